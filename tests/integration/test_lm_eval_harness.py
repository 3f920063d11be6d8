"""`tuneforge eval --lm-eval-tasks` with EleutherAI's lm-evaluation-harness installed (the `lm-eval` extra):
a local task file over a local JSONL runs on the tiny model and its results reach the printed table and
the --output report; a task that names a hub dataset fails instead of downloading it.

Opt-in (-m slow): lm-eval is an optional extra, and its imports alone take tens of seconds on the CI
machine. Without it installed these tests skip; the message `tuneforge eval` gives then is tested in
test_eval_command.py.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tuneforge.cli import main

# find_spec, not importorskip: importing lm_eval at collection would cost the default run its import time.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                                   reason="lm-eval is not installed: pip install 'tuneforge[lm-eval]'")]

QUESTIONS = [
    {"question": "Capital of France?", "choices": ["Paris", "Rome"], "label": 0},
    {"question": "Capital of Italy?", "choices": ["Paris", "Rome"], "label": 1},
    {"question": "Capital of Japan?", "choices": ["Tokyo", "Lima"], "label": 0},
    {"question": "Capital of Peru?", "choices": ["Tokyo", "Lima"], "label": 1},
]


def task_file(tmp_path, name: str, dataset: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    lines = [f"task: {name}", *dataset_lines(dataset), "output_type: multiple_choice", "test_split: test",
             'doc_to_text: "Question: {{question}}\\nAnswer:"', "doc_to_choice: choices", "doc_to_target: label",
             "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def dataset_lines(dataset: dict) -> list[str]:
    if "hub" in dataset:
        return [f"dataset_path: {dataset['hub']}"]
    return ["dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {dataset['file']}"]


def test_a_local_task_runs_on_the_tiny_model_and_reaches_the_report(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    task = task_file(tmp_path, "tiny_capitals", {"file": data})
    code = main(["eval", "--model", str(tiny_model_dir), "--lm-eval-tasks", task, "--output", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "lm-evaluation-harness:" in out and "tiny_capitals  acc,none" in out
    results = json.loads((tmp_path / "r.json").read_text())["lm_eval"]["tiny_capitals"]
    # Four two-way questions: accuracy is a multiple of 1/4, with the harness's standard error beside it.
    assert results["acc,none"] in (0.0, 0.25, 0.5, 0.75, 1.0) and "acc_stderr,none" in results


def test_a_task_naming_a_hub_dataset_fails_rather_than_downloads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find offline
    task = task_file(tmp_path, "hub_task", {"hub": "nobody/not-a-dataset"})
    with pytest.raises(Exception) as raised:
        main(["eval", "--model", str(tiny_model_dir), "--lm-eval-tasks", task])
    assert "offline" in str(raised.value).lower() or "couldn't" in str(raised.value).lower() \
        or "not found" in str(raised.value).lower(), raised.value
    assert not any((tmp_path / "hf").rglob("*.arrow"))

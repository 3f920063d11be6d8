"""`tuneforge eval` on a job, its adapter, a checkpoint and a base model; the report `tuneforge train` prints."""

import json
import os
import subprocess
import sys

import pytest

from conftest import EXAMPLE_DATA, make_job_dir
from tuneforge.cli import _print_summary, main
from tuneforge.recipes import sft
from tuneforge.spec.jobdir import EvaluationReport, read_report, read_summary

VAL = EXAMPLE_DATA / "val.jsonl"


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, tiny_model_dir):
    """One trained tiny job, shared by the tests here (read-only)."""
    root = tmp_path_factory.mktemp("eval-job")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNEFORGE_HOME", str(root / "home"))
        directory = make_job_dir(root, tiny_model_dir, training={"max_steps": 6},
                                 evaluation={"metrics": ["loss", "perplexity", "exact_match", "json_valid"],
                                             "max_eval_examples": 6, "max_new_tokens": 8, "report_samples": 2},
                                 checkpoint={"every_steps": 3, "keep_last": 2})
        sft.run(directory, progress=False)
    return directory


def run_eval(capsys, *args):
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def rows(report: EvaluationReport) -> dict:
    return {row.metric: row for row in report.rows}


def test_the_job_writes_its_report_and_train_prints_the_table(job_dir, capsys):
    summary = read_summary(job_dir)
    assert summary.report == "evaluation.json" and summary.output_step == 6
    report = read_report(job_dir)
    by_metric = rows(report)
    assert list(by_metric) == ["loss", "token_accuracy", "perplexity", "exact_match", "json_valid"]
    assert by_metric["loss"].base.value == pytest.approx(summary.eval.base.loss)
    assert by_metric["loss"].fine_tuned.value == pytest.approx(summary.eval.fine_tuned.loss)
    assert by_metric["exact_match"].fine_tuned.n == 6 and by_metric["exact_match"].fine_tuned.interval == "wilson"
    assert by_metric["loss"].fine_tuned.low <= by_metric["loss"].fine_tuned.value <= by_metric["loss"].fine_tuned.high
    assert len(report.samples) == 2 and report.samples[0].reference.startswith('{"name"')
    assert report.samples[0].base is not None and report.samples[0].fine_tuned is not None

    _print_summary(summary, job_dir)
    out = capsys.readouterr().out
    assert "metric" in out and "fine-tuned" in out and "exact_match" in out and "examples:" in out


def test_eval_of_a_job_against_its_base_reuses_the_model_with_the_adapter_off(job_dir, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "report.json"
    code, out, err = run_eval(capsys, "--model", job_dir, "--data", VAL, "--metrics", "loss,exact_match,chrf",
                              "--max-examples", 6, "--max-new-tokens", 8, "--base", "--output", output)
    assert code == 0, err
    report = EvaluationReport.model_validate_json(output.read_text())
    by_metric = rows(report)
    summary = read_summary(job_dir)
    # The base pass (adapter disabled) scores like the base model before training did; the fine-tuned
    # pass like the job's own final evaluation.
    assert by_metric["loss"].base.value == pytest.approx(summary.eval.base.loss, rel=1e-5)
    assert by_metric["loss"].fine_tuned.value == pytest.approx(summary.eval.fine_tuned.loss, rel=1e-5)
    assert by_metric["chrf"].fine_tuned.n == 6 and by_metric["chrf"].fine_tuned.interval == "bootstrap"
    assert "chrf" in out and "base" in out and "fine-tuned" in out
    # The same base model evaluated on its own gives the same numbers.
    code, _, err = run_eval(capsys, "--model", tiny_model_dir, "--data", VAL, "--metrics", "loss,exact_match,chrf",
                            "--max-examples", 6, "--max-new-tokens", 8, "--output", tmp_path / "base.json")
    assert code == 0, err
    alone = rows(EvaluationReport.model_validate_json((tmp_path / "base.json").read_text()))
    assert alone["loss"].fine_tuned is None
    assert alone["loss"].base.value == pytest.approx(by_metric["loss"].base.value, rel=1e-5)
    assert alone["chrf"].base.value == pytest.approx(by_metric["chrf"].base.value)


def test_eval_of_an_adapter_directory_and_of_a_checkpoint(job_dir, tmp_path, capsys):
    final = read_summary(job_dir).eval.fine_tuned.loss
    for model in (job_dir / "adapter", job_dir / "checkpoints" / "step-000006"):
        output = tmp_path / f"{model.name}.json"
        code, _, err = run_eval(capsys, "--model", model, "--data", VAL, "--metrics", "loss", "--max-examples", 6,
                                "--output", output)
        assert code == 0, err
        report = EvaluationReport.model_validate_json(output.read_text())
        assert rows(report)["loss"].fine_tuned.value == pytest.approx(final, rel=1e-5), model
    # An earlier checkpoint holds other weights.
    code, _, _ = run_eval(capsys, "--model", job_dir / "checkpoints" / "step-000003", "--data", VAL, "--metrics", "loss",
                          "--max-examples", 6, "--output", tmp_path / "early.json")
    early = EvaluationReport.model_validate_json((tmp_path / "early.json").read_text())
    assert code == 0 and rows(early)["loss"].fine_tuned.value != pytest.approx(final, rel=1e-5)


def test_a_spec_file_brings_graders(job_dir, tmp_path, capsys):
    spec = tmp_path / "eval.yaml"
    spec.write_text("metrics: [json_valid]\nmax_eval_examples: 4\nmax_new_tokens: 8\ngraders:\n"
                    "  - {type: string_check, name: same, input: '{{sample.output_text}}', "
                    "reference: '{{item.reference}}', operation: eq}\n")
    output = tmp_path / "graded.json"
    code, out, err = run_eval(capsys, "--model", job_dir, "--data", VAL, "--spec", spec, "--output", output)
    assert code == 0, err
    row = rows(EvaluationReport.model_validate_json(output.read_text()))["same"]
    assert row.kind == "grader" and row.fine_tuned.n == 4 and row.fine_tuned.interval == "wilson"
    assert "same" in out


def test_metric_options_come_from_the_spec_file(job_dir, tmp_path, capsys):
    spec = tmp_path / "eval.yaml"
    spec.write_text("metrics: [accuracy, json_schema, token_f1]\nmax_eval_examples: 3\nmax_new_tokens: 6\n"
                    "accuracy: {regex: '\"age\": (\\d+)', extract_reference: true}\n"
                    "json_schema: {type: object, required: [name]}\n")
    output = tmp_path / "options.json"
    code, _, err = run_eval(capsys, "--model", job_dir, "--data", VAL, "--spec", spec, "--output", output)
    assert code == 0, err
    by_metric = rows(EvaluationReport.model_validate_json(output.read_text()))
    assert set(by_metric) == {"accuracy", "json_schema", "token_f1"}
    assert all(row.fine_tuned.n == 3 for row in by_metric.values())
    # Choice letters need letter references: the data does not fit the metric, exit 2 with its reason.
    spec.write_text("metrics: [accuracy]\nmax_eval_examples: 2\nmax_new_tokens: 2\naccuracy: {choices: ABCD}\n")
    code, _, err = run_eval(capsys, "--model", job_dir, "--data", VAL, "--spec", spec)
    assert code == 2 and "not one of the choices ABCD" in err


@pytest.mark.parametrize(("args", "expected"), [
    (["--metrics", "rouge9"], "metrics.0: Input should be"),
    (["--lm-eval-tasks", "tasks/x.yaml"], "lm-evaluation-harness, which is not installed"),
    (["--base"], "is a base model"),
])
def test_bad_input_is_one_message_and_exit_2(tiny_model_dir, capsys, args, expected):
    code, _, err = run_eval(capsys, "--model", tiny_model_dir, "--data", VAL, *args)
    assert code == 2 and expected in err


def test_unknown_model_reference_says_what_is_accepted(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_eval(capsys, "--model", tmp_path / "empty", "--data", VAL)
    assert code == 2 and "not a model (no config.json), adapter" in err
    job = tmp_path / "unfinished"
    job.mkdir()
    (job / "spec.json").write_text(json.dumps({"dataset": {"path": str(VAL)}}))
    code, _, err = run_eval(capsys, "--model", job, "--data", VAL)
    assert code == 2 and "the job has no output yet" in err


SHARDED = '''
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from tuneforge.data.loading import load_examples
from tuneforge.data.templating import PromptRenderer, fit_to_length, resolve_template
from tuneforge.engine.distributed import init_distributed, shutdown
from tuneforge.engine.loss import CausalLMLoss
from tuneforge.engine.model_loading import load_tokenizer
from tuneforge.engine.precision import Precision
from tuneforge.evaluation.runner import evaluate
from tuneforge.spec.job import EvaluationSpec

parallel = init_distributed(120)
model_dir, data, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = load_tokenizer(model_dir)
examples, fmt = load_examples(data)
examples = examples[:7]  # shares of 4 and 3: the short one pads
renderer = PromptRenderer(tokenizer, resolve_template("auto", fmt, tokenizer))
tokenized, _ = fit_to_length(renderer.tokenize_many(examples), max_seq_length=512, too_long="truncate")
spec = EvaluationSpec(metrics=["loss", "exact_match", "chrf"], max_new_tokens=6, generation_batch_size=2)
result = evaluate(model, CausalLMLoss(model), tokenizer, renderer, examples, tokenized, spec, batch_size=4,
                  precision=Precision("fp32", torch.device("cpu")), parallel=parallel, details=True)
if parallel.is_main:
    details = result["details"]
    json.dump({"loss": result["loss"], "chrf": result["chrf"], "predictions": details["predictions"],
               "per_example": details["likelihood"]["per_example"]}, open(out, "w"))
shutdown()
'''


def test_two_processes_score_and_generate_their_shares_like_one(tmp_path, tiny_model_dir):
    """Every rank calls the runner: each generates a share (synced, padded to equal shares), the answers
    come back in the examples' order, and the numbers equal one process's."""
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    args = [str(tiny_model_dir), str(EXAMPLE_DATA / "val.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), *args, str(tmp_path / "two.json")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    single, sharded = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert sharded["predictions"] == single["predictions"] and len(single["predictions"]) == 7
    assert sharded["per_example"] == single["per_example"]
    assert sharded["loss"] == pytest.approx(single["loss"]) and sharded["chrf"] == pytest.approx(single["chrf"])

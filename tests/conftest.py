"""Shared fixtures: an isolated TUNEFORGE_HOME per test, a tiny model, small datasets, job directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DATA = REPO / "examples" / "json-extraction"


@pytest.fixture(autouse=True)
def tuneforge_home(tmp_path_factory, monkeypatch) -> Path:
    home = tmp_path_factory.mktemp("tuneforge-home")
    monkeypatch.setenv("TUNEFORGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tuneforge.engine.tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def byte_tokenizer():
    from tuneforge.engine.tiny_model import build_byte_tokenizer

    return build_byte_tokenizer()


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def make_job_dir(tmp_path: Path, model_dir: Path, **sections) -> Path:
    """A job directory with a spec.json for the tiny model on the example data, sections overriding."""
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import write_spec

    data = {
        "model": {"base_model": str(model_dir)},
        "dataset": {
            "path": str(EXAMPLE_DATA / "train.jsonl"),
            "validation_path": str(EXAMPLE_DATA / "val.jsonl"),
            "max_seq_length": 512,
        },
        "adapter": {"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
        "training": {"learning_rate": 3e-3, "per_device_batch_size": 8, "max_steps": 12, "seed": 0},
        "evaluation": {"metrics": ["loss", "perplexity"], "max_eval_examples": 16},
        "checkpoint": {"every_steps": 5, "keep_last": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    job_dir = tmp_path / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    write_spec(job_dir, validate_job_spec(data))
    return job_dir

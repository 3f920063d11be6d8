"""Every data format and file type trains: validate -> (convert) -> train on the tiny model."""

import pytest

from conftest import make_job_dir
from tuneforge.data.writer import write_records
from tuneforge.engine.events import read_events
from tuneforge.recipes import sft

RECORDS = {
    "chat": lambda i: {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]},
    "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"Say {i}"}, {"from": "gpt", "value": f"{i}"}]},
    "instruction": lambda i: {"instruction": "Say the number", "input": f"{i}", "output": f"{i}"},
    "completion": lambda i: {"prompt": f"Say {i}: ", "completion": f"{i}"},
    "text": lambda i: {"text": f"The number {i} follows {i - 1}."},
    "preference": lambda i: {"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"{i + 1}"},
    "openai-preference": lambda i: {"input": {"messages": [{"role": "user", "content": f"Say {i}"}]},
                                    "preferred_output": [{"role": "assistant", "content": f"{i}"}],
                                    "non_preferred_output": [{"role": "assistant", "content": f"{i + 1}"}]},
}


@pytest.mark.parametrize("kind, file_name", [
    ("chat", "d.jsonl"), ("sharegpt", "d.json"), ("instruction", "d.csv"), ("completion", "d.parquet"),
    ("text", "d.jsonl.gz"), ("preference", "d.jsonl"), ("openai-preference", "d.jsonl"),
])
def test_each_format_trains(tmp_path, tiny_model_dir, kind, file_name):
    path = tmp_path / file_name
    write_records(path, [RECORDS[kind](i) for i in range(24)])
    job_dir = make_job_dir(tmp_path, tiny_model_dir, dataset={"path": str(path), "validation_path": None,
                                                               "train_split": 0.8},
                           training={"max_steps": 3}, evaluation={"metrics": ["loss"]})
    summary = sft.run(job_dir, progress=False)
    dataset = [e["data"] for e in read_events(job_dir) if e["data"].get("kind") == "dataset"][0]
    expected = {"sharegpt": "chat", "openai-preference": "preference"}.get(kind, kind)
    assert dataset["format"] == expected and dataset["train_examples"] == 19
    assert dataset["template"] == ("plain" if kind in ("completion", "text") else "chat")
    assert summary.steps == 3 and summary.eval.fine_tuned.loss > 0

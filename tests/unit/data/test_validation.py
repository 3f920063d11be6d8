"""`tuneforge data validate`: every problem with line and field, warnings vs errors, statistics, exit codes."""

import json

import pytest

from conftest import chat, write_jsonl
from tuneforge.cli import main
from tuneforge.data.templating import PromptRenderer
from tuneforge.data.validation import validate_file


def test_report_names_lines_fields_and_kinds(tmp_path):
    records = [chat(f"q{i}", f"a{i}") for i in range(12)]
    records[3] = {"messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]}
    records[5] = '{"messages": [}'
    records[8] = chat("q0", "a0")  # a duplicate of line 1
    path = write_jsonl(tmp_path / "d.jsonl", records)
    report = validate_file(path)
    assert not report.valid and report.exit_code == 1
    assert report.counts == {"unknown_role": 1, "not_json": 1, "duplicate": 1}
    unknown = report.samples["unknown_role"][0]
    assert (unknown.line, unknown.field, unknown.found) == (4, "messages[1].role", "'wizard'")
    assert report.samples["duplicate"][0].found == "the same example as line 1"
    assert report.warnings == 1 and report.errors == 2 and report.records == 12 and report.examples == 10
    text = report.render()
    assert "unknown_role (1 error)" in text and f"{path}:4: messages[1].role: expected one of" in text


def test_duplicates_alone_are_warnings_and_few_examples_an_error(tmp_path):
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")] * 12))
    assert report.valid and report.counts["duplicate"] == 11
    small = validate_file(write_jsonl(tmp_path / "s.jsonl", [chat(f"q{i}", "a") for i in range(3)]))
    assert not small.valid and "too_few_examples" in small.counts


def test_token_statistics_and_padding_waste(tmp_path, byte_tokenizer):
    records = [chat("q" * n, "a" * (n // 2)) for n in range(5, 305, 10)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    report = validate_file(path, renderer=PromptRenderer(byte_tokenizer, "chat"), max_seq_length=400, batch_size=4)
    stats = report.stats
    lengths = sorted(len(byte_tokenizer(byte_tokenizer.apply_chat_template(r["messages"], tokenize=False),
                                        add_special_tokens=False).input_ids) for r in records)
    assert stats["tokens"]["min"] == lengths[0] and stats["tokens"]["max"] == lengths[-1]
    assert stats["over_max_seq_length"] == sum(n > 400 for n in lengths) > 0
    assert report.counts["too_long"] == stats["over_max_seq_length"] and report.valid  # a warning under "drop"
    assert stats["trainable_tokens"] == sum(n // 2 + 1 for n in range(5, 305, 10))  # answers + <|im_end|>
    padding = stats["padding"]
    assert padding["packed_real_fraction"] > 0.95 > padding["padded_real_fraction"]
    strict = validate_file(path, renderer=PromptRenderer(byte_tokenizer, "chat"), max_seq_length=400, too_long="error")
    assert not strict.valid and "too_long" not in strict.warnings_kinds


def test_cli_exit_codes_and_json(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [chat(f"q{i}", f"a{i}") for i in range(12)])
    assert main(["data", "validate", str(good), "--model", "tiny-llama"]) == 0
    assert "tokens per example" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat(f"q{i}", f"a{i}") for i in range(11)] + ["nope"])
    assert main(["data", "validate", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"]["not_json"]["first"][0]["line"] == 12
    assert main(["data", "validate", str(tmp_path / "missing.jsonl")]) == 2
    assert "unusable" in capsys.readouterr().out
    unknown = write_jsonl(tmp_path / "odd.jsonl", [{"question": "x"}])
    assert main(["data", "validate", str(unknown)]) == 2
    out = capsys.readouterr().out
    assert "unknown_format" in out and f"{unknown}:1: expected a record with messages" in out


@pytest.mark.parametrize("source, target", [
    ({"instruction": "Add", "input": "2+2", "output": "4"}, "chat"),
    ({"prompt": "2+2=", "completion": "4"}, "instruction"),
    ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}, "completion"),
    ({"prompt": "2+2=", "completion": "4"}, "text"),
    ({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}, "chat"),
    ({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "chat"),
])
def test_convert_then_validate(tmp_path, capsys, source, target):
    path = write_jsonl(tmp_path / "in.jsonl", [{**source, "id": i} for i in range(12)])
    out = tmp_path / "out.parquet"
    assert main(["data", "convert", str(path), str(out), "--to", target]) == 0
    report = validate_file(out)
    assert report.valid and report.format == target and report.examples == 12


def test_convert_refuses_to_lose_information_and_writes_nothing(tmp_path, capsys):
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path = write_jsonl(tmp_path / "in.jsonl", [chat("q", "a")] * 11 + [multi])
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(path), str(out), "--to", "instruction"]) == 1
    err = capsys.readouterr().err
    assert f"{path}:12:" in err and "4 messages" in err and "nothing was written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_split_is_deterministic_and_keeps_every_record(tmp_path, capsys):
    records = [{**chat(f"q{i}", f"a{i}"), "id": i} for i in range(100)]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    assert main(["data", "split", str(path), "--val", "0.1", "--seed", "3", "--out-dir", str(tmp_path / "a")]) == 0
    assert main(["data", "split", str(path), "--val", "0.1", "--seed", "3", "--out-dir", str(tmp_path / "b")]) == 0
    train = (tmp_path / "a" / "data.train.jsonl").read_text()
    val = (tmp_path / "a" / "data.val.jsonl").read_text()
    assert train == (tmp_path / "b" / "data.train.jsonl").read_text() and len(val.splitlines()) == 10
    ids = sorted(json.loads(line)["id"] for line in (train + val).splitlines())
    assert ids == list(range(100))  # every record once, extra fields kept

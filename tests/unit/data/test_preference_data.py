"""Preference data: the three shapes read alike and convert into each other, and `data validate` reports
pair statistics (lengths, ties, contradictions) with the lines they come from."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from tuneforge.data.command import cmd_convert
from tuneforge.data.convert import ConversionError, convert
from tuneforge.data.formats import Example, detect_format, validate_and_normalize
from tuneforge.data.loading import load_examples
from tuneforge.data.templating import PromptRenderer
from tuneforge.data.validation import validate_file

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
NORMALIZED = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Paris."}],
              "rejected": [{"role": "assistant", "content": "Lyon, I think."}]}
SHAPES = {
    "trl": {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Lyon, I think."}]},
    "trl_implicit_prompt": {"chosen": PROMPT + [{"role": "assistant", "content": "Paris."}],
                            "rejected": PROMPT + [{"role": "assistant", "content": "Lyon, I think."}]},
    "openai": {"input": {"messages": PROMPT}, "preferred_output": [{"role": "assistant", "content": "Paris."}],
               "non_preferred_output": [{"role": "assistant", "content": "Lyon, I think."}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"}],
                 "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Lyon, I think."}},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_preference_shape_reads_as_the_same_pair(shape):
    record = SHAPES[shape]
    assert detect_format(record) == "preference"
    normalized, problems = validate_and_normalize(record, "preference", file="f", line=1)
    assert not problems and normalized == NORMALIZED


@pytest.mark.parametrize("source", sorted(SHAPES))
@pytest.mark.parametrize("target", ["trl", "openai", "sharegpt"])
def test_conversion_between_shapes_round_trips(source, target):
    example = Example(1, "preference", validate_and_normalize(SHAPES[source], "preference", file="f", line=1)[0])
    written = convert(example, "preference", shape=target)
    assert written == (SHAPES[target] if target != "trl" else SHAPES["trl"])
    assert validate_and_normalize(written, "preference", file="f", line=1)[0] == NORMALIZED


def test_plain_string_pairs_stay_strings_in_trls_shape_and_multi_message_replies_refuse_openai():
    example = Example(3, "preference", {"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert convert(example, "preference", shape="trl") == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    assert convert(example, "preference", shape="openai")["input"] == {"messages": [{"role": "user", "content": "2+2?"}]}
    two = Example(4, "preference", {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"},
                                                                {"role": "assistant", "content": "b"}], "rejected": "c"})
    with pytest.raises(ConversionError, match="data:4.*2 assistant messages"):
        convert(two, "preference", shape="sharegpt")
    with pytest.raises(ValueError, match="preference data only"):
        convert(example, "chat", shape="openai")


def test_the_convert_command_writes_openai_preference(tmp_path, capsys):
    import argparse

    source = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}
                                                  for i in range(3)])
    out = tmp_path / "openai.jsonl"
    args = argparse.Namespace(input=source, output=out, to="preference", format="auto", shape="openai")
    assert cmd_convert(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"input": {"messages": [{"role": "user", "content": "q0"}]},
                       "preferred_output": [{"role": "assistant", "content": "a0"}],
                       "non_preferred_output": [{"role": "assistant", "content": "b0"}]}
    back, original = load_examples(out)[0], load_examples(source)[0]
    assert [convert(e, "preference", shape="openai") for e in back] == [convert(e, "preference", shape="openai")
                                                                       for e in original]
    args.to, args.output = "chat", tmp_path / "chat.jsonl"
    assert cmd_convert(args) == 2 and "--shape applies to --to preference only" in capsys.readouterr().err


def test_validate_reports_pair_statistics_ties_and_contradictions(tmp_path, byte_tokenizer):
    records = [{"prompt": f"q{i}", "chosen": "a much longer answer", "rejected": "short"} for i in range(10)]
    records += [{"prompt": "a?", "chosen": "yes", "rejected": "no"}, {"prompt": "a?", "chosen": "no", "rejected": "yes"},
                {"prompt": "b?", "chosen": "Hello  World", "rejected": "hello world"},
                {"prompt": "c?", "chosen": "same", "rejected": "same"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    report = validate_file(path, renderer=PromptRenderer(byte_tokenizer, "chat"))
    pairs = report.stats["pairs"]
    assert pairs["pairs"] == 13 and pairs["distinct_prompts"] == 12
    assert pairs["identical"] == 1 and pairs["ties"] == 1 and pairs["contradictory"] == 2
    assert pairs["chosen_longer"] == pytest.approx(12 / 13)
    assert pairs["chosen_chars"]["max"] == len("a much longer answer") and pairs["rejected_chars"]["min"] == 2
    # Tokens counted as training sees them: the reply through its end-of-turn token (byte-level: chars + 1).
    assert pairs["chosen_tokens"]["max"] == len("a much longer answer") + 1
    assert report.counts["identical_pair"] == 1 and report.errors == 1  # an identical pair is an error
    assert {"tied_pair", "contradictory_pair"} <= report.warnings_kinds
    assert [p.line for p in report.samples["contradictory_pair"]] == [11, 12]
    rendered = report.render()
    assert "pairs 13 (12 distinct prompts): chosen longer in 92.3%, identical 1, ties 1, contradictory 2" in rendered

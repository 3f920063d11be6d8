import pytest

from conftest import chat, write_jsonl
from tuneforge.data.formats import detect_format, validate_record
from tuneforge.data.loading import load_examples, split_examples
from tuneforge.data.problems import DataError


def kinds(record, fmt):
    return [(p.kind, p.field) for p in validate_record(record, fmt, file="f", line=1)]


def test_detects_each_format():
    assert detect_format(chat("hi", "hello")) == "chat"
    assert detect_format({"instruction": "a", "output": "b"}) == "instruction"
    assert detect_format({"prompt": "a", "completion": "b"}) == "completion"
    assert detect_format({"foo": 1}) is None


def test_chat_problems_name_the_field():
    assert kinds({"messages": [{"role": "user", "content": "hi"}]}, "chat") == [("no_assistant_turn", "messages")]
    assert kinds({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "chat") == [
        ("unknown_role", "messages[0].role")
    ]
    assert kinds({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "chat") == [
        ("wrong_type", "messages[0].content")
    ]
    assert kinds({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "chat") == [
        ("empty_content", "messages[1].content")
    ]
    assert kinds({"messages": "hello"}, "chat") == [("wrong_type", "messages")]
    assert kinds({"messages": [{"role": "assistant", "content": "x"}]}, "chat") == [("roles_out_of_order", "messages[0].role")]


def test_instruction_and_completion_fields():
    assert kinds({"instruction": "a", "output": "b"}, "instruction") == []
    assert kinds({"instruction": "a", "input": 5, "output": "b"}, "instruction") == [("wrong_type", "input")]
    assert kinds({"prompt": "a"}, "completion") == [("missing_field", "completion")]


def test_load_reports_every_bad_line(tmp_path):
    good = [chat(f"q{i}", f"a{i}") for i in range(12)]
    lines = [good[0], "{not json", good[1], {"messages": [{"role": "user", "content": "x"}]}] + good[2:]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_examples(path, min_examples=10)
    problems = {(p.line, p.kind, p.field) for p in err.value.problems}
    assert problems == {(2, "not_json", ""), (4, "no_assistant_turn", "messages")}
    assert f"{path}:2: expected a JSON object, found invalid JSON" in str(err.value)


def test_load_detects_format_and_requires_enough_examples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    examples, fmt = load_examples(path)
    assert fmt == "completion" and len(examples) == 3 and examples[0].line == 1
    with pytest.raises(DataError, match="at least 10 examples"):
        load_examples(path, min_examples=10)
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match="cannot tell the dataset format from line 1"):
        load_examples(unknown)
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")


def test_split_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(40)])
    examples, _ = load_examples(path)
    train, val = split_examples(examples, 0.9, seed=3)
    again, val_again = split_examples(examples, 0.9, seed=3)
    assert [e.line for e in val] == [e.line for e in val_again] and len(val) == 4
    assert {e.line for e in train}.isdisjoint({e.line for e in val}) and len(train) + len(val) == 40


def normalized(record, fmt):
    from tuneforge.data.formats import validate_and_normalize

    return validate_and_normalize(record, fmt, file="f", line=1)


def test_sharegpt_becomes_chat():
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                                {"from": "gpt", "value": "hello"}]}
    assert detect_format(record) == "chat"
    result, problems = normalized(record, "chat")
    assert problems == [] and [m["role"] for m in result["messages"]] == ["system", "user", "assistant"]
    _, problems = normalized({"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}, "chat")
    assert [(p.kind, p.field) for p in problems] == [("unknown_role", "conversations[0].role")]


def test_text_and_preference_formats():
    assert detect_format({"text": "once upon a time"}) == "text"
    assert normalized({"text": ""}, "text")[1][0].kind == "empty_content"
    plain = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    assert detect_format(plain) == "preference" and normalized(plain, "preference") == (plain, [])
    same = {"prompt": "2+2?", "chosen": "4", "rejected": "4"}
    assert normalized(same, "preference")[1][0].kind == "identical_pair"
    openai = {"input": {"messages": [{"role": "user", "content": "2+2?"}]},
              "preferred_output": [{"role": "assistant", "content": "4"}],
              "non_preferred_output": [{"role": "assistant", "content": "5"}]}
    result, problems = normalized(openai, "preference")
    assert problems == [] and result["prompt"] == [{"role": "user", "content": "2+2?"}]
    broken = dict(openai, preferred_output=[{"role": "user", "content": "4"}])
    assert [(p.kind, p.field) for p in normalized(broken, "preference")[1]] == [("unknown_role", "preferred_output[0].role")]


def test_prompt_records_are_what_online_rl_samples_from_and_keep_their_fields():
    from tuneforge.data.formats import Example, detect_format, validate_and_normalize

    openai_rft = {"messages": [{"role": "developer", "content": "Answer with a number."},
                               {"role": "user", "content": "2+2?"}], "reference_answer": "4"}
    assert detect_format(openai_rft) == "prompt"
    assert detect_format({"prompt": "2+2?", "answer": "4"}) == "prompt"
    assert detect_format({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) == "chat"
    normalized, problems = validate_and_normalize(openai_rft, "prompt", file="p.jsonl", line=1)
    assert problems == [] and normalized["reference_answer"] == "4"  # graders read it as {{item.reference_answer}}
    reference = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a reference"}]}
    assert Example(1, "prompt", reference).as_messages() == [{"role": "user", "content": "q"}]
    _, problems = validate_and_normalize({"messages": [{"role": "assistant", "content": "a"}]}, "prompt",
                                         file="p.jsonl", line=3)
    assert [(p.line, p.kind, p.field) for p in problems] == [(3, "no_prompt_turn", "messages")]
    _, problems = validate_and_normalize({"messages": [{"role": "robot", "content": "a"}]}, "prompt", file="p.jsonl",
                                         line=4)
    assert problems[0].kind == "unknown_role" and problems[0].field == "messages[0].role"

"""Graders in OpenAI's shapes on fixtures: string checks, similarities against their reference libraries,
templates, judge prompts and parsing (a scripted judge and a real local one), multi formulas, refusals."""

from __future__ import annotations

import difflib

import pytest
import sacrebleu
from nltk.translate.gleu_score import sentence_gleu
from pydantic import TypeAdapter, ValidationError
from rouge_score import rouge_scorer

from tuneforge.evaluation.graders import (
    GraderError,
    build_grader,
    compile_formula,
    parse_label,
    parse_score,
    wordnet_problem,
)
from tuneforge.spec.graders import Grader, MultiGrader

OUTPUT = "{{sample.output_text}}"


def string_check(operation: str, reference: str = "{{item.answer}}", name: str = "check") -> dict:
    return {"type": "string_check", "name": name, "input": OUTPUT, "reference": reference, "operation": operation}


def similarity(metric: str, threshold: float | None = None, name: str = "similar") -> dict:
    spec = {"type": "text_similarity", "name": name, "input": OUTPUT, "reference": "{{item.answer}}",
            "evaluation_metric": metric}
    return spec if threshold is None else {**spec, "pass_threshold": threshold}


def samples(*texts: str) -> list[dict]:
    return [{"output_text": text} for text in texts]


class ScriptedJudge:
    """A Judge that replies from a script and records every call."""

    def __init__(self, replies: list[str]):
        self.replies, self.calls = list(replies), []

    def complete(self, conversations, *, max_tokens, temperature, seed):
        self.calls.append({"conversations": conversations, "max_tokens": max_tokens, "temperature": temperature,
                           "seed": seed})
        replies, self.replies = self.replies[: len(conversations)], self.replies[len(conversations) :]
        return replies


def scripted(judge: ScriptedJudge, seen: list | None = None):
    def judges(model, endpoint):
        if seen is not None:
            seen.append((model, endpoint))
        return judge

    return judges


# ------------------------------------------------------------------------------------------ string_check


@pytest.mark.parametrize(("operation", "expected"), [
    ("eq", [1.0, 0.0, 0.0, 0.0]),
    ("ne", [0.0, 1.0, 1.0, 1.0]),
    ("like", [1.0, 0.0, 1.0, 0.0]),
    ("ilike", [1.0, 1.0, 1.0, 0.0]),
])
def test_string_check_operations(operation, expected):
    grader = build_grader(string_check(operation))
    items = [{"answer": "Paris"}] * 4
    results = grader.grade(items, samples("Paris", "paris", "It is Paris.", "Lyon"))
    assert [r.score for r in results] == expected
    assert [r.passed for r in results] == [s == 1.0 for s in expected]


# ------------------------------------------------------------------------------------------ templates


def test_templates_render_nested_fields_list_indexes_json_values_and_output_json():
    reference = ("{{item.meta.city}}|{{item.choices.1}}|{{item.count}}|{{item.tags}}|{{ sample.output_json.city }}|"
                 "{{sample.output_text}}")
    item = {"meta": {"city": "Paris"}, "choices": ["Lyon", "Nice"], "count": 3, "tags": ["a", True]}
    output = '{"city": "Paris"}'
    rendered = 'Paris|Nice|3|["a", true]|Paris|' + output
    grader = build_grader({**string_check("eq", reference=reference), "input": rendered})
    assert grader.grade([item], samples(output))[0].score == 1.0
    grader = build_grader({**string_check("eq", reference=reference), "input": rendered + "!"})
    assert grader.grade([item], samples(output))[0].score == 0.0


def test_a_missing_item_field_names_the_template_and_the_field():
    grader = build_grader(string_check("eq", reference="answer: {{item.meta.answer}}", name="exact"))
    with pytest.raises(GraderError, match=r"grader 'exact': reference 'answer: \{\{item.meta.answer\}\}' names "
                       r"\{\{item.meta.answer\}\}, but item 1 has no field 'meta.answer'"):
        grader.grade([{"meta": {"answer": "x"}}, {"meta": {"question": "?"}}], samples("x", "y"))
    with pytest.raises(GraderError, match=r"but item 0 has no field 'choices.5'"):
        build_grader(string_check("eq", reference="{{item.choices.5}}")).grade([{"choices": ["a"]}], samples("a"))
    with pytest.raises(GraderError, match=r"but sample 0 has no field 'output_tools'"):
        build_grader(string_check("eq", reference="{{sample.output_tools}}")).grade([{}], samples("a"))


def test_output_json_that_is_not_there_fails_that_item_only():
    grader = build_grader({**string_check("eq", reference="{{sample.output_json.city}}"), "input": "Paris"})
    results = grader.grade([{}] * 4, samples('{"city": "Paris"}', "Paris", '{"town": "Paris"}',
                                               '```json\n{"city": "Lyon"}\n```'))
    assert [r.score for r in results] == [1.0, None, None, 0.0]
    assert results[1].error == "{{sample.output_json.city}}: the output is not JSON"
    assert results[2].error == "{{sample.output_json.city}}: the output's JSON has no field 'city'"
    assert results[1].passed is None


def test_templates_may_only_name_item_and_sample():
    with pytest.raises(ValidationError, match=r"templates name item.<field> or sample.<field>"):
        TypeAdapter(Grader).validate_python(string_check("eq", reference="{{env.HOME}}"))
    with pytest.raises(GraderError, match=r"templates name item.<field> or sample.<field>"):
        build_grader(string_check("eq", reference="{{env.HOME}}"))


def test_items_and_samples_must_pair_up():
    with pytest.raises(GraderError, match="2 items but 1 samples"):
        build_grader(string_check("eq")).grade([{}, {}], samples("a"))
    assert build_grader(string_check("eq")).grade([], []) == []


# ------------------------------------------------------------------------------------------ text_similarity

PAIRS = [
    ("the cat is on the mat", "the cat sat on the mat"),
    ("a quick brown fox jumps over the lazy dog", "the quick brown fox jumped over the lazy dog"),
    ("completely different words", "the cat sat on the mat"),
    ("the cat sat on the mat", "the cat sat on the mat"),
]


def grade_pairs(spec: dict):
    return build_grader(spec).grade([{"answer": ref} for _, ref in PAIRS], samples(*(out for out, _ in PAIRS)))


@pytest.mark.parametrize("metric", ["rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"])
def test_rouge_similarity_equals_rouge_score(metric):
    kind = "rougeL" if metric == "rouge_l" else "rouge" + metric[-1]
    scorer = rouge_scorer.RougeScorer([kind])
    expected = [scorer.score(ref, out)[kind].fmeasure for out, ref in PAIRS]
    assert [r.score for r in grade_pairs(similarity(metric))] == pytest.approx(expected)
    assert expected[-1] == 1.0 and 0.0 <= min(expected)


def test_bleu_similarity_is_sacrebleu_sentence_bleu_over_100():
    expected = [sacrebleu.sentence_bleu(out, [ref]).score / 100 for out, ref in PAIRS]
    assert [r.score for r in grade_pairs(similarity("bleu"))] == pytest.approx(expected)
    assert expected[-1] == pytest.approx(1.0)


def test_gleu_similarity_is_nltk_sentence_gleu():
    expected = [sentence_gleu([ref.split()], out.split()) for out, ref in PAIRS]
    assert [r.score for r in grade_pairs(similarity("gleu"))] == pytest.approx(expected)
    # By hand: "a b c" vs "a b d" have 6 n-grams of orders 1-4 each (3 + 2 + 1), 3 in common (a, b, a b):
    # min(precision, recall) = 3/6.
    grader = build_grader(similarity("gleu"))
    assert grader.grade([{"answer": "a b d"}], samples("a b c"))[0].score == pytest.approx(3 / 6)


def test_fuzzy_match_is_a_normalized_edit_similarity():
    grader = build_grader(similarity("fuzzy_match", threshold=0.75))
    results = grader.grade([{"answer": "hallo"}, {"answer": "abc"}, {"answer": "kitten"}],
                           samples("hello", "xyz", "kitten"))
    # "hello" vs "hallo": one substitution is two indel edits of 10 characters: 1 - 2/10.
    assert [r.score for r in results] == pytest.approx([0.8, 0.0, 1.0])
    assert [r.passed for r in results] == [True, False, True]
    assert results[0].score == pytest.approx(difflib.SequenceMatcher(None, "hello", "hallo").ratio())


def test_no_pass_threshold_means_no_verdict():
    assert grade_pairs(similarity("rouge_1"))[0].passed is None
    assert [r.passed for r in grade_pairs(similarity("rouge_1", threshold=0.9))] == [False, False, False, True]


def test_meteor_is_refused_at_build_time_without_wordnet(monkeypatch, tmp_path):
    import nltk

    if wordnet_problem() is None:
        pytest.skip("WordNet is installed here, so meteor is available")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(GraderError, match=r"grader 'similar': evaluation_metric meteor needs NLTK's WordNet data.*"
                       r"python -m nltk.downloader wordnet"):
        build_grader(similarity("meteor"))


def test_meteor_equals_nltk_when_wordnet_is_installed():
    if wordnet_problem() is not None:
        pytest.skip("NLTK's WordNet data is not installed")
    from nltk.translate.meteor_score import single_meteor_score

    expected = [single_meteor_score(ref.split(), out.split()) for out, ref in PAIRS]
    assert [r.score for r in grade_pairs(similarity("meteor"))] == pytest.approx(expected)


def test_cosine_is_refused_at_build_time():
    with pytest.raises(GraderError, match="cosine compares embeddings, and tuneforge runs no embeddings model"):
        build_grader(similarity("cosine"))


# ------------------------------------------------------------------------------------------ python


def test_the_python_grader_is_refused():
    python = {"type": "python", "name": "run-me", "source": "def grade(sample, item): return 1.0"}
    with pytest.raises(GraderError, match="the python grader runs arbitrary code"):
        build_grader(python)
    with pytest.raises(ValidationError, match="the python grader runs arbitrary code"):
        TypeAdapter(Grader).validate_python(python)
    multi = {"type": "multi", "name": "m", "graders": {"a": python}, "calculate_output": "a"}
    with pytest.raises(GraderError, match="the python grader runs arbitrary code"):
        build_grader(multi)


# ------------------------------------------------------------------------------------------ model graders


def score_model(**overrides) -> dict:
    spec = {
        "type": "score_model", "name": "quality", "model": "judge-model",
        "input": [
            {"role": "developer", "content": "You grade answers to {{item.question}}."},
            {"role": "user", "content": "Reference: {{item.answer}}\nAnswer: {{sample.output_text}}"},
        ],
        "range": [1, 10], "pass_threshold": 7,
    }
    return {**spec, **overrides}


def test_score_model_sends_one_batch_and_parses_the_scores():
    judge = ScriptedJudge(["8", "Score: 3/10", "I cannot decide", '{"result": 12, "steps": []}', "-4"])
    seen = []
    grader = build_grader(score_model(sampling_params={"temperature": 0.5, "seed": 7, "max_completions_tokens": 20}),
                          judges=scripted(judge, seen))
    items = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    results = grader.grade(items, samples(*(f"o{i}" for i in range(5))))

    assert seen == [("judge-model", None)]
    assert len(judge.calls) == 1  # the whole batch in one call
    call = judge.calls[0]
    assert (call["max_tokens"], call["temperature"], call["seed"]) == (20, 0.5, 7)
    first = call["conversations"][0]
    assert first[0]["role"] == "system"  # OpenAI's developer role, as local chat templates know it
    assert first[0]["content"].startswith("You grade answers to q0.\n\n")
    assert "only a number from 1 to 10" in first[0]["content"]
    assert first[1] == {"role": "user", "content": "Reference: a0\nAnswer: o0"}

    assert [r.score for r in results] == [8.0, 3.0, None, 10.0, 1.0]  # clamped to the range
    assert [r.passed for r in results] == [True, False, None, True, False]
    assert results[2].error == "the judge gave no number in [1, 10]"
    assert results[2].judge_output == "I cannot decide"


def test_judge_defaults_and_a_system_message_is_added_when_there_is_none():
    judge = ScriptedJudge(["0.5"])
    spec = score_model(input=[{"role": "user", "content": "{{sample.output_text}}"}], range=[0, 1],
                       pass_threshold=None)
    result = build_grader(spec, judges=scripted(judge)).grade([{}], samples("hi"))[0]
    call = judge.calls[0]
    assert (call["max_tokens"], call["temperature"], call["seed"]) == (128, 0.0, None)
    assert [m["role"] for m in call["conversations"][0]] == ["system", "user"]
    assert (result.score, result.passed) == (0.5, None)


def test_top_p_is_refused_not_ignored():
    with pytest.raises(GraderError, match="sampling_params.top_p is not supported"):
        build_grader(score_model(sampling_params={"top_p": 0.9}), judges=scripted(ScriptedJudge([])))


def test_items_whose_output_json_is_missing_are_not_sent_to_the_judge():
    judge = ScriptedJudge(["9"])
    spec = score_model(input=[{"role": "user", "content": "{{sample.output_json.answer}}"}])
    results = build_grader(spec, judges=scripted(judge)).grade([{}, {}], samples("not json", '{"answer": "x"}'))
    assert len(judge.calls[0]["conversations"]) == 1
    assert [r.score for r in results] == [None, 9.0]
    assert "the output is not JSON" in results[0].error


def test_parse_score():
    assert parse_score("7", 0, 10) == 7.0
    assert parse_score("I'd say 0.75 overall.", 0, 1) == 0.75
    assert parse_score("```json\n{\"score\": 4}\n```", 0, 5) == 4.0
    assert parse_score("-3", -5, 5) == -3.0
    assert parse_score("150", 0, 100) == 100.0 and parse_score("-1", 0, 1) == 0.0
    assert parse_score("no idea", 0, 1) is None and parse_score("", 0, 1) is None


def label_model(**overrides) -> dict:
    spec = {
        "type": "label_model", "name": "tone", "model": "judge-model",
        "input": [{"role": "user", "content": "Classify the tone of: {{sample.output_text}}"}],
        "labels": ["positive", "neutral", "negative"], "passing_labels": ["positive", "neutral"],
    }
    return {**spec, **overrides}


def test_label_model_picks_a_label_and_passes_on_passing_labels():
    judge = ScriptedJudge(["positive", "Negative.", "I would call it neutral, not negative", "happy"])
    grader = build_grader(label_model(), judges=scripted(judge))
    results = grader.grade([{}] * 4, samples("great", "awful", "ok", "?"))
    assert len(judge.calls) == 1
    instruction = judge.calls[0]["conversations"][0][0]["content"]
    assert instruction == "Reply with exactly one of these labels and nothing else: positive, neutral, negative."
    assert [r.label for r in results] == ["positive", "negative", "neutral", None]
    assert [r.score for r in results] == [1.0, 0.0, 1.0, None]
    assert [r.passed for r in results] == [True, False, True, None]
    assert "named none of the labels" in results[3].error


def test_parse_label():
    labels = ["good", "very good", "bad"]
    assert parse_label(" 'Very Good' ", labels) == "very good"
    assert parse_label("This is very good work", labels) == "very good"  # the longer label at the same place
    assert parse_label("goodness me", labels) is None  # whole words only
    assert parse_label("bad, not good", labels) == "bad"


def test_a_local_judge_on_a_tiny_model(tiny_model_dir):
    """The default judges path: judges.judge_for loads the model and answers greedily; the grader gets
    exactly what that judge says about exactly the conversation it should build."""
    from tuneforge.evaluation.judges import clear_local_judges, local_judge

    spec = score_model(model=str(tiny_model_dir), sampling_params={"max_completions_tokens": 6},
                       input=[{"role": "user", "content": "Rate {{sample.output_text}} against {{item.answer}}."}])
    try:
        grader = build_grader(spec)
        results = grader.grade([{"answer": "4"}, {"answer": "5"}], samples("four", "5"))
        judge = local_judge(str(tiny_model_dir))
        conversation = [{"role": "system", "content": grader.instruction()},
                        {"role": "user", "content": "Rate four against 4."}]
        expected = judge.complete([conversation], max_tokens=6, temperature=0.0, seed=None)[0]
    finally:
        clear_local_judges()
    assert len(results) == 2
    assert results[0].judge_output == expected
    parsed = parse_score(expected, 1, 10)
    assert results[0].score == parsed
    if parsed is None:
        assert results[0].error == "the judge gave no number in [1, 10]"
    else:
        assert 1 <= results[0].score <= 10


# ------------------------------------------------------------------------------------------ multi


def test_multi_combines_named_graders_with_its_formula():
    judge = ScriptedJudge(["10", "4", "7"])
    spec = {
        "type": "multi", "name": "overall",
        "graders": {"exact": string_check("eq", name="exact"), "judge": score_model(name="judge"),
                    "overlap": similarity("rouge_1", name="overlap")},
        "calculate_output": "0.5 * exact + 0.5 * judge / 10 + 0 * max(overlap, 1)",
        "pass_threshold": 0.6,
    }
    grader = build_grader(spec, judges=scripted(judge))
    items = [{"question": "q", "answer": "Paris"}] * 3
    results = grader.grade(items, samples("Paris", "Paris", "Lyon"))
    assert len(judge.calls) == 1 and len(judge.calls[0]["conversations"]) == 3
    assert [r.score for r in results] == pytest.approx([1.0, 0.7, 0.35])
    assert [r.passed for r in results] == [True, True, False]
    assert results[2].sub_scores == {"exact": 0.0, "judge": 7.0, "overlap": 0.0}


def test_multi_item_errors_carry_the_reason():
    judge = ScriptedJudge(["no score", "5"])
    spec = {"type": "multi", "name": "m", "graders": {"j": score_model(name="j", range=[0, 10]),
                                                      "e": string_check("eq", name="e")},
            "calculate_output": "e / (j - 5)"}
    results = build_grader(spec, judges=scripted(judge)).grade([{"question": "q", "answer": "x"}] * 2,
                                                               samples("x", "x"))
    assert results[0].score is None and results[0].error == "j: the judge gave no number in [0, 10]"
    assert results[1].score is None and "division by zero" in results[1].error
    assert results[1].sub_scores == {"j": 5.0, "e": 1.0}


def test_formula_functions():
    formula = compile_formula("min(a, b) + max(a) + abs(-b) + floor(2.7) + ceil(a) + exp(0) + sqrt(4) + log(1)",
                              ["a", "b"])
    assert formula({"a": 0.5, "b": 0.25}) == pytest.approx(0.25 + 0.5 + 0.25 + 2 + 1 + 1 + 2 + 0)
    assert compile_formula("(a + b) * 2 / 4", ["a", "b"])({"a": 1.0, "b": 3.0}) == 2.0


@pytest.mark.parametrize("formula", [
    "__import__('os')",
    "__import__('os').system('true')",
    "a.__class__",
    "a ** 2",
    "a if b else 1",
    "(lambda: 1)()",
    "[a, b]",
    "a < b",
    "a % 2",
    "'text'",
    "sqrt(x=a)",
    "abs(a, b)",
    "open('f')",
    "c",
    "-" * 300 + "a",
])
def test_formulas_beyond_arithmetic_are_refused(formula):
    with pytest.raises(GraderError, match="calculate_output"):
        compile_formula(formula, ["a", "b"])


def test_the_spec_refuses_bad_formulas_before_the_runner_sees_them():
    graders = {"a": string_check("eq", name="a")}
    with pytest.raises(ValidationError, match="calculate_output may hold grader names"):
        MultiGrader.model_validate({"type": "multi", "name": "m", "graders": graders,
                                    "calculate_output": "__import__('os')"})
    with pytest.raises(ValidationError, match="neither a grader"):
        MultiGrader.model_validate({"type": "multi", "name": "m", "graders": graders, "calculate_output": "a + b"})
    # A spec built without validation still meets the runner's own parser.
    checked = TypeAdapter(Grader).validate_python(string_check("eq", name="a"))
    unchecked = MultiGrader.model_construct(type="multi", name="m", graders={"a": checked},
                                            calculate_output="a.__class__", pass_threshold=None)
    with pytest.raises(GraderError, match="'a.__class__' is not allowed"):
        build_grader(unchecked)


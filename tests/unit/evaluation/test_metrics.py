"""Generation metrics: equal to the reference libraries on the same inputs, and to hand-computed values."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

from tuneforge.evaluation.metrics import METRICS, MetricError, extract_choice, score, token_f1

PREDICTIONS = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "Paris is the capital of France.",
    "He was running to the station",
    "",
]
REFERENCES = [
    "the cat is on the mat",
    "the quick brown fox jumped over the lazy dog",
    "The capital of France is Paris.",
    "he runs to the train station",
    "nothing here",
]


@pytest.mark.parametrize("name", ["rouge1", "rouge2", "rougeL"])
@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score(name, use_stemmer):
    scorer = rouge_scorer.RougeScorer([name], use_stemmer=use_stemmer)
    expected = [scorer.score(r, p)[name].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)]
    result = score(name, PREDICTIONS, REFERENCES, options={"use_stemmer": use_stemmer})
    assert result.per_example == pytest.approx(expected)
    assert result.value == pytest.approx(sum(expected) / len(expected))
    assert result.n == 5 and not result.corpus


def test_rouge_by_hand_and_the_stemmer_option_is_used():
    # 5 of 6 unigrams in common each way (the, the, cat, on, mat): P = R = F = 5/6.
    assert score("rouge1", ["the cat sat on the mat"], ["the cat is on the mat"]).value == pytest.approx(5 / 6)
    # bigrams: "the cat", "on the", "the mat" of 5 each way: 3/5.
    assert score("rouge2", ["the cat sat on the mat"], ["the cat is on the mat"]).value == pytest.approx(3 / 5)
    assert score("rouge1", ["running dogs"], ["run dog"]).value == 0.0
    assert score("rouge1", ["running dogs"], ["run dog"], options={"use_stemmer": True}).value == 1.0


@pytest.mark.parametrize("options", [{}, {"lowercase": True}, {"tokenize": "char"}, {"tokenize": "intl"}])
def test_bleu_equals_sacrebleu_corpus_bleu(options):
    result = score("bleu", PREDICTIONS, REFERENCES, options=options)
    assert result.value == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES], **options).score)
    assert result.corpus and result.n == 5
    assert result.per_example == pytest.approx(
        [sacrebleu.sentence_bleu(p, [r], **options).score for p, r in zip(PREDICTIONS, REFERENCES)]
    )


def test_bleu_by_hand():
    # Modified n-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths, so no brevity penalty.
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert score("bleu", ["a b c d e"], ["a b c d f"]).value == pytest.approx(expected)
    assert score("bleu", ["The Cat sat down"], ["the cat sat down"], options={"lowercase": True}).value == \
        pytest.approx(100.0)
    assert score("bleu", ["The Cat sat down"], ["the cat sat down"]).value < 100.0


@pytest.mark.parametrize("options", [{}, {"word_order": 2}, {"lowercase": True}])
def test_chrf_equals_sacrebleu(options):
    result = score("chrf", PREDICTIONS, REFERENCES, options=options)
    reference = CHRF(**options)  # sacrebleu.corpus_chrf has no lowercase argument; its CHRF class does
    assert result.value == pytest.approx(reference.corpus_score(PREDICTIONS, [REFERENCES]).score)
    assert result.per_example == pytest.approx(
        [reference.sentence_score(p, [r]).score for p, r in zip(PREDICTIONS, REFERENCES)]
    )
    if "lowercase" not in options:
        assert result.value == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES], **options).score)
    assert score("chrf", ["same words"], ["same words"], options=options).value == pytest.approx(100.0)


def test_exact_match_ignores_whitespace_only():
    result = score("exact_match", ["Paris\n", " two  words ", "paris"], ["Paris", "two words", "Paris"])
    assert result.per_example == [1.0, 1.0, 0.0]
    assert result.value == pytest.approx(2 / 3)


def test_token_f1_by_hand():
    # SQuAD normalization drops "the": [cat sat on mat] vs [cat is on mat], 3 in common: P = R = 3/4.
    assert token_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.75)
    # 2 of 3 predicted tokens, 2 of 2 gold: P = 2/3, R = 1, F1 = 0.8.
    assert token_f1("Eiffel Tower Paris", "the Eiffel tower!") == pytest.approx(0.8)
    assert token_f1("The answer.", "answer") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("a b", "c d") == 0.0
    result = score("token_f1", ["the cat sat on the mat", "no"], ["the cat is on the mat", "yes"])
    assert result.per_example == pytest.approx([0.75, 0.0]) and result.value == pytest.approx(0.375)


def test_accuracy_with_a_regex_extractor():
    options = {"regex": r"[Aa]nswer:\s*(-?\d+)"}
    outputs = ["Reasoning... Answer: 42", "answer: 7 or so", "I do not know", "Answer: 100"]
    result = score("accuracy", outputs, ["42", "8", "3", " 100\n"], options=options)
    assert result.per_example == [1.0, 0.0, 0.0, 1.0] and result.value == 0.5
    # GSM8K style: the reference holds its answer after "####" too.
    gsm = {"regex": r"####\s*(\S+)", "extract_reference": True}
    result = score("accuracy", ["so 3 + 4 = 7\n#### 7", "#### 8"], ["3 plus 4\n#### 7", "#### 9"], options=gsm)
    assert result.per_example == [1.0, 0.0]


def test_accuracy_with_choice_letters():
    outputs = ["B", "(c)", "The answer is D.", "A good answer is C", "B) because it is", "I cannot tell", "Answer: A"]
    result = score("accuracy", outputs, ["B", "C", "D", "C", "(A)", "A", "A"], options={"choices": "ABCD"})
    assert result.per_example == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert extract_choice("I think it is E", "ABCD") is None
    with pytest.raises(MetricError, match=r"reference 1 is 'E', not one of the choices ABCD"):
        score("accuracy", ["A", "B"], ["A", "E"], options={"choices": "ABCD"})


@pytest.mark.parametrize(("options", "message"), [
    (None, "needs exactly one answer extractor"),
    ({"regex": "(a)", "choices": "AB"}, "needs exactly one answer extractor"),
    ({"regex": r"(\d+)-(\d+)"}, r"options.regex: needs exactly one capturing group \(the answer\), found 2"),
    ({"regex": "(unclosed"}, "options.regex: not a valid regular expression"),
    ({"choices": "abcd"}, "options.choices: must be two or more distinct capital letters"),
    ({"choices": "AAB"}, "options.choices: must be two or more distinct capital letters"),
    ({"choices": "AB", "extract_reference": True}, "extract_reference applies to options.regex only"),
    ({"regex": "(a)", "pattern": "x"}, "options.pattern: unknown option; accuracy takes regex, choices, "
     "extract_reference"),
])
def test_accuracy_options_are_validated_by_name(options, message):
    with pytest.raises(MetricError, match=message):
        score("accuracy", ["a"], ["a"], options=options)


def test_json_validity():
    outputs = ['{"a": 1}', "[1, 2]", "{'a': 1}", '```json\n{"a": 1}\n```', "not json", ' "text" \n']
    assert score("json_valid", outputs).per_example == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    fenced = score("json_valid", outputs, options={"allow_code_fence": True})
    assert fenced.per_example == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0] and fenced.value == pytest.approx(4 / 6)


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_match_and_mismatch():
    outputs = [
        '{"name": "Ada", "age": 36}',  # matches
        '{"name": "Ada", "age": -1}',  # below the minimum
        '{"name": "Ada"}',  # misses a required field
        '{"name": "Ada", "age": 36, "city": "London"}',  # an extra field
        '{"name": "Ada", "age": "36"}',  # wrong type
        "Ada, 36",  # not JSON at all
    ]
    result = score("json_schema", outputs, options={"schema": SCHEMA})
    assert result.per_example == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0] and result.value == pytest.approx(1 / 6)


def test_json_schema_option_errors_name_the_option():
    with pytest.raises(MetricError, match=r"metric json_schema: options.schema: Field required"):
        score("json_schema", ["{}"])
    with pytest.raises(MetricError, match=r"options.schema: not a valid JSON Schema"):
        score("json_schema", ["{}"], options={"schema": {"type": "no-such-type"}})
    with pytest.raises(MetricError, match=r"options.schema: cannot resolve the reference 'http://127.0.0.1:9/s.json'"):
        score("json_schema", ["{}"], options={"schema": {"$ref": "http://127.0.0.1:9/s.json"}})
    local_ref = {"$defs": {"age": {"type": "integer"}}, "type": "object",
                 "properties": {"age": {"$ref": "#/$defs/age"}}}
    assert score("json_schema", ['{"age": 3}', '{"age": "3"}'], options={"schema": local_ref}).per_example == [1.0, 0.0]


def test_names_inputs_and_empty_sets():
    assert set(METRICS) == {"rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "token_f1", "accuracy",
                            "json_valid", "json_schema"}
    with pytest.raises(MetricError, match=r"unknown metric 'rougel' \(did you mean rougeL\?\)"):
        score("rougel", ["a"], ["a"])
    with pytest.raises(MetricError, match="2 predictions but 1 references"):
        score("exact_match", ["a", "b"], ["a"])
    with pytest.raises(MetricError, match="compares with references; none were given"):
        score("rouge1", ["a"])
    with pytest.raises(MetricError, match=r"references\[1\] is int, not text"):
        score("exact_match", ["a", "b"], ["a", 2])
    with pytest.raises(MetricError, match="options.use_stemmer: unknown option; bleu takes tokenize, lowercase"):
        score("bleu", ["a"], ["a"], options={"use_stemmer": True})
    with pytest.raises(MetricError, match="options.tokenize"):
        score("bleu", ["a"], ["a"], options={"tokenize": "spm"})  # would download a model
    with pytest.raises(MetricError, match="exact_match takes no options"):
        score("exact_match", ["a"], ["a"], options={"lowercase": True})
    empty = score("bleu", [], [])
    assert (empty.value, empty.n, empty.per_example, empty.corpus) == (0.0, 0, [], True)
    assert not math.isnan(score("rougeL", [""], [""]).value)


def test_metrics_and_graders_do_not_import_torch():
    code = (
        "import sys\n"
        "from tuneforge.evaluation.metrics import score\n"
        "from tuneforge.evaluation.graders import build_grader\n"
        "for name in ('rouge1', 'bleu', 'chrf', 'token_f1'): score(name, ['a b c'], ['a b d'])\n"
        "build_grader({'type': 'text_similarity', 'name': 'g', 'input': '{{sample.output_text}}', "
        "'reference': 'x', 'evaluation_metric': 'gleu'}).grade([{}], [{'output_text': 'x'}])\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

"""Generation metrics on (predictions, references), each computed by the library the field trusts for it.

ROUGE comes from `rouge-score`, BLEU and chrF from `sacrebleu` (corpus-level, 0-100, as sacrebleu reports
them), JSON-schema match from `jsonschema`; exact match, SQuAD token F1, answer-extracted accuracy and JSON
validity are small enough to write here. One closed table of names (`METRICS`), one entry point (`score`),
torch-free so the control plane can validate metric names and options without loading a model.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.spec.job import one_group_pattern


@dataclass(frozen=True)
class MetricScore:
    """A metric over n examples.

    value: the metric as reported (mean of per_example, except for bleu and chrf, where it is sacrebleu's
    corpus score: corpus=True). per_example: one score per example, in input order, for confidence
    intervals and for picking examples to show (for bleu and chrf the sentence-level score; a confidence
    interval of the corpus value resamples the examples and calls `score` again)."""

    value: float
    n: int
    per_example: list[float] = field(default_factory=list)
    corpus: bool = False


def normalize_answer(text: str) -> str:
    """Whitespace-insensitive comparison: a trailing newline is not a wrong answer."""
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- options


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _NoOptions(_Options):
    pass


class RougeOptions(_Options):
    use_stemmer: bool = Field(False, description="Porter-stem tokens before matching (rouge-score's use_stemmer).")


class BleuOptions(_Options):
    # sacrebleu's tokenizers that need no extra package or downloaded model (not mecab, spm, flores).
    tokenize: Literal["13a", "intl", "char", "zh", "none"] = Field("13a", description="sacrebleu's tokenizer.")
    lowercase: bool = Field(False, description="Compare lowercased text.")


class ChrfOptions(_Options):
    word_order: Literal[0, 1, 2] = Field(0, description="Word n-gram order: 0 is chrF, 2 is chrF++.")
    lowercase: bool = Field(False, description="Compare lowercased text.")


class AccuracyOptions(_Options):
    regex: str | None = Field(None, max_length=1024, description="Pattern with one group: the answer in the output.")
    choices: str | None = Field(None, description='Choice letters, e.g. "ABCD": the output names one of them.')
    extract_reference: bool = Field(
        False, description="Apply the regex to the reference too (e.g. GSM8K's '#### 42'); else it is the answer."
    )

    @field_validator("regex")
    @classmethod
    def _one_group(cls, value: str | None) -> str | None:
        return value if value is None else one_group_pattern(value)  # the same check as the job spec's

    @field_validator("choices")
    @classmethod
    def _letters(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if len(value) < 2 or not all("A" <= c <= "Z" for c in value) or len(set(value)) != len(value):
            raise ValueError(f'must be two or more distinct capital letters A-Z, e.g. "ABCD", got {value!r}')
        return value

    @model_validator(mode="after")
    def _one_extractor(self) -> AccuracyOptions:
        if (self.regex is None) == (self.choices is None):
            raise ValueError("needs exactly one answer extractor: options.regex (a pattern with one group) "
                             'or options.choices (letters, e.g. "ABCD")')
        if self.extract_reference and self.regex is None:
            raise ValueError("extract_reference applies to options.regex only")
        return self


class JsonValidOptions(_Options):
    allow_code_fence: bool = Field(False, description="Accept JSON wrapped in one ``` (or ```json) fence.")


class JsonSchemaOptions(JsonValidOptions):
    json_schema: dict[str, Any] = Field(..., alias="schema", description="The JSON Schema every output must match.")

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return value


# ---------------------------------------------------------------------------------------------- metrics


def _rouge(kind: str) -> Callable:
    def compute(predictions: list[str], references: list[str], options: RougeOptions) -> MetricScore:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([kind], use_stemmer=options.use_stemmer)
        scores = [scorer.score(target=r, prediction=p)[kind].fmeasure for p, r in zip(predictions, references)]
        return _mean(scores)

    return compute


def _bleu(predictions: list[str], references: list[str], options: BleuOptions) -> MetricScore:
    from sacrebleu.metrics import BLEU

    corpus = BLEU(tokenize=options.tokenize, lowercase=options.lowercase).corpus_score(predictions, [references])
    # Sentence BLEU with effective order, as sacrebleu.sentence_bleu: a short sentence without 4-grams is not 0.
    sentence = BLEU(tokenize=options.tokenize, lowercase=options.lowercase, effective_order=True)
    per_example = [sentence.sentence_score(p, [r]).score for p, r in zip(predictions, references)]
    return MetricScore(value=float(corpus.score), n=len(predictions), per_example=per_example, corpus=True)


def _chrf(predictions: list[str], references: list[str], options: ChrfOptions) -> MetricScore:
    from sacrebleu.metrics import CHRF

    metric = CHRF(word_order=options.word_order, lowercase=options.lowercase)
    corpus = metric.corpus_score(predictions, [references])
    per_example = [metric.sentence_score(p, [r]).score for p, r in zip(predictions, references)]
    return MetricScore(value=float(corpus.score), n=len(predictions), per_example=per_example, corpus=True)


def _exact_match(predictions: list[str], references: list[str], options: _NoOptions) -> MetricScore:
    return _mean([float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references)])


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of precision and recall of the normalized tokens in common."""
    predicted, gold = squad_normalize(prediction).split(), squad_normalize(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _token_f1(predictions: list[str], references: list[str], options: _NoOptions) -> MetricScore:
    return _mean([token_f1(p, r) for p, r in zip(predictions, references)])


def extract_choice(text: str, choices: str) -> str | None:
    """The choice letter an output names, or None.

    In order: the whole output is a letter ("B", "(B)", "b."); "answer is B" / "Answer: (B)"; a letter opening
    the output as "B)" or "B:"; else the first letter standing alone, so that the article in "A good answer
    is C" counts only when nothing clearer does."""
    letters = "[" + re.escape(choices) + "]"
    stripped = text.strip()
    patterns = [
        rf"^[\s(\[]*((?i:{letters}))[\s)\].:]*$",
        rf"(?i:answer)(?:\s+is)?\s*[:=]?\s*[(\[]?({letters})\b",
        rf"^[\s(\[]*({letters})\s*[)\]:.]",
        rf"(?<![A-Za-z])({letters})(?![A-Za-z])",
    ]
    for pattern in patterns:
        found = re.search(pattern, stripped)
        if found:
            return found.group(1).upper()
    return None


def _accuracy(predictions: list[str], references: list[str], options: AccuracyOptions) -> MetricScore:
    if options.choices is not None:
        gold = []
        for index, reference in enumerate(references):
            letter = reference.strip().strip("()[]. ")
            if len(letter) != 1 or letter not in options.choices:
                raise ValueError(f"accuracy: reference {index} is {reference!r}, not one of the choices "
                                 f"{options.choices}")
            gold.append(letter)
        return _mean([float(extract_choice(p, options.choices) == g) for p, g in zip(predictions, gold)])
    pattern = re.compile(options.regex)

    def extract(text: str) -> str | None:
        found = pattern.search(text)
        return None if found is None or found.group(1) is None else normalize_answer(found.group(1))

    scores = []
    for prediction, reference in zip(predictions, references):
        answer = extract(prediction)
        gold = extract(reference) if options.extract_reference else normalize_answer(reference)
        scores.append(float(answer is not None and gold is not None and answer == gold))
    return _mean(scores)


_FENCE = re.compile(r"^```[A-Za-z]*\s*\n(.*?)\n?```$", re.DOTALL)


def parse_json(text: str, *, allow_code_fence: bool = False) -> tuple[bool, Any]:
    """(True, value) when the text is one JSON document (optionally inside a ``` fence), else (False, None)."""
    text = text.strip()
    if allow_code_fence:
        fenced = _FENCE.match(text)
        if fenced:
            text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def _json_valid(predictions: list[str], references: list[str] | None, options: JsonValidOptions) -> MetricScore:
    return _mean([float(parse_json(p, allow_code_fence=options.allow_code_fence)[0]) for p in predictions])


def _json_schema(predictions: list[str], references: list[str] | None, options: JsonSchemaOptions) -> MetricScore:
    import jsonschema

    from referencing.exceptions import Unresolvable

    validator = jsonschema.validators.validator_for(options.json_schema)(options.json_schema)
    scores = []
    for prediction in predictions:
        ok, value = parse_json(prediction, allow_code_fence=options.allow_code_fence)
        try:
            scores.append(float(ok and validator.is_valid(value)))
        except Unresolvable as exc:  # a $ref outside the schema: jsonschema fetches nothing, nor do we
            raise MetricError(f"metric json_schema: options.schema: cannot resolve the reference {exc.ref!r}; "
                              "a schema must hold its own definitions") from None
    return _mean(scores)


def _mean(scores: list[float]) -> MetricScore:
    return MetricScore(value=sum(scores) / len(scores) if scores else 0.0, n=len(scores), per_example=scores)


@dataclass(frozen=True)
class Metric:
    compute: Callable[[list[str], Any, Any], MetricScore]
    options: type[_Options]
    needs_references: bool = True
    description: str = ""


METRICS: dict[str, Metric] = {
    "rouge1": Metric(_rouge("rouge1"), RougeOptions, description="ROUGE-1 F-measure (rouge-score), mean."),
    "rouge2": Metric(_rouge("rouge2"), RougeOptions, description="ROUGE-2 F-measure (rouge-score), mean."),
    "rougeL": Metric(_rouge("rougeL"), RougeOptions, description="ROUGE-L F-measure (rouge-score), mean."),
    "bleu": Metric(_bleu, BleuOptions, description="Corpus BLEU, 0-100 (sacrebleu)."),
    "chrf": Metric(_chrf, ChrfOptions, description="Corpus chrF, 0-100 (sacrebleu); word_order=2 is chrF++."),
    "exact_match": Metric(_exact_match, _NoOptions, description="Output equals the reference, whitespace-normalized."),
    "token_f1": Metric(_token_f1, _NoOptions, description="SQuAD token F1 of the normalized answer."),
    "accuracy": Metric(_accuracy, AccuracyOptions, description="The extracted answer (regex or choice letter) "
                       "equals the reference."),
    "json_valid": Metric(_json_valid, JsonValidOptions, needs_references=False,
                         description="The output is one JSON document."),
    "json_schema": Metric(_json_schema, JsonSchemaOptions, needs_references=False,
                          description="The output is JSON that matches options.schema (jsonschema)."),
}


class MetricError(ValueError):
    """A metric name, option or input that cannot be used; the message is meant for the user as is."""


def validate_options(name: str, options: dict[str, Any] | None = None) -> _Options:
    """The metric's options, checked: an unknown metric or option, or a bad value, names itself."""
    metric = _metric(name)
    try:
        return metric.options.model_validate(options or {})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                allowed = [f.alias or n for n, f in metric.options.model_fields.items()]
                message = f"unknown option; {name} takes {', '.join(allowed) if allowed else 'no options'}"
            problems.append(f"options.{where}: {message}" if where else message)
        raise MetricError(f"metric {name}: " + "; ".join(problems)) from None


def score(name: str, predictions: Sequence[str], references: Sequence[str] | None = None, *,
          options: dict[str, Any] | None = None) -> MetricScore:
    """Score predictions against references with the metric `name` (a key of METRICS)."""
    metric = _metric(name)
    checked = validate_options(name, options)
    predictions = list(predictions)
    _check_texts(name, "predictions", predictions)
    if references is None:
        if metric.needs_references:
            raise MetricError(f"metric {name} compares with references; none were given")
    else:
        references = list(references)
        _check_texts(name, "references", references)
        if len(references) != len(predictions):
            raise MetricError(f"metric {name}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return MetricScore(value=0.0, n=0, per_example=[], corpus=name in ("bleu", "chrf"))
    try:
        return metric.compute(predictions, references, checked)
    except MetricError:
        raise
    except ValueError as exc:
        raise MetricError(str(exc)) from None


def _metric(name: str) -> Metric:
    if name not in METRICS:
        close = difflib.get_close_matches(name, list(METRICS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise MetricError(f"unknown metric {name!r}{hint}; one of {', '.join(METRICS)}")
    return METRICS[name]


def _check_texts(name: str, what: str, texts: list) -> None:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise MetricError(f"metric {name}: {what}[{index}] is {type(text).__name__}, not text")

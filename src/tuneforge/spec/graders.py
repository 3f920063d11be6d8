"""Graders in OpenAI's shapes: eval testing criteria, checkpoint-selection objectives and RL rewards.

The JSON a client sends to OpenAI's Evals or reinforcement fine-tuning API validates here unchanged
(`string_check`, `text_similarity`, `score_model`, `label_model`, `multi`). Templates name
`{{item.field}}` (the dataset row) and `{{sample.output_text}}` (what the model wrote). The `python`
grader runs arbitrary code, so it is refused with a clear error: a job spec never runs code. A judge
model is a name tuneforge resolves (a built-in base model, a registered model id, or, from a job file,
a local model directory), or a model behind an OpenAI-compatible endpoint the operator configured by
name: no request carries a URL the server would call, or a key.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TEMPLATE = 16 * 1024
MAX_GRADERS = 32
TEMPLATE_FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*\}\}")
TEMPLATE_ROOTS = ("item", "sample")

Template = Annotated[str, Field(max_length=MAX_TEMPLATE)]
GraderName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")]


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: GraderName = Field(..., description="The grader's name: its key in results and in multi formulas.")


def template_fields(template: str) -> list[str]:
    """The dotted names a template refers to, e.g. ["item.answer", "sample.output_text"]."""
    return TEMPLATE_FIELD.findall(template)


def _check_roots(template: str) -> str:
    for name in template_fields(template):
        if name.split(".")[0] not in TEMPLATE_ROOTS:
            raise ValueError(f"template field {{{{{name}}}}}: templates name item.<field> or sample.<field>")
    return template


class StringCheckGrader(_Grader):
    type: Literal["string_check"]
    input: Template = Field(..., description='Text to check, e.g. "{{sample.output_text}}".')
    reference: Template = Field(..., description='What it is compared with, e.g. "{{item.answer}}".')
    operation: Literal["eq", "ne", "like", "ilike"] = Field(
        ..., description="eq / ne: exact (in)equality; like / ilike: reference is contained (ilike: any case)."
    )

    _roots = field_validator("input", "reference")(classmethod(lambda cls, v: _check_roots(v)))


SimilarityMetric = Literal[
    "fuzzy_match", "bleu", "gleu", "meteor", "cosine", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"
]


class TextSimilarityGrader(_Grader):
    type: Literal["text_similarity"]
    input: Template
    reference: Template
    evaluation_metric: SimilarityMetric = Field(..., description="Similarity in [0, 1] between input and reference.")
    pass_threshold: float | None = Field(None, ge=0.0, le=1.0, description="A score at or above it passes.")

    _roots = field_validator("input", "reference")(classmethod(lambda cls, v: _check_roots(v)))


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Template
    type: Literal["message"] | None = None

    _roots = field_validator("content")(classmethod(lambda cls, v: _check_roots(v)))

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        # OpenAI also accepts [{"type": "input_text", "text": ...}]: the text parts, joined.
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                    raise ValueError("content parts must be text parts (input_text / output_text)")
                texts.append(str(part.get("text", "")))
            return "".join(texts)
        return value


DEFAULT_JUDGE_MAX_TOKENS = 128  # a judge's reply without sampling_params.max_completions_tokens


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore")  # reasoning_effort and the like mean nothing to a local judge

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    max_completions_tokens: int | None = Field(None, gt=0, le=8192)

    def judge_max_tokens(self) -> int:
        return self.max_completions_tokens or DEFAULT_JUDGE_MAX_TOKENS


JudgeModel = Annotated[str, Field(min_length=1, max_length=4096)]


class ModelGrader(_Grader):
    """A grader that asks a judge model (score_model, label_model)."""

    model: JudgeModel = Field(
        ..., description="The judge: a built-in base model, a registered model id, a local model directory (job "
        "files only), or a model name served by `endpoint`."
    )
    endpoint: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | None = Field(
        None, description="Name of an OpenAI-compatible endpoint the operator configured (TUNEFORGE_JUDGE_ENDPOINTS); "
        "empty: the judge runs locally."
    )
    input: Annotated[list[Message], Field(min_length=1, max_length=64)]
    sampling_params: SamplingParams | None = None


class ScoreModelGrader(ModelGrader):
    type: Literal["score_model"]
    range: Annotated[list[float], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.0, 1.0], description="[low, high] of the score the judge gives."
    )
    pass_threshold: float | None = Field(None, description="A score at or above it passes.")

    @model_validator(mode="after")
    def _ordered(self) -> ScoreModelGrader:
        if self.range[0] >= self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {self.range}")
        return self


class LabelModelGrader(ModelGrader):
    type: Literal["label_model"]
    labels: Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(min_length=2, max_length=64)]
    passing_labels: Annotated[list[str], Field(min_length=1, max_length=64)]

    @model_validator(mode="after")
    def _subset(self) -> LabelModelGrader:
        unknown = [label for label in self.passing_labels if label not in self.labels]
        if unknown:
            raise ValueError(f"passing_labels {unknown} are not among labels {self.labels}")
        return self


class PythonGrader(BaseModel):
    """Accepted by shape only to refuse it by name (a clearer error than an unknown type)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["python"]

    @model_validator(mode="after")
    def _refuse(self) -> PythonGrader:
        raise ValueError("the python grader runs arbitrary code, which a tuneforge job never does; use string_check, "
                         "text_similarity, score_model, label_model or multi")


SimpleGrader = Annotated[
    Union[StringCheckGrader, TextSimilarityGrader, ScoreModelGrader, LabelModelGrader, PythonGrader],
    Field(discriminator="type"),
]

FORMULA = re.compile(r"^[A-Za-z0-9_ .+\-*/(),]*$")
FORMULA_FUNCTIONS = ("min", "max", "abs", "floor", "ceil", "exp", "sqrt", "log")


class MultiGrader(_Grader):
    type: Literal["multi"]
    graders: Annotated[dict[GraderName, SimpleGrader], Field(min_length=1, max_length=MAX_GRADERS)] = Field(
        ..., description="Named graders whose scores the formula combines."
    )
    calculate_output: Annotated[str, Field(min_length=1, max_length=1024)] = Field(
        ..., description="Arithmetic over the graders' names (+ - * / parentheses, numbers, "
        + ", ".join(FORMULA_FUNCTIONS) + ")."
    )
    pass_threshold: float | None = None

    @model_validator(mode="after")
    def _formula(self) -> MultiGrader:
        if not FORMULA.match(self.calculate_output):
            raise ValueError("calculate_output may hold grader names, numbers, + - * / ( ) and "
                             + ", ".join(FORMULA_FUNCTIONS))
        known = set(self.graders) | set(FORMULA_FUNCTIONS)
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", self.calculate_output):
            if word not in known:
                raise ValueError(f"calculate_output names {word!r}, which is neither a grader "
                                 f"({', '.join(sorted(self.graders))}) nor a function ({', '.join(FORMULA_FUNCTIONS)})")
        return self


Grader = Annotated[
    Union[StringCheckGrader, TextSimilarityGrader, ScoreModelGrader, LabelModelGrader, MultiGrader, PythonGrader],
    Field(discriminator="type"),
]

"""Evals in OpenAI's shapes: an eval (an item schema and testing criteria), its runs, their output items.

An eval is a stored object; a run is a scheduled job (`method: eval`, the `eval_run` section here), so
quotas, priorities, leases and cost apply as to training. What a client sends to OpenAI's Evals API
validates here (`client.evals.create`, `client.evals.runs.create`); what it reads back is what OpenAI
returns. The recipe (recipes/eval_run.py) writes one output item per data item to DIR/output_items.jsonl
and the counts into the summary; the worker copies both into the database when the run succeeds.
No torch and no database here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tuneforge.spec.graders import (
    MAX_GRADERS,
    TEMPLATE_FIELD,
    Grader,
    MultiGrader,
    ScoreModelGrader,
    TextSimilarityGrader,
    Message,
    template_fields,
)

MAX_ITEM_SCHEMA_BYTES = 64 * 1024
MAX_INLINE_ITEMS = 10_000  # file_content rows; the 1 MiB request body bounds them first
MAX_NAME = 256
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
DEFAULT_MAX_COMPLETION_TOKENS = 256
MAX_COMPLETION_TOKENS = 8192
OUTPUT_ITEMS_FILE = "output_items.jsonl"  # in the run's job directory, written by the recipe
ITEM_REFERENCE = re.compile(r"^item(\.[A-Za-z0-9_]+)+$")

# Job status -> eval run status (OpenAI's five).
RUN_STATUS = {"validating_files": "queued", "queued": "queued", "running": "in_progress", "paused": "in_progress",
              "succeeded": "completed", "failed": "failed", "cancelled": "canceled"}
RunStatus = Literal["queued", "in_progress", "completed", "failed", "canceled"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's metadata rules: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise ValueError(f"key {key[:20]!r}...: keys are at most {MAX_METADATA_KEY} characters")
        if len(value) > MAX_METADATA_VALUE:
            raise ValueError(f"{key}: values are at most {MAX_METADATA_VALUE} characters")
    return metadata


Metadata = Annotated[dict[str, str] | None, Field(description="Up to 16 key-value pairs of your own.")]


# ---- item schemas ---------------------------------------------------------------------------------


def local_refs_only(value: Any, where: str) -> None:
    """A JSON schema (where: its name in errors) may refer to its own parts ("#/definitions/x"), never to a
    file or a URL: the server never fetches one."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref" and not (isinstance(item, str) and item.startswith("#")):
                raise ValueError(f"{where}.$ref {item!r}: only references inside the schema (#/...) are allowed; "
                                 "a job spec never names a file or a URL")
            local_refs_only(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            local_refs_only(item, f"{where}[{index}]")


def check_item_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) for one item: small, self-contained, and valid as a schema."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if len(json.dumps(schema, default=str)) > MAX_ITEM_SCHEMA_BYTES:
        raise ValueError(f"the item schema is larger than {MAX_ITEM_SCHEMA_BYTES // 1024} KiB")
    local_refs_only(schema, "item_schema")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        raise ValueError(f"not a JSON Schema{f' at {where}' if where else ''}: {exc.message}") from None
    return schema


def item_problems(schema: dict[str, Any], item: Any, *, limit: int = 5) -> list[str]:
    """Why an item does not match the schema: each problem names the field ("item.answer: ..."), at most
    `limit` of them; [] when it matches."""
    from jsonschema import Draft202012Validator

    problems = []
    for error in sorted(Draft202012Validator(schema).iter_errors(item), key=lambda e: list(e.absolute_path)):
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        problems.append(f"item{field}: {error.message}")
        if len(problems) >= limit:
            break
    return problems


# ---- templates over items ------------------------------------------------------------------------


class TemplateDataError(ValueError):
    """An item lacks a field a template names; the message names the item's index and the field."""


def render_item_template(text: str, item: dict[str, Any], index: int) -> str:
    """`{{item.a.b}}` filled from the item: strings as they are, other values as JSON; a numeric part
    indexes a list. The same rules as the graders' templates (evaluation/graders.py)."""

    def value(found: re.Match) -> str:
        path = found.group(1).split(".")
        if path[0] != "item":
            raise TemplateDataError(f"item {index}: {{{{{found.group(1)}}}}}: input messages name item.<field> only "
                                    "(the sample does not exist before the model answers)")
        current: Any = item
        for depth, key in enumerate(path[1:]):
            if isinstance(current, dict) and key in current:
                current = current[key]
            elif isinstance(current, list) and key.isdigit() and int(key) < len(current):
                current = current[int(key)]
            else:
                raise TemplateDataError(f"item {index} has no field {'.'.join(path[1 : depth + 2])!r} "
                                        f"(named by {{{{{found.group(1)}}}}} in the input messages)")
        return current if isinstance(current, str) else json.dumps(current, ensure_ascii=False)

    return TEMPLATE_FIELD.sub(value, text)


def item_field(item: dict[str, Any], reference: str, index: int) -> Any:
    """The value at an `item.x.y` reference."""
    current: Any = item
    parts = reference.split(".")[1:]
    for depth, key in enumerate(parts):
        if isinstance(current, dict) and key in current:
            current = current[key]
        elif isinstance(current, list) and key.isdigit() and int(key) < len(current):
            current = current[int(key)]
        else:
            raise TemplateDataError(f"item {index} has no field {'.'.join(parts[: depth + 1])!r} "
                                    f"(named by input_messages.item_reference {reference!r})")
    return current


def referenced_messages(item: dict[str, Any], reference: str, index: int) -> list[dict[str, str]]:
    """The conversation an item holds at `reference`: a list of {role, content} messages."""
    value = item_field(item, reference, index)
    if not isinstance(value, list) or not value:
        raise TemplateDataError(f"item {index}: {reference} is not a list of messages")
    messages = []
    for position, message in enumerate(value):
        try:
            parsed = Message.model_validate({k: v for k, v in message.items() if k in ("role", "content", "type")}
                                            if isinstance(message, dict) else message)
        except ValueError:
            raise TemplateDataError(f"item {index}: {reference}[{position}] is not a message with a role (system, "
                                    "developer, user, assistant) and text content") from None
        messages.append({"role": parsed.role, "content": parsed.content})
    return messages


# ---- the job section ------------------------------------------------------------------------------


class EvalRunSpec(BaseModel):
    """method eval: what a run evaluates and how it grades; set from an eval and a run request by the API."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    eval_id: Annotated[str, Field(pattern=r"^eval_[A-Za-z0-9]{1,40}$")] | None = Field(
        None, description="The eval this run belongs to."
    )
    model: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        None, description="The model that answers: a built-in base model or a registered fine-tuned model id (ft:...; "
        "the worker swaps it for its adapter or model directory); empty: the items carry their samples (jsonl)."
    )
    input_messages: Annotated[list[Message], Field(min_length=1, max_length=64)] | None = Field(
        None, description="The prompt of each item: chat messages with {{item.field}} templates."
    )
    input_reference: Annotated[str, Field(max_length=256, pattern=ITEM_REFERENCE.pattern)] | None = Field(
        None, description="Or the item field that holds each item's conversation, e.g. item.messages."
    )
    max_completion_tokens: int = Field(
        DEFAULT_MAX_COMPLETION_TOKENS, gt=0, le=MAX_COMPLETION_TOKENS, description="Generation budget per item."
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1,
        description="Recorded with each sample; decoding is greedy, so answers do not depend on it.",
    )
    generation_batch_size: int = Field(16, gt=0, le=4096, description="Prompts generated together.")
    testing_criteria: Annotated[list[Grader], Field(max_length=MAX_GRADERS)] = Field(
        default_factory=list, description="The eval's graders; an item passes when every one passes."
    )
    item_schema: dict[str, Any] | None = Field(
        None, description="The eval's JSON Schema of one item: every item is checked against it before anything runs."
    )

    @field_validator("item_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_item_schema(value)

    @model_validator(mode="after")
    def _prompt_when_generating(self) -> EvalRunSpec:
        if self.model is None:
            if self.input_messages is not None or self.input_reference is not None:
                raise ValueError("input messages need a model to answer them (eval_run.model)")
            return self
        if (self.input_messages is None) == (self.input_reference is None):
            raise ValueError("a run that generates needs exactly one of input_messages (a template) or "
                             "input_reference (an item field holding the conversation)")
        for position, message in enumerate(self.input_messages or []):
            for name in template_fields(message.content):
                if not name.startswith("item."):
                    raise ValueError(f"input_messages[{position}] names {{{{{name}}}}}: input messages name "
                                     "item.<field> only")
        return self

    def generates(self) -> bool:
        return self.model is not None

    def is_default(self) -> bool:
        return self == EvalRunSpec()


# ---- what a run produces ----------------------------------------------------------------------------


class ResultCounts(_Response):
    total: int = 0
    passed: int = 0
    failed: int = 0
    errored: int = 0


class CriterionResult(_Response):
    testing_criteria: str
    passed: int = 0
    failed: int = 0


class ModelUsage(_Response):
    model_name: str
    invocation_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class EvalRunResult(_Response):
    """The summary's eval_run: the counts the API shows on the run."""

    result_counts: ResultCounts
    per_testing_criteria_results: list[CriterionResult]
    per_model_usage: list[ModelUsage] = []


class OutputItemRecord(_Response):
    """One line of DIR/output_items.jsonl: an item, what the model answered, and each grader's result."""

    index: int
    status: Literal["pass", "fail", "error"]
    item: dict[str, Any]
    sample: dict[str, Any]
    results: list[dict[str, Any]]


def write_output_items(job_dir: Path, records: list[OutputItemRecord]) -> None:
    """All output items, atomically (a reader sees none or all)."""
    import os

    path = job_dir / OUTPUT_ITEMS_FILE
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(staging, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(record.model_dump_json() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def read_output_items(job_dir: Path) -> list[OutputItemRecord]:
    path = job_dir / OUTPUT_ITEMS_FILE
    with open(path, encoding="utf-8") as handle:
        return [OutputItemRecord.model_validate_json(line) for line in handle if line.strip()]


# ---- requests ---------------------------------------------------------------------------------------


class CustomDataSourceConfig(_Request):
    type: Literal["custom", "logs", "stored_completions"] = Field(
        ..., description="custom: items described by item_schema (tuneforge stores no logs or completions)."
    )
    item_schema: dict[str, Any] | None = Field(None, description="The JSON Schema of one item.")
    include_sample_schema: bool = Field(
        False, description="Whether runs generate samples (the schema then also describes sample.output_text)."
    )
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _custom_only(self) -> CustomDataSourceConfig:
        if self.type != "custom":
            raise ValueError(f"data_source_config type {self.type!r} reads OpenAI's stored logs, which a tuneforge "
                             "server does not keep; use type custom with an item_schema")
        if self.item_schema is None:
            raise ValueError("item_schema: required for a custom data source (the JSON Schema of one item)")
        if self.metadata is not None:
            raise ValueError("metadata filters apply to logs data sources only")
        check_item_schema(self.item_schema)
        return self

    def schema_object(self) -> dict[str, Any]:
        """What OpenAI returns as the config's `schema`: the item schema, and the sample's when included."""
        properties: dict[str, Any] = {"item": self.item_schema}
        required = ["item"]
        if self.include_sample_schema:
            properties["sample"] = {"type": "object", "properties": {"output_text": {"type": "string"}},
                                    "required": ["output_text"]}
            required.append("sample")
        return {"type": "object", "properties": properties, "required": required}


def _has_pass_criterion(grader: Any) -> bool:
    if isinstance(grader, (TextSimilarityGrader, ScoreModelGrader, MultiGrader)):
        return grader.pass_threshold is not None
    return True  # string_check passes or fails; label_model has passing_labels


class EvalCreateRequest(_Request):
    name: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    data_source_config: CustomDataSourceConfig
    testing_criteria: Annotated[list[Grader], Field(min_length=1, max_length=MAX_GRADERS)] = Field(
        ..., description="Graders in OpenAI's shapes (string_check, text_similarity, score_model, label_model, multi)."
    )
    metadata: Metadata = None

    _metadata = field_validator("metadata")(classmethod(lambda cls, v: check_metadata(v)))

    @model_validator(mode="after")
    def _criteria(self) -> EvalCreateRequest:
        names = [g.name for g in self.testing_criteria]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"testing criteria names must be unique: {', '.join(repeated)} appear more than once")
        for grader in self.testing_criteria:
            if not _has_pass_criterion(grader):
                raise ValueError(f"testing criterion {grader.name!r} ({grader.type}) needs pass_threshold: an eval "
                                 "counts passes and failures")
        return self


class EvalUpdateRequest(_Request):
    name: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    metadata: Metadata = None

    _metadata = field_validator("metadata")(classmethod(lambda cls, v: check_metadata(v)))


class SourceRow(_Request):
    item: dict[str, Any]
    sample: dict[str, Any] | None = None


class FileContentSource(_Request):
    type: Literal["file_content"]
    content: Annotated[list[SourceRow], Field(min_length=1, max_length=MAX_INLINE_ITEMS)]


class FileIdSource(_Request):
    type: Literal["file_id"]
    # a file id, or a registered dataset version: dataset:NAME@vN or dataset:NAME:ALIAS (as a job's training_file)
    id: Annotated[str, Field(min_length=1, max_length=140)]


class StoredCompletionsSource(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["stored_completions", "responses"]

    @model_validator(mode="after")
    def _refuse(self) -> StoredCompletionsSource:
        raise ValueError(f"source type {self.type!r} reads OpenAI's stored completions or responses, which a "
                         "tuneforge server does not keep; use file_content or file_id")


Source = Annotated[Union[FileContentSource, FileIdSource, StoredCompletionsSource], Field(discriminator="type")]


class TemplateInput(_Request):
    type: Literal["template"]
    template: Annotated[list[Message], Field(min_length=1, max_length=64)]


class ItemReferenceInput(_Request):
    type: Literal["item_reference"]
    item_reference: Annotated[str, Field(max_length=256, pattern=ITEM_REFERENCE.pattern)]


InputMessages = Annotated[Union[TemplateInput, ItemReferenceInput], Field(discriminator="type")]


class RunSamplingParams(_Request):
    """OpenAI's sampling parameters; tuneforge decodes greedily, so only what greedy decoding honours is accepted."""

    max_completion_tokens: int | None = Field(None, gt=0, le=MAX_COMPLETION_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _greedy(self) -> RunSamplingParams:
        if self.temperature not in (None, 0.0):
            raise ValueError(f"temperature {self.temperature:g}: tuneforge evaluates with greedy decoding "
                             "(reproducible and comparable between models); leave it out or set 0")
        if self.top_p not in (None, 1.0):
            raise ValueError(f"top_p {self.top_p:g}: tuneforge evaluates with greedy decoding; leave it out or set 1")
        for name in ("reasoning_effort", "response_format", "tools"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by tuneforge's local models; leave it out")
        return self


class CompletionsDataSource(_Request):
    type: Literal["completions"]
    source: Source
    input_messages: InputMessages | None = None
    model: Annotated[str, Field(min_length=1, max_length=255)] | None = Field(
        None, description="A built-in base model or one of your fine-tuned models (ft:...)."
    )
    sampling_params: RunSamplingParams | None = None

    @model_validator(mode="after")
    def _complete(self) -> CompletionsDataSource:
        if self.model is None:
            raise ValueError("model: required for a completions data source (the model that answers each item)")
        if self.input_messages is None:
            raise ValueError("input_messages: required for a completions data source (the prompt of each item)")
        if isinstance(self.input_messages, TemplateInput):
            for position, message in enumerate(self.input_messages.template):
                for name in template_fields(message.content):
                    if not name.startswith("item."):
                        raise ValueError(f"input_messages.template[{position}] names {{{{{name}}}}}: input messages "
                                         "name item.<field> only")
        return self


class JsonlDataSource(_Request):
    type: Literal["jsonl"]
    source: Source


class ResponsesDataSource(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["responses"]

    @model_validator(mode="after")
    def _refuse(self) -> ResponsesDataSource:
        raise ValueError("data source type 'responses' runs OpenAI's Responses API; use completions (a local model "
                         "answers) or jsonl (the items carry their samples)")


RunDataSource = Annotated[Union[CompletionsDataSource, JsonlDataSource, ResponsesDataSource],
                          Field(discriminator="type")]


class RunCreateRequest(_Request):
    name: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    metadata: Metadata = None
    data_source: RunDataSource

    _metadata = field_validator("metadata")(classmethod(lambda cls, v: check_metadata(v)))


def eval_run_spec(*, eval_id: str, data_source: CompletionsDataSource | JsonlDataSource,
                  testing_criteria: list[dict[str, Any]], item_schema: dict[str, Any]) -> EvalRunSpec:
    """The job's eval_run section for a run request on an eval (its criteria and item schema as stored)."""
    if isinstance(data_source, JsonlDataSource):
        return EvalRunSpec(eval_id=eval_id, testing_criteria=testing_criteria, item_schema=item_schema)
    params = data_source.sampling_params or RunSamplingParams()
    inputs = data_source.input_messages
    return EvalRunSpec(
        eval_id=eval_id, model=data_source.model,
        input_messages=inputs.template if isinstance(inputs, TemplateInput) else None,
        input_reference=inputs.item_reference if isinstance(inputs, ItemReferenceInput) else None,
        max_completion_tokens=params.max_completion_tokens or DEFAULT_MAX_COMPLETION_TOKENS, seed=params.seed,
        testing_criteria=testing_criteria, item_schema=item_schema,
    )


# ---- responses --------------------------------------------------------------------------------------


class DataSourceConfigObject(_Response):
    type: Literal["custom"] = "custom"
    schema_: dict[str, Any] = Field(..., alias="schema", serialization_alias="schema")


class EvalObject(_Response):
    object: Literal["eval"] = "eval"
    id: str
    created_at: int
    name: str
    data_source_config: DataSourceConfigObject
    testing_criteria: list[dict[str, Any]]
    metadata: dict[str, str] | None = None


class EvalDeleted(_Response):
    object: Literal["eval.deleted"] = "eval.deleted"
    deleted: bool = True
    eval_id: str


class EvalApiError(_Response):
    code: str
    message: str


class RunObject(_Response):
    object: Literal["eval.run"] = "eval.run"
    id: str
    eval_id: str
    created_at: int
    name: str
    model: str | None = None
    status: RunStatus
    data_source: dict[str, Any]
    metadata: dict[str, str] | None = None
    error: EvalApiError | None = None
    result_counts: ResultCounts
    per_testing_criteria_results: list[CriterionResult]
    per_model_usage: list[ModelUsage] = []
    report_url: str | None = None
    tuneforge: dict[str, Any] = Field(default_factory=dict, description=(
        "The run's job id, its GPU-seconds and its cost: the estimate made when it was created, then its priced usage, "
        "as a job's."))


class RunDeleted(_Response):
    object: Literal["eval.run.deleted"] = "eval.run.deleted"
    deleted: bool = True
    run_id: str


class OutputItemObject(_Response):
    object: Literal["eval.run.output_item"] = "eval.run.output_item"
    id: str
    created_at: int
    eval_id: str
    run_id: str
    status: Literal["pass", "fail", "error"]
    datasource_item_id: int
    datasource_item: dict[str, Any]
    results: list[dict[str, Any]]
    sample: dict[str, Any]

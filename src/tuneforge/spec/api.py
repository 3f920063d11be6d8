"""Request and response shapes of the HTTP API, in the OpenAI fine-tuning API's own field names.

Responses are what the official `openai` client parses; requests accept what it sends. tuneforge's own
settings travel in one extension field, `tuneforge` (a partial JobSpec), see spec/openai_jobs.py.
Nothing here knows about the database: routers build these from rows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.spec.graders import Grader

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
VALIDATING_FILES, QUEUED, RUNNING, PAUSED = "validating_files", "queued", "running", "paused"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
TERMINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)
ACTIVE_STATUSES = (VALIDATING_FILES, QUEUED, RUNNING, PAUSED)
FilePurpose = Literal["fine-tune", "evals"]
EventLevel = Literal["info", "warn", "error"]


class Request(BaseModel):
    """A request body: unknown fields are an error that names them."""

    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors -------------------------------------------------------------------------------------


class ErrorDetail(Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(Response):
    error: ErrorDetail


# ---- files --------------------------------------------------------------------------------------


class FileObject(Response):
    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(Response):
    object: Literal["file"] = "file"
    id: str
    deleted: bool = True


class DataProblemObject(Response):
    line: int
    kind: str
    field: str
    expected: str
    found: str


class DatasetReport(Response):
    """What tuneforge found in an uploaded file: its format, statistics, and every problem by line."""

    object: Literal["tuneforge.dataset_report"] = "tuneforge.dataset_report"
    file_id: str = ""
    status: Literal["uploaded", "processed", "error"] | None = Field(
        None, description="The file's status: uploaded (not validated yet: the report is empty), processed or error.")
    valid: bool
    format: Literal["chat", "instruction", "completion", "text", "preference", "prompt", "image_chat", "image_text"] | None = None
    examples: int = 0
    problems: list[DataProblemObject] = Field(default_factory=list)
    problems_total: int = 0
    stats: dict[str, Any] = Field(default_factory=dict)
    summary: str = ""


# ---- fine-tuning jobs ---------------------------------------------------------------------------


class Hyperparameters(Request):
    n_epochs: Literal["auto"] | Annotated[int, Field(le=10_000)] | None = Field(
        None, description="Passes over the training data.")
    batch_size: Literal["auto"] | Annotated[int, Field(le=1 << 20)] | None = Field(
        None, description="Examples per optimizer step over all devices (the effective batch)."
    )
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(le=1000)] | None = Field(
        None, description="Scales the method's default learning rate (2e-4 for LoRA / QLoRA, 2e-5 for full)."
    )


class SupervisedMethod(Request):
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] | None = Field(
        None, description="Strength of the pull toward the reference model (dpo.beta).")


class DpoMethod(Request):
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementHyperparameters(Hyperparameters):
    compute_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=32)] | None = Field(
        None, description="Scales the completions sampled per prompt (grpo.num_generations, 8 at 1.0).")
    eval_interval: Literal["auto"] | Annotated[int, Field(gt=0, le=1_000_000_000)] | None = Field(
        None, description="Evaluate every N optimizer steps (evaluation.eval_every_steps).")
    eval_samples: Literal["auto"] | Annotated[int, Field(gt=0, le=1_000_000_000)] | None = Field(
        None, description="Held-out prompts scored per evaluation (evaluation.max_eval_examples).")
    reasoning_effort: Literal["default"] | None = Field(
        None, description="Only default: tuneforge's models have no reasoning-effort setting.")


class ReinforcementMethod(Request):
    grader: Grader = Field(..., description="The reward: a grader in OpenAI's shapes (python is refused).")
    hyperparameters: ReinforcementHyperparameters | None = None


class MethodObject(Request):
    type: Literal["supervised", "dpo", "reinforcement", "reward", "ppo", "vlm", "clip"] = Field(
        ..., description="OpenAI's supervised, dpo, reinforcement (GRPO), and tuneforge's reward (a reward model), "
        "ppo, vlm (a vision-language model on chats with images) and clip (image-text pairs); their settings beyond "
        "the hyperparameters go in the tuneforge extension (dpo, reward, rollout, ppo, grpo, vision sections).")
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None
    reward: SupervisedMethod | None = None
    ppo: SupervisedMethod | None = None
    vlm: SupervisedMethod | None = None
    clip: SupervisedMethod | None = None


class JobCreateRequest(Request):
    model: str = Field(..., max_length=255, description="Base model name (GET /v1/models lists them).")
    training_file: str = Field(..., max_length=140, description=(
        "File id of the training data (purpose fine-tune); tuneforge also takes a dataset version, "
        "dataset:NAME@vN or dataset:NAME:ALIAS, pinned to its file id at creation."))
    validation_file: str | None = Field(None, max_length=140, description="File id, or dataset:NAME@vN / "
                                        "dataset:NAME:ALIAS, of the validation data.")
    method: MethodObject | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated OpenAI form of method.supervised.hyperparameters.")
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = Field(None, max_length=16)
    tuneforge: dict[str, Any] | None = Field(
        None,
        description="tuneforge's extension: a partial JobSpec (model, dataset, adapter, training, resources, "
        "evaluation, checkpoint, deploy) merged under what the OpenAI fields set.",
    )


class JobError(Response):
    code: str
    message: str
    param: str | None = None


class HyperparametersOut(Response):
    n_epochs: Literal["auto"] | int | float | None = None
    batch_size: Literal["auto"] | int | None = None
    learning_rate_multiplier: Literal["auto"] | float | None = None


class CostObject(Response):
    """A job's cost: the estimate made at submission (planner/cost.py) and what it has used so far, priced
    when it ran; once the job finished, the platform overhead and the estimate's error too."""

    object: Literal["tuneforge.job_cost"] = "tuneforge.job_cost"
    currency: Literal["usd"] = "usd"
    device: str | None = Field(None, description="The device type the estimate priced (cpu: CPU processes).")
    market: Literal["on_demand", "spot"] | None = None
    price_per_gpu_hour: float | None = None
    estimated_gpu_hours: float | None = None
    estimated_wall_seconds: float | None = None
    estimated_cost_usd: float | None = None
    estimate_basis: str | None = Field(None, description="How the tokens and the throughput were counted.")
    gpu_hours: float = Field(0.0, description="Device-hours used so far, retries and evaluation included.")
    cost_usd: float = 0.0
    final: bool = Field(False, description="The job finished: gpu_hours and cost_usd will not change.")
    overhead_fraction: float | None = Field(
        None, description="Share of the run time not spent in training steps (start-up, model load, checkpoints, "
        "evaluation; queueing excluded), from the job's metrics.")
    estimate_error: float | None = Field(None, description="(estimated - actual) / actual GPU-hours.")


class JobExtension(Response):
    """tuneforge's fields on a job: the spec (file ids, never server paths; its training section as the
    recipe resolved it once the job ran) and scheduling facts."""

    spec: dict[str, Any]
    attempt: int
    priority: int
    gpu_seconds: float
    started_at: int | None = None
    restarts: int = 0  # crash restarts from the last checkpoint (checkpoint.max_restarts bounds them)
    cost: CostObject | None = None  # the estimate at submission; what it has used so far


class FineTuningJob(Response):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    status: JobStatus
    validation_file: str | None = None
    training_file: str
    hyperparameters: HyperparametersOut
    trained_tokens: int | None = None
    error: JobError | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    seed: int
    estimated_finish: int | None = None
    method: dict[str, Any]
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None
    tuneforge: JobExtension


class JobEvent(Response):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: EventLevel
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class CheckpointMetrics(Response):
    model_config = ConfigDict(extra="allow")
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class JobCheckpoint(Response):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class MetricPoint(Response):
    step: int
    created_at: int
    values: dict[str, float | int | None]


class JobPlan(Response):
    """What a job would ask for and whether the cluster can hold it, before anything is queued."""

    object: Literal["tuneforge.job_plan"] = "tuneforge.job_plan"
    spec: dict[str, Any]
    gpus: int
    gpu_type: str
    fits: bool
    reason: str | None = None
    capacity: list[dict[str, Any]]
    memory: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None  # planner.cost.CostEstimate at the tenant's price; None: not priced


# ---- models -------------------------------------------------------------------------------------


class ModelObject(Response):
    object: Literal["model"] = "model"
    id: str
    created: int
    owned_by: str


class ModelDeleted(Response):
    object: Literal["model"] = "model"
    id: str
    deleted: bool = True


# ---- the model registry (registry/models.py): names, versions, lineage, aliases, tags --------------

RegistryName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


class ModelVersionObject(Response):
    """One immutable version of a model name: what to train or serve it by (`model`), its content and lineage."""

    object: Literal["model.version"] = "model.version"
    id: str
    name: str
    version: str  # v1, v2, ...
    model: str  # the ft:... id a job, an eval or /v1/models takes
    kind: Literal["adapter", "model"]
    created_at: int
    manifest_sha256: str
    files: list[dict[str, Any]]  # {"path", "sha256", "bytes"}
    aliases: list[str]
    tags: dict[str, str]
    lineage: dict[str, Any]


class RegisteredModelObject(Response):
    object: Literal["registered_model"] = "registered_model"
    id: str  # the name
    latest_version: str
    versions: int
    created_at: int
    aliases: dict[str, str]  # alias -> version


class ModelLineage(Response):
    """A version and what it was trained from, down to a base model: newest first."""

    object: Literal["model.lineage"] = "model.lineage"
    id: str
    chain: list[dict[str, Any]]
    exports: list[dict[str, Any]] = Field(
        default_factory=list, description="The version's exports, oldest first (Exports API and deploy:): id, status, "
        "origin, format, target, job_id and, once recorded, the SHA-256 of the export's files' manifest.")


class AliasRequest(Request):
    alias: RegistryName = Field(description="The alias to point (e.g. staging, production, champion); moved when it exists.")
    version: Annotated[str, Field(pattern=r"^v?[0-9]{1,9}$")] = Field(description="The version it names: v2 (or 2).")


class TagRequest(Request):
    key: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    value: str = Field(max_length=512)


class RegistryDeleted(Response):
    object: Literal["model.version", "model.alias", "model.tag", "model.export"]
    id: str
    deleted: bool = True


# ---- keys ---------------------------------------------------------------------------------------


TENANT_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"


Scope = Literal["read", "jobs", "files", "admin"]


class TenantLimits(Request):
    """A tenant's limits; a PUT replaces them all (a missing field is unlimited, or the default)."""

    max_running_jobs: int | None = Field(None, ge=1, le=1_000_000, description="Jobs running at once.")
    max_gpus: int | None = Field(None, ge=1, le=1_000_000, description="GPUs held at once.")
    weight: float = Field(1.0, gt=0, le=1e6, description="Fair-share weight between tenants.")
    max_active_jobs: int | None = Field(
        None, ge=1, le=1_000_000, description="Jobs not finished (validating, queued, running, paused); the next "
        "creation is a 429 quota_exceeded.")
    max_storage_bytes: int | None = Field(
        None, ge=1, le=1 << 60, description="Bytes of live files; an upload that would pass it is a 413.")
    requests_per_minute: int | None = Field(
        None, ge=1, le=1_000_000, description="Request rate of each of the tenant's keys (default: the server's, "
        "TUNEFORGE_RATE_LIMIT_PER_MINUTE); past it, 429 with Retry-After.")


class TenantBudgetRequest(Request):
    """A tenant's monthly budgets (UTC calendar months); a PUT replaces both (a missing one is unlimited)."""

    monthly_cost_usd: float | None = Field(
        None, gt=0, le=1e12, description="USD a month; a job whose estimate would pass it is a 429 budget_exceeded, "
        "and running jobs stop at their next checkpoint once it is spent.")
    monthly_gpu_hours: float | None = Field(None, gt=0, le=1e12, description="GPU-hours a month, enforced the same way.")


class TenantBudgetObject(Response):
    object: Literal["tuneforge.tenant_budget"] = "tuneforge.tenant_budget"
    tenant: str
    month: str  # YYYY-MM, UTC
    monthly_cost_usd: float | None = None
    monthly_gpu_hours: float | None = None
    cost_usd: float  # used this month
    gpu_hours: float


class TenantCreateRequest(TenantLimits):
    """A new tenant and its limits (each optional: unlimited, or the default)."""

    name: str = Field(..., pattern=TENANT_NAME, description="Tenant name: lowercase letters, digits and dashes.")


class TenantObject(Response):
    object: Literal["tuneforge.tenant"] = "tuneforge.tenant"
    id: str
    created_at: int
    max_running_jobs: int | None = None
    max_gpus: int | None = None
    weight: float
    max_active_jobs: int | None = None
    max_storage_bytes: int | None = None
    requests_per_minute: int | None = None


class KeyCreateRequest(Request):
    tenant: str = Field(..., pattern=TENANT_NAME, description="Tenant (organization / project) name; it must exist.")
    name: str = Field("", max_length=200)
    admin: bool = Field(False, description="Shorthand for adding the admin scope.")
    scopes: list[Scope] | None = Field(
        None, max_length=4, description="What the key may do: read (every GET), jobs (create and control jobs, "
        "delete models), files (upload and delete files), admin (tenants, keys, limits, the audit log). "
        "Default: read, jobs, files.")
    expires_in: int | None = Field(None, ge=60, le=10 * 366 * 86400,
                                   description="Seconds until the key stops working (default: never).")


class KeyObject(Response):
    """A key as lists show it: never the secret, only its first characters (`hint`)."""

    object: Literal["tuneforge.api_key"] = "tuneforge.api_key"
    id: str
    tenant: str
    name: str
    admin: bool
    scopes: list[Scope]
    hint: str | None = None
    created_at: int
    expires_at: int | None = None
    revoked_at: int | None = None


class KeyCreated(KeyObject):
    key: str = Field(..., description="The secret; shown once, stored only as a hash.")


class AuditRecordObject(Response):
    object: Literal["tuneforge.audit_record"] = "tuneforge.audit_record"
    id: str
    created_at: float
    tenant: str | None = None
    key_id: str | None = None
    action: str
    object_id: str | None = None
    status: int
    request_id: str
    source: str | None = None


class ListObject(Response):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None

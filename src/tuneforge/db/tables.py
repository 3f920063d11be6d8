"""SQLAlchemy tables of the control plane: tenants and keys, files, jobs and what they report, models, workers, evals.

Times that users see are integer Unix seconds (as in the OpenAI API); lease deadlines are float seconds.
Every user-visible row carries tenant_id, and every query that serves a user filters on it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, text, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_gpus: Mapped[int | None] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    # Quotas (None: unlimited): jobs not finished yet, bytes of live files, requests per minute per key.
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    admin: Mapped[bool] = mapped_column(Boolean, default=False)  # holds the admin scope (kept for lookups)
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)
    # Space-separated scopes (read jobs files admin); keys made before scopes existed got theirs in 0005.
    scopes: Mapped[str] = mapped_column(String(64), default="read jobs files", server_default="read jobs files")
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    hint: Mapped[str | None] = mapped_column(String(16))  # the key's first characters, to tell keys apart in lists


class File(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger)
    # The claim of the scheduler validating an upload (status "uploaded"): who, and until when.
    validation_owner: Mapped[str | None] = mapped_column(String(80))
    validation_expires_at: Mapped[float | None] = mapped_column(Float)
    # The second index is the validator's: it looks for "uploaded" files every poll.
    __table_args__ = (Index("ix_files_tenant_seq", "tenant_id", "seq"), Index("ix_files_status_seq", "status", "seq"))


class Job(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    status: Mapped[str] = mapped_column(String(24))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    model: Mapped[str] = mapped_column(String(255))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # JobSpec with file ids, never server paths
    priority: Mapped[int] = mapped_column(Integer, default=0)
    num_gpus: Mapped[int] = mapped_column(Integer)  # per node
    num_nodes: Mapped[int] = mapped_column(Integer)
    gpu_type: Mapped[str] = mapped_column(String(24))
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # The lease: which worker may be running something in this job's directory, and until when.
    lease_owner: Mapped[str | None] = mapped_column(String(80))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempt_started_at: Mapped[float | None] = mapped_column(Float)
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    events_offset: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes of events.jsonl already ingested
    resolved_spec: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the recipe's resolved_spec.json
    restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # crash restarts so far
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_seq", "tenant_id", "seq"),
        # The queue: each tenant's claimable jobs in the order they start (higher priority, then older).
        Index("ix_jobs_queue", "status", "tenant_id", text("priority DESC"), "seq"),
    )


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)


class JobMetric(Base):
    __tablename__ = "job_metrics"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    __table_args__ = (Index("ix_job_metrics_job_step", "job_id", "step"),)


class JobCheckpoint(Base):
    __tablename__ = "job_checkpoints"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(255))  # relative to the job directory; never shown to users
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_job_checkpoints_job_step"),)


class FineTunedModel(Base):
    __tablename__ = "models"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(255), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    base_model: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # adapter | model
    location: Mapped[str] = mapped_column(String(512))  # relative to TUNEFORGE_HOME; never shown to users
    created_at: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger)


class Worker(Base):
    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    executor: Mapped[str] = mapped_column(String(16))
    inventory: Mapped[list[Any]] = mapped_column(JSON)  # [{"gpu_type": ..., "gpus": n}] per node
    started_at: Mapped[int] = mapped_column(BigInteger)
    last_seen: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[int | None] = mapped_column(BigInteger)


class RateLimitBucket(Base):
    """One token bucket per API key, shared by every API process (updated with one atomic upsert)."""

    __tablename__ = "rate_limit_buckets"
    key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)  # below 0 after a refused request (see db/quotas.py)
    updated_at: Mapped[float] = mapped_column(Float)


class AuditRecord(Base):
    """Append-only (triggers refuse UPDATE and DELETE): who did what to which object, and the outcome.
    Never a secret or a request body."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    tenant_id: Mapped[str | None] = mapped_column(String(63))  # None: the caller was not authenticated
    key_id: Mapped[str | None] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(160))  # "POST /v1/fine_tuning/jobs/{job_id}/cancel"
    object_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[int] = mapped_column(Integer)  # the HTTP status answered
    request_id: Mapped[str] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(64))  # the client address (as the proxy reported it)
    __table_args__ = (Index("ix_audit_log_tenant_seq", "tenant_id", "seq"),)


class Eval(Base):
    """An eval in OpenAI's shape: the item schema its runs' data must match, and its graders."""

    __tablename__ = "evals"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(256))
    data_source_config: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"type": "custom", "item_schema", ...}
    testing_criteria: Mapped[list[Any]] = mapped_column(JSON)  # graders (spec/graders.py), as validated
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_evals_tenant_seq", "tenant_id", "seq"),)


class EvalRun(Base):
    """A run of an eval: the job that runs it (method eval; its status is the run's), and once it succeeded
    the counts the recipe reported."""

    __tablename__ = "eval_runs"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    model: Mapped[str | None] = mapped_column(String(255))  # None: a jsonl run (the items carry their samples)
    data_source: Mapped[dict[str, Any]] = mapped_column(JSON)  # as requested; inline items replaced by their file id
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[int] = mapped_column(BigInteger)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # spec/evals.py EvalRunResult, once completed
    deleted_at: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_eval_runs_eval_seq", "eval_id", "seq"),)


class EvalOutputItem(Base):
    """One graded item of a completed run (copied from the run's output_items.jsonl by the worker)."""

    __tablename__ = "eval_output_items"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"))
    datasource_item_id: Mapped[int] = mapped_column(Integer)  # the item's index in the run's data
    status: Mapped[str] = mapped_column(String(8))  # pass | fail | error
    created_at: Mapped[int] = mapped_column(BigInteger)
    datasource_item: Mapped[dict[str, Any]] = mapped_column(JSON)
    sample: Mapped[dict[str, Any]] = mapped_column(JSON)
    results: Mapped[list[Any]] = mapped_column(JSON)
    __table_args__ = (Index("ix_eval_output_items_run_seq", "run_id", "seq"),)


# ---- registry: model names, versions, lineage, aliases (issue 13; migration 0006) ----
class ModelVersion(Base):
    """One immutable version of a tenant's model name: the manifest of its files and its lineage."""

    __tablename__ = "model_versions"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), unique=True)  # the ft:... id it serves as
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(String(16))  # adapter | model
    manifest_sha256: Mapped[str] = mapped_column(String(64), index=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"files": [{"path", "sha256", "bytes"}]}
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version", name="uq_model_versions_tenant_name_version"),)


class ModelAlias(Base):
    """A movable name (staging, production, champion...) for one version of a model name."""

    __tablename__ = "model_aliases"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    updated_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("tenant_id", "name", "alias", name="uq_model_aliases_tenant_name_alias"),)


class ModelTag(Base):
    __tablename__ = "model_tags"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(512))
    __table_args__ = (UniqueConstraint("version_id", "key", name="uq_model_tags_version_key"),)


class RegisteredBaseModel(Base):
    """A base model an admin registered from a local Hugging Face directory (shared by every tenant)."""

    __tablename__ = "registered_base_models"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger)


class RegistryBlob(Base):
    """Which blob each registered file is: what the collector asks before removing a blob."""

    __tablename__ = "registry_blobs"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(80), index=True)  # a version id, or base:NAME
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)



# ---- storage: object-store locations, encryption keys (issues 13, 15; migration 0007) ----


class TenantKey(Base):
    """A version of a tenant's key encryption key. The key itself lives with the key provider
    (registry/storage/keys.py), never here; retired_at: destroyed after every data key was re-wrapped,
    or shredded with the tenant's keys."""

    __tablename__ = "tenant_keys"
    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    retired_at: Mapped[int | None] = mapped_column(BigInteger)


class StoredObject(Base):
    """One object in the object store, owned by a tenant. address is tenant-scoped (sha256 of the tenant id
    and the content's sha256), so equal files of two tenants are two objects and nobody learns of the
    other's; the data key sealing it is kept wrapped under the tenant key version named here."""

    __tablename__ = "stored_objects"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    address: Mapped[str] = mapped_column(String(64))
    location: Mapped[str] = mapped_column(String(512))  # the store key
    bytes: Mapped[int] = mapped_column(BigInteger)  # plaintext size
    encrypted: Mapped[bool] = mapped_column(Boolean)
    key_version: Mapped[int | None] = mapped_column(Integer)
    wrapped_key: Mapped[str | None] = mapped_column(String(120))  # base64 of nonce | sealed data key
    created_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("tenant_id", "address", name="uq_stored_objects_tenant_address"),
                      Index("ix_stored_objects_tenant_key", "tenant_id", "key_version"))


class ObjectLink(Base):
    """What a stored object is to whom: a file's dataset (owner the file id, name "data"), or one file of
    a job's published outputs (owner the job id, name its path in the job directory, e.g. adapter/...)."""

    __tablename__ = "object_links"
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    kind: Mapped[str] = mapped_column(String(16))  # dataset | adapter | model | checkpoint | export | evaluation
    object_id: Mapped[str] = mapped_column(ForeignKey("stored_objects.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


# ---- uploads: OpenAI's Uploads API (issue 13; migration 0008) ----


class Upload(Base):
    """A multi-part upload (OpenAI's Upload object): the declared size it must reach, its parts, and once
    completed the ordinary file it became."""

    __tablename__ = "uploads"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    mime_type: Mapped[str] = mapped_column(String(127))
    bytes: Mapped[int] = mapped_column(BigInteger)  # declared at creation; parts may never pass it
    received_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16))  # pending | completed | cancelled | expired
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    file_id: Mapped[str | None] = mapped_column(String(40))
    # The second index is the expiry sweep's: pending uploads by deadline.
    __table_args__ = (Index("ix_uploads_tenant_seq", "tenant_id", "seq"),
                      Index("ix_uploads_status_expires", "status", "expires_at"))


class UploadPart(Base):
    """One part of an upload: a blob in the artifact store (kept while its upload is pending)."""

    __tablename__ = "upload_parts"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id"), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


# ---- cost: prices, estimates, budgets, usage (issue 16; migration 0009) ----


class JobCost(Base):
    """A job's cost estimate at submission and, once it finished, its actual cost, the platform overhead
    and the estimate's error (planner/cost.py, scheduler/cost.py)."""

    __tablename__ = "job_costs"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # planner.cost.CostEstimate; None: not priced
    estimated_gpu_hours: Mapped[float | None] = mapped_column(Float)
    estimated_cost_usd: Mapped[float | None] = mapped_column(Float)
    estimated_wall_seconds: Mapped[float | None] = mapped_column(Float)
    actual_gpu_hours: Mapped[float | None] = mapped_column(Float)  # set when the job finished
    actual_cost_usd: Mapped[float | None] = mapped_column(Float)
    overhead_fraction: Mapped[float | None] = mapped_column(Float)  # run time outside training steps
    estimate_error: Mapped[float | None] = mapped_column(Float)  # (estimated - actual) / actual GPU-hours
    finalized_at: Mapped[int | None] = mapped_column(BigInteger)


class TenantBudget(Base):
    """A tenant's monthly budgets (None: unlimited), in USD and in GPU-hours, per UTC calendar month."""

    __tablename__ = "tenant_budgets"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    monthly_cost_usd: Mapped[float | None] = mapped_column(Float)
    monthly_gpu_hours: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class UsageRecord(Base):
    """Device time a job's processes ran, priced when it ran: written by the worker at every heartbeat and
    when a run ends, one row per UTC day a span touches, so usage by day and budgets are current."""

    __tablename__ = "usage_records"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    day: Mapped[str] = mapped_column(String(10))  # UTC, YYYY-MM-DD
    device: Mapped[str] = mapped_column(String(24))  # the GPU type it ran on, or cpu
    gpu_seconds: Mapped[float] = mapped_column(Float)
    cost_usd: Mapped[float] = mapped_column(Float)
    created_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_usage_records_tenant_day", "tenant_id", "day"),)


# ---- sweeps (issue 18; migration 0010) ----


class Sweep(Base):
    """A hyperparameter sweep: its spec (spec/sweep.py, file ids), the Optuna study that samples it, and how it ended."""

    __tablename__ = "sweeps"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # running | succeeded | cancelled | failed
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    study_name: Mapped[str] = mapped_column(String(64), unique=True)  # Optuna's study (tables below)
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    stop_reason: Mapped[str | None] = mapped_column(String(255))
    best_job_id: Mapped[str | None] = mapped_column(String(40))
    best_model: Mapped[str | None] = mapped_column(String(255))  # the best trial's fine-tuned model id
    __table_args__ = (Index("ix_sweeps_tenant_seq", "tenant_id", "seq"), Index("ix_sweeps_status", "status"))


class SweepTrial(Base):
    """One trial: an ordinary job with the sampled parameters; pruned trials are cancelled jobs."""

    __tablename__ = "sweep_trials"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # Optuna's trial number
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16))  # running | succeeded | pruned | failed | cancelled
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    values: Mapped[list[Any] | None] = mapped_column(JSON)  # the objectives, in the spec's order
    reported_step: Mapped[int] = mapped_column(Integer, default=0)  # last step told to Optuna as intermediate
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("sweep_id", "number", name="uq_sweep_trials_sweep_number"),)


# Optuna's RDB storage keeps the studies in the same database, in its own tables (studies, trials,
# trial_params, ..., version_info), created by our migration 0010 from Optuna's own models: Optuna's own
# Alembic history would write our alembic_version table, so it never runs here (docs/sweeps.md). They are
# not part of this metadata (importing Optuna costs every process half a second); the drift test compares
# them against Optuna's metadata separately. None of its table names is one of ours.


# ---- monitoring: alerts (issue 16; migration 0011) ----
# No table: alerts are job events (kind "alert"), system samples ride in the metrics events (docs/monitoring.md).


# ---- exports: exports of fine-tuned models as API calls (issue 13; migration 0013) ----


class ModelExport(Base):
    """An export of a tenant's fine-tuned model: the job that makes it (method export; its status is the
    export's), whose DIR/export holds the files and serve.json."""

    __tablename__ = "model_exports"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    model_id: Mapped[str] = mapped_column(String(255))  # the ft: id exported
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_model_exports_tenant_model", "tenant_id", "model_id", "seq"),)


# ---- the artifact folder sealed at rest (issue 15; migration 0014) ----


class SealedBlob(Base):
    """An upload's bytes in the artifact folder, sealed with its own data key (envelope encryption), kept
    at artifacts/sealed/TENANT/ID: once per tenant and content, never shared across tenants. The data key
    is kept wrapped under the tenant key version named here; touched_at is the last commit of these bytes
    (the collector removes only blobs nothing refers to and nobody committed within its grace period)."""

    __tablename__ = "sealed_blobs"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    sha256: Mapped[str] = mapped_column(String(64))  # of the plaintext, as in files.sha256
    bytes: Mapped[int] = mapped_column(BigInteger)  # plaintext size
    key_version: Mapped[int] = mapped_column(Integer)
    wrapped_key: Mapped[str] = mapped_column(String(120))  # base64 of nonce | sealed data key
    created_at: Mapped[int] = mapped_column(BigInteger)
    touched_at: Mapped[int] = mapped_column(BigInteger, index=True)
    __table_args__ = (UniqueConstraint("tenant_id", "sha256", name="uq_sealed_blobs_tenant_sha256"),
                      Index("ix_sealed_blobs_tenant_key", "tenant_id", "key_version"))


class SealedJobKey(Base):
    """The data key that seals a job directory's outputs at rest once its run ends (checkpoints, the adapter or
    model, the evaluation report, exports: registry/storage/job_files.py), wrapped under the tenant key version
    named here. Each file's own key is derived from it and the file's path; rotation re-wraps this row."""

    __tablename__ = "sealed_job_keys"
    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    key_version: Mapped[int] = mapped_column(Integer)
    wrapped_key: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_sealed_job_keys_tenant_key", "tenant_id", "key_version"),)


class ShreddedHolder(Base):
    """Crypto-shredding made permanent (issue 15; migration 0016): a holder of a tenant's bytes (a file id, an upload
    part id, or the job id whose registered files a model version or an export lists) that had them when the sealed
    blob was wrapped under a key since shredded. Written when the same bytes are sealed again under a new key
    (registry/artifacts.py): the new blob opens for new holders only, never for these. blob_id and key_version are
    the shredded blob's; the rows go with the tenant's sealed blob of these bytes (the collector's)."""

    __tablename__ = "shredded_holders"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    sha256: Mapped[str] = mapped_column(String(64))
    holder: Mapped[str] = mapped_column(String(64))
    blob_id: Mapped[str] = mapped_column(String(40))
    key_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("tenant_id", "sha256", "holder", name="uq_shredded_holders_tenant_sha256_holder"),)


# ---- the dataset registry: named versions of uploaded files (issue 13; migration 0017) ----


class DatasetVersion(Base):
    """One immutable version of a tenant's dataset name: an uploaded file (the bytes stay the file's) with
    the digest, size and report facts it had when registered, and the version it was derived from."""

    __tablename__ = "dataset_versions"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str | None] = mapped_column(String(32))  # the dataset report's: chat, instruction, ...
    examples: Mapped[int] = mapped_column(Integer)
    source_version_id: Mapped[str | None] = mapped_column(ForeignKey("dataset_versions.id"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version", name="uq_dataset_versions_tenant_name_version"),
                      Index("ix_dataset_versions_tenant_file", "tenant_id", "file_id"))


class DatasetAlias(Base):
    """A movable name (latest-clean, eval, production...) for one version of a dataset name."""

    __tablename__ = "dataset_aliases"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[str] = mapped_column(ForeignKey("dataset_versions.id"))
    updated_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("tenant_id", "name", "alias", name="uq_dataset_aliases_tenant_name_alias"),)


class DatasetTag(Base):
    __tablename__ = "dataset_tags"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("dataset_versions.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(512))
    __table_args__ = (UniqueConstraint("version_id", "key", name="uq_dataset_tags_version_key"),)


class JobDataset(Base):
    """The dataset version a job named for its training or validation file (dataset:NAME@vN or NAME:ALIAS),
    as resolved at submission: what the lineage of its model records, whatever the alias names later."""

    __tablename__ = "job_datasets"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    role: Mapped[str] = mapped_column(String(16))  # training | validation
    version_id: Mapped[str] = mapped_column(ForeignKey("dataset_versions.id"))
    __table_args__ = (UniqueConstraint("job_id", "role", name="uq_job_datasets_job_role"),)

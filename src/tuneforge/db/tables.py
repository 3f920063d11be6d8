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


# ---- storage: object-store locations, encryption keys (issues 13, 15; migration 0007) ----


# ---- uploads: OpenAI's Uploads API (issue 13; migration 0008) ----


# ---- cost: prices, estimates, budgets, usage (issue 16; migration 0009) ----


# ---- sweeps (issue 18; migration 0010) ----


# ---- monitoring: alerts (issue 16; migration 0011) ----

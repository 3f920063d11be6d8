"""Control-plane settings, read once from TUNEFORGE_* environment variables.

The API, the scheduler and the workers read the same variables, so one environment describes a
deployment: where the database is, where artifacts go, which executor runs jobs, how long a lease lasts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args

from tuneforge.home import tuneforge_home

ExecutorKind = Literal["local", "ray", "kubernetes"]


class SettingsError(ValueError):
    """An environment variable with a value tuneforge cannot use."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    artifacts_dir: Path
    jobs_dir: Path
    executor: ExecutorKind = "local"
    lease_seconds: float = 60.0  # a worker silent this long is presumed dead and its job re-queued
    heartbeat_seconds: float = 10.0  # how often a worker renews its leases (well under lease_seconds)
    poll_seconds: float = 1.0  # how often a worker looks for new jobs and tails event logs
    stop_grace_seconds: float = 120.0  # SIGTERM to SIGKILL: time for the recipe to write a checkpoint
    max_attempts: int = 5  # a job that loses its worker this many times fails
    max_upload_bytes: int = 1 << 30
    # The scheduler validates each upload in a child process under these bounds; past one, the file is "error".
    validation_timeout_seconds: float = 600.0  # wall time of one validation
    validation_max_memory_bytes: int = 2 << 30  # resident memory of the validating process
    validation_max_inflated_bytes: int = 4 << 30  # bytes of a gzip upload once decompressed
    validation_max_ratio: float = 100.0  # decompressed / stored bytes, checked past validation_ratio_floor_bytes
    validation_ratio_floor_bytes: int = 64 << 20
    validation_max_lines: int = 10_000_000  # lines (blank ones included) or records of one upload
    blob_grace_seconds: float = 3600.0  # an unreferenced blob is removed once it is older than this
    max_streams_per_key: int = 20  # open event streams one API key may hold; the next is answered 429
    reserve_after_seconds: float = 1800.0  # a job waiting this long stops smaller jobs from jumping ahead
    ray_address: str | None = None
    k8s_namespace: str = "default"
    k8s_image: str = "tuneforge:latest"
    k8s_pvc: str = "tuneforge-home"
    k8s_service_account: str | None = None
    k8s_inventory: str = ""  # the cluster's nodes for placement, e.g. "h100-80gb:8,h100-80gb:8"
    # What the recipe image can run, e.g. "ddp,fsdp,deepspeed"; empty: what the worker's own environment has.
    k8s_strategies: str = ""

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        home = tuneforge_home()
        env = os.environ
        values: dict = {
            "database_url": env.get("TUNEFORGE_DATABASE_URL") or f"sqlite:///{home / 'tuneforge.db'}",
            "artifacts_dir": Path(env.get("TUNEFORGE_ARTIFACTS_DIR") or home / "artifacts"),
            "jobs_dir": home / "jobs",
        }
        for field in fields(cls):
            name = f"TUNEFORGE_{field.name.upper()}"
            if field.name in values or name not in env or env[name] == "":
                continue
            raw = env[name]
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            try:
                if kind.startswith("float"):
                    values[field.name] = float(raw)
                elif kind.startswith("int"):
                    values[field.name] = int(raw)
                else:
                    values[field.name] = raw
            except ValueError:
                raise SettingsError(f"{name}={raw!r}: expected a number") from None
        values.update(overrides)
        if values.get("executor", "local") not in get_args(ExecutorKind):
            raise SettingsError(
                f"TUNEFORGE_EXECUTOR={values['executor']!r}: expected one of {', '.join(get_args(ExecutorKind))}"
            )
        settings = cls(**values)
        if settings.heartbeat_seconds >= settings.lease_seconds:
            raise SettingsError(
                f"TUNEFORGE_HEARTBEAT_SECONDS ({settings.heartbeat_seconds}) must be shorter than "
                f"TUNEFORGE_LEASE_SECONDS ({settings.lease_seconds}), or every lease would expire"
            )
        return settings

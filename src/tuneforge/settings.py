"""Control-plane settings, read once from TUNEFORGE_* environment variables.

The API, the scheduler and the workers read the same variables, so one environment describes a
deployment: where the database is, where artifacts go, which executor runs jobs, how long a lease lasts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args

from tuneforge.home import tuneforge_home

ExecutorKind = Literal["local", "ray", "kubernetes"]


class SettingsError(ValueError):
    """An environment variable with a value tuneforge cannot use."""


@dataclass(frozen=True)
class JudgeEndpoint:
    """An OpenAI-compatible chat completions server the operator lets judges use, known by its name.

    Requests name the endpoint, never a URL or a key: the key is read from the environment variable
    `api_key_env` when a judge is built, so it never sits in settings, specs or logs."""

    name: str
    base_url: str  # as for the OpenAI client: requests go to {base_url}/chat/completions
    api_key_env: str | None = None  # no key: no Authorization header (a local vLLM, say)
    timeout_seconds: float = 120.0
    max_retries: int = 4  # on 429, 5xx and connection errors, with exponential backoff
    max_concurrency: int = 4  # requests in flight at once


JUDGE_ENDPOINT_KEYS = ("base_url", "api_key_env", "timeout_seconds", "max_retries", "max_concurrency")


def parse_judge_endpoints(raw: str, *, variable: str = "TUNEFORGE_JUDGE_ENDPOINTS") -> dict[str, JudgeEndpoint]:
    """{"name": {"base_url": "https://...", "api_key_env": "ENV_VAR_NAME"}, ...} as JudgeEndpoint objects."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{variable}: expected JSON like {{\"name\": {{\"base_url\": ..., \"api_key_env\": ...}}}}, "
                            f"found invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise SettingsError(f"{variable}: expected a JSON object of endpoint names, found {type(value).__name__}")
    endpoints = {}
    for name, config in value.items():
        where = f"{variable}: endpoint {name!r}"
        if not name or not all(c.isalnum() or c in "._-" for c in name) or not name[0].isalnum():
            raise SettingsError(f"{where}: names are letters, digits, '.', '_' and '-', starting with a letter or digit")
        if not isinstance(config, dict):
            raise SettingsError(f"{where}: expected an object with base_url and api_key_env")
        unknown = sorted(set(config) - set(JUDGE_ENDPOINT_KEYS))
        if unknown:
            raise SettingsError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(JUDGE_ENDPOINT_KEYS)}")
        base_url = config.get("base_url")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise SettingsError(f"{where}: base_url must be an http:// or https:// URL, found {base_url!r}")
        api_key_env = config.get("api_key_env")
        if api_key_env is not None and (not isinstance(api_key_env, str) or not api_key_env.strip()):
            raise SettingsError(f"{where}: api_key_env must name an environment variable, found {api_key_env!r}")
        numbers = {}
        for key, kind, low in (("timeout_seconds", float, 0.0), ("max_retries", int, -1), ("max_concurrency", int, 0)):
            if key in config:
                number = config[key]
                if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= low \
                        or (kind is int and number != int(number)):
                    raise SettingsError(f"{where}: {key} must be a {'positive' if low >= 0 else 'non-negative'} "
                                        f"{'integer' if kind is int else 'number'}, found {number!r}")
                numbers[key] = kind(number)
        endpoints[name] = JudgeEndpoint(name=name, base_url=base_url.rstrip("/"), api_key_env=api_key_env, **numbers)
    return endpoints


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
    # /v1/uploads: the most bytes one Upload may declare (its parts stream in, 64 MiB at most each), and
    # how long a pending Upload lives before it expires and its parts are removed.
    uploads_max_bytes: int = 8 << 30
    upload_expiry_seconds: float = 3600.0
    # The scheduler validates each upload in a child process under these bounds; past one, the file is "error".
    validation_timeout_seconds: float = 600.0  # wall time of one validation
    validation_max_memory_bytes: int = 2 << 30  # resident memory of the validating process
    validation_max_inflated_bytes: int = 4 << 30  # bytes of a gzip upload once decompressed
    validation_max_ratio: float = 100.0  # decompressed / stored bytes, checked past validation_ratio_floor_bytes
    validation_ratio_floor_bytes: int = 64 << 20
    validation_max_lines: int = 10_000_000  # lines (blank ones included) or records of one upload
    blob_grace_seconds: float = 3600.0  # an unreferenced blob is removed once it is older than this
    max_streams_per_key: int = 20  # open event streams one API key may hold; the next is answered 429
    # Requests per key: a token bucket refilled at rate_limit_per_minute, holding up to rate_limit_burst
    # (a tenant's requests_per_minute overrides the rate); shared through Redis when redis_url is set.
    rate_limit_per_minute: int = 1200
    rate_limit_burst: int = 200
    redis_url: str | None = None
    reserve_after_seconds: float = 1800.0  # a job waiting this long stops smaller jobs from jumping ahead
    ray_address: str | None = None
    k8s_namespace: str = "default"
    k8s_image: str = "tuneforge:latest"
    k8s_pvc: str = "tuneforge-home"
    k8s_service_account: str | None = None
    k8s_inventory: str = ""  # the cluster's nodes for placement, e.g. "h100-80gb:8,h100-80gb:8"
    # TUNEFORGE_SHARED_JOB_ROOT=1: this worker's jobs_dir (TUNEFORGE_HOME/jobs) is a folder every node of its
    # executor sees at the same path (NFS, a shared disk, one machine), which a job on several nodes needs:
    # every rank writes its checkpoint shards there. The kubernetes executor's PVC is shared by construction.
    shared_job_root: bool = False
    # TUNEFORGE_JUDGE_ENDPOINTS: the OpenAI-compatible servers LLM judges may call, by name (see JudgeEndpoint).
    judge_endpoints: dict[str, JudgeEndpoint] = dataclasses.field(default_factory=dict)
    # Hosts of judge endpoints that may resolve to private, loopback or link-local addresses (a judge on the
    # operator's own network), comma-separated; every other endpoint must resolve to public addresses only.
    judge_allowed_hosts: str = ""
    # Requests without a valid key (missing, malformed, wrong, revoked): a token bucket per client address,
    # so guessing keys is bounded like any key's requests are.
    unauthenticated_rate_limit_per_minute: int = 60
    unauthenticated_rate_limit_burst: int = 30
    # What the recipe image can run, e.g. "ddp,fsdp,deepspeed"; empty: what the worker's own environment has.
    k8s_strategies: str = ""
    # The object store jobs read inputs from and publish outputs to (registry/storage, docs/storage.md):
    # s3://bucket/prefix (credentials from the usual AWS_* variables) or file:///shared/folder; unset: none,
    # jobs read the blobs under artifacts_dir (the local executor, or a folder every worker mounts).
    store_url: str | None = None
    s3_endpoint_url: str | None = None  # an S3-compatible server (MinIO, Ceph, moto): its http(s) URL
    s3_multipart_threshold_bytes: int = 64 << 20  # files past this are uploaded in parts
    # Encryption at rest of what goes into the object store: a data key per object, wrapped by the tenant's
    # key from keys_dir (default TUNEFORGE_HOME/keys, 0700/0600). TUNEFORGE_ENCRYPT_AT_REST=false: stored as is.
    encrypt_at_rest: bool = True
    keys_dir: str | None = None  # from_env: TUNEFORGE_KEYS_DIR, else TUNEFORGE_HOME/keys
    # /v1/chat/completions and /v1/completions of `tuneforge server` (api/playground_pool.py): a playground process
    # per base model, started on the first request for it (nothing runs before), at most playground_max_processes
    # at once (the least recently used idle one stops for a new base), each with up to playground_max_adapters
    # adapters. playground_devices: auto (what the server sees), cpu, or CUDA_VISIBLE_DEVICES for them ("1").
    # A process no request used for playground_idle_seconds stops, freeing its model's memory (0: never); the next
    # request for its base starts it again.
    playground: bool = True
    playground_max_processes: int = 2
    playground_max_adapters: int = 8
    playground_devices: str = "auto"
    playground_start_timeout_seconds: float = 600.0
    playground_request_timeout_seconds: float = 600.0
    playground_idle_seconds: float = 900.0

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        home = tuneforge_home()
        env = os.environ
        values: dict = {
            "database_url": env.get("TUNEFORGE_DATABASE_URL") or f"sqlite:///{home / 'tuneforge.db'}",
            "artifacts_dir": Path(env.get("TUNEFORGE_ARTIFACTS_DIR") or home / "artifacts"),
            "jobs_dir": home / "jobs",
            "judge_endpoints": parse_judge_endpoints(env.get("TUNEFORGE_JUDGE_ENDPOINTS") or "{}"),
            "keys_dir": env.get("TUNEFORGE_KEYS_DIR") or str(home / "keys"),
        }
        for field in fields(cls):
            name = f"TUNEFORGE_{field.name.upper()}"
            if field.name in values or name not in env or env[name] == "":
                continue
            raw = env[name]
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            try:
                if kind.startswith("bool"):
                    if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                        raise SettingsError(f"{name}={raw!r}: expected true or false")
                    values[field.name] = raw.lower() in ("1", "true", "yes", "on")
                elif kind.startswith("float"):
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
        if settings.playground_max_processes < 1 or settings.playground_max_adapters < 1:
            raise SettingsError("TUNEFORGE_PLAYGROUND_MAX_PROCESSES and TUNEFORGE_PLAYGROUND_MAX_ADAPTERS must be 1 or more")
        if settings.playground_idle_seconds < 0:
            raise SettingsError(f"TUNEFORGE_PLAYGROUND_IDLE_SECONDS={settings.playground_idle_seconds:g}: expected seconds "
                                "(0: playground processes never stop for being idle)")
        devices = settings.playground_devices
        if devices not in ("auto", "cpu") and not all(part.strip().isdigit() for part in devices.split(",")):
            raise SettingsError(f"TUNEFORGE_PLAYGROUND_DEVICES={devices!r}: expected auto, cpu or GPU indices like 0,1")
        if settings.heartbeat_seconds >= settings.lease_seconds:
            raise SettingsError(
                f"TUNEFORGE_HEARTBEAT_SECONDS ({settings.heartbeat_seconds}) must be shorter than "
                f"TUNEFORGE_LEASE_SECONDS ({settings.lease_seconds}), or every lease would expire"
            )
        return settings

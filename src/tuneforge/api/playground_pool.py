"""The playground processes behind the API's /v1/chat/completions and /v1/completions: one per base model,
started on first use, at most TUNEFORGE_PLAYGROUND_MAX_PROCESSES at once (the least recently used idle one
is stopped for a new base), each with up to TUNEFORGE_PLAYGROUND_MAX_ADAPTERS adapters hot-added. A process no
request has used for TUNEFORGE_PLAYGROUND_IDLE_SECONDS is stopped by the pool's reaper thread, so a model tried
once does not hold its memory for the server's life; the next request for its base starts it again.

The API process never imports torch: each base runs in its own child (export/playground_process.py) on
127.0.0.1, a port the kernel picks, answering only requests with this pool's random shared secret. What a
child loads is resolved here from the registry (the version's manifest, materialized from the artifact store
under TUNEFORGE_HOME/registry, or a built-in model's name), never from anything a request names. With encryption at
rest, a tenant's version is decrypted into the serving child's own folder instead (its base when the child starts,
an adapter when it is loaded), removed when that child stops or the adapter is unloaded: no shared plaintext cache.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import httpx
from sqlalchemy.orm import Session

from tuneforge.db import model_versions as version_rows
from tuneforge.home import models_dir, tuneforge_home
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.models import (
    CHECKPOINT_SUFFIX,
    MAX_LINEAGE_DEPTH,
    ModelSource,
    RegistryError,
    materialize_source,
    model_source,
    resolve_base_reference,
)
from tuneforge.registry.versions import ManifestMismatch, ModelShredded, check_readable, file_contents, manifest_digest
from tuneforge.scheduler.executors.process import spawn
from tuneforge.settings import Settings

log = logging.getLogger("tuneforge.playground")
SECRET_ENV = "TUNEFORGE_PLAYGROUND_SECRET"  # as export/playground_process.py reads it
EXIT_NOT_SERVABLE = 3  # export/playground_process.py: the base does not generate text (the reason in its refusal file)
MAX_REFUSAL_CHARS = 2000
# What the registry knows does not generate text, refused before a process starts for it: training methods whose
# outputs are not causal language models, and the built-in bases they train.
NOT_GENERATING = {
    "reward": "it is a reward model: it scores text and does not generate it",
    "clip": "it is a CLIP model: it embeds images and text and does not generate text",
    "vlm": "it is a vision-language model, and the playground's requests carry text only",
}
BUILTIN_METHODS = {"tiny-clip": "clip", "tiny-llava": "vlm"}
SECRET_HEADER = "x-tuneforge-playground-secret"
BASE_NAME = "base"  # what a child calls its base model; adapters are "adapter-<digest>"
STOP_SECONDS = 10.0
MAX_REAP_INTERVAL = 30.0  # how often, at most, the reaper looks for idle processes


class PlaygroundUnavailable(Exception):
    """A playground process could not start, died, or none is free: status, code and a message without paths."""

    def __init__(self, message: str, *, status: int = 503, code: str = "playground_unavailable",
                 retry_after: int | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.retry_after = message, status, code, retry_after
        self.reason: str | None = None  # model_not_servable: why, for the answer to name the request's model


def not_servable(reason: str) -> PlaygroundUnavailable:
    """A base the playground process refused (its reason, no paths): a 400, the same for every later request."""
    refused = PlaygroundUnavailable(f"the playground cannot serve this model: {reason}", status=400,
                                    code="model_not_servable")
    refused.reason = reason
    return refused


@dataclass(frozen=True)
class SealedFiles:
    """A tenant's version sealed at rest, written only into the folder of the child that serves it: the base (when
    it is a tenant's version: base_source) when the child starts, the adapter (adapter_source) when it is loaded."""

    store: LocalArtifactStore
    db: object
    base_source: ModelSource | None = None
    adapter_source: ModelSource | None = None

    def write_base(self, folder: Path) -> str:
        return _write_private(self.store, self.db, self.base_source, folder)

    def write_adapter(self, folder: Path) -> Path:
        return Path(_write_private(self.store, self.db, self.adapter_source, folder))


def _write_private(store: LocalArtifactStore, db, source: ModelSource, folder: Path) -> str:
    """source materialized under folder (a tenant's version; a registered base under it stays in the shared cache);
    a failure is a PlaygroundUnavailable without paths."""
    try:
        return materialize_source(store, source, tuneforge_home() / "registry", db=db, private_root=folder)
    except ModelShredded as exc:
        raise PlaygroundUnavailable(str(exc), status=410, code="content_shredded") from None
    except (ManifestMismatch, OSError, ValueError):
        log.exception("the files of a sealed model version cannot be written for its playground process")
        raise PlaygroundUnavailable("the files of this model cannot be read from the artifact store", status=500,
                                    code="model_unavailable") from None


@dataclass(frozen=True)
class Target:
    """What answers a request: a base (a built-in model's name, a materialized directory, or the key of a sealed
    version written when its child starts) and, for an adapter, its materialized directory, or with sealed files
    its key (adapter_key: written into the child's folder when loaded)."""

    base: str
    adapter: Path | None = None
    adapter_key: str | None = None
    sealed: SealedFiles | None = field(default=None, compare=False)

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None or self.adapter_key is not None

    @property
    def adapter_name(self) -> str:
        if not self.has_adapter:
            return BASE_NAME
        return "adapter-" + sha256((self.adapter_key or str(self.adapter)).encode()).hexdigest()[:16]


def source_key(source: ModelSource) -> str:
    """What names a model's files whatever folder they are written to: a built-in name, or the manifests' digests
    down an adapter's lineage."""
    if source.as_is is not None:
        return source.as_is
    if source.directory is not None:
        return str(source.directory)
    own = manifest_digest(source.manifest)
    checkpoint = source.checkpoint  # a kept checkpoint's weights in place of the version's
    if checkpoint is not None:
        own += f"@{checkpoint.job_dir.name}/{checkpoint.path}"
    return own if source.base is None else f"{own}-on-{source_key(source.base)}"


def _tenant_files(source: ModelSource | None) -> bool:
    """Whether source, or a model down its lineage, is a tenant's version (files sealed for that tenant)."""
    while source is not None:
        if source.tenant_id is not None:
            return True
        source = source.base
    return False


def _check_chain_readable(store: LocalArtifactStore, db, source: ModelSource | None) -> None:
    """ModelShredded when a sealed file down source's lineage has lost its tenant key: every request checks, so a
    child that loaded the model before its tenant was shredded answers no more."""
    while source is not None:
        if source.tenant_id is not None:
            with db.read_session() as session:
                check_readable(store, file_contents(session, store, source.manifest, tenant_id=source.tenant_id,
                                                    holder=source.job_id))
        source = source.base


# ---- which model a request names ------------------------------------------------------------------------


def resolve_pinned(session: Session, *, tenant_id: str, ref: str) -> tuple[str, ModelSource]:
    """The request's model as the tenant sees it: a base model, one of its ft: ids or NAME@vN / NAME:ALIAS.
    Another tenant's model raises exactly what a missing one does (RegistryError 404)."""
    if CHECKPOINT_SUFFIX in ref:
        parent = ref.split(CHECKPOINT_SUFFIX)[0]
        resolve_base_reference(session, tenant_id=tenant_id, ref=parent)  # 404 when not the tenant's
        raise RegistryError(f"{ref}: the playground serves models, not their checkpoints; ask for the model itself",
                            status=400, code="invalid_value")
    pinned = resolve_base_reference(session, tenant_id=tenant_id, ref=ref)
    if problem := generation_problem(session, tenant_id=tenant_id, pinned=pinned):
        raise RegistryError(f"the playground cannot serve {ref}: {problem}", status=400, code="model_not_servable")
    source = model_source(session, tenant_id=tenant_id, base_model=pinned, home=tuneforge_home())
    if source.directory is not None:  # a model row from before versions: no manifest to load it from
        raise RegistryError(f"{ref} was registered before model versions existed, so the registry holds no files "
                            "for it; serve its job directory with `tuneforge serve`", status=400, code="invalid_value")
    return pinned, source


def generation_problem(session: Session, *, tenant_id: str, pinned: str) -> str | None:
    """Why the registry already knows a pinned model does not generate text (its version's method, or that of
    a version down its lineage, or a built-in base's), None when it knows no reason: the playground process
    checks the base's config itself when it loads it."""
    ref: str | None = pinned
    for _ in range(MAX_LINEAGE_DEPTH):
        if ref in BUILTIN_METHODS:
            return NOT_GENERATING[BUILTIN_METHODS[ref]]
        version = version_rows.version_of_model(session, tenant_id=tenant_id, model_id=ref) if ref else None
        if version is None:
            return None
        lineage = version.lineage or {}
        if lineage.get("method") in NOT_GENERATING:
            return NOT_GENERATING[lineage["method"]]
        ref = (lineage.get("base_model") or {}).get("ref")
    return None


def materialize_target(store: LocalArtifactStore, source: ModelSource, *, tenant_store=None,
                       tenant_id: str | None = None, db=None, private: bool = False) -> Target:
    """The files a child loads, written out (and checked against their digests) under TUNEFORGE_HOME/registry
    once, then reused. With an object store, a version a worker elsewhere registered is fetched from it first.
    private (encryption at rest; needs db): a tenant's version is not written here but into the folder of the
    child that serves it (SealedFiles), after checking that its tenant key still opens it (ModelShredded)."""
    if tenant_store is not None:
        from tuneforge.registry.storage.jobs import stage_registered_model

        stage_registered_model(tenant_store, store, tenant_id=tenant_id, source=source)
    root = tuneforge_home() / "registry"
    if private and db is not None and _tenant_files(source):
        _check_chain_readable(store, db, source)
        base_source = source.base if source.base is not None else source
        if _tenant_files(base_source):
            base = "sealed-" + sha256(source_key(base_source).encode()).hexdigest()[:32]
        else:  # a built-in or registered base model (the operator's, not sealed): the shared cache, as before
            base = materialize_source(store, base_source, root, db=db)
            base_source = None
        if source.base is None:
            return Target(base=base, sealed=SealedFiles(store=store, db=db, base_source=base_source))
        return Target(base=base, adapter_key=source_key(source),
                      sealed=SealedFiles(store=store, db=db, base_source=base_source, adapter_source=source))
    if source.base is not None:  # an adapter on its base (itself possibly an adapter, down its lineage)
        return Target(base=materialize_source(store, source.base, root, db=db),
                      adapter=Path(materialize_source(store, source, root, db=db)))
    return Target(base=materialize_source(store, source, root, db=db))


# ---- the processes ------------------------------------------------------------------------------------


@dataclass
class PlaygroundProcess:
    base: str
    process: subprocess.Popen
    url: str
    client: httpx.Client
    workdir: Path
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    adapters: OrderedDict = field(default_factory=OrderedDict)  # name -> requests in flight with it
    adapter_dirs: dict = field(default_factory=dict)  # name -> its decrypted copy in workdir (sealed versions)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alive(self) -> bool:
        return self.process.poll() is None


class Lease:
    def __init__(self, pool: PlaygroundPool, child: PlaygroundProcess, name: str, *, adapter: bool):
        self.pool, self.child, self.name, self.adapter = pool, child, name, adapter
        self.holds_adapter = False
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._release(self)


class PlaygroundPool:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.secret = secrets.token_urlsafe(32)
        self._lock = threading.Lock()
        self._processes: dict[str, PlaygroundProcess] = {}
        self._starting: dict[str, threading.Event] = {}
        self._closed = False
        self._tenant_store = None
        self._closing = threading.Event()
        self._reaper: threading.Thread | None = None
        self._refused: dict[str, str] = {}  # base -> why its process refused it (a base's files never change)

    # ---- leasing a model for one request ---------------------------------------------------------

    def lease(self, target: Target) -> Lease:
        """The process serving target's base, with target's adapter loaded, held (never stopped) until the
        lease is released: after the answer, or after the last chunk of a streamed one."""
        child = self._process_for(target.base, target)
        lease = Lease(self, child, target.adapter_name, adapter=target.has_adapter)
        try:
            self._ensure_adapter(child, target)
            lease.holds_adapter = lease.adapter
        except BaseException:
            lease.release()
            raise
        return lease

    def _release(self, lease: Lease) -> None:
        with self._lock:
            lease.child.in_flight -= 1
            lease.child.last_used = time.monotonic()
        if lease.holds_adapter:
            with lease.child.lock:
                if lease.name in lease.child.adapters:
                    lease.child.adapters[lease.name] -= 1

    def tenant_store(self, db):
        """The object store (TUNEFORGE_STORE_URL) the registered models' files may have to come from; opened on
        first use, None without one."""
        if self.settings.store_url is None:
            return None
        with self._lock:
            if self._tenant_store is None:
                from tuneforge.registry.storage.tenant_store import open_tenant_store

                self._tenant_store = open_tenant_store(db, self.settings)
            return self._tenant_store

    def headers(self) -> dict[str, str]:
        return {SECRET_HEADER: self.secret}

    def _process_for(self, base: str, target: Target | None = None) -> PlaygroundProcess:
        deadline = time.monotonic() + self.settings.playground_start_timeout_seconds
        while True:
            with self._lock:
                if self._closed:
                    raise PlaygroundUnavailable("the server is shutting down")
                if base in self._refused:
                    raise not_servable(self._refused[base])
                child = self._processes.get(base)
                if child is not None and not child.alive():
                    log.warning("the playground process for %s exited with %s; starting another", base,
                                child.process.returncode)
                    self._discard(child)
                    child = None
                if child is not None:
                    child.in_flight += 1
                    child.last_used = time.monotonic()
                    self._processes[base] = self._processes.pop(base)
                    return child
                waiting = self._starting.get(base)
                if waiting is None:
                    evicted = self._make_room()
                    waiting = self._starting[base] = threading.Event()
                    starter = True
                else:
                    starter = False
            if not starter:  # another request is starting this base: wait for it
                if not waiting.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise PlaygroundUnavailable("the playground process for this model is still starting; retry",
                                                retry_after=10)
                if base in self._refused:
                    raise not_servable(self._refused[base])
                if base not in self._processes:
                    raise PlaygroundUnavailable("the playground process for this model could not start "
                                                "(the server's log says why)")
                continue
            try:
                for old in evicted:
                    self._stop(old)
                child = self._start(base, target)  # held by this request (in_flight 1)
                with self._lock:
                    self._processes[base] = child
                    self._start_reaper()
                return child
            finally:
                with self._lock:
                    self._starting.pop(base).set()

    def _make_room(self) -> list[PlaygroundProcess]:
        """Under the lock: the least recently used idle processes to stop so a new one fits."""
        limit = max(1, self.settings.playground_max_processes)
        starting = len(self._starting)
        evicted = []
        for base, child in sorted(self._processes.items(), key=lambda item: item[1].last_used):
            if len(self._processes) - len(evicted) + starting < limit:
                break
            if child.in_flight == 0:
                evicted.append(child)
        if len(self._processes) - len(evicted) + starting >= limit:
            raise PlaygroundUnavailable(
                f"every playground process ({limit}, TUNEFORGE_PLAYGROUND_MAX_PROCESSES) is answering another base "
                "model's requests; retry", retry_after=5)
        for child in evicted:
            del self._processes[child.base]
        return evicted

    def _start(self, base: str, target: Target | None = None) -> PlaygroundProcess:
        home = tuneforge_home()
        workdir = Path(tempfile.mkdtemp(prefix="playground-", dir=self._runtime_dir()))
        port_file, refusal_file = workdir / "port", workdir / "refused"
        loads = base
        if target is not None and target.sealed is not None and target.sealed.base_source is not None:
            try:  # a sealed version's plaintext lives only in this child's folder, removed when it stops
                loads = target.sealed.write_base(workdir / "models")
            except BaseException:
                shutil.rmtree(workdir, ignore_errors=True)
                raise
        command = [sys.executable, "-m", "tuneforge.export.playground_process", "--base", loads, "--name", BASE_NAME,
                   "--port-file", str(port_file), "--refusal-file", str(refusal_file)]
        for root in (home / "registry", models_dir(), workdir / "models"):
            command += ["--allowed-root", str(root)]
        env = {**os.environ, SECRET_ENV: self.secret}
        devices = self.settings.playground_devices
        if devices == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif devices != "auto":
            env["CUDA_VISIBLE_DEVICES"] = devices
        log_path = home / "logs" / "playground.log"
        process = spawn(command, env=env, log_path=log_path)
        deadline = time.monotonic() + self.settings.playground_start_timeout_seconds
        log.info("starting a playground process (pid %d) for %s", process.pid, base)
        while not port_file.is_file():
            if process.poll() is not None or time.monotonic() > deadline:
                self._kill(process)
                if process.returncode == EXIT_NOT_SERVABLE and refusal_file.is_file():
                    reason = refusal_file.read_text(encoding="utf-8", errors="replace")[:MAX_REFUSAL_CHARS]
                    shutil.rmtree(workdir, ignore_errors=True)
                    with self._lock:
                        self._refused[base] = reason
                    raise not_servable(reason)
                shutil.rmtree(workdir, ignore_errors=True)
                reason = (f"exited with {process.returncode}" if process.returncode is not None
                          else f"did not start within {self.settings.playground_start_timeout_seconds:g} s")
                log.error("the playground process for %s %s (see %s)", base, reason, log_path)
                raise PlaygroundUnavailable(f"the playground process for this model {reason}; the server's log "
                                            "says why", status=500 if process.returncode is not None else 503)
            time.sleep(0.1)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        timeout = httpx.Timeout(self.settings.playground_request_timeout_seconds, connect=10.0)
        client = httpx.Client(base_url=url, headers=self.headers(), timeout=timeout, trust_env=False)
        child = PlaygroundProcess(base=base, process=process, url=url, client=client, workdir=workdir, in_flight=1)
        log.info("playground process %d serving %s on %s", process.pid, base, url)
        return child

    def _runtime_dir(self) -> Path:
        path = tuneforge_home() / "run"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        return path

    def _ensure_adapter(self, child: PlaygroundProcess, target: Target) -> None:
        """Load the target's adapter into the child when it is not there yet, unloading the least recently
        used idle ones past TUNEFORGE_PLAYGROUND_MAX_ADAPTERS."""
        name = target.adapter_name
        if not target.has_adapter:
            return
        with child.lock:
            if name not in child.adapters:
                idle = [n for n, users in child.adapters.items() if users == 0]
                while idle and len(child.adapters) >= max(1, self.settings.playground_max_adapters):
                    old = idle.pop(0)
                    self._call(child, "DELETE", f"/tuneforge/adapters/{old}")
                    del child.adapters[old]
                    if old in child.adapter_dirs:  # its decrypted copy goes with it
                        shutil.rmtree(child.adapter_dirs.pop(old), ignore_errors=True)
                path = target.adapter
                if target.sealed is not None and target.sealed.adapter_source is not None:
                    path = child.adapter_dirs[name] = target.sealed.write_adapter(child.workdir / "models")
                self._call(child, "PUT", f"/tuneforge/adapters/{name}", json={"path": str(path)})
                child.adapters[name] = 0
            child.adapters[name] += 1
            child.adapters.move_to_end(name)

    def _call(self, child: PlaygroundProcess, method: str, path: str, **kwargs) -> None:
        try:
            response = child.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self.forget(child)
            raise PlaygroundUnavailable(f"the playground process stopped answering ({type(exc).__name__}); retry") \
                from None
        if response.status_code != 200:
            log.error("the playground process refused %s %s: %s", method, path, response.text[:2000])
            raise PlaygroundUnavailable("the playground process could not load this model's adapter; the server's "
                                        "log says why", status=500)

    # ---- stopping -----------------------------------------------------------------------------------

    def stop_idle(self, now: float | None = None) -> list[str]:
        """One pass of the reaper: stop every process that answers no request and has answered none for
        TUNEFORGE_PLAYGROUND_IDLE_SECONDS (0: never), freeing its model's memory. Returns the bases stopped."""
        idle_seconds = self.settings.playground_idle_seconds
        if idle_seconds <= 0:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:  # a request takes a process under this lock too: one removed here is leased by none
            idle = [child for child in self._processes.values()
                    if child.in_flight == 0 and now - child.last_used >= idle_seconds]
            for child in idle:
                del self._processes[child.base]
        for child in idle:
            log.info("the playground process for %s answered nothing for %g s", child.base, idle_seconds)
            self._stop(child)
        return [child.base for child in idle]

    def _start_reaper(self) -> None:
        """Under the lock: the reaper thread, once, when the first process starts (none runs before)."""
        if self._reaper is None and self.settings.playground_idle_seconds > 0:
            self._reaper = threading.Thread(target=self._reap, name="playground-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        interval = min(MAX_REAP_INTERVAL, max(0.2, self.settings.playground_idle_seconds / 4))
        while not self._closing.wait(interval):
            try:
                self.stop_idle()
            except Exception:  # a stop that failed is logged; the reaper keeps going for the others
                log.exception("stopping idle playground processes failed")

    def forget(self, child: PlaygroundProcess) -> None:
        """A child that failed a request: stopped, so the next request starts a fresh one."""
        with self._lock:
            if self._processes.get(child.base) is child:
                del self._processes[child.base]
        self._stop(child)

    def _discard(self, child: PlaygroundProcess) -> None:
        del self._processes[child.base]
        child.client.close()
        shutil.rmtree(child.workdir, ignore_errors=True)

    def _stop(self, child: PlaygroundProcess) -> None:
        log.info("stopping the playground process %d (%s)", child.process.pid, child.base)
        child.client.close()
        self._kill(child.process)
        shutil.rmtree(child.workdir, ignore_errors=True)

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def running(self) -> list[str]:
        """The bases with a process now, least recently used first."""
        with self._lock:
            return [base for base, _ in sorted(self._processes.items(), key=lambda item: item[1].last_used)]

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            self._closed = True
            children, self._processes = list(self._processes.values()), {}
        for child in children:
            self._stop(child)

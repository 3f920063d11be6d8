"""Checkpoints that are either complete and verified or do not exist.

A checkpoint is written into a staging directory, every file is fsynced, a manifest with each file's
size and sha256 is written last, and the directory is renamed into place. Readers trust only a
checkpoint whose manifest verifies. It holds everything needed to continue exactly: trainable weights,
optimizer, scheduler, loss scaler, RNG states and the trainer state (step, epoch, data position).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
STAGING_PREFIX = ".staging-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def commit_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], meta: dict[str, Any] | None = None,
                      parallel=None) -> Path:
    """Write a checkpoint atomically: staging dir, fsync, manifest last, rename into place.

    Under several processes every rank writes its part into the same staging directory (the job
    directory is on storage all nodes share); rank 0 seals it only when every rank says it succeeded.
    """
    if parallel is not None and parallel.enabled:
        return _commit_together(root, step, write_files, meta, parallel)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    staging = root / f"{STAGING_PREFIX}{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_files(staging)
        _seal(staging, final, step, meta)
    except BaseException as exc:
        explained = _cleaned_up(exc, root, staging, final)
        if explained is exc:  # KeyboardInterrupt and friends pass through unchanged
            raise
        raise explained from exc
    return final


def _seal(staging: Path, final: Path, step: int, meta: dict[str, Any] | None) -> None:
    """fsync every file, write the manifest last, rename the directory into place."""
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[str(path.relative_to(staging))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"version": 1, "step": step, "created_at": time.time(), "files": files, **(meta or {})}
    manifest_path = staging / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2))
    _fsync_file(manifest_path)
    _fsync_dir(staging)
    if final.exists():  # a step re-saved after a resume: replace the old copy
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(final.parent)


def _cleaned_up(exc: BaseException, root: Path, staging: Path, final: Path) -> BaseException:
    # Measure before cleaning up: the staging files are what filled the disk.
    free = shutil.disk_usage(root).free
    shutil.rmtree(staging, ignore_errors=True)
    return _explain_write_failure(exc, final, free) if isinstance(exc, Exception) else exc


def _commit_together(root: Path, step: int, write_files, meta, parallel) -> Path:
    final = root / checkpoint_name(step)
    # One staging name for every rank: rank 0's pid, so a leftover of an earlier attempt never collides.
    staging = root / f"{STAGING_PREFIX}{checkpoint_name(step)}-{parallel.broadcast(os.getpid())}"
    if parallel.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    parallel.barrier()
    failure: BaseException | None = None
    try:
        write_files(staging)  # collective: DCP saves shards from every rank
    except Exception as exc:
        failure = exc
    if parallel.any(failure is not None):
        if parallel.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        if failure is not None:
            raise _explain_write_failure(failure, final, shutil.disk_usage(root).free) from failure
        raise CheckpointWriteError(errno.EIO, f"could not write checkpoint {final.name}: another rank failed; "
                                              "the previous checkpoints are intact")
    sealed: BaseException | None = None
    if parallel.is_main:
        try:
            _seal(staging, final, step, meta)
        except Exception as exc:
            sealed = _cleaned_up(exc, root, staging, final)
    if parallel.any(sealed is not None):
        raise sealed or CheckpointWriteError(errno.EIO, f"rank 0 could not seal checkpoint {final.name}")
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the ones committed before it are untouched."""


def _explain_write_failure(exc: Exception, target: Path, free_bytes: int) -> Exception:
    # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos", so ask the disk.
    disk_full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or free_bytes < 1 << 20
    if disk_full:
        return CheckpointWriteError(
            errno.ENOSPC,
            f"No space left on device while writing checkpoint {target.name} in {target.parent} "
            f"({free_bytes} bytes free); the previous checkpoints are intact",
        )
    return CheckpointWriteError(errno.EIO, f"could not write checkpoint {target.name}: {type(exc).__name__}: {exc}; "
                                           "the previous checkpoints are intact")


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches the manifest, else the reason it cannot be used."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 (corrupted)"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint directories (verified or not), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def remove_staging(root: Path) -> list[Path]:
    """Delete half-written checkpoints left by a process that died mid-save."""
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(STAGING_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def latest_valid_checkpoint(root: Path, on_invalid: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest checkpoint whose manifest verifies; on_invalid hears about each one skipped."""
    for _, path in reversed(list_checkpoints(root)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        if on_invalid:
            on_invalid(path, reason)
    return None


def prune_checkpoints(root: Path, keep_last: int, protect: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the newest keep_last checkpoints, never one in protect (best, resumed-from)."""
    existing = [path for _, path in list_checkpoints(root)]
    keep = set(existing[-keep_last:]) | {p for p in protect if p is not None}
    removed = []
    for path in existing:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, in a form torch.load(weights_only=True) accepts."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def save_training_checkpoint(
    root: Path, step: int, *, model, optimizer, scheduler, scaler, trainer_state: dict[str, Any], parallel=None,
    sharded: bool = False,
) -> Path:
    """A complete, verified checkpoint of a training run after `step` optimizer steps.

    sharded (FSDP): weights and optimizer state go through torch.distributed.checkpoint, one file per
    rank, and can be loaded back by any number of ranks. Otherwise rank 0 writes them whole. Every rank
    writes its own RNG state (dropout differs per rank).
    """
    from tuneforge.engine import faults
    from tuneforge.engine.distributed import is_deepspeed
    from tuneforge.engine.weights import save_trainable

    rank = parallel.rank if parallel is not None else 0
    deepspeed = is_deepspeed(model)

    def write(directory: Path) -> None:
        if deepspeed:  # every rank writes its ZeRO partitions of the trainable weights and optimizer state
            model.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        elif sharded:
            import torch.distributed.checkpoint as dcp

            dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(directory / SHARDED_DIR))
        elif rank == 0:
            save_trainable(model, directory)
        faults.inside_checkpoint(step)
        if rank == 0:
            if not sharded and not deepspeed:
                torch.save(optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(scheduler.state_dict(), directory / "scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), directory / "scaler.pt")
            (directory / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        torch.save(capture_rng_state(), directory / rng_file(rank))

    return commit_checkpoint(root, step, write, meta={"metrics": trainer_state.get("metrics", {})}, parallel=parallel)


SHARDED_DIR = "sharded"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


def _sharded_state(model, optimizer) -> dict[str, Any]:
    """Trainable weights and optimizer state as DTensor shards (frozen base weights are not saved)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optimizer": optimizer_state}


def restore_training_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, parallel=None) -> dict[str, Any]:
    """Load a verified checkpoint into live objects; returns its trainer state."""
    from tuneforge.engine.weights import load_trainable

    if (path / DEEPSPEED_DIR).is_dir():
        loaded, _ = model.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False)
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {path}")
    elif (path / SHARDED_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = _sharded_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
        # strict=False because frozen weights are not in the checkpoint; missing trainable ones are an error.
        result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                                options=StateDictOptions(ignore_frozen_params=True, strict=False))
        missing = [k for k in getattr(result, "missing_keys", []) if k in state["model"]]
        if missing:
            raise ValueError(f"checkpoint {path} lacks trainable weights: {missing[:5]}")
    else:
        load_trainable(model, path)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rank = parallel.rank if parallel is not None else 0
    rng = path / rng_file(rank)
    # A resume on more ranks than saved: the new ranks start their RNG from rank 0's state.
    restore_rng_state(torch.load(rng if rng.exists() else path / rng_file(0), weights_only=True))
    return read_trainer_state(path)


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class CheckpointKeeper:
    """When to checkpoint (every N steps and/or M minutes), and which checkpoints to keep.

    Keeps the newest `keep_last`, the best by the objective (checkpoint.best_by: a validation metric or
    grader and whether lower or higher is better), and the one the run resumed from.
    """

    def __init__(self, root: Path, *, every_steps: int | None, every_minutes: float | None, keep_last: int,
                 resumed_from: Path | None = None, best: dict[str, Any] | None = None,
                 objective: tuple[str, str] | None = ("loss", "min"), save_new_best: bool = False):
        self.root, self.every_steps, self.every_minutes, self.keep_last = root, every_steps, every_minutes, keep_last
        self.resumed_from = resumed_from
        self.objective = objective  # (metric or grader name, "min" or "max"), None: no best
        self.save_new_best = save_new_best  # checkpoint a new best when it is measured, not only on schedule
        self.best = _best_record(best)  # {"step": N, "metric": name, "value": x, "direction": "min" | "max"}
        self.last_saved_step: int | None = None
        self._last_time = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        by_time = bool(self.every_minutes) and time.monotonic() - self._last_time >= self.every_minutes * 60
        return by_steps or by_time

    def improves(self, metrics: dict[str, Any]) -> bool:
        """Whether these metrics (valid_NAME: the validation at this step) beat the best so far."""
        if self.objective is None:
            return False
        name, direction = self.objective
        value = metrics.get(f"valid_{name}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best["value"] if direction == "min" else value > self.best["value"]

    def new_best_to_save(self, metrics: dict[str, Any]) -> bool:
        """Whether to checkpoint now, off schedule: these metrics are a new best and bests are saved at once."""
        return self.save_new_best and self.improves(metrics)

    def best_path(self) -> Path | None:
        return self.root / checkpoint_name(self.best["step"]) if self.best else None

    def save(self, step: int, *, model, optimizer, scheduler, scaler, trainer_state: dict[str, Any], parallel=None,
             sharded: bool = False) -> tuple[Path, bool]:
        """Commit a checkpoint, prune old ones; returns (path, whether it is the best so far)."""
        metrics = trainer_state.get("metrics", {})
        is_best = self.improves(metrics)
        if is_best:
            name, direction = self.objective
            self.best = {"step": step, "metric": name, "value": float(metrics[f"valid_{name}"]), "direction": direction}
        path = save_training_checkpoint(self.root, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                        scaler=scaler, trainer_state={**trainer_state, "best": self.best},
                                        parallel=parallel, sharded=sharded)
        if parallel is None or parallel.is_main:
            prune_checkpoints(self.root, self.keep_last, protect={self.resumed_from, self.best_path()})
        self.last_saved_step = step
        self._last_time = time.monotonic()
        return path, is_best


def _best_record(best: dict[str, Any] | None) -> dict[str, Any] | None:
    """The best-checkpoint record, including the {"step", "valid_loss"} of checkpoints written before best_by."""
    if best and "valid_loss" in best and "value" not in best:
        return {"step": best["step"], "metric": "loss", "value": best["valid_loss"], "direction": "min"}
    return best

"""Training from a kept checkpoint (ft:...:ckpt-step-N), as OpenAI's fine-tuning API accepts one as a job's model.

A checkpoint holds only the trained weights (engine/weights.py save_trainable) with the optimizer state, so the
model a job trains from is assembled: the files of the version the checkpoint's job made (the adapter's config
and tokenizer, or the full model's config), with the checkpoint's weights in place of the final ones. It lives in
the job directory of the machine that trained it, sealed at rest there when encryption at rest is on; with an
object store, the kept ones are published to it too and staged by a worker elsewhere (registry/storage/jobs.py). A checkpoint saved in parts (FSDP's shards, DeepSpeed's ZeRO partitions)
is consolidated into the weights a single-process one holds (registry/consolidate.py, in a process of its own).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db.tables import JobCheckpoint
from tuneforge.registry.consolidate import REFUSED, saved_in_parts
from tuneforge.registry.versions import COMPLETE

CHECKPOINT_ID = re.compile(r"^(ft:.+):ckpt-step-([0-9]{1,9})$")
# What engine/weights.py save_trainable writes into a checkpoint for an adapter and for a full model.
WEIGHTS = {"adapter": "adapter_model.safetensors", "model": "model.safetensors"}


@dataclass(frozen=True)
class CheckpointRef:
    """A kept checkpoint on this machine: its job's directory, its folder in it (the row's path), its step."""

    job_dir: Path
    path: str
    step: int


class CheckpointUnavailable(OSError):
    """The checkpoint a job trains from cannot be assembled here: the reason, by the checkpoint's name."""


def parse_checkpoint_id(ref: str) -> tuple[str, int] | None:
    """(the model's ft: id, the step) of ft:...:ckpt-step-N; None for any other reference."""
    match = CHECKPOINT_ID.match(ref)
    return (match.group(1), int(match.group(2))) if match else None


def model_of(ref: str) -> str:
    """The model a reference names: a checkpoint's model, else the reference itself."""
    parsed = parse_checkpoint_id(ref)
    return parsed[0] if parsed else ref


def kept_checkpoint(session: Session, *, job_id: str, step: int) -> JobCheckpoint | None:
    """The checkpoint row of the job at step, if the retention policy kept it."""
    return session.scalar(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.step == step))


def _final_weights(relative: str, kind: str) -> bool:
    """Whether a file of the version is the final weights the checkpoint's replace (a full model's may be shards)."""
    if kind == "adapter":
        return relative in ("adapter_model.safetensors", "adapter_model.bin")
    return relative.endswith(".safetensors") or relative in ("model.safetensors.index.json", "pytorch_model.bin")


def assemble_checkpoint(version_dir: Path, weights_dir: Path, root: Path, *, kind: str, step: int, label: str) -> Path:
    """root/<version folder>-ckpt-step-N: the version's materialized files (with the base an adapter applies to)
    and the checkpoint's weights in place of the final ones (consolidated first when they were saved in parts);
    written once, renamed into place when complete."""
    name = WEIGHTS[kind]
    weights = weights_dir / name
    in_parts = None if weights.is_file() else saved_in_parts(weights_dir)
    if not weights.is_file() and in_parts is None:
        raise CheckpointUnavailable(f"{label} holds no {name}, nor FSDP shards or DeepSpeed partitions of it: "
                                    "train from the model itself")
    final = root / f"{version_dir.name}-ckpt-step-{step}"
    if (final / COMPLETE).is_file():
        return final
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        for path in sorted(version_dir.rglob("*")):
            relative = path.relative_to(version_dir).as_posix()
            if path.is_file() and relative != COMPLETE and not _final_weights(relative, kind):
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staging / relative)
        if in_parts is None:
            shutil.copyfile(weights, staging / name)
        else:
            _consolidate(weights_dir, version_dir, kind=kind, out=staging / name, label=f"{label} ({in_parts})")
        (staging / COMPLETE).write_text(label)
        try:
            os.rename(staging, final)
        except OSError:  # another worker assembled it first: the same files
            if not (final / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _consolidate(checkpoint: Path, version_dir: Path, *, kind: str, out: Path, label: str) -> None:
    """registry/consolidate.py in a process of its own (it reads the shards with torch, which this process never
    imports); a refusal or a failure becomes CheckpointUnavailable, without the worker's paths."""
    import tuneforge

    source = str(Path(tuneforge.__file__).resolve().parents[1])  # this tuneforge, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "tuneforge.registry.consolidate", str(checkpoint), str(version_dir),
                           kind, str(out)], env=env, capture_output=True, text=True)
    if done.returncode == 0 and out.is_file():
        return
    lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit status {done.returncode}"]
    if done.returncode == REFUSED and lines[-1].startswith('{"refused"'):
        raise CheckpointUnavailable(f"{label} cannot be trained from: {json.loads(lines[-1])['refused']}")
    reason = lines[-1].replace(str(checkpoint), "<checkpoint>").replace(str(version_dir), "<version>")
    raise CheckpointUnavailable(f"{label} could not be consolidated: {reason}")

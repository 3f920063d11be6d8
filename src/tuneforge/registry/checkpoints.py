"""Training from a kept checkpoint (ft:...:ckpt-step-N), as OpenAI's fine-tuning API accepts one as a job's model.

A checkpoint holds only the trained weights (engine/weights.py save_trainable) with the optimizer state, so the
model a job trains from is assembled: the files of the version the checkpoint's job made (the adapter's config
and tokenizer, or the full model's config), with the checkpoint's weights in place of the final ones. It lives in
the job directory of the machine that trained it (checkpoints are not published to the object store), sealed at
rest there when encryption at rest is on.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db.tables import JobCheckpoint
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
    and the checkpoint's weights in place of the final ones; written once, renamed into place when complete."""
    name = WEIGHTS[kind]
    weights = weights_dir / name
    if not weights.is_file():
        raise CheckpointUnavailable(f"{label} holds no {name} (it was saved sharded, by FSDP or DeepSpeed, or by a "
                                    "recipe whose weights are in parts): train from the model itself")
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
        shutil.copyfile(weights, staging / name)
        (staging / COMPLETE).write_text(label)
        try:
            os.rename(staging, final)
        except OSError:  # another worker assembled it first: the same files
            if not (final / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final

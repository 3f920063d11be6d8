"""Where a run continues from: the newest checkpoint that verifies, and whether this run can load it.

One rank decides (rank 0 cleans up half-written saves and verifies manifests) and broadcasts its
answer, so every rank resumes from the same checkpoint. A checkpoint is usable only by a run that sees
the same data in the same order (the data position) and lays its weights out the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.engine.checkpoint import latest_valid_checkpoint, read_trainer_state, remove_staging
from tuneforge.engine.distributed import Distributed
from tuneforge.spec.loader import SpecError


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from (None: from the start) and the trainer state saved in it."""

    path: Path | None = None
    saved: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.saved.get("step", 0)) if self.path else 0

    def check(self, *, data_position: dict[str, Any], strategy: str, world_size: int) -> None:
        """Raise SpecError (bad input: a restart cannot help) when this run cannot continue the checkpoint."""
        if self.path is None:
            return
        if self.saved.get("data_position") != data_position:
            raise SpecError(
                f"cannot resume from {self.path}: the data or batch settings changed since it was saved "
                f"({self.saved.get('data_position')} then, {data_position} now)"
            )
        # Whole (one process, DDP), FSDP shards (loadable by any number of ranks) or ZeRO partitions
        # (only by as many ranks as wrote them).
        then = self.saved.get("strategy", "single")
        if _layout(then) != _layout(strategy):
            raise SpecError(f"cannot resume from {self.path}: it was written with resources.strategy {then}, this run "
                            f"uses {strategy}; resume with the strategy that wrote it")
        if strategy == "deepspeed" and self.saved.get("world_size") != world_size:
            raise SpecError(f"cannot resume from {self.path}: DeepSpeed wrote it with {self.saved.get('world_size')} "
                            f"processes, this run has {world_size}")


def _layout(strategy: str) -> str:
    return {"fsdp": "fsdp", "deepspeed": "deepspeed"}.get(strategy, "whole")


def find_resume_point(checkpoints: Path, parallel: Distributed, note: Callable[..., None]) -> ResumePoint:
    path = None
    if parallel.is_main:
        for leftover in remove_staging(checkpoints):
            note(f"removed unfinished checkpoint {leftover.name}", kind="checkpoint_discarded", path=leftover.name)
        path = latest_valid_checkpoint(
            checkpoints,
            on_invalid=lambda bad, why: note(f"skipping checkpoint {bad.name}: {why}", level="warning",
                                             kind="checkpoint_invalid", path=bad.name, reason=why),
        )
    path = parallel.broadcast(path)
    return ResumePoint(path, read_trainer_state(path) if path else {})

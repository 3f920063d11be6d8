"""Which examples go into which optimizer step, and how a micro-batch becomes tensors.

The plan is a pure function of (dataset size, batch settings, seed, step index): any step's examples
can be recomputed without replaying the ones before it, which is what exact resume relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tuneforge.data.templating import IGNORE_INDEX, TokenizedExample


@dataclass(frozen=True)
class StepPlan:
    step: int  # 0-based optimizer step
    epoch: int
    micro_batches: tuple[tuple[int, ...], ...]  # example indices, one tuple per micro-batch

    @property
    def example_ids(self) -> list[int]:
        return [i for batch in self.micro_batches for i in batch]


class StepSchedule:
    """Deterministic shuffled epochs cut into micro-batches and optimizer steps."""

    def __init__(
        self,
        num_examples: int,
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        num_epochs: float = 1.0,
        max_steps: int | None = None,
    ):
        if num_examples < 1:
            raise ValueError("no training examples left to schedule")
        self.num_examples, self.batch_size, self.grad_accum, self.seed = num_examples, batch_size, grad_accum, seed
        micro_per_epoch = math.ceil(num_examples / batch_size)
        self.steps_per_epoch = math.ceil(micro_per_epoch / grad_accum)
        self.total_steps = max_steps or max(1, round(self.steps_per_epoch * num_epochs))
        self._orders: dict[int, tuple[int, ...]] = {}

    def epoch_order(self, epoch: int) -> tuple[int, ...]:
        if epoch not in self._orders:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._orders = {epoch: tuple(int(i) for i in rng.permutation(self.num_examples))}
        return self._orders[epoch]

    def plan(self, step: int) -> StepPlan:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        first = within * self.grad_accum * self.batch_size
        last = min(first + self.grad_accum * self.batch_size, self.num_examples)
        micro = tuple(order[i : min(i + self.batch_size, last)] for i in range(first, last, self.batch_size))
        return StepPlan(step, epoch, micro)

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch


def collate(items: list[TokenizedExample], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example; padding never carries loss."""
    length = max(len(item.input_ids) for item in items)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

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
    example_ids: tuple[int, ...]  # the examples of this optimizer step, over all devices


class StepSchedule:
    """Deterministic shuffled epochs cut into optimizer steps of `examples_per_step` examples.

    How a step is split into micro-batches (and, later, across devices) is not part of the schedule, so
    a resumed run may use another micro-batch size and still see exactly the same data.
    """

    def __init__(self, num_examples: int, *, examples_per_step: int, seed: int, num_epochs: float = 1.0,
                 max_steps: int | None = None):
        if num_examples < 1:
            raise ValueError("no training examples left to schedule")
        self.num_examples, self.examples_per_step, self.seed = num_examples, examples_per_step, seed
        self.steps_per_epoch = math.ceil(num_examples / examples_per_step)
        self.total_steps = max_steps or max(1, round(self.steps_per_epoch * num_epochs))
        self._orders: dict[int, tuple[int, ...]] = {}

    def epoch_order(self, epoch: int) -> tuple[int, ...]:
        if epoch not in self._orders:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._orders = {epoch: tuple(int(i) for i in rng.permutation(self.num_examples))}
        return self._orders[epoch]

    def plan(self, step: int) -> StepPlan:
        epoch, within = divmod(step, self.steps_per_epoch)
        first = within * self.examples_per_step
        return StepPlan(step, epoch, self.epoch_order(epoch)[first : first + self.examples_per_step])

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch


def micro_batches(example_ids: tuple[int, ...], micro_batch_size: int) -> list[tuple[int, ...]]:
    return [example_ids[i : i + micro_batch_size] for i in range(0, len(example_ids), micro_batch_size)]


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

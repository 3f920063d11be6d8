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


# Share rows only when that removes at least 15% of the micro-batch's rows (padded tokens).
SHARED_ROWS_WORTH_IT = 0.85


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
    """Right-pad a micro-batch to its longest example; padding never carries loss.

    `tokens` counts the real tokens; it is for throughput, not for the model."""
    length = max(len(item.input_ids) for item in items)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.from_numpy(np.asarray(item.input_ids, dtype=np.int64))
        labels[row, :n] = torch.from_numpy(np.asarray(item.labels, dtype=np.int64))
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "tokens": attention_mask.sum()}


class Batcher:
    """Turns a step's units into micro-batches: single examples, or packed rows of several examples.

    With packing, units are rows filled best-fit decreasing once (the same rows every epoch; their
    order is shuffled by the step schedule like examples would be).
    """

    def __init__(self, items: list[TokenizedExample], pad_id: int, *, packing: bool = False,
                 max_seq_length: int | None = None, attention: str = "sdpa", padding_free: bool = False):
        from tuneforge.data.packing import best_fit_decreasing

        self.items, self.pad_id, self.packing, self.attention = items, pad_id, packing, attention
        self.padding_free = padding_free and not packing
        self.row_length = max_seq_length if packing else None  # the capacity rows are packed to
        self.row_reason: str | None = None  # why that capacity, for the plan event
        if packing:
            self.units = best_fit_decreasing([len(item.input_ids) for item in items], max_seq_length,
                                             longer_alone=True)
        else:
            self.units = [[index] for index in range(len(items))]

    def __len__(self) -> int:
        return len(self.units)

    def example_ids(self, unit_ids) -> list[int]:
        return [index for unit in unit_ids for index in self.units[unit]]

    def collate(self, unit_ids) -> dict[str, torch.Tensor]:
        if not self.packing:
            items = [self.items[self.units[u][0]] for u in unit_ids]
            return self._padding_free(items) if self.padding_free else collate(items, self.pad_id)
        from tuneforge.data.packing import collate_packed

        rows = [[self.items[index] for index in self.units[u]] for u in unit_ids]
        return collate_packed(rows, self.pad_id, attention=self.attention)

    def _padding_free(self, items: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        """One micro-batch of unpacked examples, sharing rows no longer than its longest example.

        The same examples, labels and loss as the padded batch (each example attends only to itself, its
        position ids restart), in fewer rows: on long-tailed lengths most of a padded batch is padding. A row
        is never longer than the padded batch's, so neither memory nor attention cost grows."""
        from tuneforge.data.packing import best_fit_decreasing, collate_packed

        lengths = [len(item.input_ids) for item in items]
        rows = best_fit_decreasing(lengths, max(lengths))
        if len(rows) > SHARED_ROWS_WORTH_IT * len(items):
            # Few rows saved: the block-diagonal mask costs about as much (~10% of a step, measured on rows of
            # one example each) as the padding it removes.
            return collate(items, self.pad_id)
        return collate_packed([[items[i] for i in row] for row in rows], self.pad_id, attention=self.attention)

    def unit_lengths(self) -> list[int]:
        return [sum(len(self.items[index].input_ids) for index in unit) for unit in self.units]

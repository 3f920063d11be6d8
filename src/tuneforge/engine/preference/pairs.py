"""Preference pairs in batches: one unit of the step schedule is one pair, collated chosen-then-rejected.

A micro-batch of B pairs is one [2B, L] tensor: rows 0..B-1 the prompt + chosen sequences, rows B..2B-1
the prompt + rejected ones (TRL's layout), right-padded together, so a single forward scores both. The
loss counts pairs: `normalizer(batch)` is B. Pair ids are positions in the pair list; precomputed
reference log-probabilities travel with the batch, looked up by id.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tuneforge.data.batching import collate
from tuneforge.data.preference import TokenizedPair
from tuneforge.engine.distributed import Distributed


def pairs_in(batch: dict[str, torch.Tensor]) -> int:
    """The pairs a collated batch holds (its rows are chosen then rejected)."""
    return int(batch["input_ids"].shape[0]) // 2


class PairBatcher:
    """Units are pairs; `collate` makes the [chosen; rejected] micro-batch the preference losses take.

    labels: keep the label masks (DPO sums log-probs over them; a reward model reads whole sequences).
    reference: an [N, 2] float32 tensor of (chosen, rejected) reference log-probs per pair id, when precomputed.
    """

    packing = False
    row_length = None

    def __init__(self, pairs: list[TokenizedPair], pad_id: int, *, labels: bool = True):
        self.pairs, self.pad_id, self.labels = pairs, pad_id, labels
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def example_ids(self, unit_ids) -> list[int]:
        return [int(u) for u in unit_ids]

    def unit_lengths(self) -> list[int]:
        return [len(pair) for pair in self.pairs]

    def collate(self, unit_ids) -> dict[str, torch.Tensor]:
        ids = [int(u) for u in unit_ids]
        batch = collate([self.pairs[i].chosen for i in ids] + [self.pairs[i].rejected for i in ids], self.pad_id)
        if not self.labels:
            del batch["labels"]
        if self.reference is not None:
            rows = self.reference[ids]
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = rows[:, 0].clone(), rows[:, 1].clone()
        return batch


@torch.no_grad()
def per_pair(score: Callable[[dict], dict[str, torch.Tensor]], batcher: PairBatcher, *, module: torch.nn.Module,
             batch_size: int, precision, parallel: Distributed | None = None) -> dict[str, list[float]]:
    """score(batch) -> {name: one value per pair} over every pair of batcher, in pair order, on every rank,
    with module (what score calls) in eval mode.

    Ranks take turns over the pairs; each runs the same number of passes (a short rank repeats its first
    batch and drops the result), so a sharded model's collectives line up."""
    parallel = parallel or Distributed()
    was_training = module.training
    module.eval()
    try:
        return _per_pair(score, batcher, batch_size, precision, parallel)
    finally:
        module.train(was_training)


def _per_pair(score, batcher: PairBatcher, batch_size: int, precision, parallel: Distributed) -> dict[str, list[float]]:
    ids = list(range(len(batcher)))
    mine = ids[parallel.rank :: parallel.world_size]
    passes = -(-len(ids[0 :: parallel.world_size]) // batch_size) if ids else 0
    rows: list[tuple[int, dict[str, float]]] = []
    for index in range(passes):
        chunk = mine[index * batch_size : (index + 1) * batch_size]
        batch = batcher.collate(chunk or ids[:1])
        inputs = {k: v.to(precision.device) for k, v in batch.items() if k != "tokens"}
        with precision.autocast():
            values = score(inputs)
        for position, pair_id in enumerate(chunk):
            rows.append((pair_id, {k: float(v[position]) for k, v in values.items()}))
    ordered = sorted((row for share in parallel.gather(rows) for row in share), key=lambda row: row[0])
    names = list(ordered[0][1]) if ordered else []
    return {name: [values[name] for _, values in ordered] for name in names}

"""optimizer_step divides by the loss's own normalizer over the whole step, so a loss that counts something
other than label tokens (pairs, sequences) gets the same exact gradient accumulation."""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.engine.precision import Precision
from tuneforge.engine.train_step import optimizer_step


class PairLoss(nn.Module):
    """A stand-in preference loss: one unit per row (a pair), -log sigmoid of a score margin."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(4, 1, bias=False)

    @staticmethod
    def normalizer(batch) -> int:
        return batch["input_ids"].shape[0]

    def forward(self, input_ids, chosen, rejected):
        margin = (self.score(chosen) - self.score(rejected)).squeeze(-1)
        return -nn.functional.logsigmoid(margin).sum(), margin.numel(), (margin > 0).sum()


def batch(rows: slice, data) -> dict:
    chosen, rejected = data
    return {"input_ids": torch.zeros(len(chosen[rows]), 3, dtype=torch.long), "tokens": torch.tensor(3 * len(chosen[rows])),
            "chosen": chosen[rows], "rejected": rejected[rows]}


def step(batches, seed: int = 0):
    torch.manual_seed(seed)
    loss = PairLoss()
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    result = optimizer_step(loss, batches, optimizer=optimizer, scheduler=scheduler, scaler=None,
                            precision=Precision("fp32", torch.device("cpu")), max_grad_norm=None,
                            parameters=list(loss.parameters()))
    return result, loss.score.weight.detach().clone()


def test_a_loss_with_its_own_normalizer_accumulates_exactly():
    generator = torch.Generator().manual_seed(1)
    data = (torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator))
    whole, whole_weight = step([batch(slice(0, 6), data)])
    split, split_weight = step([batch(slice(0, 1), data), batch(slice(1, 6), data)])  # uneven micro-batches
    assert whole.loss_units == split.loss_units == 6  # pairs, not tokens
    assert abs(whole.loss - split.loss) < 1e-6 and abs(whole.accuracy - split.accuracy) < 1e-9
    assert torch.allclose(whole_weight, split_weight, atol=1e-7)
    assert whole.tokens == 18 and whole.padded_tokens == 18

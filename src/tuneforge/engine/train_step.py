"""One optimizer step over a list of micro-batches: forward, backward, clip, step, schedule.

The loss of every micro-batch is divided by the label tokens of the whole step, so accumulating
micro-batches gives exactly the gradient of one large batch (no per-micro-batch mean bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.data.templating import IGNORE_INDEX
from tuneforge.engine import faults


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean loss per label token
    token_accuracy: float
    tokens: int  # real (non-padding) input tokens
    padded_tokens: int  # positions computed, padding included
    label_tokens: int
    grad_norm: float | None
    learning_rate: float  # the rate this step used


def optimizer_step(
    loss_module, batches: list[dict[str, torch.Tensor]], *, optimizer, scheduler, scaler, precision,
    max_grad_norm: float | None, parameters: list[torch.nn.Parameter],
) -> StepResult:
    label_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    loss_total, correct_total, tokens, padded = 0.0, 0, 0, 0
    for batch in batches:
        faults.before_micro_batch(batch["input_ids"].shape[0])
        tokens += int(batch["tokens"])
        padded += batch["input_ids"].numel()
        inputs = {k: v.to(precision.device, non_blocking=True) for k, v in batch.items() if k != "tokens" and v is not None}
        with precision.autocast():
            loss_sum, _, correct = loss_module(**inputs)
        loss = loss_sum / max(label_tokens, 1)
        (scaler.scale(loss) if scaler else loss).backward()
        loss_total += float(loss_sum.detach())
        correct_total += int(correct)
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)) if max_grad_norm else None
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    learning_rate = scheduler.get_last_lr()[0]
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=loss_total / max(label_tokens, 1),
        token_accuracy=correct_total / max(label_tokens, 1),
        tokens=tokens,
        padded_tokens=padded,
        label_tokens=label_tokens,
        grad_norm=grad_norm,
        learning_rate=learning_rate,
    )

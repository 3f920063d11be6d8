"""One optimizer step over a list of micro-batches: forward, backward, clip, step, schedule.

The loss of every micro-batch is divided by the loss's own normalizer summed over the whole step (over
every rank): label tokens for a causal-LM loss, pairs for a preference loss (engine/loss.py). So
accumulating micro-batches, or splitting the step across processes, gives exactly the gradient of one
large batch (no per-micro-batch or per-rank mean bias), whatever the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tuneforge.engine import faults
from tuneforge.engine.distributed import Distributed, gradient_sync, is_deepspeed, unwrap


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean loss per unit the loss counts (every rank)
    accuracy: float  # units right / units counted (next-token accuracy for a causal-LM loss)
    tokens: int  # real (non-padding) input tokens, every rank
    padded_tokens: int  # positions computed, padding included, every rank
    loss_units: int  # what the loss counted: label tokens for a causal-LM loss
    grad_norm: float | None
    learning_rate: float  # the rate this step used
    # What else the loss measured, per unit (a loss module's 4th output: sums, divided like the loss), e.g.
    # DPO's rewards_margins. Empty for losses that return three values.
    metrics: dict[str, float] = field(default_factory=dict)


def optimizer_step(
    loss_module, batches: list[dict[str, torch.Tensor]], *, optimizer, scheduler, scaler, precision,
    max_grad_norm: float | None, parameters: list[torch.nn.Parameter],
    parallel: Distributed | None = None, micro_batches: int | None = None, stand_in: dict | None = None,
    normalizer: Callable[[dict], float] | None = None,
) -> StepResult:
    """batches are this rank's share of the step: dicts of tensors with `tokens` (real tokens) and
    `input_ids`. normalizer(batch) is how many units the batch's summed loss counts; by default the loss
    module's own `normalizer`. Under several processes every rank must run the same number of
    forward/backward passes (FSDP gathers weights in each): `micro_batches` is that number, and a rank
    with fewer real batches runs `stand_in` with weight 0."""
    parallel = parallel or Distributed()
    normalizer = normalizer or unwrap(loss_module).normalizer
    # A DeepSpeed engine clips, steps the optimizer and the schedule itself, on its accumulation boundary.
    deepspeed = is_deepspeed(loss_module)
    count = max(micro_batches or len(batches), len(batches))
    local = [float(sum(normalizer(b) for b in batches)), float(sum(int(b["tokens"]) for b in batches)),
             float(sum(b["input_ids"].numel() for b in batches))]
    units, tokens, padded = (int(v) for v in parallel.sum(local))
    used_rate = scheduler.get_last_lr()[0]
    # DDP and FSDP average gradients over ranks; scaling by world_size turns that average into the sum.
    scale = parallel.world_size / max(units, 1)
    loss_total, correct_total = 0.0, 0
    extra: dict[str, float] = {}
    for index in range(count):
        real = index < len(batches)
        batch = batches[index] if real else (stand_in or batches[0])
        faults.before_micro_batch(batch["input_ids"].shape[0])
        inputs = {k: v.to(precision.device, non_blocking=True) for k, v in batch.items() if k != "tokens" and v is not None}
        with gradient_sync(loss_module, enabled=deepspeed or index == count - 1):
            with precision.autocast():
                outputs = loss_module(**inputs)
            loss_sum, correct = outputs[0], outputs[2]
            loss = loss_sum * (scale if real else 0.0)
            if deepspeed:
                loss_module.backward(loss, scale_wrt_gas=False)  # our scale already covers the whole step
                loss_module.step()
            else:
                (scaler.scale(loss) if scaler else loss).backward()
        # Every pass adds its keys (a stand-in's with 0), so every rank sums the same list below.
        for name, value in (outputs[3] if len(outputs) > 3 else {}).items():
            extra[name] = extra.get(name, 0.0) + (float(value) if real else 0.0)
        if real:
            loss_total += float(loss_sum.detach())
            correct_total += int(correct)
    names = sorted(extra)
    loss_total, correct_total, *extra_totals = parallel.sum([loss_total, float(correct_total), *(extra[n] for n in names)])
    if deepspeed:
        norm = loss_module.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
    else:
        grad_norm = _clip_and_step(optimizer, scheduler, scaler, parameters, max_grad_norm)
    return StepResult(
        loss=loss_total / max(units, 1),
        accuracy=correct_total / max(units, 1),
        tokens=tokens,
        padded_tokens=padded,
        loss_units=units,
        grad_norm=grad_norm,
        learning_rate=used_rate,
        metrics={name: total / max(units, 1) for name, total in zip(names, extra_totals)},
    )


def _clip_and_step(optimizer, scheduler, scaler, parameters, max_grad_norm: float | None) -> float | None:
    """Unscale, clip, step the optimizer and the schedule, clear the gradients; the norm before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = None
    if max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm

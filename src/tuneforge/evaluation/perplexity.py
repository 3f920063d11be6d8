"""Validation loss, perplexity and next-token accuracy over the tokens that carry loss.

Under several processes each rank scores its share of the examples and the sums are added up; every
rank runs the same number of forward passes (FSDP gathers weights in each), a short share padding with
passes whose result is dropped.
"""

from __future__ import annotations

import math

import torch

from tuneforge.data.batching import collate
from tuneforge.data.templating import TokenizedExample
from tuneforge.engine.distributed import Distributed


@torch.no_grad()
def evaluate_loss(loss_module, examples: list[TokenizedExample], *, batch_size: int, pad_id: int, precision,
                  parallel: Distributed | None = None, per_example: bool = False) -> dict:
    """Token-weighted mean loss (same masking as training), its exp, and argmax accuracy.

    per_example: also each example's (summed loss, tokens, correct), in the order of examples, for
    confidence intervals; each example then goes through the model alone (the loss module returns sums)."""
    parallel = parallel or Distributed()
    batch_size = 1 if per_example else batch_size
    was_training = loss_module.training
    loss_module.eval()
    # Longest first, so batches hold examples of similar length and little padding; ranks take turns
    # so each gets a similar mix of lengths.
    ordered = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    mine = ordered[parallel.rank :: parallel.world_size]
    passes = -(-len(ordered[0 :: parallel.world_size]) // batch_size) if ordered else 0
    totals = [0.0, 0.0, 0.0]  # loss, tokens, correct
    rows: list[tuple[int, float, int, int]] = []  # (example index, loss, tokens, correct)
    device = precision.device
    for index in range(passes):
        chunk = mine[index * batch_size : (index + 1) * batch_size]
        batch = collate([examples[i] for i in chunk] or [examples[ordered[0]]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items() if k != "tokens"}
        with precision.autocast():
            loss_sum, tokens, correct = loss_module(**batch)
        if chunk:
            totals[0] += float(loss_sum)
            totals[1] += int(tokens)
            totals[2] += int(correct)
            if per_example:
                rows.append((chunk[0], float(loss_sum), int(tokens), int(correct)))
    loss_module.train(was_training)
    total_loss, total_tokens, total_correct = parallel.sum(totals)
    if total_tokens == 0:
        return {}
    loss = total_loss / total_tokens
    measured = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "token_accuracy": total_correct / total_tokens,
        "tokens": int(total_tokens),
        "examples": len(examples),
    }
    if per_example:
        gathered = sorted(row for share in parallel.gather(rows) for row in share)
        measured["per_example"] = [[loss_sum, tokens, correct] for _, loss_sum, tokens, correct in gathered]
    return measured

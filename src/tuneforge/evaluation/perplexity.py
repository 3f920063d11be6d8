"""Validation loss, perplexity and next-token accuracy over the tokens that carry loss."""

from __future__ import annotations

import math

import torch

from tuneforge.data.batching import collate
from tuneforge.data.templating import TokenizedExample


@torch.no_grad()
def evaluate_loss(loss_module, examples: list[TokenizedExample], *, batch_size: int, pad_id: int, precision) -> dict:
    """Token-weighted mean loss (same masking as training), its exp, and argmax accuracy."""
    was_training = loss_module.training
    loss_module.eval()
    total_loss, total_tokens, total_correct = 0.0, 0, 0
    # Longest first, so batches hold examples of similar length and little padding.
    ordered = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    device = precision.device
    for start in range(0, len(ordered), batch_size):
        batch = collate(ordered[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items() if k != "tokens"}
        with precision.autocast():
            loss_sum, tokens, correct = loss_module(**batch)
        total_loss += float(loss_sum)
        total_tokens += int(tokens)
        total_correct += int(correct)
    loss_module.train(was_training)
    if total_tokens == 0:
        return {}
    loss = total_loss / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "token_accuracy": total_correct / total_tokens,
        "tokens": total_tokens,
    }

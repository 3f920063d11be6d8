"""Causal-LM loss without the (tokens x vocabulary) float32 logits tensor.

Two savings over `model(labels=...)`: logits are computed only at positions that carry loss (prompt
tokens are skipped before the LM head, not masked after it), and they are computed chunk by chunk with
the gradient taken on the spot (a fused linear + cross-entropy, as in Liger-Kernel), so at most one
chunk of logits is alive at a time.

A training loss is a module whose forward returns (summed loss, units counted, units right) and whose
`normalizer(batch)` says, before any forward, how many units that batch's summed loss counts: label
tokens here, pairs for a preference loss. engine/train_step.py divides by the units of the whole
optimizer step over every rank, so any such loss gets exact gradient accumulation, clipping, loss
scaling and the distributed reduction from the same step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.data.templating import IGNORE_INDEX

LOGITS_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of float32 logits per chunk


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T, targets), with gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            logits = (h @ weight.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            loss += (log_norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
            correct += (logits.argmax(dim=-1) == t).sum()
            if need_hidden_grad or need_weight_grad:
                # d(CE)/d(logits) = softmax - one_hot, built in place in the logits buffer.
                grad_logits = logits.sub_(log_norm[:, None]).exp_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if need_hidden_grad:
                    grad_hidden[start : start + chunk_rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_weight_grad:
                    grad_weight += grad_logits.t() @ h.float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE loss, number of correct argmax predictions) of the rows of hidden against targets."""
    chunk_rows = max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


def _fusable(lm_head: nn.Module, config) -> bool:
    """Only a bias-free plain Linear head with no logit post-processing can skip the module call."""
    post_processing = any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    return type(lm_head) is nn.Linear and lm_head.bias is None and not post_processing


class CausalLMLoss(nn.Module):
    """Wraps a causal LM (plain or PEFT) so that forward returns loss sums instead of logits.

    Returns (summed token loss, tokens with loss, correct next-token predictions). Callers divide by
    the token count of the whole optimizer step, which keeps gradient accumulation exact.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def normalizer(batch: dict[str, torch.Tensor]) -> int:
        """The tokens that carry loss in batch (labels predict the next token: the first never does)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def base_model(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        base = self.base_model()
        hidden = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        hidden = hidden[:, :-1][keep]
        targets = targets[keep]
        lm_head = base.get_output_embeddings()
        if _fusable(lm_head, base.config):
            loss, correct = linear_cross_entropy(hidden, lm_head.weight, targets)
        else:
            logits = lm_head(hidden).float()
            if getattr(base.config, "logit_scale", None):
                logits = logits * base.config.logit_scale
            if getattr(base.config, "final_logit_softcapping", None):
                cap = base.config.final_logit_softcapping
                logits = torch.tanh(logits / cap) * cap
            loss = F.cross_entropy(logits, targets, reduction="sum")
            correct = (logits.argmax(dim=-1) == targets).sum()
        return loss, targets.numel(), correct

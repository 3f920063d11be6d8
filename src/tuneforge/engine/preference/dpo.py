"""Direct preference optimization: sequence log-probs, the reference, TRL's losses, and the loss module.

The reference is the base model itself: the same weights with the LoRA adapter disabled, scored under
no_grad in the same forward (no second copy of the model), or, for full fine-tuning, log-probs computed
once from the initial weights before training and kept per pair id (in every checkpoint, so a resumed run
uses the very same numbers). The losses are trl 1.16's `DPOTrainer` formulas (reverse KL), per pair, so
the step's normalizer (pairs) makes gradient accumulation and the split over ranks exact.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tuneforge.data.templating import IGNORE_INDEX
from tuneforge.engine.distributed import Distributed
from tuneforge.engine.preference.pairs import PairBatcher, pairs_in, per_pair
from tuneforge.spec.preference import DpoSpec

LOGITS_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of float32 logits alive at a time; bigger chunks are recomputed in backward


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_logps(head: nn.Module, config, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def token_logps(base: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of hidden, in chunks of LOGITS_CHUNK_ELEMENTS logits; with gradients, each
    chunk's logits are recomputed in backward instead of kept (activation checkpointing on the LM head)."""
    head = base.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    rows = max(1, LOGITS_CHUNK_ELEMENTS // vocab)
    if hidden.shape[0] <= rows:
        return _chunk_logps(head, base.config, hidden, targets)
    pieces = []
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logps, head, base.config, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, base.config, h, t))
    return torch.cat(pieces)


def sequence_logps(model: nn.Module, input_ids, labels, attention_mask=None) -> torch.Tensor:
    """Each row's log-probability of its labelled tokens, summed (float32). Logits are computed only at
    the labelled positions (the prompt's never reach the LM head)."""
    base = _base(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    logps = token_logps(base, hidden[:, :-1][keep], targets[keep])
    return torch.zeros(input_ids.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)


def completion_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Labelled tokens per row (TRL's completion_mask.sum(1)), at least 1."""
    return (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1).float()


def dpo_losses(spec: DpoSpec, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
               chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """The per-pair loss of spec.loss_type, as trl 1.16's DPOTrainer computes it (f_divergence reverse_kl).

    logratios are log pi(y|x) - log pi_ref(y|x), summed over the reply's tokens; tokens are the reply's
    labelled tokens (for the length-normalized ipo and sigmoid_norm)."""
    beta, eps, kind = spec.beta, spec.label_smoothing, spec.loss_type
    delta = chosen_logratios - rejected_logratios
    if kind == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":
        # TRL (confirmed with the IPO authors) averages the log-ratios per token, so beta means the same at any length.
        return (chosen_logratios / chosen_tokens - rejected_logratios / rejected_tokens - 1 / (2 * beta)) ** 2
    if kind == "robust":
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * eps)
    if kind == "exo_pair":
        return (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - math.log1p(-eps))
                + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - math.log(eps)))
    if kind == "nca_pair":
        chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    if kind == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if kind == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if kind == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * delta)
    if kind == "discopop":
        logits = beta * delta
        modulation = torch.sigmoid(logits / spec.discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if kind == "sigmoid_norm":
        return -F.logsigmoid(beta * (chosen_logratios / chosen_tokens - rejected_logratios / rejected_tokens))
    raise ValueError(f"unknown dpo.loss_type {kind}")


class DpoLoss(nn.Module):
    """A preference loss in engine/train_step.py's contract: forward returns (summed per-pair loss, pairs,
    pairs whose implicit reward ranks chosen first, summed metrics) and `normalizer` counts pairs.

    The metrics are TRL's: rewards/chosen, rewards/rejected, rewards/margins (beta * log-ratios) and
    logps/chosen, logps/rejected, named with _ for events; the accuracy is rewards/accuracies.
    reference: adapter_disabled (scored in the forward) or precomputed (the batch carries ref_*_logps).
    """

    accuracy_metric = "rewards_accuracies"

    def __init__(self, model: nn.Module, spec: DpoSpec, *, reference: str):
        super().__init__()
        if reference not in ("adapter_disabled", "precomputed"):
            raise ValueError(f"reference must be adapter_disabled or precomputed, not {reference}")
        if reference == "adapter_disabled" and not hasattr(model, "disable_adapter"):
            raise ValueError("reference adapter_disabled needs an adapter to disable")
        self.model, self.spec, self.reference = model, spec, reference

    normalizer = staticmethod(pairs_in)

    def base_model(self) -> nn.Module:
        return _base(self.model)

    @torch.no_grad()
    def frozen_logps(self, input_ids, labels, attention_mask=None) -> torch.Tensor:
        """The reference's sequence log-probs: the model with its adapter disabled, or the model as it is
        (the initial weights, when called before training)."""
        context = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        with context:
            return sequence_logps(self.model, input_ids, labels, attention_mask)

    def forward(self, input_ids, labels, attention_mask=None, ref_chosen_logps=None, ref_rejected_logps=None,
                per_pair: bool = False):
        logps = sequence_logps(self.model, input_ids, labels, attention_mask)
        if ref_chosen_logps is None:
            if self.reference == "precomputed":
                raise ValueError("reference precomputed: the batch carries no reference log-probs")
            ref_chosen_logps, ref_rejected_logps = self.frozen_logps(input_ids, labels, attention_mask).chunk(2)
        chosen, rejected = logps.chunk(2)
        tokens_chosen, tokens_rejected = completion_tokens(labels).chunk(2)
        chosen_logratios, rejected_logratios = chosen - ref_chosen_logps, rejected - ref_rejected_logps
        losses = dpo_losses(self.spec, chosen_logratios, rejected_logratios, tokens_chosen, tokens_rejected)
        chosen_rewards = self.spec.beta * chosen_logratios.detach()
        rejected_rewards = self.spec.beta * rejected_logratios.detach()
        if per_pair:
            return {"loss": losses.detach(), "chosen_logps": chosen.detach(), "rejected_logps": rejected.detach(),
                    "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                    "chosen_tokens": tokens_chosen}
        metrics = {"rewards_chosen": chosen_rewards.sum(), "rewards_rejected": rejected_rewards.sum(),
                   "rewards_margins": (chosen_rewards - rejected_rewards).sum(), "logps_chosen": chosen.detach().sum(),
                   "logps_rejected": rejected.detach().sum()}
        return losses.sum(), losses.numel(), (chosen_rewards > rejected_rewards).sum(), metrics


def reference_table(loss: DpoLoss, batcher: PairBatcher, *, batch_size: int, precision,
                    parallel: Distributed | None = None) -> torch.Tensor:
    """[pairs, 2] float32 reference log-probs (chosen, rejected) of every pair, in eval mode, on every rank.
    Call it before training (and before the model is sharded): it scores the weights as they are."""
    def score(batch):
        chosen, rejected = loss.frozen_logps(batch["input_ids"], batch["labels"], batch.get("attention_mask")).chunk(2)
        return {"chosen": chosen, "rejected": rejected}

    values = per_pair(score, batcher, module=loss, batch_size=batch_size, precision=precision, parallel=parallel)
    return torch.tensor([values.get("chosen", []), values.get("rejected", [])], dtype=torch.float32).T.contiguous()


def dpo_metrics(values: dict[str, list[float]]) -> dict[str, float]:
    """Held-out scores from per-pair values: the DPO loss, the model's own log-prob margin and how often the
    chosen reply is the likelier (preference_*), the implicit reward margin and accuracy (reward_*), and the
    perplexity of the chosen replies."""
    n = len(values.get("loss", []))
    if not n:
        return {}
    chosen, rejected = values["chosen_logps"], values["rejected_logps"]
    chosen_r, rejected_r = values["chosen_rewards"], values["rejected_rewards"]
    return {
        "loss": sum(values["loss"]) / n,
        "preference_margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "preference_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "reward_margin": sum(c - r for c, r in zip(chosen_r, rejected_r)) / n,
        "reward_accuracy": sum(c > r for c, r in zip(chosen_r, rejected_r)) / n,
        "perplexity": math.exp(min(50.0, -sum(chosen) / max(1.0, sum(values["chosen_tokens"])))),
    }

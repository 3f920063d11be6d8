"""PPO's and GRPO's losses as training-step modules (engine/train_step.py's interface).

forward(**batch) returns (summed loss, units, 0): the per-token loss times the batch's `token_weight`,
summed; `normalizer(batch)` is the batch's `units`. How a loss is averaged is carried by those two
tensors, set when the rollouts are built: PPO and GRPO's bnpo average over tokens (weight 1, units =
tokens), GRPO averages each completion over its own tokens then over completions (weight 1/length, one
unit per completion), Dr. GRPO divides by max_new_tokens instead (no length bias). So gradient
accumulation, several processes and the out-of-memory back-off give the gradient of one whole batch.

Diagnostics (entropy, clip fractions, value loss, approximate KL) are summed per token during forward
and read, summed over ranks, with `pop_stats` after the step's updates.
"""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.engine.rl import objectives
from tuneforge.engine.rl.policy import score_tokens


class _RLLoss(nn.Module):
    accuracy_metric = None  # no next-token accuracy: the step's event carries the rollout's metrics instead

    def __init__(self) -> None:
        super().__init__()
        self._stats: dict[str, float] = {}

    @staticmethod
    def normalizer(batch: dict[str, torch.Tensor]) -> int:
        return int(round(float(batch["units"].sum())))

    def _record(self, mask: torch.Tensor, **per_token: torch.Tensor) -> None:
        with torch.no_grad():
            self._stats["tokens"] = self._stats.get("tokens", 0.0) + float(mask.sum())
            for name, value in per_token.items():
                self._stats[name] = self._stats.get(name, 0.0) + float((value.float() * mask).sum())

    def pop_stats(self, parallel) -> dict[str, float]:
        """Token means of what forward recorded since the last call, over every rank; then reset."""
        names = sorted(k for k in self._stats if k != "tokens")
        totals = parallel.sum([self._stats.get("tokens", 0.0)] + [self._stats[k] for k in names])
        self._stats = {}
        tokens = max(totals[0], 1.0)
        return {name: total / tokens for name, total in zip(names, totals[1:])}


class PpoLoss(_RLLoss):
    """Clipped policy loss + value_coef x clipped value loss, per response token (TRL's PPO)."""

    def __init__(self, actor_critic: nn.Module, *, clip_range: float, clip_range_value: float, value_coef: float,
                 temperature: float):
        super().__init__()
        self.model = actor_critic
        self.clip_range, self.clip_range_value, self.value_coef = clip_range, clip_range_value, value_coef
        self.temperature = temperature

    def base_model(self) -> nn.Module:
        policy = self.model.policy
        return policy.get_base_model() if hasattr(policy, "get_base_model") else policy

    def forward(self, input_ids, attention_mask, response_mask, old_logprobs, old_values, advantages, returns,
                token_weight, units):
        scores = score_tokens(self.model.policy, input_ids, attention_mask, response_mask.shape[1],
                              temperature=self.temperature, value_head=self.model.value_head, with_entropy=True)
        mask = response_mask.float()
        policy_loss, policy_clipped = objectives.clipped_policy_loss(scores.logprobs, old_logprobs, advantages,
                                                                     self.clip_range)
        value_loss, value_clipped = objectives.clipped_value_loss(scores.values, old_values, returns,
                                                                  self.clip_range_value)
        loss = ((policy_loss + self.value_coef * value_loss) * token_weight * mask).sum()
        log_ratio = (scores.logprobs - old_logprobs).detach()
        self._record(mask, policy_loss=policy_loss, value_loss=value_loss, clip_fraction=policy_clipped,
                     value_clip_fraction=value_clipped, entropy=scores.entropy, approx_kl=0.5 * log_ratio**2)
        return loss, mask.sum(), torch.zeros((), dtype=torch.long)


class GrpoLoss(_RLLoss):
    """GRPO's clipped loss with the k3 KL penalty against the reference, per completion token."""

    def __init__(self, policy: nn.Module, *, epsilon: float, beta: float, temperature: float):
        super().__init__()
        self.model = policy
        self.epsilon, self.beta, self.temperature = epsilon, beta, temperature

    def base_model(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, attention_mask, response_mask, old_logprobs, ref_logprobs, advantages, token_weight,
                units):
        scores = score_tokens(self.model, input_ids, attention_mask, response_mask.shape[1],
                              temperature=self.temperature, with_entropy=True)
        mask = response_mask.float()
        per_token, clipped = objectives.grpo_token_loss(scores.logprobs, old_logprobs, ref_logprobs, advantages,
                                                        epsilon=self.epsilon, beta=self.beta)
        loss = (per_token * token_weight * mask).sum()
        self._record(mask, policy_loss=per_token, clip_fraction=clipped, entropy=scores.entropy,
                     kl=objectives.kl_k3(scores.logprobs.detach(), ref_logprobs))
        return loss, mask.sum(), torch.zeros((), dtype=torch.long)

"""The arithmetic of PPO and GRPO, one small function each: KL estimators, GAE, whitening, clipped
losses, the adaptive KL controller and group-relative advantages.

Tensors are (sequences, response tokens) with a `mask` that is 1 on real response tokens and 0 on the
padding after a sequence ended. Conventions follow InstructGPT / TRL's PPO trainer (k1 KL in the
per-token rewards, GAE over the response, clipped value loss) and TRL's GRPOTrainer (k3 KL in the loss,
advantages relative to each group of completions of one prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  stats: tuple[float, float] | None = None) -> torch.Tensor:
    """(values - mean) / std over the masked entries; with shift_mean False the mean is added back
    (TRL's convention for rewards). stats: (mean, variance) measured elsewhere, e.g. over every rank.
    Masked-out entries come back 0."""
    if stats is None:
        mean = masked_mean(values, mask)
        count = mask.sum()
        variance = masked_mean((values - mean) ** 2, mask)
        if count > 1:  # the unbiased estimate, as TRL's masked_var
            variance = variance * count / (count - 1)
    else:
        mean, variance = (torch.tensor(v, dtype=values.dtype, device=values.device) for v in stats)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(policy || reference) on tokens the policy sampled: log p - log q.
    Unbiased, can be negative per token."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate (Schulman): exp(q - p) - (q - p) - 1, non-negative, low variance; GRPO's
    penalty in the loss."""
    diff = ref_logprobs - logprobs
    return torch.exp(diff) - diff - 1


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token rewards: -kl_coef * k1 KL on every response token, plus the sequence's score on
    its last real token. Returns (rewards, per-token KL), both zero on padding."""
    kl = kl_k1(logprobs, ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015) along each response:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; V after the end is 0.
    Returns (advantages, returns = advantages + values), zero on padding."""
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: max(-A r, -A clip(r, 1-eps, 1+eps)) with r = exp(new - old).
    Returns (per-token loss, per-token 1.0 where the clipped term was the larger)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logprobs.dtype)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: 0.5 max((V - R)^2, (clip(V, V_old +- eps) - R)^2).
    Returns (per-token loss, per-token 1.0 where the clipped term was the larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(values.dtype)


def grpo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                    advantages: torch.Tensor, *, epsilon: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's per-token loss (TRL's GRPOTrainer, two-sided clip): -min(r A, clip(r) A) + beta k3-KL,
    A one value per sequence (shape (sequences,)). Returns (per-token loss, per-token clipped flag)."""
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if beta != 0.0 and ref_logprobs is not None:
        loss = loss + beta * kl_k3(logprobs, ref_logprobs)
    return loss, (clipped < unclipped).to(logprobs.dtype)


def group_advantages(rewards: torch.Tensor, num_generations: int, *, scale_rewards: bool) -> torch.Tensor:
    """GRPO's advantages: each completion's reward minus the mean of its group (the num_generations
    completions of one prompt, consecutive), divided by the group's standard deviation (unbiased) + 1e-4
    when scale_rewards."""
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the measured KL approaches `target`:
    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon. With target None it stays fixed."""

    value: float
    target: float | None
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of logits along the last dimension."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)

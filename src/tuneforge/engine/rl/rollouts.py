"""A step's rollouts: sampled from the current policy, scored by the policy and the reference, held as
rows the optimization passes cut into mini-batches and micro-batches.

Both PPO and GRPO build theirs from the same three calls: `generate` (per-sequence seeded sampling,
engine/rl/sampling.py), `score` (old log-probs, reference log-probs, values, in micro-batches without
gradients) and `Rollouts` (the rows, collated on demand and trimmed to what a micro-batch needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tuneforge.engine.rl.policy import reference_of, score_tokens
from tuneforge.engine.rl.prompts import Prompt, PromptSet
from tuneforge.engine.rl.sampling import Completions, sample, sequence_seed


@dataclass
class Generated:
    prompts: list[Prompt]  # one per completion (a prompt repeated for each of its samples, consecutively)
    completions: Completions
    texts: list[str]  # each completion decoded, special tokens (EOS) removed


def generate(policy, prompts: PromptSet, prompt_ids, *, samples_per_prompt: int, step: int, seed: int, tokenizer,
             max_new_tokens: int, temperature: float, top_p: float, greedy: bool = False, synced=None) -> Generated:
    """Sample samples_per_prompt completions of each prompt with the current policy (greedy: the argmax)."""
    rows = [(int(pid), k) for pid in prompt_ids for k in range(samples_per_prompt)]
    chosen = [prompts[pid] for pid, _ in rows]
    seeds = None if greedy else [sequence_seed(seed, step, pid, k) for pid, k in rows]
    completions = sample(policy, [list(p.ids) for p in chosen], seeds=seeds, max_new_tokens=max_new_tokens,
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, temperature=temperature,
                         top_p=top_p, synced=synced)
    responses = [ids[: int(n)] for ids, n in zip(completions.response_ids, completions.response_lengths())]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Generated(chosen, completions, texts)


@dataclass
class Scored:
    logprobs: torch.Tensor  # (completions, response tokens), of the policy that sampled them
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None


@torch.no_grad()
def score(policy, completions: Completions, *, micro: int, temperature: float, precision, value_head=None,
          with_reference: bool = True, reference=None) -> Scored:
    """Log-probs of the sampled tokens under the policy (eval mode, as sampled) and the reference (the
    adapter disabled, or a frozen copy), and the value head's values, micro-batch by micro-batch."""
    was_training = policy.training
    policy.eval()
    logprobs, ref_logprobs, values = [], [], []
    length = completions.response_mask.shape[1]
    try:
        for start in range(0, completions.input_ids.shape[0], micro):
            ids = completions.input_ids[start : start + micro].to(precision.device)
            mask = completions.attention_mask[start : start + micro].to(precision.device)
            with precision.autocast():
                mine = score_tokens(policy, ids, mask, length, temperature=temperature, value_head=value_head)
                logprobs.append(mine.logprobs.cpu())
                if value_head is not None:
                    values.append(mine.values.cpu())
                if with_reference:
                    with reference_of(policy, reference) as ref:
                        theirs = score_tokens(ref, ids, mask, length, temperature=temperature)
                        ref_logprobs.append(theirs.logprobs.cpu())
    finally:
        policy.train(was_training)
    mask = completions.response_mask.float()
    return Scored(torch.cat(logprobs) * mask, torch.cat(ref_logprobs) * mask if with_reference else None,
                  torch.cat(values) * mask if value_head is not None else None)


class Rollouts:
    """Rows of one step's experience: tensors with one row per completion, either over the whole
    sequence (input_ids, attention_mask), over the response (response_mask and per-token values) or one
    value per completion."""

    def __init__(self, completions: Completions, **tensors: torch.Tensor):
        self.prompt_length = completions.prompt_length
        self.tensors = {"input_ids": completions.input_ids, "attention_mask": completions.attention_mask,
                        "response_mask": completions.response_mask, **tensors}

    def __len__(self) -> int:
        return self.tensors["input_ids"].shape[0]

    @property
    def tokens(self) -> int:
        return int(self.tensors["attention_mask"].sum())

    @property
    def padded_tokens(self) -> int:
        return self.tensors["input_ids"].numel()

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The rows as a micro-batch, without the prompt columns that are padding on every one of them
        and the response columns after the longest of them ended (positions follow the attention mask,
        so trimming changes nothing they compute)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        full = self.tensors["input_ids"].shape[1]
        attention = self.tensors["attention_mask"][index]
        response = self.tensors["response_mask"][index]
        first = int(attention[:, : self.prompt_length].any(dim=0).long().argmax())
        kept = max(1, int(response.any(dim=0).long().sum()))
        batch = {}
        for name, tensor in self.tensors.items():
            rows_of = tensor[index]
            if rows_of.dim() == 2 and rows_of.shape[1] == full:
                rows_of = rows_of[:, first : self.prompt_length + kept]
            elif rows_of.dim() == 2:
                rows_of = rows_of[:, :kept]
            batch[name] = rows_of
        batch["tokens"] = batch["attention_mask"].sum()
        return batch


def update_plan(rows: int, *, epochs: int, mini_batches: int, seed: int, step: int) -> list[list[int]]:
    """The optimizer updates of one step: each epoch a fresh permutation of the rows (seeded by the seed,
    the step and the epoch: a resumed step shuffles alike) cut into mini_batches equal parts."""
    if rows % mini_batches:
        raise ValueError(f"{rows} rollouts per device do not split into {mini_batches} equal mini-batches")
    size = rows // mini_batches
    updates = []
    for epoch in range(epochs):
        order = np.random.Generator(np.random.PCG64([seed, step, epoch])).permutation(rows)
        updates.extend([int(i) for i in order[k * size : (k + 1) * size]] for k in range(mini_batches))
    return updates


def global_stats(values: torch.Tensor, mask: torch.Tensor, parallel) -> tuple[float, float]:
    """(mean, unbiased variance) of the masked values over every rank."""
    total, squares, count = parallel.sum([float((values * mask).sum()), float((values**2 * mask).sum()),
                                          float(mask.sum())])
    mean = total / max(count, 1.0)
    variance = max(squares / max(count, 1.0) - mean**2, 0.0)
    if count > 1:
        variance *= count / (count - 1)
    return mean, variance


def global_mean(values: list[float], parallel) -> float:
    """The mean of every rank's values."""
    total, count = parallel.sum([float(sum(values)), float(len(values))])
    return total / max(count, 1.0)


def rollout_metrics(rewards, completions: Completions, parallel) -> dict[str, float]:
    """A step's mean reward (and each part of it when there are several), grader pass rate and response
    length, over every rank."""
    metrics = {"reward": global_mean(rewards.scores.tolist(), parallel),
               "response_length": global_mean(completions.response_lengths().float().tolist(), parallel)}
    if len(rewards.parts) > 1:
        metrics |= {f"reward_{name}": global_mean(v.tolist(), parallel) for name, v in sorted(rewards.parts.items())}
    if rewards.passed is not None:
        metrics["pass_rate"] = global_mean([float(p) for p in rewards.passed], parallel)
    return metrics

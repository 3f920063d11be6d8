"""Batched sampling of completions: left-padded prompts, a KV cache, temperature and top-p, each
sequence stopping at its own EOS.

Every sequence draws its random numbers from its own generator, seeded by the caller (a pure
function of the seed, the step, the prompt and the sample index). So a completion does not depend on
which other prompts share its batch, how the batch is chunked, how many processes split the step,
or on any RNG state: a resumed run samples exactly what the uninterrupted one sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Completions:
    """Prompts and sampled responses as one left-padded block of token ids.

    input_ids: (sequences, prompt_length + response_length); the prompt occupies the first
    prompt_length columns, right-aligned (left padding), the response the rest, right-padded after EOS.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    response_mask: torch.Tensor  # (sequences, response_length): 1 on real response tokens, EOS included

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]

    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)


def sequence_seed(seed: int, step: int, prompt_id: int, sample: int) -> int:
    """The seed of one sampled sequence, a pure function of where it sits in the run."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, prompt_id, sample]).generate_state(1, dtype=np.uint64)[0] >> 1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one block (so every sequence's next token is in the last column)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, length - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt):] = 1
    return ids, mask


def pick_tokens(logits: torch.Tensor, generators: list[torch.Generator] | None, *, temperature: float,
                top_p: float) -> torch.Tensor:
    """One token per row: argmax when generators is None, else sampled from softmax(logits / T) cut to
    the smallest set of tokens whose probability reaches top_p, by inverse-CDF on one uniform number
    drawn from each row's own generator."""
    if generators is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    if top_p < 1.0:
        # Keep a token while the mass before it is below top_p (the most likely token always stays).
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs >= top_p, 0.0)
        cumulative = sorted_probs.cumsum(dim=-1)
    uniform = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)
    threshold = uniform * cumulative[:, -1]
    index = torch.searchsorted(cumulative, threshold[:, None]).clamp(max=cumulative.shape[1] - 1)
    return order.gather(1, index).squeeze(1)


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, seeds: list[int] | None, max_new_tokens: int, eos_id: int,
           pad_id: int, temperature: float = 1.0, top_p: float = 1.0, synced=None) -> Completions:
    """Sample one completion per prompt (seeds None: greedy decoding), stopping each at its EOS.

    model: a causal LM (PEFT or plain) called with a KV cache; it is put in eval mode for the call.
    synced: a Distributed; every rank then keeps stepping until all ranks' sequences are done, for
    models whose forward is a collective (FSDP)."""
    from transformers import DynamicCache

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    generators = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache()
    step_ids, step_positions, attention = ids, position_ids, mask
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_tokens, alive = [], []
    try:
        for _ in range(max_new_tokens):
            # The cache grows in place (a DynamicCache), so each call feeds only the newest tokens; only the
            # last position's logits are needed (a prompt's would cost tokens x vocabulary).
            logits = model(input_ids=step_ids, attention_mask=attention, position_ids=step_positions, cache=cache,
                           use_cache=True, logits_to_keep=1).logits
            token = pick_tokens(logits[:, -1, :], generators, temperature=temperature, top_p=top_p)
            alive.append(~finished)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            new_tokens.append(token)
            finished = finished | (token == eos_id)
            done = bool(finished.all())
            if done if synced is None else not synced.any(not done):
                break
            step_ids = token[:, None]
            step_positions = step_positions[:, -1:] + 1
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    finally:
        model.train(was_training)
    response = torch.stack(new_tokens, dim=1)
    response_mask = torch.stack(alive, dim=1).long()
    input_ids = torch.cat([ids, response], dim=1)
    attention_mask = torch.cat([mask, response_mask], dim=1)
    return Completions(input_ids.cpu(), attention_mask.cpu(), ids.shape[1], response_mask.cpu())

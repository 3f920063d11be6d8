"""The policy as online RL sees it: per-token log-probabilities (and entropy) of a response, the value
head PPO trains beside it, and the frozen reference (the base with the adapter disabled).

One forward over prompt + response gives everything at once: the hidden state before each response
token feeds the LM head (log-prob of that token, entropy of the distribution) and the value head
(the expected return from there), as in TRL's PPO trainer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_WEIGHTS = "value_head.safetensors"


@dataclass
class TokenScores:
    logprobs: torch.Tensor  # (sequences, response tokens): log p(token | prefix) at the sampling temperature
    entropy: torch.Tensor | None  # (sequences, response tokens)
    values: torch.Tensor | None  # (sequences, response tokens), when a value head is given


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each sequence's first real token (prompts are left-padded)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def score_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int, *,
                 temperature: float = 1.0, value_head: nn.Module | None = None,
                 with_entropy: bool = False) -> TokenScores:
    """Log-probs of the last response_length tokens of input_ids under model (logits divided by the
    sampling temperature, as the tokens were sampled), and optionally entropy and values."""
    base = base_causal_lm(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    # The hidden state at position t predicts token t + 1: the response's tokens are predicted from the
    # positions just before them.
    hidden = hidden[:, -response_length - 1 : -1]
    logits = base.get_output_embeddings()(hidden).float() / temperature
    targets = input_ids[:, -response_length:]
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(2, targets[..., None]).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            entropy = log_norm - (probs * logits).sum(dim=-1)
    values = value_head(hidden).squeeze(-1).float() if value_head is not None else None
    return TokenScores(logprobs, entropy, values)


@contextmanager
def reference_of(model: nn.Module, reference: nn.Module | None = None):
    """The frozen reference policy: the base model with the adapter disabled (no second copy of the
    weights), or `reference`, a frozen copy kept for full fine-tuning."""
    if reference is not None:
        yield reference
        return
    if not hasattr(model, "disable_adapter"):
        raise ValueError("full fine-tuning needs a reference copy of the base model; pass `reference`")
    with model.disable_adapter():
        yield model


class ActorCritic(nn.Module):
    """The policy and PPO's value head, trained and checkpointed together.

    The value head is a linear layer on the policy's last hidden state (shared trunk). Checkpoints hold
    the policy's trainable weights as usual (the adapter, or every weight) and the head beside them;
    the published adapter is the policy's alone, loadable by any PEFT or serving stack."""

    def __init__(self, policy: nn.Module, hidden_size: int, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.policy = policy
        device = next(policy.parameters()).device
        self.value_head = nn.Linear(hidden_size, 1, device=device, dtype=dtype)
        # Small weights: the first values are near 0 instead of random returns with a large loss.
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)

    def save_trainable(self, directory: Path) -> None:
        from safetensors.torch import save_file

        from tuneforge.engine.weights import save_trainable

        save_trainable(self.policy, directory)
        save_file({k: v.detach().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(directory / VALUE_HEAD_WEIGHTS))

    def load_trainable(self, directory: Path) -> None:
        from safetensors.torch import load_file

        from tuneforge.engine.weights import load_trainable

        load_trainable(self.policy, directory)
        device = self.value_head.weight.device
        self.value_head.load_state_dict(load_file(str(directory / VALUE_HEAD_WEIGHTS), device=str(device)))

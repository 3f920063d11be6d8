"""The reward of a completion: a trained reward model's score and/or graders' scores, summed.

Graders are OpenAI's shapes (spec/graders.py) run by evaluation/graders.py: the dataset row is the
`item`, the completion's text the `sample.output_text`. A completion a grader cannot grade (score None)
earns 0 from that grader, as a wrong answer would. A reward model is a `method: reward` job's output
scoring the prompt's messages followed by the completion as the assistant's
reply, rendered as its training pairs were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.engine.rl.prompts import Prompt

REWARD_MODEL_BATCH = 8


@dataclass
class Rewards:
    scores: torch.Tensor  # (completions,) float32: the reward of each
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # each source's score: reward_model, grader names
    passed: list[bool] | None = None  # every grader with a pass criterion passed; None without such graders


def load_reward_model(path: str | Path, precision):
    """(model, tokenizer) of a trained reward model (a `method: reward` job's directory), as the reward
    recipe wrote it (engine/preference), on the training device."""
    from tuneforge.engine.preference import load_reward_model as load_trained

    model, tokenizer = load_trained(path, precision.name, device=precision.device)
    return model.requires_grad_(False), tokenizer


class RewardFunction:
    """Scores completions with a reward model and graders (their sum).

    graders: runners of rollout.graders (evaluation/graders.py's build_grader, which the recipe calls:
    the engine does not import evaluation); reward_model: rollout.reward_model, loaded here."""

    def __init__(self, graders: list, *, reward_model: str | Path | None = None, precision=None):
        self.graders = graders
        self.reward_model = load_reward_model(reward_model, precision) if reward_model is not None else None
        if not graders and self.reward_model is None:
            raise ValueError("a reward needs a reward model or at least one grader")

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> Rewards:
        parts: dict[str, torch.Tensor] = {}
        passes: list[list[bool]] = []
        if self.reward_model is not None:
            parts["reward_model"] = self.model_scores([[*p.messages, {"role": "assistant", "content": c}]
                                                       for p, c in zip(prompts, completions)])
        items = [p.item for p in prompts]
        samples = [{"output_text": c} for c in completions]
        for grader in self.graders:
            results = grader.grade(items, samples)
            parts[grader.name] = torch.tensor([r.score if r.score is not None else 0.0 for r in results],
                                              dtype=torch.float32)
            if any(r.passed is not None for r in results):
                passes.append([bool(r.passed) for r in results])
        scores = torch.stack(list(parts.values())).sum(dim=0)
        passed = [all(column) for column in zip(*passes)] if passes else None
        return Rewards(scores, parts, passed)

    def model_scores(self, conversations: list[list[dict]]) -> torch.Tensor:
        """The reward model's score of each conversation, rendered as its training pairs were."""
        from tuneforge.engine.preference import score_conversations

        model, tokenizer = self.reward_model
        return torch.tensor(score_conversations(model, tokenizer, conversations, batch_size=REWARD_MODEL_BATCH),
                            dtype=torch.float32)

"""Settings of the online RL methods, `ppo` and `grpo`: how completions are sampled and what scores them.

A reward comes from a trained reward model (a registered model id, or from a job file a reward job's
directory) or from graders in OpenAI's shapes (spec/graders.py), summed by weight when several are
given. The KL penalty is taken against the base model with the adapter disabled.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.spec.graders import MAX_GRADERS, Grader


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RolloutSpec(_Section):
    prompts_per_step: int = Field(
        8, gt=0, le=1 << 16, description="Prompts sampled per step over all devices (GRPO samples num_generations "
        "completions of each); a multiple of the number of devices."
    )
    max_new_tokens: int = Field(64, gt=0, le=8192, description="Longest sampled completion, in tokens.")
    temperature: float = Field(1.0, gt=0.0, le=5.0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the rollouts.")
    reward_model: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        None, description="Trained reward model: a registered model id or, in a job file, the directory of a "
        "`method: reward` job."
    )
    graders: Annotated[list[Grader], Field(max_length=MAX_GRADERS)] = Field(
        default_factory=list, description="Graders (OpenAI shapes) whose scores are the reward; with a reward model "
        "too, the reward is their sum."
    )

    def has_reward(self) -> bool:
        return self.reward_model is not None or bool(self.graders)


class PpoSpec(_Section):
    ppo_epochs: int = Field(4, gt=0, le=100, description="Optimization passes over each batch of rollouts.")
    num_mini_batches: int = Field(1, gt=0, le=1024, description="Mini-batches per PPO epoch.")
    clip_range: float = Field(0.2, gt=0.0, le=10.0, description="Policy ratio clip (epsilon).")
    clip_range_value: float = Field(0.2, gt=0.0, le=100.0, description="Value prediction clip.")
    value_coef: float = Field(0.1, ge=0.0, le=100.0, description="Weight of the value loss.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount factor.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    kl_coef: float = Field(0.05, ge=0.0, le=100.0, description="Initial coefficient of the per-token KL penalty.")
    target_kl: float | None = Field(
        6.0, gt=0.0, le=1000.0, description="Adaptive KL control target (Ziegler et al.); empty: a fixed kl_coef."
    )
    kl_horizon: int = Field(10000, gt=0, le=1 << 30, description="Horizon of the adaptive KL controller.")
    whiten_advantages: bool = Field(True, description="Normalize advantages to zero mean, unit variance per batch.")


class GrpoSpec(_Section):
    num_generations: int = Field(8, ge=2, le=256, description="Completions sampled per prompt (the group).")
    beta: float = Field(0.04, ge=0.0, le=100.0, description="KL penalty coefficient against the reference; 0 skips it.")
    epsilon: float = Field(0.2, gt=0.0, le=10.0, description="Policy ratio clip.")
    scale_rewards: bool = Field(True, description="Divide group-relative advantages by the group's standard deviation.")
    num_iterations: int = Field(
        1, gt=0, le=100, description="Optimizer steps on each batch of completions (TRL's num_iterations); above 1 "
        "the clipped ratio against the sampling policy matters."
    )
    loss_type: Literal["grpo", "dr_grpo", "bnpo"] = Field(
        "grpo", description="grpo: mean over each completion's tokens; bnpo: over the batch's tokens; dr_grpo: "
        "over max_new_tokens per completion (no length bias)."
    )

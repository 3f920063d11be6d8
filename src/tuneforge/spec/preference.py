"""Settings of the preference methods: `dpo` (direct preference optimization) and `reward` (a reward model).

Both train on preference pairs (prompt, chosen, rejected). The reference model of DPO is the base
model itself with the adapter disabled, so no second copy is held; for full fine-tuning (no adapter
to disable) the reference log-probabilities are computed once before training and kept.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust"]


class DpoSpec(_Section):
    beta: float = Field(0.1, gt=0.0, le=100.0, description="Strength of the pull toward the reference model (DPO's beta).")
    loss_type: DpoLoss = Field(
        "sigmoid", description="sigmoid (the DPO paper), ipo (identity preference optimization), hinge (SLiC), "
        "robust (noise-robust DPO, with label_smoothing as the flip rate)."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed fraction of flipped preference labels (conservative / robust DPO)."
    )
    reference: Literal["auto", "adapter_disabled", "precomputed"] = Field(
        "auto", description="Reference log-probabilities: from the base with the adapter disabled (LoRA / QLoRA), or "
        "precomputed once before training; auto: adapter_disabled with an adapter, precomputed for full fine-tuning."
    )
    max_prompt_length: int | None = Field(
        None, gt=0, le=1 << 20, description="Keep at most this many prompt tokens (from the end); empty: no limit."
    )


class RewardModelSpec(_Section):
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, le=100.0, description="Add this times the mean squared reward to the loss, so rewards stay "
        "centred on zero (TRL's center_rewards_coefficient); empty: off."
    )

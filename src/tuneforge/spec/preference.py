"""Settings of the preference methods: `dpo` (direct preference optimization) and `reward` (a reward model).

Both train on preference pairs (prompt, chosen, rejected). The reference model of DPO is the base
model itself with the adapter disabled, so no second copy is held; for full fine-tuning (no adapter
to disable) the reference log-probabilities are computed once before training and kept.
The DPO losses are TRL's (trl 1.16 `DPOTrainer`, reverse-KL), checked against it on the same batch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# TRL's per-pair losses. Left out: aot / aot_unpaired (they sort the pairs of a batch, so the loss of a
# pair depends on the micro-batch it lands in) and sft (a token mean, not a per-pair loss).
DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop", "sigmoid_norm"]
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair")
DISCOPOP_TAU = 0.05  # the losses whose formula uses label_smoothing (as in TRL)


class DpoSpec(_Section):
    beta: float = Field(0.1, gt=0.0, le=100.0, description="Strength of the pull toward the reference model (DPO's "
                        "beta; IPO's tau).")
    loss_type: DpoLoss = Field(
        "sigmoid", description="sigmoid (the DPO paper), ipo (identity preference optimization, length-normalized as "
        "TRL), hinge (SLiC), robust (noise-robust DPO, label_smoothing is the flip rate), exo_pair, nca_pair, "
        "bco_pair, sppo_hard, apo_zero, apo_down, discopop, sigmoid_norm (DPO on per-token mean log-ratios): TRL's "
        "formulas."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed fraction of flipped preference labels; only the robust and "
        "exo_pair losses use it (exo_pair needs it above 0; the EXO paper suggests 1e-3)."
    )
    discopop_tau: float = Field(DISCOPOP_TAU, gt=0.0, le=100.0, description="discopop only: the temperature of its log-ratio "
                                "modulation (the paper's 0.05).")
    reference: Literal["auto", "adapter_disabled", "precomputed"] = Field(
        "auto", description="Reference log-probabilities: from the base with the adapter disabled (LoRA / QLoRA), or "
        "precomputed once before training; auto: adapter_disabled with an adapter, precomputed for full fine-tuning."
    )
    max_prompt_length: int | None = Field(
        None, gt=0, le=1 << 20, description="Keep at most this many prompt tokens (from the end); empty: no limit."
    )

    @model_validator(mode="after")
    def _label_smoothing_is_used(self) -> DpoSpec:
        if self.label_smoothing and self.loss_type not in LABEL_SMOOTHING_LOSSES:
            raise ValueError(f"label_smoothing is used only by the {' and '.join(LABEL_SMOOTHING_LOSSES)} losses, not "
                             f"by {self.loss_type}; set loss_type robust for noise-robust DPO or remove label_smoothing")
        if self.loss_type == "exo_pair" and not self.label_smoothing:
            raise ValueError("loss_type exo_pair needs label_smoothing above 0 (the EXO paper suggests 1e-3)")
        if self.discopop_tau != DISCOPOP_TAU and self.loss_type != "discopop":
            raise ValueError(f"discopop_tau is used only by loss_type discopop, not by {self.loss_type}")
        return self


class RewardModelSpec(_Section):
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, le=100.0, description="Add this times the mean over pairs of (r_chosen + r_rejected)^2 to the "
        "loss, so rewards stay centred on zero (TRL's center_rewards_coefficient); empty: off."
    )

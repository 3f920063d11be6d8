"""The dpo and reward sections: label_smoothing and discopop_tau only where TRL's formulas use them."""

import pytest
from pydantic import ValidationError

from tuneforge.spec.preference import DpoSpec, RewardModelSpec


def test_label_smoothing_is_refused_where_no_formula_uses_it():
    assert DpoSpec(loss_type="robust", label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValidationError, match="label_smoothing is used only by the robust and exo_pair losses"):
        DpoSpec(loss_type="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValidationError, match="exo_pair needs label_smoothing above 0"):
        DpoSpec(loss_type="exo_pair")
    with pytest.raises(ValidationError, match="discopop_tau is used only by loss_type discopop"):
        DpoSpec(loss_type="ipo", discopop_tau=0.1)
    assert DpoSpec(loss_type="discopop", discopop_tau=0.1).discopop_tau == 0.1
    # A spec round-trips through spec.json with every field written out.
    spec = DpoSpec(loss_type="robust", label_smoothing=0.2)
    assert DpoSpec.model_validate(spec.model_dump()) == spec


def test_unknown_or_unpaired_losses_are_refused():
    with pytest.raises(ValidationError):
        DpoSpec(loss_type="aot")  # sorts a batch's pairs: not a per-pair loss
    assert RewardModelSpec().center_rewards_coefficient is None

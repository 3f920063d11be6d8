"""Training on preference pairs: DPO (and TRL's other pairwise losses) and reward models.

    PairBatcher, per_pair                         pairs.py   a step's unit is one pair, [chosen; rejected]
    DpoLoss, dpo_losses, reference_table, ...     dpo.py     log-probs, the reference, the losses
    RewardLoss, load_reward_model, ...            reward.py  a scalar head, Bradley-Terry, loading by directory

Both loss modules plug into engine/train_step.py like CausalLMLoss: forward returns (summed loss, pairs,
pairs ranked right, summed metrics) and `normalizer(batch)` counts the batch's pairs.
"""

from tuneforge.engine.preference.dpo import (
    DpoLoss,
    completion_tokens,
    dpo_losses,
    dpo_metrics,
    reference_table,
    sequence_logps,
)
from tuneforge.engine.preference.pairs import PairBatcher, pairs_in, per_pair
from tuneforge.engine.preference.reward import (
    MANIFEST,
    RewardLoss,
    head_in_float32,
    load_reward_base,
    load_reward_model,
    reward_metrics,
    reward_model_dir,
    score_conversations,
    write_manifest,
)

__all__ = [
    "MANIFEST", "DpoLoss", "PairBatcher", "RewardLoss", "completion_tokens", "dpo_losses", "dpo_metrics",
    "head_in_float32", "load_reward_base", "load_reward_model", "pairs_in", "per_pair", "reference_table",
    "reward_metrics", "reward_model_dir", "score_conversations", "sequence_logps", "write_manifest",
]

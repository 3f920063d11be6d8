"""Our DPO and reward losses against TRL's own (trl 1.16 DPOTrainer / RewardTrainer) on the same tiny model
and the same batch, and the pieces around them: pair tokenization, precomputed references, accumulation.

Tolerance: float32 on CPU, |ours - TRL's| <= 5e-5 * max(1, |TRL's|) for every loss and logged metric (measured:
at most 1.1e-5, for sppo_hard, whose squares amplify the last digits of the summed log-probs), and
LoRA gradients within 1e-4 relative + 1e-6 absolute (TRL's fused log-prob kernel and ours take the same
per-token log-probs, with float additions in another order: measured differences about 3e-5 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tuneforge.data.formats import Example
from tuneforge.data.preference import fit_pairs, prompt_length, tokenize_pairs
from tuneforge.data.templating import IGNORE_INDEX, PromptRenderer
from tuneforge.engine.precision import Precision
from tuneforge.engine.preference import DpoLoss, PairBatcher, RewardLoss, reference_table
from tuneforge.engine.train_step import optimizer_step
from tuneforge.spec.preference import DpoSpec

trl = pytest.importorskip("trl")

TOLERANCE = 5e-5
RECORDS = [
    {"prompt": "Write 14 March 2021 as an ISO date.", "chosen": "2021-03-14", "rejected": "14/03/2021"},
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": "Paris.", "rejected": "I think it might be Lyon, but I am not sure."},
    {"prompt": "2+2?", "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5, probably"}]},
    {"prompt": "Say hi politely.", "chosen": "Hello, nice to meet you!", "rejected": "what"},
]
LOSSES = [("sigmoid", {}), ("ipo", {}), ("hinge", {}), ("robust", {"label_smoothing": 0.2}),
          ("exo_pair", {"label_smoothing": 1e-3}), ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}),
          ("apo_zero", {}), ("apo_down", {}), ("discopop", {"discopop_tau": 0.05}), ("sigmoid_norm", {})]


def examples():
    from tuneforge.data.formats import validate_and_normalize

    out = []
    for line, record in enumerate(RECORDS, 1):
        normalized, problems = validate_and_normalize(record, "preference", file="t", line=line)
        assert not problems
        out.append(Example(line, "preference", normalized))
    return out


def conversational(record: dict) -> dict:
    """The record in TRL's conversational shape (messages everywhere)."""
    turn = lambda value, role: [{"role": role, "content": value}] if isinstance(value, str) else value  # noqa: E731
    return {"prompt": turn(record["prompt"], "user"), "chosen": turn(record["chosen"], "assistant"),
            "rejected": turn(record["rejected"], "assistant")}


@pytest.fixture(scope="module")
def pairs(byte_tokenizer):
    return tokenize_pairs(examples(), PromptRenderer(byte_tokenizer, "chat"))


def trl_dpo_trainer(tmp_path, model_dir, tokenizer, loss_type="sigmoid", ref_model=None, peft=True, **kwargs):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[loss_type], beta=0.3, report_to="none",
                     per_device_train_batch_size=4, max_length=None, use_cpu=True, bf16=False, **kwargs)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0) if peft else None
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([conversational(r) for r in RECORDS]), peft_config=peft_config)
    torch.manual_seed(3)
    with torch.no_grad():  # move the adapter off zero, so the policy differs from the reference
        for name, parameter in trainer.model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * (0.05 if peft else 0.01))
    return trainer


def trl_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long()}


def close(ours: float, theirs: float) -> bool:
    return abs(ours - theirs) <= TOLERANCE * max(1.0, abs(theirs))


def test_pairs_tokenize_like_trl_with_the_prompt_masked_and_the_reply_labelled(tmp_path, tiny_model_dir, byte_tokenizer,
                                                                                pairs):
    trainer = trl_dpo_trainer(tmp_path, tiny_model_dir, byte_tokenizer)
    for pair, row in zip(pairs, trainer.train_dataset):
        for side, key in ((pair.chosen, "chosen_ids"), (pair.rejected, "rejected_ids")):
            assert list(side.input_ids) == row["prompt_ids"] + row[key]  # the same tokens, the same chat template
            labelled = [int(t) for t, label in zip(side.input_ids, side.labels) if label != IGNORE_INDEX]
            # TRL also trains on the template's newline after <|im_end|>; we stop at the end-of-turn token (as SFT).
            assert labelled == row[key][:-1] and byte_tokenizer.decode(row[key][-1:]) == "\n"
            assert prompt_length(side) == len(row["prompt_ids"])


@pytest.mark.parametrize("loss_type,options", LOSSES, ids=[name for name, _ in LOSSES])
def test_dpo_loss_equals_trls_with_the_adapter_disabled_as_reference(tmp_path, tiny_model_dir, byte_tokenizer, pairs,
                                                                     loss_type, options):
    trainer = trl_dpo_trainer(tmp_path, tiny_model_dir, byte_tokenizer, loss_type=loss_type, **options)
    batch = PairBatcher(pairs, byte_tokenizer.pad_token_id).collate(range(len(pairs)))
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, trl_inputs(batch))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss = DpoLoss(trainer.model, DpoSpec(loss_type=loss_type, beta=0.3, **options), reference="adapter_disabled")
    inputs = {k: v for k, v in batch.items() if k != "tokens"}
    loss_sum, count, correct, sums = loss(**inputs)
    assert count == len(pairs)
    assert close(float(loss_sum) / count, float(theirs)), (float(loss_sum) / count, float(theirs.detach()))
    for ours_name, trl_name in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                                ("rewards_margins", "rewards/margins"), ("logps_chosen", "logps/chosen"),
                                ("logps_rejected", "logps/rejected")):
        assert close(float(sums[ours_name]) / count, metrics[trl_name]), ours_name
    assert abs(int(correct) / count - metrics["rewards/accuracies"]) < 1e-9
    if loss_type == "sigmoid":  # the gradients agree too
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        theirs.backward()
        trl_grads = [p.grad.clone() for p in trainable]
        trainer.model.zero_grad()
        (loss(**inputs)[0] / count).backward()
        for ours, reference in zip((p.grad for p in trainable), trl_grads):
            assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-6)


def test_precomputed_reference_for_full_fine_tuning_equals_trls_reference_model(tmp_path, tiny_model_dir,
                                                                                byte_tokenizer, pairs):
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = trl_dpo_trainer(tmp_path, tiny_model_dir, byte_tokenizer, ref_model=copy.deepcopy(initial), peft=False)
    batcher = PairBatcher(pairs, byte_tokenizer.pad_token_id)
    # The table comes from the initial weights, once; training then moves the model away from them.
    batcher.reference = reference_table(DpoLoss(initial, DpoSpec(beta=0.3), reference="precomputed"), batcher,
                                        batch_size=3, precision=Precision("fp32", torch.device("cpu")))
    assert batcher.reference.shape == (len(pairs), 2) and batcher.reference.dtype == torch.float32
    batch = batcher.collate(range(len(pairs)))
    theirs = trainer.compute_loss(trainer.model, trl_inputs(batch))
    loss = DpoLoss(trainer.model, DpoSpec(beta=0.3), reference="precomputed")
    loss_sum, count, _, _ = loss(**{k: v for k, v in batch.items() if k != "tokens"})
    # Full fine-tuning moves every weight, so log-probs are large (up to -260 here); the reference table equals
    # TRL's reference log-probs within 1e-5 relative, and both agree with a float64 forward.
    assert close(float(loss_sum) / count, float(theirs.detach()))
    trl_reference = torch.stack(trainer.compute_ref_log_probs(trainer.ref_model, trl_inputs(batch)), dim=1)
    assert torch.allclose(batcher.reference, trl_reference, rtol=1e-5, atol=0)
    exact = DpoLoss(copy.deepcopy(trainer.model).double(), DpoSpec(beta=0.3), reference="precomputed")
    exact_reference = DpoLoss(copy.deepcopy(initial).double(), DpoSpec(beta=0.3), reference="precomputed")
    with torch.no_grad():
        reference64 = exact_reference.frozen_logps(batch["input_ids"], batch["labels"], batch["attention_mask"])
        chosen64, rejected64 = reference64.chunk(2)
        loss64 = exact(**{k: v for k, v in batch.items() if k not in ("tokens", "ref_chosen_logps", "ref_rejected_logps")},
                       ref_chosen_logps=chosen64, ref_rejected_logps=rejected64)[0] / count
    assert torch.allclose(batcher.reference, torch.stack([chosen64, rejected64], dim=1), rtol=1e-5, atol=0)
    # float32 log-probs of about -260 carry ~260 x 6e-8 of rounding each, so the loss can sit ~1e-6 from float64
    # (1.3e-6 seen with transformers 5.24): bound it at 5e-6, still far below any real difference in the loss.
    assert abs(float(loss_sum) / count - float(loss64)) < 5e-6
    with pytest.raises(ValueError, match="no reference"):
        loss(**{k: v for k, v in batch.items() if k not in ("tokens", "ref_chosen_logps", "ref_rejected_logps")})


@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_equals_trls_reward_trainer(tmp_path, tiny_model_dir, byte_tokenizer, pairs, center):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = byte_tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(tmp_path / "trl"), center_rewards_coefficient=center, report_to="none",
                        use_cpu=True, max_length=None, bf16=False)
    trainer = RewardTrainer(model=model, args=args, processing_class=byte_tokenizer,
                            train_dataset=Dataset.from_list([conversational(r) for r in RECORDS]))
    for pair, row in zip(pairs, trainer.train_dataset):  # TRL tokenizes the pairs as we do
        assert (list(pair.chosen.input_ids), list(pair.rejected.input_ids)) == (row["chosen_ids"], row["rejected_ids"])
    batch = PairBatcher(pairs, byte_tokenizer.pad_token_id, labels=False).collate(range(len(pairs)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, dict(inputs))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss_sum, count, correct, sums = RewardLoss(trainer.model, center)(**inputs)
    assert close(float(loss_sum) / count, float(theirs.detach()))
    assert abs(int(correct) / count - metrics["accuracy"]) < 1e-9
    assert close(float(sums["margin"]) / count, metrics["margin"])


def test_a_pair_loss_accumulates_exactly_over_micro_batches(tiny_model_dir, byte_tokenizer, pairs):
    """One step on 4 pairs at once = the same step in micro-batches of 1 and 3 (loss, metrics, weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def step(splits):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        loss = DpoLoss(model, DpoSpec(), reference="adapter_disabled")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        batcher = PairBatcher(pairs, byte_tokenizer.pad_token_id)
        for _ in range(2):  # the second step has a nonzero margin
            result = optimizer_step(loss, [batcher.collate(ids) for ids in splits], optimizer=optimizer,
                                    scheduler=scheduler, scaler=None, precision=Precision("fp32", torch.device("cpu")),
                                    max_grad_norm=None, parameters=trainable)
        return result, [p.detach().clone() for p in trainable]

    whole, whole_weights = step([(0, 1, 2, 3)])
    split, split_weights = step([(0,), (1, 2, 3)])
    assert whole.loss_units == split.loss_units == 4  # pairs
    assert abs(whole.loss - split.loss) < 1e-6 and whole.accuracy == split.accuracy
    assert whole.metrics.keys() == split.metrics.keys() >= {"rewards_margins", "rewards_chosen", "logps_chosen"}
    assert whole.metrics["rewards_margins"] != 0.0
    assert all(abs(whole.metrics[k] - split.metrics[k]) < 1e-5 for k in whole.metrics)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole_weights, split_weights))


def test_max_prompt_length_keeps_the_end_of_the_prompt_and_too_long_pairs_follow_the_policy(pairs):
    fitted, _ = fit_pairs(pairs, max_seq_length=10_000, max_prompt_length=5)
    for before, after in zip(pairs, fitted):
        for old, new in ((before.chosen, after.chosen), (before.rejected, after.rejected)):
            start = prompt_length(old)
            assert prompt_length(new) == min(5, start)
            assert list(new.input_ids) == list(old.input_ids[start - min(5, start):])  # the prompt's last 5 tokens
    longest = max(len(p.chosen) for p in pairs)
    kept, stats = fit_pairs(pairs, max_seq_length=longest - 1, too_long="drop")
    assert stats.dropped_too_long >= 1 and len(kept) == len(pairs) - stats.dropped_too_long
    truncated, stats = fit_pairs(pairs, max_seq_length=40, too_long="truncate")
    assert all(len(p.chosen) <= 40 and len(p.rejected) <= 40 for p in truncated)

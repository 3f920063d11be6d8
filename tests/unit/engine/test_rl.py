"""PPO's and GRPO's pieces against hand-computed values (and TRL's GRPOTrainer where it exposes them)."""

import math

import pytest
import torch

from tuneforge.engine.rl import objectives
from tuneforge.engine.rl.rollouts import update_plan
from tuneforge.engine.rl.sampling import left_pad, pick_tokens, sequence_seed


def test_gae_on_a_short_trajectory_matches_the_hand_computed_values():
    # One response of 3 tokens (then padding), gamma 0.9, lambda 0.8.
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.9]])  # the padded position's value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = objectives.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_t = r_t + gamma V_{t+1} - V_t, V after the end = 0
    d2 = 1.0 + 0.9 * 0.0 - 0.3  # 0.7
    d1 = -0.2 + 0.9 * 0.3 - 0.4  # -0.33
    d0 = 0.1 + 0.9 * 0.4 - 0.5  # -0.04
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2  # 0.174
    a0 = d0 + 0.9 * 0.8 * a1  # 0.08528
    assert advantages.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])
    assert returns.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0])


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    rewards = torch.tensor([[0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = objectives.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert advantages.tolist()[0] == pytest.approx([1.5, 1.0, 0.5])
    assert returns.tolist()[0] == pytest.approx([2.0, 2.0, 2.0])


def test_kl_penalty_puts_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = objectives.kl_penalized_rewards(torch.tensor([3.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 3.0], [-0.1, -1.0, 0.0]]))


def test_k3_kl_is_non_negative_and_matches_its_formula():
    p, q = torch.tensor([-0.2, -3.0, -1.0]), torch.tensor([-1.2, -1.0, -1.0])
    expected = [math.exp(q_ - p_) - (q_ - p_) - 1 for p_, q_ in zip(p.tolist(), q.tolist())]
    assert objectives.kl_k3(p, q).tolist() == pytest.approx(expected)
    assert (objectives.kl_k3(p, q) >= 0).all() and objectives.kl_k3(p, q)[2] == 0


def test_whitening_gives_zero_mean_unit_variance_over_the_mask():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    whitened = objectives.masked_whiten(values, mask)
    kept = whitened[mask.bool()]
    # mean 3, unbiased variance 2.5 over [1, 2, 3, 4, 5]
    assert kept.tolist() == pytest.approx([(v - 3) / math.sqrt(2.5) for v in [1, 2, 3, 4, 5]], rel=1e-6)
    assert whitened[~mask.bool()].abs().sum() == 0
    shifted = objectives.masked_whiten(values, mask, shift_mean=False)
    assert shifted[mask.bool()].mean().item() == pytest.approx(3.0)


def test_whitening_with_stats_from_elsewhere_uses_them():
    values, mask = torch.tensor([[2.0, 4.0]]), torch.ones(1, 2)
    assert objectives.masked_whiten(values, mask, stats=(3.0, 4.0)).tolist()[0] == pytest.approx([-0.5, 0.5])


def test_clipped_policy_loss_takes_the_pessimistic_term():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))  # ratios
    advantages = torch.tensor([1.0, 1.0, -2.0, -1.0])
    loss, clipped = objectives.clipped_policy_loss(new, old, advantages, clip_range=0.2)
    # ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped); ratio 0.5, A=1: max(-0.5, -0.8) = -0.5
    # ratio 1.1, A=-2: max(2.2, 2.2) = 2.2; ratio 0.7, A=-1: max(0.7, 0.8) = 0.8 (clipped)
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 2.2, 0.8])
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_clipped_value_loss_takes_the_larger_error():
    old = torch.tensor([1.0, 1.0, 1.0])
    values = torch.tensor([2.0, 1.1, 0.0])
    returns = torch.tensor([3.0, 0.0, 0.5])
    loss, clipped = objectives.clipped_value_loss(values, old, returns, clip_range_value=0.2)
    # v=2.0 clipped to 1.2: max(1, 3.24) ; v=1.1 (inside): max(1.21, 1.21); v=0 clipped to 0.8: max(0.25, 0.09)
    assert loss.tolist() == pytest.approx([0.5 * 3.24, 0.5 * 1.21, 0.5 * 0.25])
    assert clipped.tolist() == [1.0, 0.0, 0.0]


def test_adaptive_kl_controller_follows_ziegler_et_al():
    controller = objectives.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # error clip(12/6 - 1, -0.2, 0.2) = 0.2; multiplier 1 + 0.2 * 256 / 10000
    assert controller.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    value = controller.value
    # error (3/6 - 1) = -0.5 clipped to -0.2
    assert controller.update(3.0, 100) == pytest.approx(value * (1 - 0.2 * 100 / 10000))
    value = controller.value
    assert controller.update(6.6, 100) == pytest.approx(value * (1 + 0.1 * 100 / 10000))
    fixed = objectives.AdaptiveKLController(0.05, target=None, horizon=10000)
    assert fixed.update(100.0, 1000) == 0.05


def test_group_relative_advantages_of_a_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts, four completions each
    advantages = objectives.group_advantages(rewards, 4, scale_rewards=True)
    std = math.sqrt(sum((r - 0.5) ** 2 for r in [1, 0, 0, 1]) / 3)  # unbiased, as torch.std
    assert advantages[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 +
                                                    [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert advantages[4:].tolist() == [0.0] * 4  # a group that agrees teaches nothing
    unscaled = objectives.group_advantages(rewards, 4, scale_rewards=False)
    assert unscaled.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_grpo_token_loss_is_trls_formula():
    logprobs = torch.tensor([[-1.0, -0.5], [-2.0, -0.1]])
    old = torch.tensor([[-1.2, -0.5], [-1.0, -0.1]])
    ref = torch.tensor([[-1.1, -0.7], [-2.0, -0.3]])
    advantages = torch.tensor([1.0, -1.0])
    loss, clipped = objectives.grpo_token_loss(logprobs, old, ref, advantages, epsilon=0.2, beta=0.04)
    ratio = torch.exp(logprobs - old)
    expected = -torch.min(ratio * advantages[:, None], ratio.clamp(0.8, 1.2) * advantages[:, None])
    expected = expected + 0.04 * (torch.exp(ref - logprobs) - (ref - logprobs) - 1)
    assert torch.allclose(loss, expected)
    # ratio e^0.2 = 1.22 > 1.2 with A > 0 is clipped; e^-1 = 0.37 < 0.8 with A < 0 is clipped
    assert clipped.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_grpo_loss_equals_trls_grpotrainer_compute_loss():
    """TRL 1.16's GRPOTrainer._compute_loss on the same log-probs, advantages and masks (loss_type grpo,
    bnpo and dr_grpo), driven with the attributes it reads: our per-token loss, weighted and normalized as
    the recipe does, gives the same number."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from types import SimpleNamespace

    torch.manual_seed(0)
    batch, length, max_new = 3, 5, 6
    logprobs = -torch.rand(batch, length)
    old = logprobs + 0.3 * torch.randn(batch, length)
    ref = logprobs + 0.2 * torch.randn(batch, length)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    advantages = torch.tensor([0.7, -1.3, 0.4])
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        fake = SimpleNamespace(
            _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.04,
            args=SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type, epsilon_low=0.2,
            epsilon_high=0.2, use_vllm=False, model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=1,
            max_completion_length=max_new, _entropy_bonus_enabled=False, aux_loss_enabled=False,
            accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t, num_processes=1,
                                        reduce=lambda t, reduction="sum": t),
            _metrics={"train": __import__("collections").defaultdict(list)},
        )
        inputs = {"prompt_ids": torch.zeros(batch, 1, dtype=torch.long), "prompt_mask": torch.ones(batch, 1),
                  "completion_ids": torch.zeros(batch, length, dtype=torch.long), "completion_mask": mask,
                  "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
        try:
            theirs = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
        except AttributeError as exc:  # an attribute this TRL reads that the stand-in lacks
            pytest.skip(f"TRL's GRPOTrainer reads more than the stand-in provides: {exc}")
        per_token, _ = objectives.grpo_token_loss(logprobs, old, ref, advantages, epsilon=0.2, beta=0.04)
        lengths = mask.sum(dim=1, keepdim=True)
        weight, units = {"grpo": (mask / lengths, batch), "bnpo": (mask, mask.sum()),
                         "dr_grpo": (mask / max_new, batch)}[loss_type]
        ours = (per_token * weight * mask).sum() / units
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5), loss_type


def test_sampling_is_a_pure_function_of_each_sequences_seed():
    logits = torch.randn(3, 50)
    seeds = [sequence_seed(0, 5, p, 0) for p in (1, 2, 3)]
    together = pick_tokens(logits, [torch.Generator().manual_seed(s) for s in seeds], temperature=0.7, top_p=0.9)
    alone = [pick_tokens(logits[i : i + 1], [torch.Generator().manual_seed(seeds[i])], temperature=0.7, top_p=0.9)
             for i in range(3)]
    assert together.tolist() == [int(t) for t in alone]
    assert sequence_seed(0, 5, 1, 0) != sequence_seed(0, 6, 1, 0) != sequence_seed(0, 5, 1, 1)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = {int(pick_tokens(logits, [torch.Generator().manual_seed(s)], temperature=1.0, top_p=0.7))
             for s in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reach 0.7; the tail is never sampled
    assert int(pick_tokens(logits, None, temperature=1.0, top_p=1.0)) == 0  # greedy


def test_left_padding_right_aligns_prompts():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_update_plan_is_epochs_of_seeded_permutations_cut_into_mini_batches():
    plan = update_plan(8, epochs=2, mini_batches=4, seed=3, step=7)
    assert len(plan) == 8 and all(len(u) == 2 for u in plan)
    assert sorted(sum(plan[:4], [])) == list(range(8)) and sorted(sum(plan[4:], [])) == list(range(8))
    assert plan == update_plan(8, epochs=2, mini_batches=4, seed=3, step=7)
    assert plan != update_plan(8, epochs=2, mini_batches=4, seed=3, step=8)
    with pytest.raises(ValueError, match="equal mini-batches"):
        update_plan(6, epochs=1, mini_batches=4, seed=0, step=0)


def test_prompt_files_are_checked_line_by_line(tmp_path):
    from tuneforge.data.problems import DataError
    from tuneforge.engine.rl.prompts import check_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}], "answer": "a"}\n'
                    '{"prompt": "Say a"}\n'
                    '{"messages": [{"role": "robot", "content": "Hi"}]}\n'
                    '{"question": "no prompt"}\n'
                    '{"messages": [{"role": "assistant", "content": "only a reply"}]}\n')
    with pytest.raises(DataError) as caught:
        check_prompts(path)
    where = [(p.line, p.field, p.kind) for p in caught.value.problems]
    assert where == [(3, "messages", "wrong_type"), (4, "messages", "missing_field"), (5, "messages", "wrong_type")]
    assert "messages[0].role one of system, developer, user, assistant" in str(caught.value)


def test_greedy_sampling_matches_transformers_generate_and_trimmed_batches_score_alike(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.model_loading import load_tokenizer
    from tuneforge.engine.rl.policy import score_tokens
    from tuneforge.engine.rl.rollouts import Rollouts
    from tuneforge.engine.rl.sampling import sample
    from tuneforge.evaluation.generation import generate

    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    texts = ["a much longer prompt than the other", "hi"]
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    greedy = sample(model, prompts, seeds=None, max_new_tokens=10, eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id)
    decoded = tokenizer.batch_decode([r[: int(n)] for r, n in zip(greedy.response_ids, greedy.response_lengths())],
                                     skip_special_tokens=True)
    assert decoded == generate(model, tokenizer, texts, max_new_tokens=10)

    sampled = sample(model, prompts, seeds=[1, 2], max_new_tokens=10, eos_id=tokenizer.eos_token_id,
                     pad_id=tokenizer.pad_token_id)
    rows = Rollouts(sampled)
    with torch.no_grad():
        whole = score_tokens(model, sampled.input_ids, sampled.attention_mask, 10).logprobs
        alone = rows.collate([1])  # the short prompt's row without the columns that are padding for it
        assert alone["input_ids"].shape[1] < sampled.input_ids.shape[1]
        trimmed = score_tokens(model, alone["input_ids"], alone["attention_mask"], alone["response_mask"].shape[1])
    kept = alone["response_mask"].shape[1]
    assert torch.allclose(trimmed.logprobs, whole[1:, :kept], atol=1e-5)


def test_committed_rl_task_is_what_its_generator_writes_and_parses_as_prompts(tmp_path):
    import importlib.util
    from pathlib import Path

    from tuneforge.engine.rl.prompts import check_prompts

    task = Path(__file__).resolve().parents[3] / "examples" / "rl"
    spec = importlib.util.spec_from_file_location("generate_rl", task / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in ("prompts.jsonl", "held_out.jsonl"):
        assert (tmp_path / name).read_bytes() == (task / name).read_bytes()
    assert check_prompts(task / "prompts.jsonl") == 57 and check_prompts(task / "held_out.jsonl") == 24
    train, held_out = ((task / name).read_text().splitlines() for name in ("prompts.jsonl", "held_out.jsonl"))
    assert not set(train) & set(held_out)  # held-out questions are not trained on

"""How well a policy does on held-out prompts: greedy completions, their mean reward, the graders'
pass rate and mean scores, and the KL from the reference.

The KL is exact per position (the sum over the vocabulary of p log p/q between the policy's and the
reference's next-token distributions at temperature 1), summed over each greedy completion and averaged
over prompts; it is 0 for the reference itself.
"""

from __future__ import annotations

import torch

from tuneforge.engine.rl.policy import base_causal_lm, position_ids, reference_of
from tuneforge.engine.rl.prompts import PromptSet
from tuneforge.engine.rl.rewards import RewardFunction
from tuneforge.engine.rl.rollouts import generate

SAMPLES_KEPT = 3


def _next_token_log_probs(model, input_ids, attention_mask, response_length: int) -> torch.Tensor:
    base = base_causal_lm(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    logits = base.get_output_embeddings()(hidden[:, -response_length - 1 : -1]).float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def sequence_kl(policy, completions, *, batch: int, precision, reference=None) -> torch.Tensor:
    """KL(policy || reference) of each completion: the exact per-token KL summed over its tokens."""
    was_training = policy.training
    policy.eval()
    length = completions.response_mask.shape[1]
    totals = []
    try:
        for start in range(0, completions.input_ids.shape[0], batch):
            ids = completions.input_ids[start : start + batch].to(precision.device)
            mask = completions.attention_mask[start : start + batch].to(precision.device)
            with precision.autocast():
                mine = _next_token_log_probs(policy, ids, mask, length)
                with reference_of(policy, reference) as ref:
                    theirs = _next_token_log_probs(ref, ids, mask, length)
            per_token = (mine.exp() * (mine - theirs)).sum(dim=-1).cpu()
            totals.append((per_token * completions.response_mask[start : start + batch]).sum(dim=1))
    finally:
        policy.train(was_training)
    return torch.cat(totals)


def evaluate_policy(policy, prompts: PromptSet, reward: RewardFunction, tokenizer, *, max_new_tokens: int, batch: int,
                    precision, parallel, reference=None) -> dict:
    """mean_reward, pass_rate (when graders have pass criteria), each grader's mean score, the mean KL to
    the reference and the mean response length on prompts, greedy; a few samples. Each rank takes its
    share of the prompts; the numbers are over all of them."""
    mine, _ = parallel.shard(list(range(len(prompts))))
    rewards, passed, lengths, kls, parts, samples = [], [], [], [], {}, []
    for start in range(0, len(mine), batch):
        ids = mine[start : start + batch]
        generated = generate(policy, prompts, ids, samples_per_prompt=1, step=0, seed=0, tokenizer=tokenizer,
                             max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, greedy=True)
        scored = reward(generated.prompts, generated.texts)
        rewards += scored.scores.tolist()
        passed += [float(p) for p in scored.passed] if scored.passed is not None else []
        for name, values in scored.parts.items():
            parts.setdefault(name, []).extend(values.tolist())
        lengths += generated.completions.response_lengths().tolist()
        kls += sequence_kl(policy, generated.completions, batch=batch, precision=precision,
                           reference=reference).tolist()
        samples += [{"prompt": p.text, "reference": "", "prediction": t}
                    for p, t in zip(generated.prompts, generated.texts)][: SAMPLES_KEPT - len(samples)]
    names = sorted(parts)
    sums = parallel.sum([float(len(rewards)), sum(rewards), float(len(passed)), sum(passed), sum(lengths), sum(kls)]
                        + [sum(parts[n]) for n in names])
    count = max(sums[0], 1.0)
    metrics = {"mean_reward": sums[1] / count, "pass_rate": sums[3] / sums[2] if sums[2] else None,
               "kl_to_reference": sums[5] / count, "response_length": sums[4] / count,
               "graders": {n: total / count for n, total in zip(names, sums[6:]) if n != "reward_model"},
               "samples": samples if parallel.is_main else []}
    if "reward_model" in parts:
        metrics["reward_model_score"] = sums[6 + names.index("reward_model")] / count
    return metrics


def held_out_scores(job, data, policy, reward: RewardFunction, reference, which: str | None, *,
                    batch: int = 16) -> dict:
    """evaluate_policy on the job's held-out prompts (data: engine/rl/setup.py's PromptData), as an eval
    event naming `which` model (None: no event); returns the numbers (and samples) for the summary."""
    from tuneforge.engine.runtime.metrics import format_metrics

    scores = evaluate_policy(policy, data.held_out, reward, data.tokenizer,
                             max_new_tokens=job.spec.evaluation.max_new_tokens, batch=batch, precision=job.precision,
                             parallel=job.parallel, reference=reference)
    if which is not None:
        shown = {k: v for k, v in scores.items() if isinstance(v, float)}
        job.note(f"{which} model: {format_metrics(shown)}", kind="eval", model=which, metrics=shown)
    return scores


def validation(job, data, policy, reward: RewardFunction, reference):
    """The loop's `validate` (every evaluation.eval_every_steps): the held-out numbers, or None without
    held-out prompts. Greedy and draws no random numbers, so it leaves a resumed run unchanged."""
    if not len(data.held_out):
        return None
    return lambda: {k: v for k, v in held_out_scores(job, data, policy, reward, reference, None).items()
                    if isinstance(v, float)}

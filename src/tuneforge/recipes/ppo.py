"""PPO (InstructGPT-style RLHF): the policy learns from sampled completions scored by a reward model
and/or graders, kept near the base model by a per-token KL penalty.

    python -m tuneforge.recipes.ppo --job-dir DIR

Each step (the algorithm box of Ouyang et al. 2022 / TRL's PPO trainer):
  1. sample one completion for each of the step's prompts with the current policy;
  2. score the sampled tokens under the policy (old log-probs), the reference (the base with the adapter
     disabled) and the value head; score each completion with the reward;
  3. per-token rewards = -kl_coef x (log p - log p_ref), plus the score on the last token; GAE gives
     advantages (whitened) and returns;
  4. ppo_epochs x num_mini_batches optimizer steps on the clipped policy loss + value_coef x the clipped
     value loss; the adaptive controller moves kl_coef toward target_kl.
Before and after training the policy answers held-out prompts greedily: mean reward, pass rate, KL to the
reference. The runtime (engine/runtime) owns the rest: job directory, resume, preemption, events, summary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.data.batching import StepSchedule
from tuneforge.data.loading import file_sha256
from tuneforge.engine import runtime
from tuneforge.engine.adapters import parameter_counts
from tuneforge.engine.distributed import Prepared
from tuneforge.engine.rl import objectives
from tuneforge.engine.rl.evaluation import held_out_scores, validation
from tuneforge.engine.rl.losses import PpoLoss
from tuneforge.engine.rl.policy import ActorCritic
from tuneforge.engine.rl.rewards import RewardFunction
from tuneforge.engine.rl.rollouts import (
    Rollouts,
    generate,
    global_mean,
    global_stats,
    rollout_metrics,
    score,
    update_plan,
)
from tuneforge.engine.rl.setup import PromptData, load_policy, load_prompt_data, prompt_schedule, resolve_training
from tuneforge.engine.runtime import RecipeJob, ResumePoint, TrainingResult
from tuneforge.evaluation.graders import build_grader
from tuneforge.spec.jobdir import EvalMetrics, Evaluation, JobSummary
from tuneforge.spec.loader import SpecError

@dataclass
class Setup:
    data: PromptData
    actor_critic: ActorCritic  # the policy (what is published) and its value head (checkpointed beside it)
    reference: torch.nn.Module | None  # a frozen copy for full fine-tuning; None: the adapter disabled
    reward: RewardFunction
    loss: PpoLoss
    schedule: StepSchedule
    prepared: Prepared
    resume: ResumePoint
    kl: objectives.AdaptiveKLController
    state: dict  # what checkpoints keep beyond the weights: the KL coefficient, the base model's scores
    data_position: dict
    trainable_parameters: int


def run(job_dir: Path, *, progress: bool = True) -> JobSummary:
    """Run the job described by job_dir/spec.json to completion; returns its summary."""
    return runtime.run_recipe(job_dir, ppo, progress=progress)


def ppo(job: RecipeJob) -> JobSummary:
    s = setup(job)
    training = train(job, s)
    output = job.publish(s.actor_critic.policy, s.data.tokenizer, s.prepared, full=job.spec.adapter.type == "full")
    return evaluate(job, s, training, output)


def setup(job: RecipeJob) -> Setup:
    """Prompts, the reward, the policy with its value head, the resolved plan, the score before training."""
    data = load_prompt_data(job)
    reward = RewardFunction([build_grader(g) for g in job.spec.rollout.graders],
                            reward_model=job.spec.rollout.reward_model, precision=job.precision)
    rollout, cfg = job.spec.rollout, job.spec.ppo
    per_update = rollout.prompts_per_step // cfg.num_mini_batches
    if rollout.prompts_per_step % (cfg.num_mini_batches * job.parallel.world_size):
        raise SpecError(f"rollout.prompts_per_step {rollout.prompts_per_step} must split into ppo.num_mini_batches "
                        f"{cfg.num_mini_batches} equal mini-batches on each of the {job.parallel.world_size} devices")
    spec = resolve_training(job, prompts=len(data.train), rows_per_update=per_update)
    job.phase("data_s")
    resume = job.resume_point()
    policy, reference = load_policy(job, data.model_dir)
    actor_critic = ActorCritic(policy, policy.config.hidden_size)
    trainable, total = parameter_counts(actor_critic)
    job.phase("model_load_s")
    state = {"base_metrics": resume.saved.get("base_metrics"), "kl_coef": resume.saved.get("kl_coef", cfg.kl_coef)}
    if state["base_metrics"] is None and spec.evaluation.eval_before_training and len(data.held_out):
        state["base_metrics"] = held_out_scores(job, data, actor_critic.policy, reward, reference, "base")
    job.phase("base_eval_s")
    schedule = prompt_schedule(spec, len(data.train))
    updates_per_step = cfg.ppo_epochs * cfg.num_mini_batches
    loss = PpoLoss(actor_critic, clip_range=cfg.clip_range, clip_range_value=cfg.clip_range_value,
                   value_coef=cfg.value_coef, temperature=rollout.temperature)
    prepared = job.prepare(loss, actor_critic, total_steps=schedule.total_steps * updates_per_step)
    position = {"dataset_sha256": file_sha256(spec.dataset.path), "prompts": len(data.train),
                "prompts_per_step": rollout.prompts_per_step, "updates_per_step": updates_per_step,
                "seed": spec.training.seed}
    job.note(f"PPO: {trainable:,} of {total:,} parameters trained (policy and value head) for {schedule.total_steps} "
             f"steps of {rollout.prompts_per_step} prompts, {updates_per_step} optimizer steps each, learning rate "
             f"{spec.training.learning_rate:g}", kind="plan", trainable_parameters=trainable, total_parameters=total,
             total_steps=schedule.total_steps, updates_per_step=updates_per_step, batch_size=spec.training.batch_size,
             per_device_batch_size=spec.training.per_device_batch_size, learning_rate=spec.training.learning_rate)
    kl = objectives.AdaptiveKLController(state["kl_coef"], cfg.target_kl, cfg.kl_horizon)
    return Setup(data, actor_critic, reference, reward, loss, schedule, prepared, resume, kl, state, position,
                 trainable)


def train(job: RecipeJob, s: Setup) -> TrainingResult:
    """The runtime's loop with PPO's rollout phase as each step's experience (and the held-out scores every
    evaluation.eval_every_steps)."""
    return runtime.train(job, s.prepared, s.data.train, s.schedule, micro=job.spec.training.per_device_batch_size,
                         resume=s.resume, data_position=s.data_position, recipe_state=s.state,
                         validate=validation(job, s.data, s.actor_critic.policy, s.reward, s.reference),
                         experience=lambda step, prompt_ids: experience(job, s, step, prompt_ids))


def experience(job: RecipeJob, s: Setup, step: int, prompt_ids: tuple[int, ...]) -> runtime.Experience:
    """Steps 1-3 of the algorithm for this rank's prompts: sample, score, reward, advantages."""
    rollout, cfg, parallel = job.spec.rollout, job.spec.ppo, job.parallel
    policy, micro = s.actor_critic.policy, job.spec.training.per_device_batch_size
    generated = generate(policy, s.data.train, prompt_ids, samples_per_prompt=1, step=step, seed=job.spec.training.seed,
                         tokenizer=s.data.tokenizer, max_new_tokens=rollout.max_new_tokens,
                         temperature=rollout.temperature, top_p=rollout.top_p)
    completions = generated.completions
    scored = score(policy, completions, micro=micro, temperature=rollout.temperature, precision=job.precision,
                   value_head=s.actor_critic.value_head, reference=s.reference)
    rewards = s.reward(generated.prompts, generated.texts)
    mask = completions.response_mask.float()
    token_rewards, kl = objectives.kl_penalized_rewards(rewards.scores, scored.logprobs, scored.ref_logprobs, mask,
                                                        s.kl.value)
    advantages, returns = objectives.gae(token_rewards, scored.values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = objectives.masked_whiten(advantages, mask, stats=global_stats(advantages, mask, parallel))
    sequence_kl = global_mean(kl.sum(dim=1).tolist(), parallel)
    metrics = rollout_metrics(rewards, completions, parallel) | {"kl": sequence_kl, "kl_coef": s.kl.value}
    s.state["kl_coef"] = s.kl.update(sequence_kl, rollout.prompts_per_step)  # for the next step (Ziegler et al.)
    rows = Rollouts(completions, old_logprobs=scored.logprobs, old_values=scored.values, advantages=advantages,
                    returns=returns, token_weight=mask, units=mask.sum(dim=1))
    updates = update_plan(len(rows), epochs=cfg.ppo_epochs, mini_batches=cfg.num_mini_batches,
                          seed=job.spec.training.seed, step=step)
    tokens, padded = (int(v) for v in parallel.sum([float(rows.tokens), float(rows.padded_tokens)]))
    return runtime.Experience(updates, rows.collate, tokens, padded, metrics, finish=lambda: s.loss.pop_stats(parallel))


def evaluate(job: RecipeJob, s: Setup, training: TrainingResult, output: str) -> JobSummary:
    """The trained policy on the held-out prompts, then the summary (written last)."""
    final = held_out_scores(job, s.data, s.actor_critic.policy, s.reward, s.reference, "fine-tuned") \
        if len(s.data.held_out) else {}
    evaluation = Evaluation(base=EvalMetrics(**(s.state["base_metrics"] or {})), fine_tuned=EvalMetrics(**final))
    return job.finish(training, s.prepared, evaluation=evaluation, trainable_parameters=s.trainable_parameters,
                      output=output)


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.ppo", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

"""GRPO (Shao et al. 2024, DeepSeekMath): the policy learns from groups of completions of the same
prompt, each judged against its group, with no value model.

    python -m tuneforge.recipes.grpo --job-dir DIR

Each step (as TRL's GRPOTrainer):
  1. sample grpo.num_generations completions of each of the step's prompts with the current policy;
  2. score each completion with the reward (a reward model and/or graders); its advantage is its reward
     minus its group's mean, divided by the group's standard deviation (scale_rewards);
  3. score the sampled tokens under the policy (old log-probs) and the reference (the base with the
     adapter disabled);
  4. num_iterations optimizer steps on the clipped surrogate + beta x the k3 KL to the reference,
     averaged per completion (grpo), over the batch's tokens (bnpo) or over max_new_tokens (dr_grpo).
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
from tuneforge.engine.rl.losses import GrpoLoss
from tuneforge.engine.rl.rewards import RewardFunction
from tuneforge.engine.rl.evaluation import held_out_scores, validation
from tuneforge.engine.rl.rollouts import Rollouts, generate, global_mean, rollout_metrics, score, update_plan
from tuneforge.engine.rl.setup import PromptData, load_policy, load_prompt_data, prompt_schedule, resolve_training
from tuneforge.engine.runtime import RecipeJob, ResumePoint, TrainingResult
from tuneforge.evaluation.graders import build_grader
from tuneforge.spec.jobdir import EvalMetrics, Evaluation, JobSummary


@dataclass
class Setup:
    data: PromptData
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # a frozen copy for full fine-tuning; None: the adapter disabled
    reward: RewardFunction
    loss: GrpoLoss
    schedule: StepSchedule
    prepared: Prepared
    resume: ResumePoint
    state: dict  # what checkpoints keep beyond the weights: the base model's scores
    data_position: dict
    trainable_parameters: int


def run(job_dir: Path, *, progress: bool = True) -> JobSummary:
    """Run the job described by job_dir/spec.json to completion; returns its summary."""
    return runtime.run_recipe(job_dir, grpo, progress=progress)


def grpo(job: RecipeJob) -> JobSummary:
    s = setup(job)
    training = train(job, s)
    output = job.publish(s.policy, s.data.tokenizer, s.prepared, full=job.spec.adapter.type == "full")
    return evaluate(job, s, training, output)


def setup(job: RecipeJob) -> Setup:
    """Prompts, the reward, the policy, the resolved plan, the score before training."""
    data = load_prompt_data(job)
    reward = RewardFunction([build_grader(g) for g in job.spec.rollout.graders],
                            reward_model=job.spec.rollout.reward_model, precision=job.precision)
    rollout, cfg = job.spec.rollout, job.spec.grpo
    spec = resolve_training(job, prompts=len(data.train),
                            rows_per_update=rollout.prompts_per_step * cfg.num_generations)
    job.phase("data_s")
    resume = job.resume_point()
    policy, reference = load_policy(job, data.model_dir)
    trainable, total = parameter_counts(policy)
    job.phase("model_load_s")
    state = {"base_metrics": resume.saved.get("base_metrics")}
    if state["base_metrics"] is None and spec.evaluation.eval_before_training and len(data.held_out):
        state["base_metrics"] = held_out_scores(job, data, policy, reward, reference, "base")
    job.phase("base_eval_s")
    schedule = prompt_schedule(spec, len(data.train))
    loss = GrpoLoss(policy, epsilon=cfg.epsilon, beta=cfg.beta, temperature=rollout.temperature)
    prepared = job.prepare(loss, policy, total_steps=schedule.total_steps * cfg.num_iterations)
    position = {"dataset_sha256": file_sha256(spec.dataset.path), "prompts": len(data.train),
                "prompts_per_step": rollout.prompts_per_step, "num_generations": cfg.num_generations,
                "updates_per_step": cfg.num_iterations, "seed": spec.training.seed}
    job.note(f"GRPO: {trainable:,} of {total:,} parameters trained for {schedule.total_steps} steps of "
             f"{rollout.prompts_per_step} prompts x {cfg.num_generations} completions, {cfg.num_iterations} optimizer "
             f"step(s) each, learning rate {spec.training.learning_rate:g}", kind="plan",
             trainable_parameters=trainable, total_parameters=total, total_steps=schedule.total_steps,
             updates_per_step=cfg.num_iterations,
             batch_size=spec.training.batch_size, per_device_batch_size=spec.training.per_device_batch_size,
             learning_rate=spec.training.learning_rate)
    return Setup(data, policy, reference, reward, loss, schedule, prepared, resume, state, position, trainable)


def train(job: RecipeJob, s: Setup) -> TrainingResult:
    """The runtime's loop with GRPO's rollout phase as each step's experience (and the held-out scores
    every evaluation.eval_every_steps)."""
    return runtime.train(job, s.prepared, s.data.train, s.schedule, micro=job.spec.training.per_device_batch_size,
                         resume=s.resume, data_position=s.data_position, recipe_state=s.state,
                         validate=validation(job, s.data, s.policy, s.reward, s.reference),
                         experience=lambda step, prompt_ids: experience(job, s, step, prompt_ids))


def experience(job: RecipeJob, s: Setup, step: int, prompt_ids: tuple[int, ...]) -> runtime.Experience:
    """Steps 1-3 of the algorithm for this rank's prompts (each prompt's group stays on one rank)."""
    rollout, cfg, parallel = job.spec.rollout, job.spec.grpo, job.parallel
    generated = generate(s.policy, s.data.train, prompt_ids, samples_per_prompt=cfg.num_generations, step=step,
                         seed=job.spec.training.seed, tokenizer=s.data.tokenizer, max_new_tokens=rollout.max_new_tokens,
                         temperature=rollout.temperature, top_p=rollout.top_p)
    completions = generated.completions
    rewards = s.reward(generated.prompts, generated.texts)
    advantages = objectives.group_advantages(rewards.scores, cfg.num_generations, scale_rewards=cfg.scale_rewards)
    scored = score(s.policy, completions, micro=job.spec.training.per_device_batch_size,
                   temperature=rollout.temperature, precision=job.precision, reference=s.reference)
    mask = completions.response_mask.float()
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
    weight, units = {"grpo": (mask / lengths, torch.ones(len(mask))), "bnpo": (mask, mask.sum(dim=1)),
                     "dr_grpo": (mask / rollout.max_new_tokens, torch.ones(len(mask)))}[cfg.loss_type]
    metrics = rollout_metrics(rewards, completions, parallel)  # the loss adds kl: k3 per token, as TRL logs it
    metrics["reward_std_in_group"] = global_mean(rewards.scores.view(-1, cfg.num_generations).std(dim=1).tolist(),
                                                 parallel)
    rows = Rollouts(completions, old_logprobs=scored.logprobs, ref_logprobs=scored.ref_logprobs, advantages=advantages,
                    token_weight=weight, units=units)
    updates = update_plan(len(rows), epochs=cfg.num_iterations, mini_batches=1, seed=job.spec.training.seed, step=step)
    tokens, padded = (int(v) for v in parallel.sum([float(rows.tokens), float(rows.padded_tokens)]))
    return runtime.Experience(updates, rows.collate, tokens, padded, metrics, finish=lambda: s.loss.pop_stats(parallel))


def evaluate(job: RecipeJob, s: Setup, training: TrainingResult, output: str) -> JobSummary:
    """The trained policy on the held-out prompts, then the summary (written last)."""
    final = held_out_scores(job, s.data, s.policy, s.reward, s.reference, "fine-tuned") if len(s.data.held_out) else {}
    evaluation = Evaluation(base=EvalMetrics(**(s.state["base_metrics"] or {})), fine_tuned=EvalMetrics(**final))
    return job.finish(training, s.prepared, evaluation=evaluation, trainable_parameters=s.trainable_parameters,
                      output=output)


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.grpo", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

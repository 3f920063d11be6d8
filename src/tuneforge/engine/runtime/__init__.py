"""The recipe runtime: what every training method shares, so a recipe file holds only its algorithm.

A recipe is `run(job_dir) = run_recipe(job_dir, recipe)` with `recipe(job: RecipeJob) -> JobSummary`,
and `main = recipe_main(run, ...)`. The runtime owns the job-directory contract around it: spec.json in,
resolved_spec.json, events, checkpoints and the typed summary out, the exit codes (0/1/2/75), the resume
point and its checks, stop requests and spot notices, the checkpoint-now / stop agreement across ranks,
the out-of-memory back-off of the micro-batch, and the failure event that says whether a restart can help.

    run_recipe, recipe_main, RecipeJob, INPUT_ERRORS   job.py      a run from start to end
    ResumePoint                                        resume.py   where a run continues from
    train, TrainingResult, Progress, Experience        loop.py     the shared training loop (online RL: Experience)
    scalar_metrics, format_metrics                     metrics.py  evaluation results in events
"""

from tuneforge.engine.runtime.job import INPUT_ERRORS, RecipeJob, recipe_main, run_recipe, seed_everything
from tuneforge.engine.runtime.loop import Experience, Progress, TrainingResult, train
from tuneforge.engine.runtime.metrics import format_metrics, scalar_metrics
from tuneforge.engine.runtime.resume import ResumePoint

__all__ = [
    "INPUT_ERRORS", "Experience", "Progress", "RecipeJob", "ResumePoint", "TrainingResult", "format_metrics",
    "recipe_main", "run_recipe", "scalar_metrics", "seed_everything", "train",
]

"""The spec a recipe reads: file ids and registered model ids swapped for local paths, wherever the spec
names a model (the reward model, judges inside graders and multi graders); the stored spec is untouched."""

from __future__ import annotations

from pathlib import Path

from tuneforge.scheduler.launch import materialize_spec
from tuneforge.spec.job import JobSpec
from tuneforge.spec.openai_jobs import registered_models

JUDGE = {"type": "score_model", "name": "j", "model": "ft:tiny-llama:t::judge", "input": [{"role": "user", "content": "x"}]}


def test_registered_models_become_paths_only_in_the_recipes_copy():
    spec = JobSpec.model_validate({
        "method": "ppo", "dataset": {"path": "file-1"},
        "rollout": {"reward_model": "ft:tiny-llama:t::rm", "graders": [
            JUDGE, {"type": "multi", "name": "m", "graders": {"a": JUDGE}, "calculate_output": "a"}]},
    })
    assert sorted(registered_models(spec)) == [
        ("rollout.graders.0.model", "ft:tiny-llama:t::judge"), ("rollout.graders.1.graders.a.model", "ft:tiny-llama:t::judge"),
        ("rollout.reward_model", "ft:tiny-llama:t::rm")]
    local = materialize_spec(spec, {"file-1": Path("/blobs/1")},
                             {"ft:tiny-llama:t::rm": Path("/home/jobs/a/adapter"), "ft:tiny-llama:t::judge": Path("/home/j")})
    assert local.dataset.path == "/blobs/1" and local.rollout.reward_model == "/home/jobs/a/adapter"
    assert local.rollout.graders[0].model == "/home/j" and local.rollout.graders[1].graders["a"].model == "/home/j"
    assert spec.rollout.reward_model == "ft:tiny-llama:t::rm" and spec.rollout.graders[0].model == "ft:tiny-llama:t::judge"

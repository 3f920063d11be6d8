"""SweepSpec: paths and values checked against JobSpec with the field named, grid and random enumerate what
they should, conditional parameters apply only where their condition holds; the shipped sweeps validate."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tuneforge.spec.sweep import SweepSpecError, load_sweep_spec, validate_sweep_spec

REPO = Path(__file__).resolve().parents[3]
BASE = {"model": {"base_model": "tiny-llama"}, "dataset": {"path": "file-x"}, "training": {"max_steps": 4},
        "evaluation": {"metrics": ["loss", "exact_match"], "eval_every_steps": 2}}
CONDITIONAL = {
    "adapter.type": {"type": "choice", "values": ["lora", "full"]},
    "adapter.rank": {"type": "int", "low": 4, "high": 12, "step": 4, "when": {"adapter.type": ["lora"]}},
    "training.learning_rate": {"type": "choice", "values": [1e-4, 1e-3]},
}


def sweep(**fields):
    return validate_sweep_spec({"base": BASE, "objectives": [{"metric": "loss"}], "sampler": "grid", **fields})


def refused(**fields) -> str:
    with pytest.raises(SweepSpecError) as caught:
        sweep(**fields)
    return str(caught.value)


def test_grid_enumerates_each_distinct_combination_once_with_conditions_applied():
    points = sweep(space=CONDITIONAL).grid_points()
    lora = [p for p in points if p["adapter.type"] == "lora"]
    full = [p for p in points if p["adapter.type"] == "full"]
    assert len(lora) == 3 * 2 and len(full) == 2 and len(points) == 8
    assert {(p["adapter.rank"], p["training.learning_rate"]) for p in lora} == {
        (r, lr) for r in (4, 8, 12) for lr in (1e-4, 1e-3)}
    assert all("adapter.rank" not in p for p in full)  # no duplicate full points differing only in rank


def test_every_grid_point_is_a_valid_job_with_the_values_at_their_paths():
    spec = sweep(space=CONDITIONAL)
    for point in spec.grid_points():
        job = spec.trial_spec(point, name="s")
        assert job.adapter.type == point["adapter.type"] and job.training.learning_rate == point["training.learning_rate"]
        assert job.adapter.rank == point.get("adapter.rank", 16)  # the base's rank where rank does not apply
        assert job.training.max_steps == 4 and job.dataset.path == "file-x"


def test_random_sampling_stays_in_the_space_and_samples_conditional_parameters_only_when_they_apply():
    spec = validate_sweep_spec({"base": BASE, "objectives": [{"metric": "loss"}], "sampler": "random",
                                "budget": {"max_trials": 40}, "space": {
                                    **CONDITIONAL,
                                    "training.learning_rate": {"type": "log_uniform", "low": 1e-5, "high": 1e-2},
                                    "adapter.dropout": {"type": "uniform", "low": 0.0, "high": 0.3}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(40):
        trial = study.ask()
        chosen = spec.suggest(trial)
        study.tell(trial, 0.0)
        seen.append(chosen)
        assert 1e-5 <= chosen["training.learning_rate"] <= 1e-2 and 0.0 <= chosen["adapter.dropout"] <= 0.3
        assert ("adapter.rank" in chosen) == (chosen["adapter.type"] == "lora")
        assert chosen.get("adapter.rank", 4) in (4, 8, 12)
        spec.trial_spec(chosen)  # every sample is a valid job
    assert {c["adapter.type"] for c in seen} == {"lora", "full"}


def test_a_path_that_is_not_a_job_spec_field_is_refused_with_the_near_miss():
    assert "'rnk' is not a field of adapter; did you mean 'rank'?" in refused(
        space={"adapter.rnk": {"type": "choice", "values": [4]}})
    assert "adapter is a section" in refused(space={"adapter": {"type": "choice", "values": [4]}})
    assert "training.seed is a value, not a section" in refused(space={"training.seed.x": {"type": "choice",
                                                                                          "values": [1]}})
    assert "fixed for a sweep" in refused(space={"dataset.path": {"type": "choice", "values": ["a", "b"]}})


def test_values_the_job_spec_refuses_are_refused_with_the_field_named():
    message = refused(space={"adapter.rank": {"type": "int", "low": 0, "high": 8}})
    assert "space.adapter.rank: the job spec refuses the value 0" in message and "greater than 0" in message
    message = refused(space={"adapter.type": {"type": "choice", "values": ["lora", "prefix"]}})
    assert "space.adapter.type: the job spec refuses the value 'prefix'" in message


def test_objectives_pruner_grid_and_budget_rules_name_what_to_change():
    assert "objectives.0.metric 'bleu' is not measured" in refused(
        space=CONDITIONAL, objectives=[{"metric": "bleu"}])
    assert "pruning needs one objective" in refused(
        space=CONDITIONAL, objectives=[{"metric": "loss"}, {"metric": "exact_match"}], pruner="median")
    assert "uniform parameter without a step has no grid" in refused(
        space={"adapter.dropout": {"type": "uniform", "low": 0.0, "high": 0.2}})
    with pytest.raises(SweepSpecError, match="no end of its own"):
        validate_sweep_spec({"base": BASE, "objectives": [{"metric": "loss"}], "sampler": "tpe", "space": CONDITIONAL})
    assert "'adapter.type' is not a parameter declared before" in refused(space={
        "adapter.rank": {"type": "choice", "values": [4], "when": {"adapter.type": ["lora"]}},
        "adapter.type": {"type": "choice", "values": ["lora", "full"]}})
    assert "'qlora' is not one of its values" in refused(space={
        **CONDITIONAL, "adapter.rank": {"type": "choice", "values": [4], "when": {"adapter.type": ["qlora"]}}})


def test_pruner_warmup_steps_must_judge_before_the_last_step_and_needs_a_pruner():
    assert sweep(space=CONDITIONAL, pruner="median").warmup_steps() == BASE["evaluation"]["eval_every_steps"]
    assert sweep(space=CONDITIONAL, pruner="median", pruner_warmup_steps=3).warmup_steps() == 3
    assert "would never be judged before its last step" in refused(
        space=CONDITIONAL, pruner="successive_halving", pruner_warmup_steps=4)
    assert "there is no pruner" in refused(space=CONDITIONAL, pruner_warmup_steps=2)


def test_several_objectives_keep_their_directions():
    spec = sweep(space=CONDITIONAL, objectives=[{"metric": "loss"}, {"metric": "exact_match"}])
    assert spec.directions() == ["minimize", "maximize"]


def test_a_yaml_error_names_the_line(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("base:\n  dataset: {path: x.jsonl}\nspace:\n  adapter.rnk: {type: choice, values: [4]}\n"
                    "objectives: [{metric: loss}]\nsampler: grid\n")
    with pytest.raises(SweepSpecError, match=r"sweep.yaml:4: space: adapter.rnk"):
        load_sweep_spec(path)


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_validate(config):
    spec = load_sweep_spec(config)
    assert config.read_text().startswith(f"# tuneforge sweep run configs/sweeps/{config.name}")
    assert spec.space and spec.objectives

"""checkpoint.best_by: the best checkpoint by any validation metric or grader, kept, and the output when asked."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_job_dir
from tuneforge.engine.checkpoint import CheckpointKeeper, list_checkpoints
from tuneforge.engine.events import read_events
from tuneforge.recipes import sft
from tuneforge.spec import SpecError, validate_job_spec


def validations(job_dir, name):
    """{step: valid_NAME} from the metrics events of the validations during training."""
    return {e["data"]["step"]: e["data"][f"valid_{name}"] for e in read_events(job_dir)
            if e["type"] == "metrics" and f"valid_{name}" in e["data"]}


def test_keeper_keeps_the_best_by_a_metric_where_higher_is_better(tmp_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    keeper = CheckpointKeeper(tmp_path, every_steps=2, every_minutes=None, keep_last=1, objective=("rouge1", "max"),
                              save_new_best=True)
    flags = []
    for step, rouge in [(2, 0.1), (4, 0.5), (6, 0.3), (8, None), (10, 0.4)]:
        metrics = {"train_loss": 1.0, "valid_loss": 0.1 * step, **({"valid_rouge1": rouge} if rouge is not None else {})}
        flags.append(keeper.new_best_to_save(metrics))
        keeper.save(step, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    trainer_state={"metrics": metrics})
    assert flags == [True, True, False, False, False]
    assert keeper.best == {"step": 4, "metric": "rouge1", "value": 0.5, "direction": "max"}
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 10]  # the newest and the best
    # A checkpoint written before best_by recorded {"step", "valid_loss"}: read as the loss's best.
    old = CheckpointKeeper(tmp_path, every_steps=None, every_minutes=None, keep_last=1, best={"step": 4, "valid_loss": 2.0})
    assert old.best == {"step": 4, "metric": "loss", "value": 2.0, "direction": "min"}
    assert not old.new_best_to_save({"valid_loss": 1.0})  # without best_by, only scheduled checkpoints


def spec_data(tiny_model_dir, **checkpoint):
    return {"model": {"base_model": str(tiny_model_dir)}, "dataset": {"path": "d.jsonl"},
            "evaluation": {"metrics": ["loss", "chrf"], "eval_every_steps": 2}, "checkpoint": checkpoint}


@pytest.mark.parametrize(("checkpoint", "evaluation", "expected"), [
    ({"best_by": "rouge1"}, {}, "checkpoint.best_by 'rouge1' is not measured"),
    ({"output": "best"}, {"eval_every_steps": None}, "checkpoint.output best needs evaluation.eval_every_steps"),
    ({"output": "best"}, {"metrics": ["chrf"]}, "needs checkpoint.best_by"),
    ({"best_direction": "sideways"}, {}, "best_direction"),
])
def test_best_by_must_name_something_measured(tiny_model_dir, checkpoint, evaluation, expected):
    data = spec_data(tiny_model_dir, **checkpoint)
    data["evaluation"].update(evaluation)
    with pytest.raises(SpecError, match=expected):
        validate_job_spec(data)


def test_best_by_a_grader_name_with_inferred_direction(tiny_model_dir):
    data = spec_data(tiny_model_dir, best_by="has brace")
    data["evaluation"]["graders"] = [{"type": "string_check", "name": "has brace", "input": "{{sample.output_text}}",
                                      "reference": "{", "operation": "like"}]
    spec = validate_job_spec(data)
    assert spec.checkpoint.objective(spec.evaluation) == ("has brace", "max")
    plain = validate_job_spec(spec_data(tiny_model_dir))
    assert plain.checkpoint.objective(plain.evaluation) == ("loss", "min")  # empty best_by: the loss


def test_the_best_checkpoint_by_a_generated_metric_is_kept_and_marked(tmp_path, tiny_model_dir):
    job_dir = make_job_dir(tmp_path, tiny_model_dir, training={"max_steps": 8},
                           evaluation={"metrics": ["loss", "chrf"], "eval_every_steps": 2, "max_eval_examples": 4,
                                       "max_new_tokens": 8, "eval_before_training": False},
                           checkpoint={"every_steps": 100, "keep_last": 1, "best_by": "chrf"})
    summary = sft.run(job_dir, progress=False)
    chrf = validations(job_dir, "chrf")
    assert sorted(chrf) == [2, 4, 6, 8]  # every eval_every_steps, and the last step
    best_step = max(chrf, key=lambda step: (chrf[step], -step))  # the first of the highest
    assert summary.best_checkpoint.step == best_step and summary.best_checkpoint.metric == "chrf"
    assert summary.best_checkpoint.value == chrf[best_step] and summary.best_checkpoint.direction == "max"
    kept = [step for step, _ in list_checkpoints(job_dir / "checkpoints")]
    assert kept == sorted({best_step, 8})  # keep_last 1, plus the best
    marked = [e["data"]["step"] for e in read_events(job_dir) if e["data"].get("kind") == "checkpoint"
              and e["data"]["is_best"]]
    assert marked[-1] == best_step
    assert summary.output_step == 8  # checkpoint.output last (the default)


def test_output_best_makes_the_best_checkpoint_the_job_output(tmp_path, tiny_model_dir):
    # A deliberately odd objective, so the best is not the last step: the lowest token accuracy.
    job_dir = make_job_dir(tmp_path, tiny_model_dir, training={"max_steps": 8},
                           evaluation={"metrics": ["loss"], "eval_every_steps": 2, "eval_before_training": False},
                           checkpoint={"every_steps": 100, "keep_last": 1, "best_by": "token_accuracy",
                                       "best_direction": "min", "output": "best"})
    summary = sft.run(job_dir, progress=False)
    accuracy = validations(job_dir, "token_accuracy")
    best_step = min(accuracy, key=lambda step: (accuracy[step], step))
    assert best_step < 8, accuracy  # training raises token accuracy: the minimum is early
    assert summary.best_checkpoint.step == best_step and summary.output_step == best_step
    # The published adapter holds the best checkpoint's weights, and the final evaluation scored them.
    published = load_file(str(job_dir / "adapter" / "adapter_model.safetensors"))
    saved = load_file(str(job_dir / "checkpoints" / f"step-{best_step:06d}" / "adapter_model.safetensors"))
    assert published.keys() == saved.keys() and all(torch.equal(published[k], saved[k]) for k in saved)
    assert summary.eval.fine_tuned.token_accuracy == pytest.approx(accuracy[best_step], abs=1e-6)
    assert any(e["data"].get("kind") == "best_checkpoint" for e in read_events(job_dir))

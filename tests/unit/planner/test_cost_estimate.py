"""The price table (defaults, the operator's file, tenants' rates), its errors, and the cost estimate."""

import json
import os
import subprocess
import sys

import pytest

from tuneforge.planner import GPUS, PlannerError, plan_job
from tuneforge.planner.cost import (
    DEFAULT_PRICES,
    PRICE_TABLE_ENV,
    STARTUP_SECONDS,
    STEP_OVERHEAD_SECONDS,
    PriceTable,
    estimate_cost,
    parse_price_table,
    price_table,
    training_tokens,
)
from tuneforge.planner.cost import SAMPLED_TOKEN_COST as SAMPLED
from tuneforge.spec import validate_job_spec

TABLE = """
market: on_demand
prices:
  h100-80gb: {on_demand: 2.5}
tenants:
  acme: {discount: 0.2, market: spot, prices: {a100-80gb: {spot: 0.5}}}
"""


def spec(**sections):
    body = {"dataset": {"path": "file-x", "max_seq_length": 512}, "model": {"base_model": "smollm2-135m"}, **sections}
    return validate_job_spec(body, source="test")


def test_every_device_a_job_can_ask_for_has_a_default_price_and_spot_is_cheaper():
    assert set(DEFAULT_PRICES) == set(GPUS) | {"cpu"}
    for device, (on_demand, spot) in DEFAULT_PRICES.items():
        assert 0 < spot < on_demand, device
    rate = PriceTable().rate("h100-80gb")
    assert (rate.market, rate.price_per_hour, rate.source) == ("on_demand", DEFAULT_PRICES["h100-80gb"][0], "default")


def test_the_file_replaces_what_it_names_and_tenants_get_their_negotiated_rates():
    table = parse_price_table(TABLE, source="prices.yaml")
    h100 = table.rate("h100-80gb")
    assert (h100.on_demand, h100.spot, h100.source) == (2.5, DEFAULT_PRICES["h100-80gb"][1], "price table")
    assert table.rate("l4").source == "default"
    acme = table.rate("h100-80gb", "acme")  # 20% off the list, charged at spot
    assert acme.market == "spot" and acme.price_per_hour == pytest.approx(DEFAULT_PRICES["h100-80gb"][1] * 0.8)
    assert acme.on_demand == pytest.approx(2.0) and acme.source == "tenant"
    assert table.rate("a100-80gb", "acme").price_per_hour == 0.5  # its own price, not discounted again
    assert table.rate("h100-80gb", "someone-else") == h100


@pytest.mark.parametrize("text, where", [
    ("prices: {h100-80gb: {on_demand: -1}}", "prices.h100-80gb.on_demand"),
    ("prices: {h900: {on_demand: 1}}", "prices.h900"),
    ("market: reserved", "market"),
    ("tenants: {acme: {discount: 1.5}}", "tenants.acme.discount"),
    ("prices: {cpu: {on_demand: 1, price: 2}}", "prices.cpu.price"),
])
def test_a_bad_price_table_names_the_file_and_the_field(text, where):
    with pytest.raises(PlannerError) as error:
        parse_price_table(text, source="prices.yaml")
    assert str(error.value).startswith(f"prices.yaml: {where}:")


def test_the_table_is_reread_when_the_file_changes_and_a_bad_edit_keeps_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"prices": {"l4": {"on_demand": 1.0}}}))
    monkeypatch.setenv(PRICE_TABLE_ENV, str(path))
    assert price_table().rate("l4").on_demand == 1.0
    path.write_text(json.dumps({"prices": {"l4": {"on_demand": 1.5}}}))
    os.utime(path, ns=(1, 10**18))  # a new mtime even on a coarse clock
    assert price_table().rate("l4").on_demand == 1.5
    path.write_text("{not json")
    os.utime(path, ns=(1, 2 * 10**18))
    assert price_table().rate("l4").on_demand == 1.5
    monkeypatch.setenv(PRICE_TABLE_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(PlannerError, match="missing.yaml: cannot read the price table"):
        price_table()


def test_the_estimate_is_startup_plus_tokens_over_throughput_priced_per_device_hour():
    rate = PriceTable().rate("h100-80gb")
    one = plan_job(spec(resources={"gpu_type": "h100-80gb"}))
    four = plan_job(spec(resources={"gpu_type": "h100-80gb", "num_gpus": 4}))
    tokens = 2_000_000_000
    a, b = estimate_cost(one, tokens=tokens, rate=rate), estimate_cost(four, tokens=tokens, rate=rate)
    training = tokens / one.throughput.tokens_per_second
    assert a.wall_seconds == pytest.approx(training + STARTUP_SECONDS + one.model.num_params * 2 / 500e6)
    stepped = estimate_cost(one, tokens=tokens, rate=rate, steps=1000)
    assert stepped.wall_seconds == pytest.approx(a.wall_seconds + 1000 * STEP_OVERHEAD_SECONDS)
    assert a.gpu_hours == pytest.approx(a.wall_seconds / 3600)
    assert a.cost_usd == pytest.approx(a.gpu_hours * rate.price_per_hour)
    assert a.spot_usd < a.cost_usd == a.on_demand_usd
    # Four GPUs: a quarter of the training time, the same device-hours for it, start-up paid four times.
    assert b.wall_seconds == pytest.approx(a.wall_seconds - training * 3 / 4)
    assert b.gpu_hours == pytest.approx(a.gpu_hours + 3 * (a.wall_seconds - training) / 3600)


def test_cpu_jobs_get_an_estimate_from_the_cores_and_their_price():
    result = plan_job(spec(resources={"gpu_type": "cpu"}, model={"base_model": "tiny-llama"}))
    assert result.throughput.tokens_per_second is None  # the planner publishes no CPU peak
    estimate = estimate_cost(result, tokens=100_000, rate=PriceTable().rate("cpu"))
    assert estimate.tokens_per_second > 0 and estimate.cost_usd > 0 and "cpu:" in estimate.basis


NO_EVAL = {"eval_before_training": False, "metrics": ["loss"]}


def test_tokens_are_examples_times_epochs_or_steps_times_batch_and_some_methods_are_not_priced():
    stats = {"total_tokens": 20_000, "characters": 1}
    counted = training_tokens(spec(training={"num_epochs": 3, "batch_size": 8}, evaluation=NO_EVAL), examples=100,
                              stats=stats, validation_examples=0)
    assert counted.tokens == 100 * 3 * 200 and counted.steps == 38 and "100 examples x 3 epochs" in counted.basis
    counted = training_tokens(spec(training={"max_steps": 5, "batch_size": 4}, evaluation=NO_EVAL), examples=100,
                              stats=stats, validation_examples=0)
    assert counted == (5 * 4 * 200, 5, counted.basis)
    # Without a validation file, train_split (0.95) carves the validation set out of the examples.
    counted = training_tokens(spec(training={"num_epochs": 1, "batch_size": 5}, evaluation=NO_EVAL), examples=100,
                              stats=stats)
    assert counted.tokens == 95 * 200 + 5 * 200 // 3 and counted.steps == 19  # the final evaluation's forward
    # Without a tokenizer's count: characters / 4 plus 8 template tokens per message, capped at max_seq_length.
    counted = training_tokens(spec(training={"max_steps": 1, "batch_size": 1}, evaluation=NO_EVAL), examples=10,
                              stats={"characters": 4000, "turns": 20}, validation_examples=0)
    assert counted.tokens == 100 + 16 and "characters / 4" in counted.basis
    counted = training_tokens(spec(training={"max_steps": 1, "batch_size": 1}, evaluation=NO_EVAL), examples=1,
                              stats={"characters": 10**6}, validation_examples=0)
    assert counted.tokens == 512
    assert training_tokens(spec(training={"max_steps": 1}), examples=0, stats={}) is None


def test_a_packed_max_steps_job_counts_rows_of_several_examples():
    # The bench's jobs: 2 packed rows per step of ~60-token chats pack ~4 examples a row (rows of 256 tokens).
    stats = {"total_tokens": 6_000}
    unpacked = training_tokens(spec(training={"max_steps": 10, "batch_size": 2}, evaluation=NO_EVAL), examples=100,
                               stats=stats, validation_examples=0)
    packed = training_tokens(spec(training={"max_steps": 10, "batch_size": 2}, evaluation=NO_EVAL), examples=100,
                             stats=stats, validation_examples=0, packed=True)
    assert unpacked.tokens == 10 * 2 * 60
    assert packed.tokens == int(10 * 2 * 256 * 0.95) and "packed rows of ~243 tokens" in packed.basis
    # An auto batch already counts examples (the recipe turns it into the rows that hold them).
    auto = training_tokens(spec(training={"max_steps": 10}, evaluation=NO_EVAL), examples=100, stats=stats,
                           validation_examples=0, packed=True)
    assert auto.tokens == 10 * 8 * 60


def test_evaluations_are_priced_by_their_passes_and_whether_they_generate():
    stats = {"total_tokens": 6_000}  # 60 tokens an example
    base = {"training": {"max_steps": 20, "batch_size": 1}}
    likelihood = training_tokens(spec(**base, evaluation={"metrics": ["loss"], "eval_every_steps": 10,
                                                          "max_eval_examples": 8}),
                                 examples=100, stats=stats, validation_examples=30)
    # Passes: the base model, steps 10 and 20, and the final one; 8 examples each; a forward is 1/3 of a step.
    assert likelihood.tokens == 20 * 60 + 4 * 8 * 20 and "4 evaluations of 8 examples" in likelihood.basis
    generated = training_tokens(spec(**base, evaluation={"metrics": ["loss", "exact_match"], "max_new_tokens": 16,
                                                         "eval_before_training": False, "max_eval_examples": 8}),
                                examples=100, stats=stats, validation_examples=30)
    assert generated.tokens == 20 * 60 + int(1 * 8 * (20 + 20 + 16))  # forward, prefill, 16 decoded tokens


def test_tuneforge_plan_prints_the_cost_of_its_tokens(tmp_path):
    env = {**os.environ, PRICE_TABLE_ENV: str(tmp_path / "prices.yaml")}
    (tmp_path / "prices.yaml").write_text("prices: {a100-80gb: {on_demand: 10, spot: 4}}\n")
    run = subprocess.run([sys.executable, "-m", "tuneforge.cli", "plan", "--model", "smollm2-135m", "--tokens", "1B",
                          "--json"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    cost = json.loads(run.stdout)["cost"]
    assert cost["device"] == "a100-80gb" and cost["price_per_gpu_hour"] == 10
    assert cost["cost_usd"] == pytest.approx(cost["gpu_hours"] * 10) and cost["spot_usd"] == pytest.approx(cost["gpu_hours"] * 4)
    text = subprocess.run([sys.executable, "-m", "tuneforge.cli", "plan", "--model", "smollm2-135m", "--tokens", "1B"],
                          capture_output=True, text=True, env=env).stdout
    assert "cost: ~" in text and "at $10/h on_demand" in text
    (tmp_path / "prices.yaml").write_text("prices: {a100-80gb: {on_demand: lots}}\n")
    bad = subprocess.run([sys.executable, "-m", "tuneforge.cli", "plan", "--model", "smollm2-135m", "--tokens", "1B"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "prices.a100-80gb.on_demand" in bad.stderr


def test_packed_rows_of_about_one_long_example_are_priced_as_examples():
    from tuneforge.planner.cost import packed_row_tokens

    assert packed_row_tokens(361, 2048, row_cap=576) == 361  # a 576-token row holds one 361-token chat: not packed
    assert packed_row_tokens(361, 2048) == pytest.approx(1472 * 0.95)  # uncapped: four of them
    assert packed_row_tokens(60, 2048, row_cap=576) == pytest.approx(256 * 0.95)  # short chats: the cap is not reached


RL_GRADER = {"type": "string_check", "name": "a", "input": "{{sample.output_text}}", "reference": "a", "operation": "like"}
RL_NO_EVAL = {"eval_before_training": False, "max_eval_examples": 1}


def test_ppo_and_grpo_are_priced_by_their_rollouts_scoring_and_training_passes():
    stats = {"total_tokens": 40 * 20}  # 20 prompts of 40 tokens
    rollout = {"prompts_per_step": 4, "max_new_tokens": 60, "graders": [RL_GRADER]}
    grpo = training_tokens(spec(method="grpo", rollout=rollout, grpo={"num_generations": 8, "beta": 0.04},
                                training={"max_steps": 3}, evaluation=RL_NO_EVAL), examples=20, stats=stats,
                           validation_examples=0)
    # 32 completions a step: prefill 40/3 + 60 sampled + the reference's forward 100/3 + one training pass of 100.
    assert grpo.tokens == int(3 * 32 * (40 / 3 + SAMPLED * 60 + 100 / 3 + 100)) and grpo.steps == 3
    assert "3 steps x 32 completions" in grpo.basis
    ppo = training_tokens(spec(method="ppo", rollout=rollout, ppo={"ppo_epochs": 2, "num_mini_batches": 2},
                               training={"max_steps": 3}, evaluation=RL_NO_EVAL), examples=20, stats=stats,
                          validation_examples=0)
    # 4 completions a step, the policy's and the reference's forwards, two PPO epochs; 2 x 2 optimizer steps a step.
    assert ppo.tokens == int(3 * 4 * (40 / 3 + SAMPLED * 60 + 2 * 100 / 3 + 2 * 100)) and ppo.steps == 12
    # Epochs: whole steps of prompts_per_step prompts (19 training prompts -> 4 steps an epoch), as the recipe's schedule.
    epochs = training_tokens(spec(method="grpo", rollout=rollout, training={"num_epochs": 2}, evaluation=RL_NO_EVAL),
                             examples=20, stats=stats)
    assert epochs.steps == 8
    # Held-out evaluations decode evaluation.max_new_tokens greedily and score the answers with the reference.
    evaluated = training_tokens(spec(method="grpo", rollout=rollout, training={"max_steps": 3},
                                     evaluation={"eval_before_training": True, "max_new_tokens": 30}),
                                examples=20, stats=stats, validation_examples=5)
    plain = training_tokens(spec(method="grpo", rollout=rollout, training={"max_steps": 3}, evaluation=RL_NO_EVAL),
                            examples=20, stats=stats, validation_examples=0)
    assert evaluated.tokens - plain.tokens == int(2 * 5 * (40 / 3 + SAMPLED * 30 + 70 / 3))
    assert "2 evaluations of 5 prompts" in evaluated.basis


def eval_run(**run):
    body = {"method": "eval", "model": {"base_model": "smollm2-135m"} if run.get("model") else {},
            "dataset": {"path": "file-x"}, "resources": {"gpu_type": "h100-80gb"},
            "eval_run": {"testing_criteria": [{"type": "string_check", "name": "exact", "operation": "eq",
                                               "input": "{{sample.output_text}}", "reference": "{{item.a}}"}],
                         "item_schema": {"type": "object"}, **run}}
    return validate_job_spec(body, source="test")


def test_an_eval_run_is_priced_by_what_its_model_and_its_local_judges_read_and_write():
    from tuneforge.scheduler.cost import JUDGE_INSTRUCTION_TOKENS, LocalJudge, estimate_eval_run

    template = [{"role": "developer", "content": "x" * 40}, {"role": "user", "content": "{{item.q}}"}]
    run = eval_run(model="smollm2-135m", input_messages=template, max_completion_tokens=64)
    # 10 items of 400 characters: 100 tokens each, the template's 50 characters and two messages' markers.
    alone = estimate_eval_run(tenant_id="t", spec=run, inventories=[], items=10, characters=4_000, judges=[])
    prompt = 100 + 50 / 4 + 2 * 8
    assert alone.tokens == int(10 * (prompt / 3 + 64)) and "the model: 10 prompts of ~128 tokens" in alone.basis
    plan = plan_job(run)
    assert alone.wall_seconds == pytest.approx(STARTUP_SECONDS + plan.model.num_params * 2 / 500e6
                                               + alone.tokens / plan.throughput.tokens_per_second)
    assert alone.gpu_hours == pytest.approx(alone.wall_seconds / 3600) and alone.device == "h100-80gb"

    # A judge served here reads its instructions, the item and the model's answer, loads its own weights, and
    # the process starts once.
    judge = LocalJudge("rubric", "llama-3-8b", input_characters=200, max_tokens=16)
    judged = estimate_eval_run(tenant_id="t", spec=run, inventories=[], items=10, characters=4_000, judges=[judge])
    judge_prompt = 100 + 64 + 200 / 4 + JUDGE_INSTRUCTION_TOKENS + 2 * 8
    assert judged.tokens == alone.tokens + int(10 * (judge_prompt / 3 + 16))
    judge_plan = plan_job(run.model_copy(update={"model": run.model.model_copy(update={"base_model": "llama-3-8b"})}))
    judge_wall = (judge_plan.model.num_params * 2 / 500e6
                  + (judged.tokens - alone.tokens) / judge_plan.throughput.tokens_per_second)
    assert judged.wall_seconds == pytest.approx(alone.wall_seconds + judge_wall)
    assert judged.cost_usd == pytest.approx(judged.wall_seconds / 3600 * alone.price_per_gpu_hour)
    assert "judge rubric: 10 prompts" in judged.basis

    # A jsonl run loads a model only for a local judge (its answers are among the items' characters); items not
    # counted yet (a file still being validated) price nothing.
    jsonl = eval_run()
    assert estimate_eval_run(tenant_id="t", spec=jsonl, inventories=[], items=10, characters=4_000, judges=[]) is None
    only_judge = estimate_eval_run(tenant_id="t", spec=jsonl, inventories=[], items=10, characters=4_000, judges=[judge])
    assert only_judge.tokens == int(10 * ((judge_prompt - 64) / 3 + 16))
    assert estimate_eval_run(tenant_id="t", spec=run, inventories=[], items=0, characters=0, judges=[]) is None

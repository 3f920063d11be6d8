"""The RLHF methods through the server with the official `openai` client: OpenAI's `dpo` and `reinforcement`
method shapes and tuneforge's `reward` and `ppo` run to succeeded on tiny-llama; the reward model one job
trained is the registered model a PPO job scores with (the worker swaps the id for its directory), and
another tenant cannot name it."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, ServerProcess

openai = pytest.importorskip("openai")

TINY = {"dataset": {"max_seq_length": 192}, "evaluation": {"max_eval_examples": 4, "max_new_tokens": 8},
        "adapter": {"rank": 4, "alpha": 8}}
ROLLOUT = {"max_new_tokens": 8}
GRADER = {"type": "string_check", "name": "answer", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
          "operation": "like"}


@pytest.fixture
def server(tmp_path, database_url):
    if not database_url.startswith("sqlite"):
        pytest.skip("the job flow is the same on PostgreSQL (test_server_jobs); one database keeps CI short")
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url)
    yield process
    process.stop()


def upload(client, path, tmp_path, rows: int):
    small = tmp_path / path.name
    small.write_text("".join(path.read_text().splitlines(keepends=True)[:rows]))
    with open(small, "rb") as handle:
        file = client.files.create(file=handle, purpose="fine-tune")
    return client.files.wait_for_processing(file.id, poll_interval=0.1, max_wait_seconds=60)


def finished(client, job, server):
    import time

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            assert job.status == "succeeded", f"{job.error}\n{server.log_text()[-3000:]}"
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job.id} still {job.status}\n{server.log_text()[-3000:]}")


def test_dpo_reinforcement_reward_and_ppo_jobs_run_through_the_api(server, tmp_path):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys["tenant-a"], max_retries=0, timeout=30)
    pairs = upload(client, REPO / "examples" / "preference" / "train.jsonl", tmp_path, 24)
    prompts = upload(client, REPO / "examples" / "rl" / "prompts.jsonl", tmp_path, 24)
    assert client.files.retrieve(prompts.id).status == "processed"

    dpo = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4}}},
        extra_body={"tuneforge": TINY | {"training": {"max_steps": 2}}})
    rft = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=prompts.id,
        method={"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"batch_size": 2}}},
        extra_body={"tuneforge": TINY | {"training": {"max_steps": 2}, "grpo": {"num_generations": 2},
                                         "rollout": ROLLOUT}})
    reward = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=pairs.id, suffix="rm", method={"type": "reward"},
        extra_body={"tuneforge": TINY | {"training": {"max_steps": 2, "batch_size": 4}}})

    dpo, rft, reward = (finished(client, job, server) for job in (dpo, rft, reward))
    assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.2
    assert rft.method.type == "reinforcement" and rft.method.reinforcement.grader.name == "answer"
    assert reward.fine_tuned_model and dpo.fine_tuned_model and rft.fine_tuned_model

    ppo = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=prompts.id, method={"type": "ppo"},
        extra_body={"tuneforge": TINY | {"training": {"max_steps": 1}, "rollout": ROLLOUT | {
            "prompts_per_step": 2, "reward_model": reward.fine_tuned_model}}})
    ppo = finished(client, ppo, server)
    assert ppo.method.type == "ppo" and ppo.to_dict()["tuneforge"]["spec"]["rollout"]["reward_model"] == reward.fine_tuned_model
    events = [e.data for e in client.fine_tuning.jobs.list_events(ppo.id, limit=100).data if e.data]
    assert any("train_reward" in (data or {}) for data in events), json.dumps(events)[:2000]

    other = openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys["tenant-b"], max_retries=0, timeout=30)
    theirs = upload(other, REPO / "examples" / "rl" / "prompts.jsonl", tmp_path, 24)
    with pytest.raises(openai.BadRequestError) as refused:
        other.fine_tuning.jobs.create(model="tiny-llama", training_file=theirs.id, method={"type": "ppo"},
                                      extra_body={"tuneforge": {"rollout": {"reward_model": reward.fine_tuned_model}}})
    assert refused.value.body["code"] == "model_not_found"

"""The Evals API end to end, against a real `tuneforge server` (API + scheduler + local worker) with the
official `openai` client: an eval is created, a run on the built-in tiny-llama model is scheduled as a job,
answers every item and is graded by a string_check and a text_similarity criterion, and its result counts
match its output items; a jsonl run grades the samples its uploaded file carries; a run on a fine-tuned
model of the caller works; another tenant sees none of it, and the fine-tuning endpoints never show a run."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, write_jsonl

openai = pytest.importorskip("openai")

ITEM_SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
               "required": ["question", "answer"]}
CRITERIA = [
    {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
     "operation": "eq"},
    {"type": "text_similarity", "name": "similar", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
     "evaluation_metric": "fuzzy_match", "pass_threshold": 0.5},
]
ITEMS = [{"question": q, "answer": a} for q, a in
         [("Capital of France?", "Paris"), ("2 + 2?", "4"), ("Colour of the sky?", "blue"), ("Say hi.", "hi"),
          ("Opposite of up?", "down")]]
PROMPT = {"type": "template", "template": [{"role": "developer", "content": "Answer in one word."},
                                           {"role": "user", "content": "{{item.question}}"}]}


def wait_for(predicate, *, server: ServerProcess, what: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{server.log_text()[-4000:]}")


@pytest.fixture
def server(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url)
    yield process
    process.stop()


def client_for(server: ServerProcess, tenant: str = "tenant-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys[tenant], max_retries=0, timeout=30)


def finished_run(client, eval_id: str, run_id: str, server: ServerProcess):
    return wait_for(lambda: (r := client.evals.runs.retrieve(run_id, eval_id=eval_id)).status
                    in ("completed", "failed", "canceled") and r, server=server, what=f"run {run_id} to finish")


def all_output_items(client, eval_id: str, run_id: str, **query) -> list:
    # limit 2 makes the client follow the cursor across pages
    return list(client.evals.runs.output_items.list(run_id, eval_id=eval_id, limit=2, **query))


def test_eval_run_on_tiny_llama_is_graded_and_counts_match_the_output_items(server):
    from rapidfuzz import fuzz

    client = client_for(server)
    evaluation = client.evals.create(
        name="capitals", metadata={"team": "qa"}, testing_criteria=CRITERIA,
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True},
    )
    assert evaluation.object == "eval" and evaluation.id.startswith("eval_") and evaluation.name == "capitals"
    assert evaluation.data_source_config.schema_["properties"]["item"] == ITEM_SCHEMA
    assert [c.name for c in evaluation.testing_criteria] == ["exact", "similar"]
    assert client.evals.retrieve(evaluation.id).metadata == {"team": "qa"}

    run = client.evals.runs.create(
        evaluation.id, name="tiny",
        data_source={"type": "completions", "model": "tiny-llama", "input_messages": PROMPT,
                     "source": {"type": "file_content", "content": [{"item": item} for item in ITEMS]},
                     "sampling_params": {"max_completion_tokens": 6, "temperature": 0, "seed": 3}},
    )
    assert run.object == "eval.run" and run.id.startswith("evalrun_") and run.status == "queued"
    assert run.data_source.source.type == "file_id"  # the inline items were stored as an uploaded file

    done = finished_run(client, evaluation.id, run.id, server)
    assert done.status == "completed", done.error
    counts = done.result_counts
    assert counts.total == len(ITEMS) and counts.passed + counts.failed + counts.errored == counts.total

    items = all_output_items(client, evaluation.id, run.id)
    assert [i.datasource_item_id for i in items] == list(range(len(ITEMS)))
    assert [i.datasource_item for i in items] == ITEMS
    by_status = {s: sum(i.status == s for i in items) for s in ("pass", "fail", "error")}
    assert (by_status["pass"], by_status["fail"], by_status["error"]) == (counts.passed, counts.failed, counts.errored)
    per = {r.testing_criteria: r for r in done.per_testing_criteria_results}
    for criterion in ("exact", "similar"):
        results = [next(r for r in i.results if r.name == criterion) for i in items]
        assert per[criterion].passed == sum(r.passed for r in results)
        assert per[criterion].failed == sum(not r.passed for r in results)
    for item in items:
        text = item.sample.output[0].content
        assert item.sample.model == "tiny-llama" and item.sample.input[0].role == "system"
        assert item.sample.input[1].content == item.datasource_item["question"]
        assert item.sample.max_completion_tokens == 6 and item.sample.seed == 3 and item.sample.temperature == 0
        exact, similar = item.results
        assert exact.score == float(text == item.datasource_item["answer"]) and exact.passed == (exact.score == 1.0)
        assert similar.score == pytest.approx(fuzz.ratio(text, item.datasource_item["answer"]) / 100)
        assert similar.passed == (similar.score >= 0.5)
        assert item.status == ("pass" if exact.passed and similar.passed else "fail")
    usage = done.per_model_usage[0]
    assert usage.run_model_name == "tiny-llama" and usage.invocation_count == len(ITEMS)
    assert 0 < usage.completion_tokens <= 6 * len(ITEMS)
    assert client.evals.runs.output_items.retrieve(items[2].id, eval_id=evaluation.id, run_id=run.id).datasource_item \
        == ITEMS[2]
    assert [r.id for r in client.evals.runs.list(evaluation.id).data] == [run.id]
    assert client.evals.runs.list(evaluation.id, status="queued").data == []
    assert done.model_extra["tuneforge"]["gpu_seconds"] > 0  # cost is recorded as for training

    # The fine-tuning endpoints never show an eval run's job.
    assert client.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve(done.model_extra["tuneforge"]["job_id"])

    # Another tenant sees none of it.
    other = client_for(server, "tenant-b")
    with pytest.raises(openai.NotFoundError):
        other.evals.retrieve(evaluation.id)
    with pytest.raises(openai.NotFoundError):
        other.evals.runs.retrieve(run.id, eval_id=evaluation.id)
    with pytest.raises(openai.NotFoundError):
        other.evals.runs.output_items.list(run.id, eval_id=evaluation.id)
    assert other.evals.list().data == []

    updated = client.evals.update(evaluation.id, name="capitals v2")
    assert updated.name == "capitals v2" and [e.id for e in client.evals.list().data] == [evaluation.id]
    assert client.evals.delete(evaluation.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(evaluation.id)


def test_jsonl_run_grades_the_samples_of_an_uploaded_file(server, tmp_path):
    client = client_for(server)
    evaluation = client.evals.create(name="given", testing_criteria=CRITERIA,
                                     data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA})
    rows = [{"item": {"question": "Capital?", "answer": "Paris"}, "sample": {"output_text": "Paris"}},
            {"item": {"question": "Capital?", "answer": "Paris"}, "sample": {"output_text": "Parus"}},
            {"item": {"question": "Capital?", "answer": "Paris"}, "sample": {"output_text": "Lyon"}}]
    with open(write_jsonl(tmp_path / "given.jsonl", rows), "rb") as handle:
        file = client.files.create(file=handle, purpose="evals")
    file = client.files.wait_for_processing(file.id, poll_interval=0.1, max_wait_seconds=60)
    assert file.status == "processed" and file.purpose == "evals"

    run = client.evals.runs.create(evaluation.id, data_source={"type": "jsonl", "source": {"type": "file_id",
                                                                                          "id": file.id}})
    done = finished_run(client, evaluation.id, run.id, server)
    assert done.status == "completed", done.error
    # "Parus" is 80% similar to "Paris" (passes similar, fails exact); "Lyon" fails both.
    assert (done.result_counts.total, done.result_counts.passed, done.result_counts.failed) == (3, 1, 2)
    per = {r.testing_criteria: (r.passed, r.failed) for r in done.per_testing_criteria_results}
    assert per == {"exact": (1, 2), "similar": (2, 1)}
    assert [i.status for i in all_output_items(client, evaluation.id, run.id)] == ["pass", "fail", "fail"]
    assert [i.datasource_item_id for i in all_output_items(client, evaluation.id, run.id, status="fail")] == [1, 2]

    # Items of an uploaded file are checked against the eval's item schema when the run starts.
    bad = rows[:1] + [{"item": {"question": "Capital?", "answer": 4}, "sample": {"output_text": "4"}}]
    with open(write_jsonl(tmp_path / "bad.jsonl", bad), "rb") as handle:
        bad_file = client.files.create(file=handle, purpose="evals")
    run = client.evals.runs.create(evaluation.id, data_source={"type": "jsonl", "source": {"type": "file_id",
                                                                                          "id": bad_file.id}})
    failed = finished_run(client, evaluation.id, run.id, server)
    assert failed.status == "failed" and "item 1 item.answer" in failed.error.message, failed.error
    assert str(server.home) not in failed.error.message

    # A training file is not an eval file, and an eval file is not training data.
    with open(EXAMPLE_DATA / "val.jsonl", "rb") as handle:
        training = client.files.create(file=handle, purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose 'evals'"):
        client.evals.runs.create(evaluation.id, data_source={"type": "jsonl", "source": {"type": "file_id",
                                                                                        "id": training.id}})
    with pytest.raises(openai.BadRequestError, match="expected 'fine-tune'"):
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=file.id)


def test_requests_that_cannot_run_are_refused_with_the_field_named(server):
    client = client_for(server)
    with pytest.raises(openai.BadRequestError, match="python grader runs arbitrary code"):
        client.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                            testing_criteria=[{"type": "python", "name": "p", "source": "def grade(s, i): return 1"}])
    with pytest.raises(openai.BadRequestError, match="needs pass_threshold"):
        client.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                            testing_criteria=[{**CRITERIA[1], "pass_threshold": None}])
    # A judge served by an endpoint is checked against the operator's endpoints, not the loadable models.
    judge = {"type": "score_model", "name": "judge", "model": "gpt-4o-mini", "endpoint": "not-configured",
             "input": [{"role": "user", "content": "Rate {{sample.output_text}} from 0 to 1."}], "range": [0, 1],
             "pass_threshold": 0.5}
    with pytest.raises(openai.BadRequestError, match=r"testing_criteria\[0\].endpoint: judge endpoint 'not-configured' "
                                                     "is not configured"):
        client.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA}, testing_criteria=[judge])
    evaluation = client.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                                     testing_criteria=CRITERIA)

    def run_with(items, **data_source):
        source = {"type": "file_content", "content": [{"item": item} for item in items]}
        return client.evals.runs.create(evaluation.id, data_source={
            "type": "completions", "model": "tiny-llama", "input_messages": PROMPT, "source": source, **data_source})

    with pytest.raises(openai.BadRequestError) as refused:
        run_with([ITEMS[0], {"question": "Q?", "answer": 4}])
    assert "content[1]" in refused.value.message and "item.answer" in refused.value.message
    with pytest.raises(openai.BadRequestError, match="greedy decoding"):
        run_with(ITEMS[:1], sampling_params={"temperature": 0.7})
    with pytest.raises(openai.BadRequestError, match="no model with id"):
        run_with(ITEMS[:1], model="ft:tiny-llama:tenant-a::nothere")
    with pytest.raises(openai.BadRequestError, match="cannot name a directory"):
        run_with(ITEMS[:1], model="/etc")
    headers = {"Authorization": f"Bearer {server.keys['tenant-a']}"}
    answer = httpx.post(f"{server.url}/v1/evals/{evaluation.id}/runs", headers=headers, json={
        "data_source": {"type": "completions", "model": "tiny-llama", "source": {"type": "file_id", "id": "file-x"},
                        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{sample.x}}"}]}}})
    assert answer.status_code == 400 and answer.json()["error"]["message"].count("item.<field> only") == 1
    assert client.evals.runs.list(evaluation.id).data == []  # nothing was created


def test_a_run_on_the_callers_fine_tuned_model(tmp_path):
    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'tuneforge.db'}")
    try:
        client = client_for(server)
        with open(EXAMPLE_DATA / "train.jsonl", "rb") as handle:
            training = client.files.wait_for_processing(client.files.create(file=handle, purpose="fine-tune").id,
                                                        poll_interval=0.1, max_wait_seconds=60)
        job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, extra_body={"tuneforge": {
            "training": {"max_steps": 2, "per_device_batch_size": 4}, "dataset": {"max_seq_length": 256},
            "evaluation": {"max_eval_examples": 2, "eval_before_training": False}}})
        trained = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
                           server=server, what="the fine-tuning job")
        assert trained.status == "succeeded", trained.error
        evaluation = client.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                                         testing_criteria=CRITERIA)
        run = client.evals.runs.create(evaluation.id, data_source={
            "type": "completions", "model": trained.fine_tuned_model, "input_messages": PROMPT,
            "source": {"type": "file_content", "content": [{"item": item} for item in ITEMS[:2]]},
            "sampling_params": {"max_completion_tokens": 4}})
        done = finished_run(client, evaluation.id, run.id, server)
        assert done.status == "completed", done.error
        assert done.model == trained.fine_tuned_model and done.result_counts.total == 2
        items = all_output_items(client, evaluation.id, run.id)
        assert {i.sample.model for i in items} == {trained.fine_tuned_model}  # never the server's path
        assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]
        other = client_for(server, "tenant-b")
        theirs = other.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                                    testing_criteria=CRITERIA)
        with pytest.raises(openai.BadRequestError, match="no model with id"):
            other.evals.runs.create(theirs.id, data_source={
                "type": "completions", "model": trained.fine_tuned_model, "input_messages": PROMPT,
                "source": {"type": "file_content", "content": [{"item": ITEMS[0]}]}})
    finally:
        server.stop()


def test_cancel_and_delete_runs_that_have_not_started(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", database_url, worker=False)  # nothing runs: runs stay queued
    try:
        client = client_for(server)
        evaluation = client.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                                         testing_criteria=CRITERIA)

        def queued_run():
            return client.evals.runs.create(evaluation.id, data_source={
                "type": "jsonl", "source": {"type": "file_content", "content": [
                    {"item": ITEMS[0], "sample": {"output_text": "Paris"}}]}})

        first, second = queued_run(), queued_run()
        stored = client.files.retrieve(first.data_source.source.id)
        assert stored.purpose == "evals" and stored.filename == "eval-run-items.jsonl"
        canceled = client.evals.runs.cancel(first.id, eval_id=evaluation.id)
        assert canceled.status == "canceled"
        with pytest.raises(openai.ConflictError):
            client.evals.runs.cancel(first.id, eval_id=evaluation.id)
        assert [r.id for r in client.evals.runs.list(evaluation.id, status="canceled").data] == [first.id]
        assert client.evals.runs.delete(first.id, eval_id=evaluation.id).deleted
        assert [r.id for r in client.evals.runs.list(evaluation.id).data] == [second.id]
        job_id = second.model_extra["tuneforge"]["job_id"]
        assert client.evals.delete(evaluation.id).deleted  # and its unfinished run is cancelled
        from tuneforge.db.jobs import get_job_any_tenant
        from tuneforge.db.session import Database

        db = Database(database_url)
        with db.session() as session:
            assert get_job_any_tenant(session, job_id=job_id).status == "cancelled"
        db.dispose()
    finally:
        server.stop()


def test_an_eval_whose_judge_is_served_by_a_configured_endpoint_is_accepted(tmp_path, monkeypatch):
    # POST /v1/evals used to check every judge against the models this server can load, refusing a judge that
    # a configured endpoint serves ("gpt-4o-mini" is neither built in nor ft:...).
    from fastapi.testclient import TestClient

    from tuneforge.api.app import create_app
    from tuneforge.db import tenants as tenant_rows
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.settings import Settings

    monkeypatch.setenv("TUNEFORGE_JUDGE_ENDPOINTS", json.dumps({"grader-box": {"base_url": "http://127.0.0.1:9/v1"}}))
    monkeypatch.setenv("TUNEFORGE_JUDGE_ALLOWED_HOSTS", "127.0.0.1")  # loopback is refused unless allowed
    settings = Settings.from_env(database_url=f"sqlite:///{tmp_path / 'tuneforge.db'}")
    db = Database(settings.database_url)
    upgrade(db.engine)
    with db.session() as session:
        _, secret = tenant_rows.create_api_key(session, tenant_id="tenant-a")
    judge = {"type": "score_model", "name": "judge", "model": "gpt-4o-mini", "endpoint": "grader-box",
             "input": [{"role": "user", "content": "Rate {{sample.output_text}} from 0 to 1."}], "range": [0, 1],
             "pass_threshold": 0.5}
    with TestClient(create_app(settings, db=db)) as client:
        created = client.post("/v1/evals", headers={"Authorization": f"Bearer {secret}"}, json={
            "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA}, "testing_criteria": [judge]})
    db.dispose()
    assert created.status_code == 200, created.text
    assert created.json()["testing_criteria"][0]["endpoint"] == "grader-box"

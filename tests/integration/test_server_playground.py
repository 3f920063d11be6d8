"""`tuneforge server`'s /v1/chat/completions and /v1/completions, answered through the `openai` client by a real
server on the tiny model: a registered adapter answers (by ft: id, NAME@vN and NAME:ALIAS) exactly as the
`tuneforge serve` playground answers greedily for the same adapter, streamed too; a second adapter is hot-added
to the same playground process, a third unloads the least recently used; the base model answers, a second base
stops the idle process of the first (one process allowed here); another tenant's model answers 404 with a
missing one's body; a read-only key gets 403; the playground process refuses requests without the secret;
TUNEFORGE_PLAYGROUND=false answers 503. And (slow) a model trained through the API answers as
`tuneforge serve JOB_DIR` does."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated
from test_export import ASK
from test_playground import random_adapter

openai = pytest.importorskip("openai")
MAX_NEW = 12
PROMPT = "<|im_start|>user\nSay hi to Zed.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def server(tmp_path, monkeypatch):
    # Small bounds, so the test sees adapters unloaded and a process stopped for another base.
    monkeypatch.setenv("TUNEFORGE_PLAYGROUND_MAX_PROCESSES", "1")
    monkeypatch.setenv("TUNEFORGE_PLAYGROUND_MAX_ADAPTERS", "2")
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'tuneforge.db'}", worker=False)
    yield process
    process.stop()
    assert "Traceback" not in process.log_text(), process.log_text()[-4000:]


def http(server: ServerProcess, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys[tenant]}"}, timeout=300)


def client(server: ServerProcess, key: str):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=300)


def register_adapter(server: ServerProcess, tenant: str, adapter, name: str, alias: str | None = None) -> str:
    """A job (queued: no worker runs here) and its adapter as the worker registers a succeeded job's output: a
    fine-tuned model and the next version of `name`, its files in the artifact store, its base tiny-llama."""
    from tuneforge.db import model_versions as version_rows
    from tuneforge.db import models as model_rows
    from tuneforge.db.session import Database
    from tuneforge.registry.artifacts import LocalArtifactStore
    from tuneforge.registry.versions import store_directory

    api = http(server, tenant)
    file = wait_validated(api, post_file(api, EXAMPLE_DATA / "train.jsonl")["id"])
    job = api.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"]})
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    model_id = f"ft:tiny-llama:{tenant}:{name}:{job_id.removeprefix('ftjob-')}"
    manifest, digest = store_directory(LocalArtifactStore(server.home / "artifacts"), adapter)
    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    with db.session() as session:
        model_rows.create_model(session, model_id=model_id, tenant_id=tenant, job_id=job_id, base_model="tiny-llama",
                                kind="adapter", location=f"jobs/{job_id}/adapter")
        version = version_rows.create_version(session, tenant_id=tenant, name=name, model_id=model_id, job_id=job_id,
                                              kind="adapter", manifest=manifest, manifest_sha256=digest,
                                              lineage={"base_model": {"ref": "tiny-llama", "kind": "builtin"}})
        if alias:
            version_rows.set_alias(session, version=version, alias=alias)
    db.dispose()
    return model_id


def core(ref: str) -> str:
    """The part of a model reference a not-found message names: the ft: id (without a checkpoint), or the name."""
    return ref.split(":ckpt-step-")[0] if ref.startswith("ft:") else ref.split("@")[0].split(":")[0]


def playground_answers(base, adapters: dict):
    """What the `tuneforge serve` playground answers (its own app, in this process): greedy chat and completion
    for the base and each adapter."""
    from fastapi.testclient import TestClient

    from tuneforge.export.playground import Playground, create_app

    with TestClient(create_app(Playground(base, adapters=adapters, name="base"))) as serve:
        answers = {}
        for model in ("base", *adapters):
            chat = serve.post("/v1/chat/completions", json={"model": model, "messages": ASK, "temperature": 0,
                                                             "max_tokens": MAX_NEW}).json()
            text = serve.post("/v1/completions", json={"model": model, "prompt": PROMPT, "temperature": 0,
                                                       "max_tokens": MAX_NEW}).json()
            answers[model] = (chat["choices"][0]["message"]["content"], text["choices"][0]["text"])
    return answers


def test_registered_models_answer_as_the_playground_does_and_only_for_their_tenant(server, tmp_path, tiny_model_dir):
    warm = register_adapter(server, "tenant-a", random_adapter(tiny_model_dir, tmp_path / "warm", 1), "warm-bot",
                            alias="production")
    cold = register_adapter(server, "tenant-a", random_adapter(tiny_model_dir, tmp_path / "cold", 2), "cold-bot")
    theirs = register_adapter(server, "tenant-b", random_adapter(tiny_model_dir, tmp_path / "theirs", 3), "their-bot",
                              alias="production")
    a = client(server, server.keys["tenant-a"])
    assert not (server.home / "run").exists() or not list((server.home / "run").iterdir())  # nothing started yet

    first = a.chat.completions.create(model=warm, messages=ASK, temperature=0, max_tokens=MAX_NEW)
    assert first.model == warm and first.object == "chat.completion"
    # The same model by its version and by its alias; the answer names the model that answered.
    for ref in ("warm-bot@v1", "warm-bot:production"):
        again = a.chat.completions.create(model=ref, messages=ASK, temperature=0, max_tokens=MAX_NEW)
        assert again.choices[0].message.content == first.choices[0].message.content and again.model == warm
    # Streamed: the same text, chunk by chunk, with the usage at the end.
    chunks = list(a.chat.completions.create(model="warm-bot:production", messages=ASK, temperature=0,
                                            max_tokens=MAX_NEW, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    assert len([c for c in chunks if c.choices]) > 2 and {c.model for c in chunks} == {warm}
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens

    answers = {}
    for model in ("tiny-llama", warm, cold):
        chat = a.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=MAX_NEW)
        text = a.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=MAX_NEW)
        streamed = a.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=MAX_NEW, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == text.choices[0].text
        answers[model] = (chat.choices[0].message.content, text.choices[0].text)
    # One playground process for the one base, both adapters hot-added to it.
    assert len(list((server.home / "run").iterdir())) == 1
    expected = playground_answers(server.home / "models" / "tiny-llama",
                                  {"warm": tmp_path / "warm", "cold": tmp_path / "cold"})
    assert answers == {"tiny-llama": expected["base"], warm: expected["warm"], cold: expected["cold"]}
    assert len({chat for chat, _ in answers.values()}) == 3  # each adapter changes the answer

    # Another tenant's model, by any name, answers exactly as a missing one does.
    api = http(server, "tenant-a")
    for mine, missing in ((theirs, theirs.replace("tenant-b", "nobody")), ("their-bot@v1", "no-such-bot@v1"),
                          ("their-bot:production", "no-such-bot:production"), ("their-bot", "no-such-bot"),
                          (theirs + ":ckpt-step-1", theirs.replace("tenant-b", "nobody") + ":ckpt-step-1")):
        for path, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "x"})):
            got, expected_body = (api.post(path, json={"model": model, **body}) for model in (mine, missing))
            assert got.status_code == expected_body.status_code == 404, (mine, got.text)
            assert got.json()["error"]["code"] == "model_not_found"
            assert got.text == expected_body.text.replace(core(missing), core(mine)), (got.text, expected_body.text)
    with pytest.raises(openai.NotFoundError):
        a.chat.completions.create(model=theirs, messages=ASK)
    b = client(server, server.keys["tenant-b"])
    assert b.chat.completions.create(model="their-bot:production", messages=ASK, temperature=0,
                                     max_tokens=4).model == theirs
    with pytest.raises(openai.NotFoundError):
        b.chat.completions.create(model=warm, messages=ASK)

    # A checkpoint of one's own model, unknown parameters, a read-only key.
    checkpoint = api.post("/v1/chat/completions", json={"model": warm + ":ckpt-step-1", "messages": ASK})
    assert checkpoint.status_code == 400 and "not their checkpoints" in checkpoint.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        a.chat.completions.create(model=warm, messages=ASK, logprobs=True)
    reader = server.cli("keys", "create", "--tenant", "tenant-a", "--scopes", "read").strip()
    with pytest.raises(openai.PermissionDeniedError, match="jobs"):
        client(server, reader).chat.completions.create(model=warm, messages=ASK)
    assert str(server.home) not in api.post("/v1/chat/completions", json={"model": warm, "messages": ASK}).text

    # Tenant B's adapter was the third on the base: the least recently used idle one (warm) was unloaded, and
    # comes back on its next request with the same answer. The playground process answers nobody without the secret.
    assert a.chat.completions.create(model=warm, messages=ASK, temperature=0,
                                     max_tokens=MAX_NEW).choices[0].message.content == answers[warm][0]
    (port_file,) = (server.home / "run").glob("playground-*/port")
    child = f"http://127.0.0.1:{port_file.read_text()}"
    assert httpx.get(child + "/v1/models").status_code == 403
    assert httpx.post(child + "/v1/chat/completions", json={"model": "base", "messages": ASK},
                      headers={"x-tuneforge-playground-secret": "x" * 43}).status_code == 403

    # A second base model (registered by the operator; the tiny model's own weights): with one process allowed,
    # the idle tiny-llama process stops for it, and starts again for the next request on tiny-llama.
    server.cli("models", "register", "--base", "tiny-two", str(tiny_model_dir))
    other = a.chat.completions.create(model="tiny-two", messages=ASK, temperature=0, max_tokens=MAX_NEW)
    assert other.model == "tiny-two" and other.choices[0].message.content == answers["tiny-llama"][0]
    assert [p.parent for p in (server.home / "run").glob("playground-*/port")] != [port_file.parent]
    assert len(list((server.home / "run").iterdir())) == 1
    assert a.completions.create(model=cold, prompt=PROMPT, temperature=0,
                                max_tokens=MAX_NEW).choices[0].text == answers[cold][1]


def test_the_playground_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_PLAYGROUND", "false")
    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'tuneforge.db'}", worker=False)
    try:
        off = http(server, "tenant-a").post("/v1/chat/completions", json={"model": "tiny-llama", "messages": ASK})
        assert off.status_code == 503 and off.json()["error"]["code"] == "playground_disabled", off.text
    finally:
        server.stop()


@pytest.mark.slow
def test_a_model_trained_through_the_api_answers_as_tuneforge_serve_does(tmp_path, monkeypatch):
    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'tuneforge.db'}")
    try:
        api = http(server, "tenant-a")
        file = wait_validated(api, post_file(api, EXAMPLE_DATA / "train.jsonl")["id"])
        job = api.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"],
                                                     "suffix": "support-bot", "tuneforge": {
            "training": {"max_steps": 3, "per_device_batch_size": 4, "learning_rate": 0.02},
            "dataset": {"max_seq_length": 256}, "evaluation": {"max_eval_examples": 2, "eval_before_training": False}}})
        assert job.status_code == 200, job.text
        deadline = time.monotonic() + 300
        while (body := api.get(f"/v1/fine_tuning/jobs/{job.json()['id']}").json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.5)
        assert body["status"] == "succeeded", body["error"]
        model = body["fine_tuned_model"]
        a = client(server, server.keys["tenant-a"])
        answers = {}
        for ref in ("tiny-llama", model, "support-bot@v1"):
            chat = a.chat.completions.create(model=ref, messages=ASK, temperature=0, max_tokens=MAX_NEW)
            text = a.completions.create(model=ref, prompt=PROMPT, temperature=0, max_tokens=MAX_NEW)
            answers[ref] = (chat.choices[0].message.content, text.choices[0].text)
        streamed = a.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=MAX_NEW, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answers[model][0]
        with pytest.raises(openai.NotFoundError):
            client(server, server.keys["tenant-b"]).chat.completions.create(model=model, messages=ASK)

        # `tuneforge serve JOB_DIR` (its app, here): the job's adapter on its base, greedy.
        monkeypatch.setenv("TUNEFORGE_HOME", str(server.home))
        from fastapi.testclient import TestClient

        from tuneforge.export.playground import Playground, create_app

        with TestClient(create_app(Playground(server.home / "jobs" / job.json()["id"], name="bot"))) as serve:
            names = [m["id"] for m in serve.get("/v1/models").json()["data"]]
            for served, ref in zip(names, ("tiny-llama", model)):
                chat = serve.post("/v1/chat/completions", json={"model": served, "messages": ASK, "temperature": 0,
                                                                 "max_tokens": MAX_NEW}).json()
                text = serve.post("/v1/completions", json={"model": served, "prompt": PROMPT, "temperature": 0,
                                                           "max_tokens": MAX_NEW}).json()
                assert answers[ref] == (chat["choices"][0]["message"]["content"], text["choices"][0]["text"]), served
        assert answers["support-bot@v1"] == answers[model]
    finally:
        server.stop()

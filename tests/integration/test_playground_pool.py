"""The playground pool behind /v1/chat/completions (api/playground_pool.py): a process no request used for
TUNEFORGE_PLAYGROUND_IDLE_SECONDS is stopped (its process gone, its folder removed) while one answering a request
stays, by a pass of stop_idle and by the reaper thread; 0 turns that off. A model the registry knows does not
generate text (a reward, CLIP or vision-language version, down the lineage too, or a built-in CLIP / LLaVA base)
answers 400 model_not_servable naming it and why, and no process starts. And (slow) with real playground processes
on the tiny models: a base whose process refuses it on load (an operator-registered CLIP directory) answers the
same 400, at once the second time; a base that answered stops when idle and answers the same on the next request."""

from __future__ import annotations

import os
import sys
import time

import httpx
import pytest
from test_registry_db import db, make_job  # noqa: F401 - db is the fixture

from tuneforge.api.playground_pool import BASE_NAME, Lease, PlaygroundPool, PlaygroundProcess
from tuneforge.db import model_versions as version_rows
from tuneforge.db import models as model_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.home import tuneforge_home
from tuneforge.scheduler.executors.process import spawn
from tuneforge.settings import Settings

ASK = [{"role": "user", "content": "Say hi to Zed."}]


def settings(tmp_path, **changes) -> Settings:
    return Settings.from_env(database_url=f"sqlite:///{tmp_path / 'tuneforge.db'}", artifacts_dir=tmp_path / "artifacts",
                             **changes)


def sleeping_child(pool: PlaygroundPool, base: str, tmp_path) -> PlaygroundProcess:
    """A process in the pool as _start leaves one (its own process group, its folder), that serves nothing: what
    is tested is how the pool stops it."""
    workdir = tmp_path / f"playground-{base}"
    workdir.mkdir()
    process = spawn([sys.executable, "-c", "import time; time.sleep(300)"], env=dict(os.environ))
    child = PlaygroundProcess(base=base, process=process, url="http://127.0.0.1:9", client=httpx.Client(),
                              workdir=workdir)
    pool._processes[base] = child
    return child


def stopped(child: PlaygroundProcess) -> bool:
    return child.process.poll() is not None and not child.workdir.exists()


def test_idle_processes_stop_and_busy_ones_stay(tmp_path):
    pool = PlaygroundPool(settings(tmp_path, playground_idle_seconds=60))
    try:
        idle, busy, recent = (sleeping_child(pool, base, tmp_path) for base in ("idle", "busy", "recent"))
        now = time.monotonic()
        idle.last_used = busy.last_used = now - 61
        busy.in_flight = 1  # answering (or streaming) a request: never stopped under it
        assert pool.stop_idle(now=now) == ["idle"]
        assert stopped(idle) and pool.running() == ["busy", "recent"]
        assert not stopped(busy) and not stopped(recent)
        Lease(pool, busy, BASE_NAME, adapter=False).release()  # its answer is done: idle from now on
        assert pool.stop_idle(now=time.monotonic() + 30) == []
        assert sorted(pool.stop_idle(now=time.monotonic() + 61)) == ["busy", "recent"]
        assert stopped(busy) and stopped(recent) and pool.running() == []
    finally:
        pool.close()

    never = PlaygroundPool(settings(tmp_path, playground_idle_seconds=0))  # 0: processes stay until the server stops
    try:
        kept = sleeping_child(never, "kept", tmp_path)
        assert never.stop_idle(now=time.monotonic() + 1e9) == [] and not stopped(kept)
    finally:
        never.close()
    assert stopped(kept)


def test_the_reaper_thread_stops_an_idle_process(tmp_path):
    pool = PlaygroundPool(settings(tmp_path, playground_idle_seconds=0.5))
    try:
        child = sleeping_child(pool, "base", tmp_path)
        with pool._lock:
            pool._start_reaper()  # as _process_for does when it adds a process
        deadline = time.monotonic() + 20
        while not stopped(child):
            assert time.monotonic() < deadline, "the reaper did not stop the idle process"
            time.sleep(0.1)
        assert pool.running() == []
    finally:
        pool.close()


def test_the_settings_refuse_a_negative_idle_time(monkeypatch, tmp_path):
    from tuneforge.settings import SettingsError

    monkeypatch.setenv("TUNEFORGE_PLAYGROUND_IDLE_SECONDS", "-1")
    with pytest.raises(SettingsError, match="TUNEFORGE_PLAYGROUND_IDLE_SECONDS=-1"):
        Settings.from_env()
    monkeypatch.setenv("TUNEFORGE_PLAYGROUND_IDLE_SECONDS", "30")
    assert Settings.from_env().playground_idle_seconds == 30.0
    monkeypatch.delenv("TUNEFORGE_PLAYGROUND_IDLE_SECONDS")
    assert Settings.from_env().playground_idle_seconds == 900.0


# ---- models that do not generate text ------------------------------------------------------------------


def app_client(db, tmp_path, **changes):
    from fastapi.testclient import TestClient

    from tuneforge.api.app import create_app

    app = create_app(Settings.from_env(database_url=db.engine.url.render_as_string(hide_password=False),
                                       artifacts_dir=tmp_path / "artifacts", **changes), db=db)
    with db.session() as session:
        _, key = tenant_rows.create_api_key(session, tenant_id="t")
    return app, TestClient(app, headers={"Authorization": f"Bearer {key}"})


def version(db, name: str, method: str, base: dict) -> str:
    """A version of the tenant's as the worker registers one, made by `method` on `base` (its lineage's record)."""
    job_id, _ = make_job(db, suffix=name)
    model_id = f"ft:tiny-llama:t:{name}:{job_id.removeprefix('ftjob-')}"
    with db.session() as session:
        model_rows.create_model(session, model_id=model_id, tenant_id="t", job_id=job_id, base_model="tiny-llama",
                                kind="adapter", location=f"jobs/{job_id}/adapter")
        version_rows.create_version(session, tenant_id="t", name=name, model_id=model_id, job_id=job_id, kind="adapter",
                                    manifest={"files": []}, manifest_sha256="0" * 64,
                                    lineage={"method": method, "base_model": base})
    return model_id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_models_that_do_not_generate_text_answer_400_naming_why(db, tmp_path):
    app, client = app_client(db, tmp_path)
    scorer = version(db, "scorer", "reward", {"ref": "tiny-llama", "kind": "builtin"})
    version(db, "captioner", "vlm", {"ref": "tiny-llava", "kind": "builtin"})
    on_scorer = version(db, "on-scorer", "sft", {"ref": scorer, "kind": "version"})  # trained on the reward model
    try:
        for ref, why in ((scorer, "a reward model"), ("scorer@v1", "a reward model"),
                         ("captioner@v1", "a vision-language model"), (on_scorer, "a reward model"),
                         ("tiny-clip", "a CLIP model"), ("tiny-llava", "a vision-language model")):
            for path, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "x"})):
                answer = client.post(path, json={"model": ref, **body})
                error = answer.json()["error"]
                assert answer.status_code == 400 and error["code"] == "model_not_servable", (ref, answer.text)
                assert error["message"].startswith(f"the playground cannot serve {ref}: it is {why}")
                assert error["param"] == "model"
        assert app.state.playground.running() == [] and not (tuneforge_home() / "run").exists()  # nothing started
    finally:
        app.state.playground.close()


@pytest.mark.slow  # two real playground processes on the tiny models: about a minute on two busy cores
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_real_processes_refuse_on_load_and_stop_when_idle(db, tmp_path, tiny_model_dir, tiny_clip_dir):
    from tuneforge.registry.models import register_base_model

    app, client = app_client(db, tmp_path, playground_idle_seconds=2.0)
    pool = app.state.playground
    with db.session() as session:
        register_base_model(session, app.state.store, name="clip-base", directory=tiny_clip_dir)
        register_base_model(session, app.state.store, name="tiny-two", directory=tiny_model_dir)
    try:
        # Refused by its process on load (the registry knows nothing of it): a 400 naming it and why, then at once.
        refused = client.post("/v1/chat/completions", json={"model": "clip-base", "messages": ASK})
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["code"] == "model_not_servable", refused.text
        assert error["message"].startswith("the playground cannot serve clip-base: it is a clip model (CLIPModel)")
        assert str(tmp_path) not in refused.text and str(tiny_clip_dir) not in refused.text
        started = time.monotonic()
        assert client.post("/v1/completions", json={"model": "clip-base", "prompt": "x"}).json()["error"]["message"] \
            .startswith("the playground cannot serve clip-base: it is a clip model")
        assert time.monotonic() - started < 5 and pool.running() == []  # remembered: no second process

        ask = {"model": "tiny-two", "messages": ASK, "temperature": 0, "max_tokens": 8}
        first = client.post("/v1/chat/completions", json=ask)
        assert first.status_code == 200, first.text
        (child,) = pool._processes.values()
        deadline = time.monotonic() + 30
        while not (child.process.poll() is not None and not child.workdir.exists()):
            assert time.monotonic() < deadline, "the idle playground process was not stopped"
            time.sleep(0.2)
        assert pool.running() == []
        again = client.post("/v1/chat/completions", json=ask)  # a fresh process, the same greedy answer
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        assert next(iter(pool._processes.values())).process.pid != child.process.pid
    finally:
        pool.close()

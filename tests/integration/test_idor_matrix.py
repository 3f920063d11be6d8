"""The IDOR matrix, generated from the server's OpenAPI document: every operation on a route with a path id,
called by tenant A with tenant B's real object ids, answers 404 with exactly the body a missing id gets (so do
the playground's chat and completions for B's model named in the body, by ft: id, version or alias),
and changes nothing of B's; a route whose parent is A's own and whose last id is B's does the same; no
read by A (lists, A's own objects, lists paged from B's ids) shows any of B's ids. A route with a path
parameter that has no entry in ROUTES fails the test, named, so a new route cannot go unchecked.

Admin routes take ids of tenants and keys, not of a tenant's objects: A's key (no admin scope) gets the
same 403 for B's ids as for missing ones."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated

# Each route with path parameters -> the kind of object each parameter names, in order.
ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/files/{file_id}": ("file",),
    "/v1/files/{file_id}/content": ("file",),
    "/v1/files/{file_id}/validation": ("file",),
    "/v1/fine_tuning/jobs/{job_id}": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/cancel": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/pause": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/resume": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/events": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/checkpoints": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/metrics": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/events/stream": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/evaluation": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/human_eval": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/human_eval/rows": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/human_eval/judgements": ("job",),
    "/v1/fine_tuning/jobs/{job_id}/human_eval/report": ("job",),
    "/v1/models/{model_id}": ("model",),
    "/v1/models/{model_id}/exports": ("model",),
    "/v1/models/{model_id}/exports/{export_id}": ("model", "export"),
    "/v1/models/{model_id}/exports/{export_id}/content": ("model", "export"),
    "/v1/registry/models/{name}": ("registry_name",),
    "/v1/registry/models/{name}/versions": ("registry_name",),
    "/v1/registry/models/{name}/versions/{version}": ("registry_name", "version"),
    "/v1/registry/models/{name}/versions/{version}/lineage": ("registry_name", "version"),
    "/v1/registry/models/{name}/versions/{version}/tags": ("registry_name", "version"),
    "/v1/registry/models/{name}/versions/{version}/tags/{key}": ("registry_name", "version", "tag"),
    "/v1/registry/models/{name}/aliases": ("registry_name",),
    "/v1/registry/models/{name}/aliases/{alias}": ("registry_name", "alias"),
    "/v1/registry/datasets/{name}": ("dataset_name",),
    "/v1/registry/datasets/{name}/versions": ("dataset_name",),
    "/v1/registry/datasets/{name}/versions/{version}": ("dataset_name", "dataset_version"),
    "/v1/registry/datasets/{name}/versions/{version}/tags": ("dataset_name", "dataset_version"),
    "/v1/registry/datasets/{name}/versions/{version}/tags/{key}": ("dataset_name", "dataset_version", "dataset_tag"),
    "/v1/registry/datasets/{name}/aliases": ("dataset_name",),
    "/v1/registry/datasets/{name}/aliases/{alias}": ("dataset_name", "dataset_alias"),
    "/v1/evals/{eval_id}": ("eval",),
    "/v1/evals/{eval_id}/runs": ("eval",),
    "/v1/evals/{eval_id}/runs/{run_id}": ("eval", "run"),
    "/v1/evals/{eval_id}/runs/{run_id}/cancel": ("eval", "run"),
    "/v1/evals/{eval_id}/runs/{run_id}/output_items": ("eval", "run"),
    "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}": ("eval", "run", "output_item"),
    "/v1/tuneforge/tenants/{tenant_id}": ("tenant",),
    "/v1/tuneforge/tenants/{tenant_id}/limits": ("tenant",),
    "/v1/tuneforge/tenants/{tenant_id}/budget": ("tenant",),
    "/v1/tuneforge/keys/{key_id}": ("key",),
    "/v1/uploads/{upload_id}/parts": ("upload",),
    "/v1/uploads/{upload_id}/complete": ("upload",),
    "/v1/uploads/{upload_id}/cancel": ("upload",),
    "/v1/sweeps/{sweep_id}": ("sweep",),
    "/v1/sweeps/{sweep_id}/trials": ("sweep",),
    "/v1/sweeps/{sweep_id}/cancel": ("sweep",),
}
# Routes that name a tenant's object in the body, not the path: the playground's, whose `model` is an ft: id or a
# registry reference (NAME@vN, NAME:ALIAS) -> the kinds each reference is made of, and the rest of the body.
BODY_ROUTES: dict[str, dict] = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
}
BODY_REFERENCES = (("model",), ("registry_name", "@v1"), ("registry_name", ":", "alias"))
ADMIN_KINDS = {"tenant", "key"}
ITEM_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
CRITERIA = [{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}]
ROWS = [{"item": {"answer": "Paris"}, "sample": {"output_text": "Paris"}}]
# A valid body for the operations that need one: a body the server refuses would answer 400 before the id.
BODIES = {
    ("POST", "/v1/evals/{eval_id}"): {"name": "renamed"},
    ("POST", "/v1/evals/{eval_id}/runs"): {"data_source": {"type": "jsonl", "source": {"type": "file_content",
                                                                                     "content": ROWS}}},
    ("POST", "/v1/evals/{eval_id}/runs/{run_id}"): {"metadata": {"k": "v"}},
    ("PUT", "/v1/tuneforge/tenants/{tenant_id}/limits"): {"max_gpus": 1},
    ("PUT", "/v1/registry/models/{name}/aliases"): {"alias": "idor", "version": "v1"},
    ("POST", "/v1/registry/models/{name}/versions/{version}/tags"): {"key": "idor", "value": "v"},
    # Registering names a new version of the caller's own name: a missing file makes both answers 404 alike.
    ("POST", "/v1/registry/datasets/{name}/versions"): {"file_id": "file-000000000000000000000000"},
    ("PUT", "/v1/registry/datasets/{name}/aliases"): {"alias": "idor", "version": "v1"},
    ("POST", "/v1/registry/datasets/{name}/versions/{version}/tags"): {"key": "idor", "value": "v"},
    ("POST", "/v1/uploads/{upload_id}/complete"): {"part_ids": ["part_000000000000000000000000"]},
    ("PUT", "/v1/tuneforge/tenants/{tenant_id}/budget"): {"monthly_cost_usd": 10},
    ("POST", "/v1/models/{model_id}/exports"): {},
}
MISSING = {"file": "file-000000000000000000000000", "job": "ftjob-000000000000000000000000",
           "model": "ft:tiny-llama:nobody::missing", "eval": "eval_000000000000000000000000",
           "registry_name": "no-such-model", "version": "mv_000000000000000000000000", "alias": "no-such-alias",
           "tag": "no-such-tag", "dataset_name": "no-such-dataset", "dataset_version": "dsv_000000000000000000000000",
           "dataset_alias": "no-such-dataset-alias", "dataset_tag": "no-such-dataset-tag",
           "run": "evalrun_000000000000000000000000", "output_item": "outputitem_000000000000000000000000",
           "tenant": "no-such-tenant", "key": "key_000000000000000000000000",
           "sweep": "sweep_000000000000000000000000",
           "export": "export_000000000000000000000000",
           "upload": "upload_000000000000000000000000"}


@pytest.fixture
def server(tmp_path, database_url, monkeypatch):
    # A rate the matrix never reaches: it checks isolation, not the limiter (each cell is a request or two).
    monkeypatch.setenv("TUNEFORGE_RATE_LIMIT_PER_MINUTE", "1000000")
    monkeypatch.setenv("TUNEFORGE_RATE_LIMIT_BURST", "1000000")
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url, worker=False)
    yield process
    process.stop()


def client(server: ServerProcess, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys[tenant]}"}, timeout=30)


def objects_of(server: ServerProcess, tenant: str) -> dict[str, str]:
    """One real object of every kind for the tenant, made through the API (a model and an output item,
    which only a finished job makes, are written as the worker would)."""
    from tuneforge.db import evals as eval_rows
    from tuneforge.db import model_versions as version_rows
    from tuneforge.db import models as model_rows
    from tuneforge.db.session import Database

    http = client(server, tenant)
    file = wait_validated(http, post_file(http, EXAMPLE_DATA / "train.jsonl")["id"])
    assert file["status"] == "processed", file
    job = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"],
                                                  "tuneforge": {"training": {"max_steps": 2}}})
    assert job.status_code == 200, job.text
    evaluation = http.post("/v1/evals", json={"name": "e", "testing_criteria": CRITERIA,
                                              "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA}})
    assert evaluation.status_code == 200, evaluation.text
    run = http.post(f"/v1/evals/{evaluation.json()['id']}/runs", json=BODIES[("POST", "/v1/evals/{eval_id}/runs")])
    assert run.status_code == 200, run.text
    ids = {"file": file["id"], "job": job.json()["id"], "eval": evaluation.json()["id"], "run": run.json()["id"],
           "model": f"ft:tiny-llama:{tenant}::idor", "tenant": tenant,
           "registry_name": f"bot-{tenant}", "alias": f"prod-{tenant}", "tag": f"tag-{tenant}",
           "dataset_name": f"data-{tenant}", "dataset_alias": f"clean-{tenant}", "dataset_tag": f"dtag-{tenant}"}
    dataset = http.post(f"/v1/registry/datasets/{ids['dataset_name']}/versions", json={"file_id": file["id"]})
    assert dataset.status_code == 201, dataset.text  # a dataset version of the file, with an alias and a tag
    ids["dataset_version"] = dataset.json()["id"]
    assert http.put(f"/v1/registry/datasets/{ids['dataset_name']}/aliases",
                    json={"alias": ids["dataset_alias"], "version": "v1"}).status_code == 200
    assert http.post(f"/v1/registry/datasets/{ids['dataset_name']}/versions/v1/tags",
                     json={"key": ids["dataset_tag"], "value": "v"}).status_code == 200
    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    with db.session() as session:
        model_rows.create_model(session, model_id=ids["model"], tenant_id=tenant, job_id=ids["job"],
                                base_model="tiny-llama", kind="adapter", location=f"jobs/{ids['job']}/adapter")
        version = version_rows.create_version(  # the registry's version of it, with an alias and a tag
            session, tenant_id=tenant, name=ids["registry_name"], model_id=ids["model"], job_id=ids["job"],
            kind="adapter", manifest={"files": []}, manifest_sha256="0" * 64,
            lineage={"base_model": {"ref": "tiny-llama", "kind": "builtin"}})
        version_rows.set_alias(session, version=version, alias=ids["alias"])
        version_rows.set_tag(session, version_id=version.id, key=ids["tag"], value="v")
        ids["version"] = version.id
        run_row = eval_rows.get_run(session, tenant_id=tenant, eval_id=ids["eval"], run_id=ids["run"])[0]
        assert eval_rows.record_run_result(session, job_id=run_row.job_id, result={}, items=[
            {"index": 0, "status": "pass", "item": ROWS[0]["item"], "sample": ROWS[0]["sample"], "results": []}])
    db.dispose()
    export = http.post(f"/v1/models/{ids['model']}/exports", json={})  # an export job of the model (no worker runs it)
    assert export.status_code == 200, export.text
    ids["export"] = export.json()["id"]
    # The job's evaluation report, as the recipe writes it when a job succeeds, and a human eval of it.
    from tuneforge.spec.jobdir import EvaluationReport, SideBySide, write_report

    (server.home / "jobs" / ids["job"]).mkdir(parents=True, exist_ok=True)
    write_report(server.home / "jobs" / ids["job"], EvaluationReport(dataset="val.jsonl", examples=2, samples=[
        SideBySide(prompt=f"q{i}", reference="a", base="b", fine_tuned="a") for i in range(2)]))
    assert http.post(f"/v1/fine_tuning/jobs/{ids['job']}/human_eval").status_code == 200
    db.dispose()
    items = http.get(f"/v1/evals/{ids['eval']}/runs/{ids['run']}/output_items").json()["data"]
    ids["output_item"] = items[0]["id"]
    keys = httpx.get(server.url + "/v1/tuneforge/keys", headers={
        "Authorization": f"Bearer {(server.home / 'admin-key').read_text().strip()}"}).json()["data"]
    ids["key"] = next(k["id"] for k in keys if k["tenant"] == tenant)
    upload = http.post("/v1/uploads", json={"bytes": 10, "filename": "a.jsonl", "mime_type": "application/jsonl",
                                            "purpose": "fine-tune"})
    assert upload.status_code == 200, upload.text
    ids["upload"] = upload.json()["id"]
    sweep = http.post("/v1/sweeps", json={"base": {"model": {"base_model": "tiny-llama"}, "dataset": {"path": file["id"]},
                                                   "training": {"max_steps": 2}},
                                          "space": {"adapter.rank": {"type": "choice", "values": [4, 8]}},
                                          "objectives": [{"metric": "loss"}], "sampler": "grid"})
    assert sweep.status_code == 200, sweep.text
    ids["sweep"] = sweep.json()["id"]
    # The scheduler's sweep driver submits the first trial (no worker runs it): wait, so B's reads stay put.
    deadline = time.monotonic() + 60
    while not http.get(f"/v1/sweeps/{ids['sweep']}/trials").json()["data"]:
        assert time.monotonic() < deadline, "the sweep driver submitted no trial"
        time.sleep(0.2)
    return ids


def fill(path: str, values: list[str]) -> str:
    names = re.findall(r"\{([^}]+)\}", path)
    for name, value in zip(names, values):
        path = path.replace("{" + name + "}", value)
    return path


def test_every_path_id_of_another_tenant_answers_like_a_missing_one_and_lists_never_leak(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=60).json()  # built on first use: seconds on a busy machine
    with_ids = {path: ops for path, ops in spec["paths"].items() if "{" in path}
    uncovered = sorted(path for path in with_ids if path not in ROUTES)
    assert not uncovered, f"routes with path ids and no entry in the IDOR matrix (add them to ROUTES): {uncovered}"
    stale = sorted(path for path in ROUTES if path not in with_ids)
    assert not stale, f"entries in ROUTES for routes the server does not have: {stale}"

    ours, theirs = objects_of(server, "tenant-a"), objects_of(server, "tenant-b")
    a = client(server, "tenant-a")
    assert a.post(f"/v1/fine_tuning/jobs/{ours['job']}/cancel").status_code == 200  # so its event stream ends
    b_before = {path: client(server, "tenant-b").get(fill(path, [theirs[k] for k in kinds])).text
                for path, kinds in ROUTES.items() if "get" in with_ids[path] and not path.endswith("/stream")
                and not kinds[0] in ADMIN_KINDS}

    cells = 0
    for path, kinds in ROUTES.items():
        # All of B's ids; and, for nested routes, A's own parents with B's id last.
        variants = [[theirs[k] for k in kinds]]
        if len(kinds) > 1:
            variants.append([ours[k] for k in kinds[:-1]] + [theirs[kinds[-1]]])
        for method in with_ids[path]:
            body = BODIES.get((method.upper(), path))
            for values in variants:
                missing = [MISSING[k] if v == theirs[k] else v for k, v in zip(kinds, values)]
                got = a.request(method.upper(), fill(path, values), json=body)
                expected = a.request(method.upper(), fill(path, missing), json=body)
                status = 403 if kinds[0] in ADMIN_KINDS else 404
                assert got.status_code == status, (method, path, values, got.text)
                assert expected.status_code == status, (method, path, missing, expected.text)
                text = expected.text
                for k, v in zip(kinds, values):
                    text = text.replace(MISSING[k], theirs[k]) if v == theirs[k] else text
                assert got.text == text, (method, path, got.text, text)
                cells += 1
    # The routes with the id in the body: B's model by its ft: id, version or alias answers like a missing one.
    for path, rest in BODY_ROUTES.items():
        for parts in BODY_REFERENCES:
            mine = "".join(theirs.get(part, part) for part in parts)
            missing = "".join(MISSING.get(part, part) for part in parts)
            got = a.post(path, json={"model": mine, **rest})
            expected = a.post(path, json={"model": missing, **rest})
            assert got.status_code == expected.status_code == 404, (path, mine, got.text, expected.text)
            text = expected.text
            for part in parts:
                text = text.replace(MISSING[part], theirs[part]) if part in MISSING else text
            assert got.text == text, (path, got.text, text)
            cells += 1
    print(f"IDOR matrix: {len(ROUTES)} routes with path ids and {len(BODY_ROUTES)} with a model id in the body, "
          f"{cells} cells (operation x id combination)")

    # Nothing of B's changed: every read B makes answers as before (cancel, pause, delete... were refused).
    b = client(server, "tenant-b")
    for path, before in b_before.items():
        assert b.get(fill(path, [theirs[k] for k in ROUTES[path]])).text == before, path

    # No read of A's shows B's ids: every GET list, every GET of A's own objects, lists paged from B's ids.
    leaks = [theirs[k] for k in ("file", "job", "model", "eval", "run", "output_item", "sweep", "registry_name",
                                 "version", "export", "dataset_name", "dataset_version")]
    reads = []
    for path, ops in spec["paths"].items():
        if "get" not in ops:
            continue
        if "{" not in path:
            reads.append(path)
            params = {p["name"] for p in ops["get"].get("parameters", []) if p.get("in") == "query"}
            if "after" in params:
                reads += [f"{path}?after={value}" for value in leaks]
        elif ROUTES[path][0] not in ADMIN_KINDS:
            reads.append(fill(path, [ours[k] for k in ROUTES[path]]))
    for url in reads:
        response = a.get(url)
        # 409: A's own export is queued (no worker runs here), so its files cannot be downloaded yet
        assert response.status_code in (200, 403) or (response.status_code == 409 and url.endswith("/content")), \
            (url, response.text)
        assert not [value for value in leaks if value in response.text], (url, response.text[:500])
    print(f"reads checked for leaks: {len(reads)}")

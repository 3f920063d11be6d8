"""/v1/chat/completions and /v1/completions: a tenant tries its models on the server, OpenAI-compatible.

`model` is a base model, one of the tenant's fine-tuned model ids (ft:...) or a registered version (NAME@vN,
NAME:ALIAS); another tenant's answers exactly like a missing one, and a model that does not generate text (a reward,
CLIP or vision-language model, known from the registry or refused by its process on load) answers 400
model_not_servable naming the reason. The answer comes from the playground process
of the model's base (api/playground_pool.py; started on the first request, streamed through as it generates),
and names the model that answered: the pinned ft: id (or the base model). Scope `jobs`: an answer spends the
server's devices like a job does, which a read-only key (a dashboard, a monitor) must not. TUNEFORGE_PLAYGROUND=
false turns the routes off (503).
"""

from __future__ import annotations

import json
import logging

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from tuneforge.api.auth import Principal
from tuneforge.api.dependencies import Config, Db, JobsCaller, Store
from tuneforge.api.errors import ApiError
from tuneforge.api.playground_pool import PlaygroundUnavailable, materialize_target, resolve_pinned
from tuneforge.registry.models import RegistryError
from tuneforge.registry.versions import ManifestMismatch, ModelShredded
from tuneforge.spec.playground import ChatCompletion, ChatRequest, Completion, CompletionRequest, PlaygroundRequest

router = APIRouter(tags=["inference"])
log = logging.getLogger("tuneforge.api")
STREAMED = {"text/event-stream": {"schema": {"type": "string"},
                                  "description": "with stream: true, chunks as OpenAI streams them, then [DONE]"}}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={200: {"content": STREAMED}})
async def chat_completions(body: ChatRequest, caller: JobsCaller, db: Db, store: Store, config: Config,
                           request: Request):
    """Chat with a model, through its own chat template (streaming too)."""
    return await _answer(request, "/v1/chat/completions", body, caller, db, store, config)


@router.post("/v1/completions", response_model=Completion, responses={200: {"content": STREAMED}})
async def completions(body: CompletionRequest, caller: JobsCaller, db: Db, store: Store, config: Config,
                      request: Request):
    """Continue a prompt as it is (streaming too)."""
    return await _answer(request, "/v1/completions", body, caller, db, store, config)


def _target(db, store, pool, caller: Principal, ref: str):
    with db.read_session() as session:
        try:
            pinned, source = resolve_pinned(session, tenant_id=caller.tenant_id, ref=ref)
        except RegistryError as exc:
            raise ApiError(exc.status, exc.message, param="model", code=exc.code) from None
    try:  # with encryption at rest a tenant's version is decrypted only into the folder of the child serving it
        return pinned, materialize_target(store, source, tenant_store=pool.tenant_store(db), tenant_id=caller.tenant_id,
                                          db=db, private=pool.settings.encrypt_at_rest)
    except ModelShredded:
        raise ApiError(410, f"the files of {ref} can no longer be read: tenant {caller.tenant_id}'s encryption key was "
                            "destroyed (crypto-shredded)", param="model", code="content_shredded") from None
    except (ManifestMismatch, OSError, ValueError):
        log.exception("the files of %s cannot be materialized", pinned)
        raise ApiError(500, f"the files of {ref} cannot be read from the artifact store", param="model",
                       code="model_unavailable", type="server_error") from None


def _unavailable(exc: PlaygroundUnavailable) -> ApiError:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return ApiError(exc.status, exc.message, code=exc.code, type="server_error", headers=headers)


def _renamed(data: dict, model: str) -> dict:
    if isinstance(data, dict) and "model" in data:
        data["model"] = model
    return data


async def _answer(request: Request, path: str, body: PlaygroundRequest, caller: Principal, db, store, config):
    if not config.playground:
        raise ApiError(503, "the playground is off on this server (TUNEFORGE_PLAYGROUND=false)",
                       code="playground_disabled", type="server_error")
    pool = request.app.state.playground
    pinned, target = await run_in_threadpool(_target, db, store, pool, caller, body.model)
    try:
        lease = await run_in_threadpool(pool.lease, target)
    except PlaygroundUnavailable as exc:
        if exc.reason is not None:  # its process refused the base: say which model, and why
            raise ApiError(exc.status, f"the playground cannot serve {body.model}: {exc.reason}", param="model",
                           code=exc.code) from None
        raise _unavailable(exc) from None
    payload = {**body.model_dump(mode="json", exclude_unset=True), "model": lease.name}
    client = httpx.AsyncClient(base_url=lease.child.url, headers=pool.headers(), trust_env=False,
                               timeout=httpx.Timeout(config.playground_request_timeout_seconds, connect=10.0))
    try:
        response = await client.send(client.build_request("POST", path, json=payload), stream=body.stream)
        if not body.stream or response.status_code != 200:
            await response.aread()
            await client.aclose()
            lease.release()
            return _relayed(response, pinned)
    except httpx.HTTPError as exc:
        await client.aclose()
        lease.release()
        await run_in_threadpool(pool.forget, lease.child)
        raise _unavailable(PlaygroundUnavailable(
            f"the playground process stopped answering ({type(exc).__name__}); retry")) from None
    except BaseException:
        await client.aclose()
        lease.release()
        raise

    async def chunks():
        try:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    line = "data: " + json.dumps(_renamed(json.loads(line[len("data: "):]), pinned))
                yield line + "\n"
        finally:
            await response.aclose()
            await client.aclose()
            lease.release()

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _relayed(response: httpx.Response, pinned: str) -> JSONResponse:
    """The child's answer with the model named as the tenant knows it; its 404 (an adapter unloaded between
    the lease and the request) as a 503 to retry."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code == 404 or not isinstance(data, dict):
        log.error("the playground process answered %s: %s", response.status_code, response.text[:2000])
        raise ApiError(503, "the playground process could not answer; retry", code="playground_unavailable",
                       type="server_error", headers={"Retry-After": "1"})
    return JSONResponse(_renamed(data, pinned), status_code=response.status_code)

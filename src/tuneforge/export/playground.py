"""The playground: an OpenAI-compatible server for trying a model before deploying it with vLLM.

`/v1/chat/completions` (streaming too) and `/v1/completions` on transformers generation, `/v1/models`; one base
model with any number of PEFT adapters loaded beside it, the request's `model` picking one (PEFT `set_adapter`,
or no adapter for the base's own name). Prompts go through the model's own chat template and generation stops at
its EOS. Requests run one at a time (the active adapter is the model's state): this is for trying a model, not a
production engine. Parameters it does not implement are refused with a 400 naming them, never ignored.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tuneforge.export.source import ExportError, resolve_source
from tuneforge.spec.playground import ChatMessage as _Message
from tuneforge.spec.playground import ChatRequest, CompletionRequest
from tuneforge.spec.playground import PlaygroundRequest as _Request


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop (EOS or a stop string) or length


class Playground:
    """The loaded base model, its adapters and their tokenizers."""

    def __init__(self, model_path: Path, *, adapters: dict[str, Path] | None = None, name: str | None = None):
        """model_path: a model, adapter or job directory (resolve_source); adapters: NAME -> adapter or job."""
        source = resolve_source(model_path)
        adapters = dict(adapters or {})
        if source.kind == "adapter":  # an adapter or a job with one: serve its base too, under the base's name
            adapters = {name or source.name: source.path, **adapters}
            base_dir, self.base_name = source.base_dir, source.base_dir.name
        else:
            base_dir, self.base_name = source.path, name or source.name
        if self.base_name in adapters:
            raise ExportError(f"the adapter name {self.base_name!r} is also the base model's name; choose another")
        self._start(base_dir, adapters)

    @classmethod
    def on_base(cls, base_model, *, tokenizer_dir: Path, name: str) -> Playground:
        """A playground on a base model loaded by the caller (the registry's playground process merges an
        adapter's lineage into its base first), with tokenizer_dir's tokenizer; adapters come by add_adapter."""
        playground = cls.__new__(cls)
        playground.base_name = name
        playground._start(tokenizer_dir, {}, base_model=base_model)
        return playground

    @staticmethod
    def serving_dtype():
        import torch

        cuda = torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32

    def _start(self, base_dir: Path, adapters: dict[str, Path], base_model=None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = self.serving_dtype()
        # Each adapter answers with its own tokenizer (the chat template its job trained with); the base with its
        # own, or, when it has no chat template, the first adapter's.
        first = next(iter(adapters.values()), None)
        self.tokenizers = {self.base_name: _tokenizer(base_dir)}
        if first is not None and not self.tokenizers[self.base_name].chat_template \
                and (first / "tokenizer_config.json").is_file():
            self.tokenizers[self.base_name] = _tokenizer(first)
        self.tokenizer = self.tokenizers[self.base_name]
        if base_model is None:
            from tuneforge.export.playground_process import NotServable, check_generates

            try:
                check_generates(base_dir)  # a CLIP or LLaVA directory: say so, not AutoModelForCausalLM's traceback
            except NotServable as exc:
                raise ExportError(f"{base_dir}: {exc}") from None
            base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=self.dtype)
        self.model = base_model.to(self.device).eval()
        self.adapters: list[str] = []
        self.lock = threading.Lock()
        for adapter_name, path in adapters.items():
            self.add_adapter(adapter_name, path)
        self.created = int(time.time())

    @property
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def add_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT adapter beside the others (hot: requests for the others keep their answers)."""
        from peft import PeftModel

        directory = _adapter_dir(path)
        if name == self.base_name or name in self.adapters:
            raise ExportError(f"an adapter or the base is named {name!r} already")
        with self.lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(directory, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, directory, adapter_name=name)
            self.model.eval()
            self.tokenizers[name] = (_tokenizer(directory) if (directory / "tokenizer_config.json").is_file()
                                     else self.tokenizers[self.base_name])
            self.adapters.append(name)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter (PEFT delete_adapter), freeing its weights."""
        if name not in self.adapters:
            raise LookupError(name)
        with self.lock:
            if len(self.adapters) == 1:  # PEFT keeps one adapter at least: go back to the plain base
                self.model = self.model.unload()
            else:
                if self.model.active_adapter == name:
                    self.model.set_adapter(next(a for a in self.adapters if a != name))
                self.model.delete_adapter(name)
            self.adapters.remove(name)
            del self.tokenizers[name]

    def tokenizer_for(self, model: str):
        return self.tokenizers.get(model, self.tokenizer)

    def chat_prompt(self, messages: list[_Message], model: str | None = None) -> str:
        tokenizer = self.tokenizer_for(model) if model else self.tokenizer
        if not tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template: use /v1/completions")
        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)

    def generate(self, request: _Request, prompt: str, max_new_tokens: int, on_text=None, *,
                 special_tokens: bool = False) -> Generated:
        """Generate for prompt with request's model and sampling; on_text(piece) gets the text as it comes.
        special_tokens: let the tokenizer add its BOS (raw completions; a chat template writes its own)."""
        import torch
        from transformers import TextIteratorStreamer

        if request.model not in self.model_names:
            raise LookupError(request.model)
        tokenizer = self.tokenizer_for(request.model)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=special_tokens).to(self.device)
        stops = request.stops()
        eos = self._eos_ids(tokenizer)
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=tokenizer)
        with self.lock:
            if request.seed is not None:
                torch.manual_seed(request.seed)
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict = {}

            def run() -> None:
                try:
                    with torch.no_grad(), self._adapter(request.model):
                        result["ids"] = self.model.generate(**inputs, streamer=streamer, **kwargs)
                except BaseException as exc:  # re-raised in the request's thread
                    result["error"] = exc
                    streamer.on_finalized_text("", stream_end=True)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            text, sent = "", 0
            for piece in streamer:
                text += piece
                cut = _first_stop(text, stops)
                safe = cut if cut is not None else len(text) - max((len(s) for s in stops), default=1) + 1
                if on_text and safe > sent:
                    on_text(text[sent:safe])
                    sent = safe
            thread.join()
        if "error" in result:
            raise result["error"]
        new = result["ids"][0, inputs["input_ids"].shape[1]:].tolist()
        cut = _first_stop(text, stops)
        final = text[:cut] if cut is not None else text
        if on_text and len(final) > sent:
            on_text(final[sent:])
        ended = bool(new) and new[-1] in eos
        finish = "stop" if ended or cut is not None or len(new) < max_new_tokens else "length"
        return Generated(final, int(inputs["input_ids"].shape[1]), len(new), finish)

    def _eos_ids(self, tokenizer) -> list[int]:
        ids = {tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids |= set(configured) if isinstance(configured, list) else {configured}
        return sorted(i for i in ids if i is not None)

    def _adapter(self, name: str):
        from contextlib import nullcontext

        if not self.adapters:
            return nullcontext()
        if name == self.base_name:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _adapter_dir(path: Path) -> Path:
    if (path / "adapter_config.json").is_file():  # an adapter directory: its base is the playground's own
        return path
    source = resolve_source(path)
    if source.kind != "adapter":
        raise ExportError(f"--adapter {path}: not a PEFT adapter (or a job with one)")
    return source.path


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


# ---- the HTTP app ----------------------------------------------------------------------------------


def create_app(playground: Playground):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="tuneforge playground", version="1")

    def error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
              code: str | None = None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())[1:])
        what = "is not supported by the playground" if first.get("type") == "extra_forbidden" else first.get("msg")
        return error(400, f"{field}: {what}", param=field or None)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": playground.created,
                                            "owned_by": "tuneforge"} for name in playground.model_names]}

    def unknown_model(name: str):
        return error(404, f"The model {name!r} does not exist; this playground serves "
                     f"{', '.join(playground.model_names)}", param="model", code="model_not_found")

    def respond(request: _Request, prompt: str, max_new: int, kind: str, echo_prefix: str = ""):
        if request.model not in playground.model_names:
            return unknown_model(request.model)
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def usage(g: Generated) -> dict:
            return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                    "total_tokens": g.prompt_tokens + g.completion_tokens}

        if not request.stream:
            try:
                g = playground.generate(request, prompt, max_new, special_tokens=kind != "chat")
            except ValueError as exc:
                return error(400, str(exc))
            choice = ({"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}
                      if kind == "chat" else
                      {"index": 0, "text": echo_prefix + g.text, "finish_reason": g.finish_reason, "logprobs": None})
            return {"id": ident, "object": obj, "created": created, "model": request.model, "choices": [choice],
                    "usage": usage(g)}

        import queue

        pieces: queue.Queue = queue.Queue()

        def chunk(delta: dict | str, finish: str | None = None, extra: dict | None = None) -> str:
            choice = ({"index": 0, "delta": delta, "finish_reason": finish} if kind == "chat" else
                      {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None})
            body = {"id": ident, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                    "model": request.model, "choices": [choice], **(extra or {})}
            return f"data: {json.dumps(body)}\n\n"

        def work() -> None:
            try:
                g = playground.generate(request, prompt, max_new, on_text=lambda text: pieces.put(("text", text)),
                                        special_tokens=kind != "chat")
                pieces.put(("done", g))
            except BaseException as exc:  # noqa: BLE001 - reported in the stream
                pieces.put(("error", exc))

        threading.Thread(target=work, daemon=True).start()

        def events():
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            elif echo_prefix:
                yield chunk(echo_prefix)
            while True:
                what, value = pieces.get()
                if what == "text":
                    yield chunk({"content": value} if kind == "chat" else value)
                elif what == "done":
                    yield chunk({} if kind == "chat" else "", value.finish_reason)
                    if (request.stream_options or {}).get("include_usage"):
                        body = {"id": ident, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                                "model": request.model, "choices": [], "usage": usage(value)}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                else:
                    yield f"data: {json.dumps({'error': {'message': str(value), 'type': 'server_error'}})}\n\n"
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        if request.model not in playground.model_names:
            return unknown_model(request.model)
        try:
            prompt = playground.chat_prompt(request.messages, request.model)
        except ValueError as exc:
            return error(400, str(exc), param="messages")
        return respond(request, prompt, request.max_new_tokens(), "chat")

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        return respond(request, request.prompt, request.max_new_tokens(), "completion",
                       echo_prefix=request.prompt if request.echo else "")

    return app


def parse_adapters(items: list[str]) -> dict[str, Path]:
    adapters: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ExportError(f"--adapter {item!r}: expected NAME=PATH")
        if name in adapters:
            raise ExportError(f"--adapter {name} is given twice")
        adapters[name] = Path(path).expanduser().resolve()
    return adapters


def run_playground(model: Path, *, adapters: list[str], name: str | None, host: str, port: int) -> int:
    import uvicorn

    playground = Playground(model, adapters=parse_adapters(adapters), name=name)
    print(f"playground on http://{host}:{port}/v1 serving {', '.join(playground.model_names)}", flush=True)
    uvicorn.run(create_app(playground), host=host, port=port, log_level="warning")
    return 0

"""The playground process `tuneforge server` starts for registered models (api/playground_pool.py).

    python -m tuneforge.export.playground_process --base BASE --name NAME --port-file FILE --allowed-root DIR ...
        [--refusal-file FILE]

One base model (a built-in name, or a directory the API process materialized from the registry; a registry
adapter that later versions trained on is merged into its own base first, as training did) served by the
playground's app (export/playground.py), adapters hot-added by the API process (PEFT load_adapter) on the first
request for them. Torch lives here, never in the API process. It listens on 127.0.0.1 only, on a port the
kernel picks (written to FILE once the model is loaded), and answers only requests carrying the shared secret
the API process put in TUNEFORGE_PLAYGROUND_SECRET; an adapter it loads must lie under an --allowed-root.
A base that does not generate text (a CLIP or vision-language model, a classifier head) is refused before its
weights load: the reason goes to --refusal-file and the process exits with EXIT_NOT_SERVABLE, which the API
process answers as a 400 naming it.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import socket
import sys
from pathlib import Path

from tuneforge.export.source import ExportError
from tuneforge.spec.jobdir import BASE_OF_ADAPTER

SECRET_ENV = "TUNEFORGE_PLAYGROUND_SECRET"
SECRET_HEADER = "x-tuneforge-playground-secret"
MAX_LINEAGE_DEPTH = 32
EXIT_NOT_SERVABLE = 3
CLASSIFIER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


class NotServable(ExportError):
    """A base model the playground cannot generate text with; the message names why, without a path."""


def check_generates(directory: Path) -> None:
    """Refuse a model directory transformers cannot load as a causal language model, or whose weights are a
    classification head's (a reward model trained in full: loaded as a causal LM its answer would come from an
    untrained lm_head), from its config alone."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(directory)
    architectures = list(getattr(config, "architectures", None) or [])
    named = f" ({', '.join(architectures)})" if architectures else ""
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise NotServable(f"it is a {config.model_type} model{named}, which transformers cannot load as a causal "
                          "language model; the playground serves models that generate text")
    if architectures and all(name.endswith(CLASSIFIER_HEADS) for name in architectures):
        raise NotServable(f"its weights are a classification head{named}: it scores text and does not generate it")


def load_base(ref: str, dtype, *, depth: int = 0):
    """(the model, the directory whose tokenizer it answers with) for a built-in model's name or a model
    directory; a registry adapter directory (one a later version was trained on) is merged into its own base,
    down the lineage, in float32 with PEFT, exactly as the training job that continued from it did."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.base_models import resolve_base_model

    if depth > MAX_LINEAGE_DEPTH:
        raise ValueError(f"the lineage of {ref} is deeper than {MAX_LINEAGE_DEPTH} adapters")
    path = Path(ref)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        recorded = path / BASE_OF_ADAPTER
        if not recorded.is_file():
            raise ValueError(f"{path.name}: an adapter without {BASE_OF_ADAPTER} (the registry writes it)")
        parent, _ = load_base(json.loads(recorded.read_text())["base_model"], torch.float32, depth=depth + 1)
        merged = PeftModel.from_pretrained(parent, path).merge_and_unload()
        return merged.to(dtype), path
    directory = resolve_base_model(ref)
    check_generates(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype), directory


class _RequireSecret:
    """ASGI middleware: every request must carry the shared secret (compared in constant time)."""

    def __init__(self, app, secret: str):
        self.app, self.secret = app, secret.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(SECRET_HEADER.encode(), b"")
            if not hmac.compare_digest(given, self.secret):
                body = json.dumps({"error": {"message": "forbidden", "type": "permission_error", "param": None,
                                             "code": "forbidden"}}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def create_process_app(playground, *, secret: str, allowed_roots: list[Path]):
    """The playground's app, plus the API process's own routes to add and remove adapters."""
    from fastapi import Body
    from fastapi.responses import JSONResponse

    from tuneforge.export.playground import create_app

    app = create_app(playground)
    roots = [root.resolve() for root in allowed_roots]

    @app.put("/tuneforge/adapters/{name}")
    def add_adapter(name: str, path: str = Body(..., embed=True)):
        directory = Path(path).resolve()
        if not any(directory.is_relative_to(root) for root in roots):
            return JSONResponse({"error": {"message": "not under an allowed root", "type": "invalid_request_error",
                                           "param": "path", "code": "forbidden_path"}}, 403)
        if name not in playground.adapters:
            playground.add_adapter(name, directory)
        return {"adapters": playground.adapters}

    @app.delete("/tuneforge/adapters/{name}")
    def remove_adapter(name: str):
        if name in playground.adapters:
            playground.remove_adapter(name)
        return {"adapters": playground.adapters}

    return _RequireSecret(app, secret)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneforge.export.playground_process", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a built-in model's name or a model (or registry adapter) directory")
    parser.add_argument("--name", required=True, help="the name requests use for the base model itself")
    parser.add_argument("--port-file", required=True, type=Path, help="where to write the port once serving")
    parser.add_argument("--allowed-root", action="append", type=Path, default=[],
                        help="a directory adapters may be loaded from (repeatable)")
    parser.add_argument("--refusal-file", type=Path, help="where to write why the base cannot be served, if it cannot")
    args = parser.parse_args(argv)
    secret = os.environ.pop(SECRET_ENV, "")
    if len(secret) < 32:
        parser.error(f"{SECRET_ENV} must hold the shared secret (32 characters at least)")

    import uvicorn

    from tuneforge.export.playground import Playground

    try:
        model, tokenizer_dir = load_base(args.base, Playground.serving_dtype())
    except NotServable as exc:
        print(f"playground process: not serving {args.base}: {exc}", file=sys.stderr, flush=True)
        if args.refusal_file is not None:
            staging = args.refusal_file.with_name(args.refusal_file.name + ".tmp")
            staging.write_text(str(exc), encoding="utf-8")
            os.replace(staging, args.refusal_file)
        return EXIT_NOT_SERVABLE
    playground = Playground.on_base(model, tokenizer_dir=tokenizer_dir, name=args.name)
    app = create_process_app(playground, secret=secret, allowed_roots=args.allowed_root)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    staging = args.port_file.with_name(args.port_file.name + ".tmp")
    staging.write_text(str(sock.getsockname()[1]))
    os.replace(staging, args.port_file)  # the API process reads a whole number or nothing
    print(f"playground process serving {args.name} on 127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

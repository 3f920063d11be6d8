"""`tuneforge export` and `tuneforge serve`: the command bodies (cli.py only registers them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuneforge.spec.jobdir import EXIT_BAD_INPUT, EXIT_OK

EXPORT_EPILOG = """\
formats and targets:
  adapter  the PEFT adapter, checked against the server's rules first   vllm (default), sglang, tgi
  merged   the adapter merged into its float32 base (logits checked)     vllm, sglang, tgi
  gguf     one GGUF file, F16 or Q8_0 (read back and compared)           llama.cpp (and Ollama)
Every export writes serve.json and README.md (the server commands), chat_template.jinja, and ray_serve.yaml
(adapter, merged) or an Ollama Modelfile (gguf).
"""


def add_export_commands(commands) -> None:
    from tuneforge.export.bundle import DTYPES, FORMATS
    from tuneforge.export.gguf_export import GGUF_TYPES
    from tuneforge.export.server_rules import TARGETS
    from tuneforge.planner.hardware import GPUS

    export = commands.add_parser(
        "export", help="export a fine-tuned model for vLLM, SGLang, TGI or llama.cpp",
        description="Export a job's output, an adapter or a model directory, with its serving commands.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("source", type=Path, metavar="MODEL_OR_JOB_DIR",
                        help="a succeeded job directory, a PEFT adapter directory or a Hugging Face model directory")
    export.add_argument("--format", choices=FORMATS,
                        help="adapter, merged or gguf (default: gguf for --target llama.cpp, else adapter, or merged "
                        "for a fully fine-tuned model)")
    export.add_argument("--target", choices=TARGETS, help="the server (default: vllm; llama.cpp for gguf)")
    export.add_argument("--out", type=Path, required=True, help="export directory (must not exist or be empty)")
    export.add_argument("--fallback", choices=("none", "merged"), default="none",
                        help="when the adapter breaks a rule of the server: fail (none) or export it merged")
    export.add_argument("--gguf-type", choices=tuple(GGUF_TYPES), help="--format gguf: tensor type, f16 (default) or q8_0")
    export.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype of a merged model's weights (auto: the base model's)")
    export.add_argument("--gpu", choices=tuple(GPUS),
                        help="the serving GPU, for the tensor-parallel size in the commands (default h100-80gb)")
    export.add_argument("--base", type=Path, help="the adapter's base model directory (default: from the job or "
                        "adapter_config.json)")
    export.add_argument("--name", help="the served model name (default: the job's name or the directory's)")
    export.set_defaults(handler=cmd_export)

    serve = commands.add_parser(
        "serve", help="try a model in an OpenAI-compatible playground server (transformers generation)",
        description="Serve MODEL (a model or job directory) with /v1/chat/completions and /v1/completions; "
        "several adapters on one base, switched per request by the `model` field. For trying a model before "
        "deploying it with vLLM, not a production engine.")
    serve.add_argument("model", type=Path, metavar="MODEL", help="a base model directory, an adapter directory or a "
                       "succeeded job directory")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="a PEFT adapter served as model NAME (repeatable)")
    serve.add_argument("--name", help="the model name of MODEL itself (default: its directory name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.set_defaults(handler=cmd_serve)


def cmd_export(args: argparse.Namespace) -> int:
    from tuneforge.export import ExportError, export_model

    try:
        result = export_model(args.source, format=args.format, target=args.target, out=args.out,
                              fallback=args.fallback, gguf_type=args.gguf_type, dtype=args.dtype, gpu=args.gpu,
                              base=args.base, name=args.name)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(result.summary)
    for server, command in result.descriptor["commands"].items():
        print(f"  {server}: {command}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneforge.export import ExportError
    from tuneforge.export.playground import run_playground

    try:
        return run_playground(args.model, adapters=args.adapter, name=args.name, host=args.host, port=args.port)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

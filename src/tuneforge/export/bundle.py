"""One export: check, build, verify, then write the export directory with its serving descriptors.

Everything is built in a staging directory beside the target and renamed into place only after every check
passed, so a refused or failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tuneforge.export.descriptors import ServeDescriptor, parallelism, write_descriptors
from tuneforge.export.server_rules import check_adapter, read_adapter_facts, vllm_max_lora_rank
from tuneforge.export.source import ExportError, ExportSource, resolve_source

FORMATS = ("adapter", "merged", "gguf")
ADAPTER_TARGETS = ("vllm", "sglang", "tgi")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# GGUF read back by transformers vs the source model, float32 logits:
# |gguf - source| <= tolerance * max(1, max |source logit|), the largest difference over every position and vocabulary
# entry of the check prompts. F16 rounds each weight to 11 significant bits: measured 2.4e-4 relative on the tiny
# test model, 1.05e-3 on SmolLM2-135M (30 layers). Q8_0 stores blocks of 32 int8 values with one scale each:
# measured 6.8e-3 on the tiny model, 3.4e-2 on SmolLM2-135M.
GGUF_TOLERANCE = {"f16": 5e-3, "q8_0": 8e-2}


class ServerRulesError(ExportError):
    """The adapter breaks rules of the target server (and no fallback was asked for)."""

    def __init__(self, target: str, failures):
        self.failures = failures
        lines = "".join(f"\n  - {failure}" for failure in failures)
        super().__init__(f"the adapter cannot be served by {target} as an adapter:{lines}\n"
                         "export it merged instead (--format merged), or ask for that fallback (--fallback merged)")


@dataclass
class ExportResult:
    path: Path
    format: str
    target: str
    descriptor: dict

    @property
    def summary(self) -> str:
        fallback = " (merged: the adapter breaks the server's rules)" if self.descriptor.get("fallback_from") else ""
        return f"{self.format} export for {self.target}{fallback} in {self.path}"


def export_model(path: Path | ExportSource, *, format: str | None = None, target: str | None = None, out: Path,
                 fallback: str = "none", gguf_type: str | None = None, dtype: str = "auto", gpu: str | None = None,
                 base: Path | None = None, name: str | None = None, overwrite: bool = False) -> ExportResult:
    """Export MODEL_OR_JOB_DIR as format for target into out (see `tuneforge export --help`). format None: gguf for
    llama.cpp, else the adapter, or merged for a whole model (full fine-tuning)."""
    source = path if isinstance(path, ExportSource) else resolve_source(path, base=base, name=name)
    if format is None:
        format = "gguf" if target == "llama.cpp" else "adapter" if source.kind == "adapter" else "merged"
    target = target or ("llama.cpp" if format == "gguf" else "vllm")
    _check_choices(format, target, fallback, gguf_type, dtype, gpu)
    gguf_type, gpu = gguf_type or "f16", gpu or "h100-80gb"
    out = out.expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another --out")
    fallback_from = None
    vision = _is_vision_model(source)
    if vision and format == "gguf":
        raise ExportError("--format gguf: a vision-language model's GGUF needs its vision projector as a separate "
                          "mmproj file, which tuneforge does not write; export --format merged (or adapter) for vLLM")
    if format == "adapter":
        if source.kind != "adapter":
            raise ExportError(f"{source.path} is a whole model (full fine-tuning), not an adapter: use --format merged")
        facts = read_adapter_facts(source.path, source.base_dir)
        failures = check_adapter(facts, target) + (_vision_adapter_failures(facts, source.base_dir) if vision else [])
        if failures:
            if fallback != "merged":
                raise ServerRulesError(target, failures)
            fallback_from, format = [str(f) for f in failures], "merged"

    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        build = {"adapter": _adapter_export, "merged": _merged_export, "gguf": _gguf_export}[format]
        descriptor, extra = build(source, staging, target=target, dtype=dtype, gpu=gpu, gguf_type=gguf_type, out=out)
        descriptor.fallback_from = fallback_from
        write_descriptors(staging, descriptor, **extra)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, format, target, descriptor.as_dict())


def _check_choices(format: str, target: str, fallback: str, gguf_type: str | None, dtype: str, gpu: str | None) -> None:
    """Every option either shapes this export or is refused: none is accepted and then ignored."""
    from tuneforge.export.gguf_export import GGUF_TYPES
    from tuneforge.export.server_rules import TARGETS
    from tuneforge.planner.hardware import GPUS

    for value, choices, what in ((format, FORMATS, "format"), (target, TARGETS, "target"),
                                 (fallback, ("none", "merged"), "fallback"), (gguf_type or "f16", tuple(GGUF_TYPES), "gguf type"),
                                 (dtype, DTYPES, "dtype"), (gpu or "h100-80gb", tuple(GPUS), "gpu")):
        if value not in choices:
            raise ExportError(f"{what} {value!r}: expected one of {', '.join(choices)}")
    if gguf_type is not None and format != "gguf":
        raise ExportError("--gguf-type applies to --format gguf only")
    if format == "gguf" and dtype != "auto":
        raise ExportError("--dtype applies to adapter and merged exports; a GGUF file's type is --gguf-type")
    if format == "gguf" and gpu is not None:
        raise ExportError("--gpu sizes the tensor parallelism of vLLM / SGLang / TGI commands; llama.cpp takes none")
    if fallback != "none" and format != "adapter":
        raise ExportError(f"--fallback applies to --format adapter (a {format} export has nothing to fall back from)")
    if format == "gguf" and target != "llama.cpp":
        raise ExportError(f"--format gguf is for --target llama.cpp (and Ollama); {target} serves --format adapter "
                          "or merged")
    if target == "llama.cpp" and format != "gguf":
        raise ExportError("--target llama.cpp loads GGUF files: use --format gguf")


# ---- the three formats ---------------------------------------------------------------------------


def _adapter_export(source: ExportSource, staging: Path, *, target: str, dtype: str, gpu: str, out: Path, **_):
    from transformers import AutoTokenizer

    adapter = staging / "adapter"
    shutil.copytree(source.path, adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(source.base_dir)  # a local path: servers never look it up on a hub
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer_dir = source.path if (source.path / "tokenizer_config.json").is_file() else source.base_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = _write_chat_template(staging, tokenizer, out)
    facts = read_adapter_facts(source.path, source.base_dir)
    base_config = _config(source.base_dir)
    descriptor = ServeDescriptor(
        format="adapter", target=target, name=source.name, model_path=str(source.base_dir),
        adapter_path=str(out / "adapter"), max_lora_rank=vllm_max_lora_rank(facts.rank), dtype=_flag(dtype),
        parallel=parallelism(_parameters(source.base_dir) * _served_bytes(dtype),
                             num_heads=base_config.get("num_attention_heads", 1), gpu=gpu),
        chat_template_path=template, eos_token=tokenizer.eos_token,
        checks={"server_rules": f"{target}: all passed", "rank": facts.rank,
                "trained_quantization": source.trained_quantization},
    )
    return descriptor, {}


def _merged_export(source: ExportSource, staging: Path, *, target: str, dtype: str, gpu: str, out: Path, **_):
    model_dir = staging / "model"
    checks = _build_merged(source, model_dir, dtype)
    config = _config(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    descriptor = ServeDescriptor(
        format="merged", target=target, name=source.name, model_path=str(out / "model"), dtype=_flag(dtype),
        parallel=parallelism(_parameters(model_dir) * _served_bytes(dtype),
                             num_heads=config.get("num_attention_heads", 1), gpu=gpu),
        chat_template_path=_write_chat_template(staging, tokenizer, out), eos_token=tokenizer.eos_token, checks=checks,
    )
    return descriptor, {}


def _gguf_export(source: ExportSource, staging: Path, *, target: str, gpu: str, gguf_type: str, out: Path, **_):
    from transformers import AutoTokenizer

    from tuneforge.export.gguf_export import GGUF_TYPES, write_gguf

    work = staging / ".hf-float32"
    checks = _build_merged(source, work, "float32")
    gguf_file = f"{source.name}-{GGUF_TYPES[gguf_type]}.gguf"
    write_gguf(work, staging / gguf_file, gguf_type=gguf_type, name=source.name)
    checks["gguf"] = _verify_gguf(work, staging / gguf_file, gguf_type)
    tokenizer = AutoTokenizer.from_pretrained(work)
    shutil.rmtree(work)
    descriptor = ServeDescriptor(format="gguf", target=target, name=source.name, model_path=str(out / gguf_file),
                                 chat_template_path=_write_chat_template(staging, tokenizer, out),
                                 eos_token=tokenizer.eos_token, checks=checks)
    return descriptor, {"gguf_file": gguf_file, "chat_template": tokenizer.chat_template}


# ---- building and verifying ----------------------------------------------------------------------


def _build_merged(source: ExportSource, model_dir: Path, dtype: str) -> dict:
    """A Hugging Face directory at model_dir: the adapter merged into its float32 base (checked), or the whole
    fine-tuned model as it is (dtype converted when asked)."""
    import torch

    from tuneforge.export.merge import merge_adapter, save_merged

    if _is_vision_model(source):
        return _build_merged_vision(source, model_dir, dtype)
    if source.kind == "adapter":
        model, tokenizer, check = merge_adapter(source.path, source.base_dir)
        checks = {"merge": {**check.as_dict(), "precision": "float32",
                            "base": f"{source.base_dir} loaded unquantized (trained on: {source.trained_quantization})"}}
        config = _config(source.base_dir)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        checks = {"merge": "none: a fully fine-tuned model is exported as it is"}
        config = _config(source.path)
    _keep_eos(model, tokenizer)
    save_merged(model, tokenizer, model_dir, dtype=getattr(torch, _saved_dtype(dtype, config)))
    return checks


def _is_vision_model(source: ExportSource) -> bool:
    from tuneforge.export.vision import is_vision_model  # torch and transformers load only for an export

    return is_vision_model(source.base_dir or source.path)


def _vision_adapter_failures(facts, base_dir: Path) -> list:
    from tuneforge.export.vision import vision_adapter_failures

    return vision_adapter_failures(facts, base_dir)


def _build_merged_vision(source: ExportSource, model_dir: Path, dtype: str) -> dict:
    """A VLM's merged directory (export/vision.py): the adapter merged, its projector in place, the processor."""
    import torch

    from tuneforge.engine.vision.models import load_processor
    from tuneforge.export.vision import load_vision_base_fp32, merge_vision_adapter, save_merged_vision

    if source.kind == "adapter":
        model, processor, check = merge_vision_adapter(source.path, source.base_dir)
        checks = {"merge": {**check.as_dict(), "precision": "float32", "prompts": "an image and text through the "
                            f"processor; base {source.base_dir} loaded unquantized (trained on: "
                            f"{source.trained_quantization})"}}
        config = _config(source.base_dir)
    else:
        model, processor = load_vision_base_fp32(source.path), load_processor(source.path)
        checks = {"merge": "none: a fully fine-tuned model is exported as it is"}
        config = _config(source.path)
    _keep_eos(model, processor.tokenizer)
    save_merged_vision(model, processor, model_dir, dtype=getattr(torch, _saved_dtype(dtype, config)))
    return checks


def _verify_gguf(model_dir: Path, gguf_path: Path, gguf_type: str) -> dict:
    """Load the GGUF file back with transformers; its logits must match the source's, its tokenizer must encode the
    check prompts to the same ids and carry the same chat template and EOS token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.export.merge import check_prompts, compare_logits, prompt_logits

    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    prompts = check_prompts(tokenizer)
    check = compare_logits(prompt_logits(source, prompts), prompt_logits(loaded, prompts),
                           relative=GGUF_TOLERANCE[gguf_type])
    problems = []
    if not check.max_abs_diff <= check.tolerance:
        problems.append(f"logits differ by {check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g})")
    for ids in prompts:
        text = tokenizer.decode(ids[0])
        if loaded_tokenizer(text, add_special_tokens=False)["input_ids"] != tokenizer(text, add_special_tokens=False)["input_ids"]:
            problems.append(f"the GGUF tokenizer encodes {text[:40]!r} differently")
            break
    if loaded_tokenizer.chat_template != tokenizer.chat_template:
        problems.append("the GGUF file's chat template differs from the model's")
    if loaded_tokenizer.eos_token != tokenizer.eos_token:
        problems.append(f"the GGUF EOS token is {loaded_tokenizer.eos_token!r}, the model's {tokenizer.eos_token!r}")
    if problems:
        raise ExportError(f"the GGUF file {gguf_path.name} does not reproduce the model: " + "; ".join(problems))
    return {**check.as_dict(), "relative_tolerance": GGUF_TOLERANCE[gguf_type], "loaded_with": "transformers",
            "tokenizer": "same ids on every check prompt, same chat template and EOS token"}


def _keep_eos(model, tokenizer) -> None:
    """Generation stops at the tokenizer's EOS (the end-of-turn token the job trained the model to emit)."""
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        model.generation_config.eos_token_id = ids + [tokenizer.eos_token_id] if ids else tokenizer.eos_token_id
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _write_chat_template(staging: Path, tokenizer, out: Path) -> str | None:
    if not tokenizer.chat_template:
        return None
    (staging / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")
    return str(out / CHAT_TEMPLATE_FILE)


def _config(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return config.get("text_config", config) if "num_attention_heads" not in config else config


def _saved_dtype(dtype: str, config: dict) -> str:
    if dtype != "auto":
        return dtype
    stored = config.get("dtype") or config.get("torch_dtype")
    return stored if stored in ("float32", "bfloat16", "float16") else "float32"


def _flag(dtype: str) -> str | None:
    """--dtype for the server commands: only when one was asked for (the servers' auto reads the checkpoint)."""
    return None if dtype == "auto" else dtype


def _served_bytes(dtype: str) -> int:
    """Bytes per weight as served: vLLM's and SGLang's --dtype auto serve float32 checkpoints in 16 bits."""
    return 4 if dtype == "float32" else 2


def _parameters(model_dir: Path) -> int:
    """Parameters stored in the directory's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="numpy") as handle:
            for name in handle.keys():
                count = 1
                for size in handle.get_slice(name).get_shape():
                    count *= size
                total += count
    return total

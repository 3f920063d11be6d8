"""Serving descriptors: how to serve an export, written beside it (serve.json, README.md, ray_serve.yaml,
Modelfile). Nothing here runs a server; the commands are what a user copies.

Tensor-parallel size: the smallest power of two (up to 8, one node) for which the served weights take at most
WEIGHT_SHARE of one GPU's memory (vLLM's default --gpu-memory-utilization is 0.9, and the KV cache, activations
and CUDA graphs need the rest) and that divides the attention heads (vLLM and SGLang shard by head). Past 8 GPUs
the descriptor adds pipeline parallelism across nodes.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.planner.hardware import GPUS

WEIGHT_SHARE = 0.5
SERVE_FILE = "serve.json"


@dataclass
class Parallelism:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    gpu: str
    weight_bytes: int
    why: str


def parallelism(weight_bytes: int, *, num_heads: int, gpu: str) -> Parallelism:
    memory = GPUS[gpu].memory_bytes
    per_gpu = WEIGHT_SHARE * memory
    needed = weight_bytes / per_gpu
    for tp in (1, 2, 4, 8):
        if tp >= needed and num_heads % tp == 0:
            return Parallelism(tp, 1, gpu, weight_bytes, f"{weight_bytes / 2**30:.2f} GiB of weights over {tp} x {gpu} "
                               f"({memory / 2**30:.0f} GiB each, weights kept under {WEIGHT_SHARE:.0%})")
    tp = max(t for t in (1, 2, 4, 8) if num_heads % t == 0)
    pp = max(2, math.ceil(needed / tp))
    return Parallelism(tp, pp, gpu, weight_bytes, f"{weight_bytes / 2**30:.2f} GiB of weights need more than 8 x {gpu}: "
                       f"{tp} per node x {pp} nodes (pipeline parallel)")


@dataclass
class ServeDescriptor:
    """What serve.json holds."""

    format: str  # adapter, merged, gguf
    target: str
    name: str
    model_path: str  # the base (adapter exports), the merged model directory, or the GGUF file
    adapter_path: str | None = None
    max_lora_rank: int | None = None
    dtype: str | None = None
    parallel: Parallelism | None = None
    chat_template_path: str | None = None
    eos_token: str | None = None
    checks: dict = field(default_factory=dict)
    fallback_from: list[str] | None = None  # the adapter rules that failed when a merged export replaced it

    @property
    def base_name(self) -> str:
        """The model name the server answers to without an adapter: the export's name for a merged model, the
        base directory's name for an adapter export (the adapter answers to `name`)."""
        return Path(self.model_path).name if self.adapter_path else self.name

    def commands(self) -> dict[str, list[str]]:
        p = self.parallel
        tp = p.tensor_parallel_size if p else 1
        pp = p.pipeline_parallel_size if p else 1
        if self.format == "gguf":
            return {
                "llama.cpp": ["llama-server", "-m", self.model_path, "--jinja", "--alias", self.name, "--port", "8080"],
                "ollama": ["ollama", "create", self.name, "-f", "Modelfile"],
            }
        vllm = ["vllm", "serve", self.model_path, "--served-model-name", self.base_name]
        sglang = ["python", "-m", "sglang.launch_server", "--model-path", self.model_path]
        tgi = ["text-generation-launcher", "--model-id", self.model_path, "--num-shard", str(tp * pp)]
        if self.adapter_path:
            vllm += ["--enable-lora", "--lora-modules", f"{self.name}={self.adapter_path}",
                     "--max-lora-rank", str(self.max_lora_rank)]
            sglang += ["--enable-lora", "--lora-paths", f"{self.name}={self.adapter_path}",
                       "--max-lora-rank", str(self.max_lora_rank)]
            tgi += ["--lora-adapters", f"{self.name}={self.adapter_path}"]
        else:
            sglang += ["--served-model-name", self.base_name]
        vllm += ["--tensor-parallel-size", str(tp)]
        sglang += ["--tp-size", str(tp)]
        if pp > 1:
            vllm += ["--pipeline-parallel-size", str(pp)]
            sglang += ["--pp-size", str(pp)]
        if self.dtype:
            vllm += ["--dtype", self.dtype]
            sglang += ["--dtype", self.dtype]
        if self.chat_template_path:
            vllm += ["--chat-template", self.chat_template_path]
            sglang += ["--chat-template", self.chat_template_path]
        vllm += ["--generation-config", "auto"]  # the export's generation_config.json: its EOS tokens stop generation
        return {"vllm": vllm, "sglang": sglang, "tgi": tgi}

    def as_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "parallel"}
        if self.parallel:
            data["parallel"] = self.parallel.__dict__
        data["commands"] = {k: shlex.join(v) for k, v in self.commands().items()}
        data["argv"] = self.commands()
        return data


def ray_serve_config(d: ServeDescriptor) -> str:
    """A Ray Serve LLM application (ray.serve.llm.build_openai_app) serving the export with vLLM."""
    tp = d.parallel.tensor_parallel_size if d.parallel else 1
    pp = d.parallel.pipeline_parallel_size if d.parallel else 1
    lines = [
        "# Ray Serve LLM config written by tuneforge export: serve run ray_serve.yaml",
        "applications:",
        f"- name: {d.name}",
        "  route_prefix: /",
        "  import_path: ray.serve.llm:build_openai_app",
        "  args:",
        "    llm_configs:",
        "    - model_loading_config:",
        f"        model_id: {json.dumps(d.base_name)}",
        f"        model_source: {json.dumps(d.model_path)}",
        "      engine_kwargs:",
        f"        tensor_parallel_size: {tp}",
        f"        pipeline_parallel_size: {pp}",
    ]
    if d.dtype:
        lines.append(f"        dtype: {d.dtype}")
    if d.adapter_path:
        lines += [
            f"        max_lora_rank: {d.max_lora_rank}",
            "      lora_config:",
            "        # every subdirectory is an adapter: request model '<model_id>:<adapter directory name>'",
            f"        dynamic_lora_loading_path: {json.dumps(str(Path(d.adapter_path).parent))}",
            "        max_num_adapters_per_replica: 16",
        ]
    lines += ["      deployment_config:", "        autoscaling_config:", "          min_replicas: 1",
              "          max_replicas: 1"]
    return "\n".join(lines) + "\n"


def ollama_modelfile(d: ServeDescriptor, gguf_file: str, chat_template: str | None) -> str:
    """An Ollama Modelfile for a GGUF export. Ollama's templates are Go templates, not Jinja: a ChatML template
    (`<|im_start|>role ... <|im_end|>`) is written out; any other template stays in the GGUF's
    tokenizer.chat_template metadata, which Ollama reads and maps itself."""
    lines = [f"# Ollama Modelfile written by tuneforge export: ollama create {d.name} -f Modelfile", f"FROM ./{gguf_file}"]
    if chat_template and "<|im_start|>" in chat_template:
        lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
                  '{{ .Content }}<|im_end|>',
                  '{{ end }}<|im_start|>assistant', '"""']
    if d.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(d.eos_token)}")
    return "\n".join(lines) + "\n"


def readme(d: ServeDescriptor) -> str:
    commands = d.as_dict()["commands"]
    what = {"adapter": f"a LoRA adapter ({d.adapter_path}) on the base model {d.model_path}",
            "merged": f"the model with its adapter merged in ({d.model_path})",
            "gguf": f"a GGUF file ({d.model_path})"}[d.format]
    lines = [f"# {d.name}: serving", "", f"This export is {what}, laid out for {d.target}.", ""]
    if d.fallback_from:
        lines += ["It is a merged model because the adapter breaks these rules of the target server:", ""]
        lines += [f"- {reason}" for reason in d.fallback_from] + [""]
    if d.parallel:
        lines += [f"Parallelism: {d.parallel.why}.", ""]
    for server, command in commands.items():
        lines += [f"## {server}", "", "```bash", command, "```", ""]
    if d.format != "gguf":
        lines += ["## Ray Serve", "", "```bash", "serve run ray_serve.yaml", "```", ""]
        query_model = d.name
        lines += ["## Query it", "", "```python", "from openai import OpenAI",
                  'client = OpenAI(base_url="http://localhost:8000/v1", api_key="none")',
                  f'client.chat.completions.create(model="{query_model}", messages=[{{"role": "user", "content": "Hi"}}])',
                  "```", ""]
    if d.checks:
        lines += ["## Checks made before writing", "", "```json", json.dumps(d.checks, indent=2), "```", ""]
    return "\n".join(lines)


def write_descriptors(directory: Path, d: ServeDescriptor, *, gguf_file: str | None = None,
                      chat_template: str | None = None) -> None:
    (directory / SERVE_FILE).write_text(json.dumps(d.as_dict(), indent=2) + "\n", encoding="utf-8")
    (directory / "README.md").write_text(readme(d), encoding="utf-8")
    if d.format == "gguf":
        (directory / "Modelfile").write_text(ollama_modelfile(d, gguf_file, chat_template), encoding="utf-8")
    else:
        (directory / "ray_serve.yaml").write_text(ray_serve_config(d), encoding="utf-8")

"""Peak host memory per rank while 2 processes load a base model: the whole-model path vs sharded loading.

    .venv/bin/python bench/load_memory.py [--models smollm2-135m-instruct,wide] [--strategies fsdp,deepspeed]
        [--wide-layers 20]

For each model and strategy, `torchrun --nproc-per-node=2` (gloo, CPU) runs this file as a worker twice:
once with `resources.model_loading: whole` (every rank loads the whole model with transformers, then
shards it) and once with the default sharded load (engine/sharded_loading.py). Each worker reads its
peak resident set (VmHWM) after its imports and the process group, and again once the model is
sharded with its LoRA adapter in place; the difference is what loading cost that rank ("built": after
the model and its adapter exist, which under ZeRO-3's sharded load includes filling the partitions;
"sharded": after `prepare`, where FSDP fills its shards and DeepSpeed's engine starts, which itself
copies each rank's partitions into flat buffers, on both paths). `wide` is a
Llama-shaped model of about 1.1B parameters (bf16, 2.2 GB) with random weights, written as sharded
safetensors (2 files) by this bench without ever holding the whole model; smollm2-135m-instruct is the
bundled model. Weights are kept in bf16 (the adapter's compute dtype) on both paths. Memory figures
are meaningful on a busy machine; the seconds printed are not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SHARD_BYTES = 1 << 30  # the wide model's safetensors files are at most this large, as save_pretrained shards


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


# ---- the wide model ----------------------------------------------------------------------------------


def build_wide_model(directory: Path, *, layers: int) -> Path:
    """A Llama of ~1.1B parameters (22 layers of hidden 2048) with random bf16 weights, written file by
    file: the tensors of one shard at a time exist in memory, never the model."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True, dtype="bfloat16")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    skeleton.tie_weights()  # skipped on empty weights: tied, the embeddings are saved once, as save_pretrained does
    shapes = {name: p.shape for name, p in skeleton.named_parameters()}
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    groups, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = {}, 0
        current[name], size = shape, size + nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for index, group in enumerate(groups, 1):
        filename = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.ones(shape) if name.endswith("norm.weight") else
                          torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in group.items()}
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(group, filename))
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))
    return directory


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


# ---- one rank's load (run under torchrun) --------------------------------------------------------------


def worker(model_dir: str, strategy: str, loading: str, out: str) -> None:
    import torch

    from tuneforge.engine.adapters import trainable_model
    from tuneforge.engine.distributed import init_distributed, prepare
    from tuneforge.engine.loss import CausalLMLoss
    from tuneforge.engine.model_loading import load_base_model
    from tuneforge.engine.precision import resolve_precision
    from tuneforge.engine.sharded_loading import load_sharded_base, loads_sharded
    from tuneforge.spec import validate_job_spec

    import importlib

    # The libraries are loaded before the baseline, so what loading adds is weights and buffers.
    for library in ("peft", "transformers.models.llama.modeling_llama", *(("deepspeed",) if strategy == "deepspeed" else ())):
        importlib.import_module(library)
    parallel = init_distributed(1800)
    resources = {"num_gpus": 2, "strategy": strategy, "model_loading": loading, "gpu_type": "cpu"}
    spec = validate_job_spec({
        "model": {"base_model": model_dir}, "dataset": {"path": str(REPO / "examples" / "json-extraction" / "train.jsonl")},
        "training": {"batch_size": 2, "per_device_batch_size": 1, "gradient_accumulation_steps": 1, "precision": "bf16",
                     "learning_rate": 1e-4},
        "resources": resources})
    precision = resolve_precision("bf16", torch.device("cpu"))
    parallel.barrier()
    before, started = _peak_rss(), time.perf_counter()
    sharded = loads_sharded(spec, strategy=strategy, world_size=parallel.world_size)
    assert sharded == (loading == "auto"), (sharded, loading)
    if sharded:
        model = load_sharded_base(model_dir, spec, precision, strategy=strategy, full_finetune=False)
    else:
        model = load_base_model(model_dir, spec.model, precision, full_finetune=False)
    model = trainable_model(model, spec)
    loaded = _peak_rss()  # ZeRO-3's sharded load is done here; FSDP's fills its shards inside prepare()
    # prepare() shards the loss module (FSDP2, or DeepSpeed's engine) and builds the optimizer, as a recipe does.
    prepared = prepare(CausalLMLoss(model), model, spec=spec, strategy=strategy, parallel=parallel, precision=precision,
                       total_steps=1, weights_dir=model_dir if sharded else None)
    seconds = time.perf_counter() - started
    held = prepared.rank_memory()
    record = {"rank": parallel.rank, "before": before, "loaded": loaded, "peak": _peak_rss(), "seconds": seconds,
              "parameter_bytes": held["parameter_bytes"]}
    Path(f"{out}.{parallel.rank}").write_text(json.dumps(record))
    parallel.barrier()


def run_case(model_dir: Path, strategy: str, loading: str, root: Path) -> list[dict]:
    out = root / f"{model_dir.name}-{strategy}-{loading}"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
                           "--worker", str(model_dir), strategy, loading, str(out)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{model_dir.name} {strategy} {loading} failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m-instruct,wide")
    parser.add_argument("--strategies", default="fsdp,deepspeed", help="deepspeed runs ZeRO-3")
    parser.add_argument("--wide-layers", type=int, default=22, help="decoder layers of the wide model (22: ~1.1B)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from tuneforge.engine.base_models import resolve_base_model

    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        root = Path(tmp)
        for name in args.models.split(","):
            model_dir = build_wide_model(root / "wide", layers=args.wide_layers) if name == "wide" else \
                resolve_base_model(name)
            size = model_bytes(model_dir)
            print(f"{name}: {size / MiB:,.0f} MiB of safetensors weights, 2 ranks (half: {size / 2 / MiB:,.0f} MiB)",
                  flush=True)
            for strategy in args.strategies.split(","):
                for loading, label in (("whole", "whole model"), ("auto", "sharded")):
                    ranks = run_case(model_dir, strategy, loading, root)
                    cells = "  ".join(f"rank {r['rank']}: +{(r['loaded'] - r['before']) / MiB:6,.0f} MiB built, "
                                      f"+{(r['peak'] - r['before']) / MiB:6,.0f} MiB sharded (peak {r['peak'] / MiB:6,.0f}), "
                                      f"holds {r['parameter_bytes'] / MiB:6,.0f} MiB" for r in ranks)
                    print(f"  {strategy:<9} {label:<12} {cells}   {max(r['seconds'] for r in ranks):5.0f} s", flush=True)


if __name__ == "__main__":
    main()

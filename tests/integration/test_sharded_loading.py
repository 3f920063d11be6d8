"""Sharded loading for real: 2 processes under torchrun (gloo), each building the tiny model without its
weights and reading only its shard, must train exactly like the whole-model load it replaced (the
same per-step losses, the same adapter), under FSDP2 and under ZeRO-3; and a rank's parameters right
after loading hold only its shard of the checkpoint's values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO
from tuneforge.engine.events import read_events
from test_distributed import assert_same_curve, assert_same_weights, job_with, losses, run


def _train(tmp_path: Path, model_dir: Path, home: Path, name: str, resources: dict, **extra) -> Path:
    job_dir = job_with(tmp_path, model_dir, name, processes=2, strategy=resources["strategy"], resources=resources,
                       **extra)
    assert run(job_dir, home).status == "succeeded"
    return job_dir


# ZeRO-3 is opt-in (-m slow): the default run already trains it sharded against one process
# (test_distributed.py::test_deepspeed_zero_trains_like_one_process_and_consolidates_the_adapter).
@pytest.mark.parametrize("resources", [pytest.param({"strategy": "fsdp"}, id="fsdp"),
                                       pytest.param({"strategy": "deepspeed", "deepspeed_stage": 3}, id="zero3",
                                                    marks=pytest.mark.slow)])
def test_sharded_loading_trains_like_the_whole_model_load(resources, tmp_path, tiny_model_dir, tuneforge_home):
    if resources["strategy"] == "deepspeed":
        pytest.importorskip("deepspeed")
    sharded = _train(tmp_path, tiny_model_dir, tuneforge_home, "sharded", resources)
    whole = _train(tmp_path, tiny_model_dir, tuneforge_home, "whole", {**resources, "model_loading": "whole"})
    assert_same_curve(losses(sharded), losses(whole))
    assert_same_weights(load_file(sharded / "adapter" / "adapter_model.safetensors"),
                        load_file(whole / "adapter" / "adapter_model.safetensors"))
    # The base model was scored (before training) the same way on both paths.
    base = [[e["data"]["metrics"] for e in read_events(d) if e["data"].get("kind") == "eval"
             and e["data"].get("model") == "base"] for d in (sharded, whole)]
    assert base[0] and base[0][0]["loss"] == pytest.approx(base[1][0]["loss"], abs=1e-5)


@pytest.mark.slow
def test_fsdp_full_fine_tuning_loads_sharded_like_whole(tmp_path, tiny_model_dir, tuneforge_home):
    full = {"adapter": {"type": "full"}, "training": {"learning_rate": 1e-4}}
    sharded = _train(tmp_path, tiny_model_dir, tuneforge_home, "sharded", {"strategy": "fsdp"}, **full)
    whole = _train(tmp_path, tiny_model_dir, tuneforge_home, "whole", {"strategy": "fsdp", "model_loading": "whole"},
                   **full)
    assert_same_curve(losses(sharded), losses(whole))


SHARD_CHECK = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from safetensors.torch import load_file
    from tuneforge.engine.distributed import init_distributed, wrap
    from tuneforge.engine.loss import CausalLMLoss
    from tuneforge.engine.precision import resolve_precision
    from tuneforge.engine.sharded_loading import load_sharded_base
    from tuneforge.spec import validate_job_spec

    model_dir = sys.argv[1]
    parallel = init_distributed(60)
    spec = validate_job_spec({"model": {"base_model": model_dir}, "dataset": {"path": "x.jsonl"},
                              "adapter": {"type": "full"}, "resources": {"num_gpus": 2, "strategy": "fsdp"}})
    precision = resolve_precision("fp32", torch.device("cpu"))
    model = load_sharded_base(model_dir, spec, precision, strategy="fsdp", full_finetune=True)
    root = wrap(CausalLMLoss(model), strategy="fsdp", sharding="full_shard", cpu_offload=False, precision=precision,
                parallel=parallel, weights_dir=model_dir)
    saved = load_file(model_dir + "/model.safetensors")
    for name, param in root.named_parameters():
        local, full = param.to_local(), saved[name.removeprefix("model.")]
        rows = -(-full.shape[0] // 2)
        assert local.shape[0] < full.shape[0] and torch.equal(local, full[parallel.rank * rows:][:local.shape[0]]), name
    print("rank", parallel.rank, "holds its shard of", len(saved), "tensors")
    dist.destroy_process_group()
""")


def _torchrun(tmp_path: Path, source: str, model_dir: Path) -> str:
    script = tmp_path / "check.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(model_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_each_rank_holds_only_its_shard_of_the_checkpoint(tmp_path, tiny_model_dir):
    stdout = _torchrun(tmp_path, SHARD_CHECK, tiny_model_dir)
    assert stdout.count("holds its shard") == 2, json.dumps(stdout[-500:])


# DeepSpeed's own layout (partition_parameters.py): the flattened parameter, zero-padded to a multiple of
# the group, cut in equal pieces; rank r holds piece r in param.ds_tensor (and, under hpZ, its piece of
# the node group's copy in ds_secondary_tensor). The second model is built with hpZ.
ZERO3_CHECK = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from safetensors.torch import load_file
    from tuneforge.engine.distributed import init_distributed
    from tuneforge.engine.precision import resolve_precision
    from tuneforge.engine.sharded_loading import load_sharded_base
    from tuneforge.spec import validate_job_spec

    model_dir = sys.argv[1]
    parallel = init_distributed(60)
    precision = resolve_precision("fp32", torch.device("cpu"))
    saved = load_file(model_dir + "/model.safetensors")

    def piece(full, size, rank):
        flat = full.reshape(-1)
        return torch.nn.functional.pad(flat, (0, 2 * size - flat.numel()))[rank * size:(rank + 1) * size]

    for hpz in (1, 2):
        zero = {"stage": 3, **({"zero_hpz_partition_size": hpz} if hpz > 1 else {})}
        spec = validate_job_spec({"model": {"base_model": model_dir}, "dataset": {"path": "x.jsonl"},
                                  "adapter": {"type": "full"},
                                  "resources": {"num_gpus": 2, "strategy": "deepspeed",
                                                "deepspeed_config": {"zero_optimization": zero}}})
        model = load_sharded_base(model_dir, spec, precision, strategy="deepspeed", full_finetune=True)
        names = dict(model.named_parameters())
        assert names, "no parameters"
        padded = 0
        for name, param in names.items():
            full = saved[name] if name in saved else saved["model.embed_tokens.weight"]  # the tied LM head
            assert param.ds_numel == full.numel() and param.ds_tensor.numel() == -(-full.numel() // 2), name
            assert torch.equal(param.ds_tensor, piece(full, param.ds_tensor.numel(), parallel.rank)), name
            if hpz > 1:
                secondary = param.ds_secondary_tensor
                assert torch.equal(secondary, piece(full, secondary.numel(), parallel.rank)), name
            padded += full.numel() % 2
        assert padded > 0, "no parameter of the model needs padding"
        print("rank", parallel.rank, "hpz", hpz, "holds its partitions of", len(names), "parameters")
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def odd_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose tensors have odd sizes, so ZeRO-3 pads partitions and cuts rows in the middle."""
    from tuneforge.engine.tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("odd-llama") / "model", hidden_size=63, num_heads=3,
                                num_kv_heads=1, head_dim=16, intermediate_size=127)


def test_each_zero3_rank_fills_exactly_its_deepspeed_partitions(tmp_path, odd_model_dir):
    pytest.importorskip("deepspeed")
    stdout = _torchrun(tmp_path, ZERO3_CHECK, odd_model_dir)
    assert stdout.count("holds its partitions") == 4, json.dumps(stdout[-500:])

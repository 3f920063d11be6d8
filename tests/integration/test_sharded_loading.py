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
    model = load_sharded_base(model_dir, spec, precision, strategy="fsdp", rank=parallel.rank, full_finetune=True)
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


def test_each_rank_holds_only_its_shard_of_the_checkpoint(tmp_path, tiny_model_dir):
    script = tmp_path / "shard_check.py"
    script.write_text(SHARD_CHECK)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(tiny_model_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("holds its shard") == 2, json.dumps(result.stdout[-500:])

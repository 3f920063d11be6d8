"""Continuing a registered adapter: the runtime merges the adapter (and the adapter it was trained on, down
its lineage) into the base in full precision, and the merged model answers like base + adapters; a spec
that names a plain model directory passes unchanged. The runtime also records the library versions."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")

from conftest import random_lora_adapter  # noqa: E402 - after the skip: it needs torch


class OneProcess:
    is_main = True

    def barrier(self) -> None:
        pass


def test_an_adapter_chain_is_merged_into_its_base_and_answers_like_the_adapters(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.runtime.job import continue_from_adapter, record_environment
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import BASE_OF_ADAPTER, ENVIRONMENT_FILE, MERGED_BASE_DIR

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    first = tmp_path / "v1"
    random_lora_adapter(tiny_model_dir, first, seed=1)
    (first / BASE_OF_ADAPTER).write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    merged_first = random_lora_adapter(tiny_model_dir, tmp_path / "unused", seed=1).merge_and_unload()
    second = tmp_path / "v2"
    random_lora_adapter(tiny_model_dir, second, seed=2)  # trained "on v1": same shapes, applied on top of it
    (second / BASE_OF_ADAPTER).write_text(json.dumps({"base_model": str(first)}))

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    spec = validate_job_spec({"model": {"base_model": str(second)}, "dataset": {"path": "data.jsonl"}})
    resolved = continue_from_adapter(spec, job_dir, OneProcess())
    assert resolved.model.base_model == str(job_dir / MERGED_BASE_DIR)

    from peft import PeftModel

    expected = PeftModel.from_pretrained(merged_first, second).eval()
    merged = AutoModelForCausalLM.from_pretrained(job_dir / MERGED_BASE_DIR, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        want, got, plain = expected(tokens).logits, merged(tokens).logits, base(tokens).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-2  # the adapters changed the model

    plain_spec = validate_job_spec({"model": {"base_model": str(tiny_model_dir)}, "dataset": {"path": "data.jsonl"}})
    assert continue_from_adapter(plain_spec, job_dir, OneProcess()).model.base_model == str(tiny_model_dir)

    record_environment(job_dir)
    versions = json.loads((job_dir / ENVIRONMENT_FILE).read_text())
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"].startswith(torch.__version__[:4])
    assert versions["peft"] and versions["transformers"] and versions["python"]

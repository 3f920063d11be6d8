"""The real check behind the vLLM export rules: vLLM's CPU build serves a tuneforge adapter export with the
command tuneforge generated, and its greedy answers equal the PEFT model's (opt-in: -m slow, and the separate
virtual environment `scripts/vllm-cpu-env` makes, so vLLM's pins never touch the project's .venv).

The adapter is a LoRA on the bundled SmolLM2-135M with random (non-zero) B matrices, so it changes the answers:
the test also checks that the base, served beside it, answers differently, which proves vLLM applied it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "List three colours."]
MAX_TOKENS = 24
STARTUP_S = 900  # the first start compiles and warms up on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_lora(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, weight in peft.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.5)  # changes answers without turning them into noise
    peft.save_pretrained(out)


def peft_answers(base: Path, export: Path) -> dict[str, list[str]]:
    """Greedy answers of the adapter (and of the base with the adapter off), in float32, with the export's template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    template = (export / "chat_template.jinja").read_text()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), export / "adapter")
    answers: dict[str, list[str]] = {"adapter": [], "base": []}
    for prompt in PROMPTS:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        start = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        answers["adapter"].append(tokenizer.decode(out[0, start:], skip_special_tokens=True))
        with model.disable_adapter():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        answers["base"].append(tokenizer.decode(out[0, start:], skip_special_tokens=True))
    return answers


def vllm_command(descriptor: dict, port: int) -> list[str]:
    """The generated `vllm serve MODEL ARGS` as `python -m vllm.entrypoints.openai.api_server --model MODEL ARGS`:
    the CPU build's distribution is named vllm-cpu, so its `vllm` script fails looking up the version of "vllm".
    CPU-only additions: float32 (what the PEFT reference computes in) and a context that fits the KV cache."""
    argv = descriptor["argv"]["vllm"]
    assert argv[:2] == ["vllm", "serve"], argv
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", *argv[2:],
            "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"]


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vLLM exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    pytest.fail(f"vLLM did not answer within {STARTUP_S} s:\n{log.read_text()[-4000:]}")


def test_vllm_cpu_serves_the_adapter_export_and_answers_like_peft(tmp_path):
    if not VLLM_PYTHON.is_file():
        pytest.skip("vLLM's CPU build is not installed: run scripts/vllm-cpu-env first")
    from openai import OpenAI

    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.export import export_model

    base = resolve_base_model("smollm2-135m-instruct")
    random_lora(base, tmp_path / "adapter")
    export = tmp_path / "export"
    export_model(tmp_path / "adapter", format="adapter", target="vllm", out=export, base=base, name="bot")
    descriptor = json.loads((export / "serve.json").read_text())
    assert descriptor["checks"]["server_rules"] == "vllm: all passed"
    expected = peft_answers(base, export)
    assert expected["adapter"] != expected["base"], "the adapter must change some answer for the check to mean anything"

    port, log = free_port(), tmp_path / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    command = vllm_command(descriptor, port)
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(process, url, log)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        argv = descriptor["argv"]["vllm"]
        base_name = argv[argv.index("--served-model-name") + 1]
        served = {m.id for m in client.models.list().data}
        assert {"bot", base_name} <= served, served
        for name, key in (("bot", "adapter"), (base_name, "base")):
            answers = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": p}],
                                                      temperature=0, max_tokens=MAX_TOKENS).choices[0].message.content
                       for p in PROMPTS]
            assert answers == expected[key], (name, answers, expected[key])
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)

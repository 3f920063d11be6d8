"""`tuneforge serve` as a real process on the tiny model, answered through the `openai` client: chat (streamed
too) and completions, two adapters hot-swapped on one base, each answer equal to the same model's greedy
generation in this process."""

import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import free_port
from test_export import ASK, MAX_NEW, stopper_base

openai = pytest.importorskip("openai")


def random_adapter(base, path, seed):
    """A LoRA adapter with non-zero random weights (init_lora_weights=False): its answers differ from the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    base = stopper_base(tmp_path_factory)
    adapters = {"warm": random_adapter(base, root / "warm", 1), "cold": random_adapter(base, root / "cold", 2)}
    port = free_port()
    log = open(root / "serve.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "serve", str(base), "--port", str(port),
         *[f"--adapter={name}={path}" for name, path in adapters.items()]],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError((root / "serve.log").read_text(errors="replace")[-3000:])
            time.sleep(0.3)
    yield client, base, adapters
    process.terminate()
    process.wait(timeout=30)
    log.close()


def reference(base, adapter=None, *, prompt=None, max_new=MAX_NEW):
    """The same model's greedy answer, generated here with transformers (and PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    text = prompt if prompt is not None else tokenizer.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=prompt is not None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new), new[-1] == tokenizer.eos_token_id


def test_models_lists_the_base_and_every_adapter(served):
    client, base, _ = served
    assert [m.id for m in client.models.list().data] == [base.name, "warm", "cold"]


def test_chat_answers_with_the_chat_template_and_stops_at_eos(served):
    client, base, adapters = served
    answers = {}
    for model, adapter in ((base.name, None), ("warm", adapters["warm"]), ("cold", adapters["cold"]), (base.name, None)):
        response = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=MAX_NEW)
        text, tokens, ended = reference(base, adapter)
        assert response.choices[0].message.content == text  # hot-swapped adapters, in any order
        assert response.usage.completion_tokens == tokens
        assert response.choices[0].finish_reason == ("stop" if ended else "length")
        answers.setdefault(model, text)
    assert len(set(answers.values())) == 3
    assert response.choices[0].finish_reason == "stop"  # the base stops at its EOS by itself


def test_streamed_chat_equals_the_whole_answer(served):
    client, base, _ = served
    whole = client.chat.completions.create(model="warm", messages=ASK, temperature=0, max_tokens=MAX_NEW)
    stream = client.chat.completions.create(model="warm", messages=ASK, temperature=0, max_tokens=MAX_NEW, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_stop_strings(served):
    client, base, adapters = served
    prompt = "<|im_start|>user\nSay hi to Zed.<|im_end|>\n<|im_start|>assistant\n"
    response = client.completions.create(model="cold", prompt=prompt, max_tokens=3, temperature=0)
    text, tokens, ended = reference(base, adapters["cold"], prompt=prompt, max_new=3)
    assert response.choices[0].text == text and response.usage.completion_tokens == tokens
    assert response.choices[0].finish_reason == ("stop" if ended else "length")
    full = reference(base)[0]
    # A stop string from the answer itself (not its first character), so the check does not hang on what the tiny
    # base happens to say ("Hi Zed!" with one release of the libraries, "Hi olo." with another).
    stop = next(c for c in full if full.index(c) > 0 and not c.isspace())
    stopped = client.chat.completions.create(model=base.name, messages=ASK, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == full[:full.index(stop)] and stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=base.name, prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reference(base, prompt=prompt)[0]


def test_unknown_models_and_unsupported_parameters_are_refused(served):
    client, _, _ = served
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=ASK)
    with pytest.raises(openai.BadRequestError, match="logprobs: is not supported"):
        client.chat.completions.create(model="warm", messages=ASK, logprobs=True)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model="warm", messages=ASK, n=2)

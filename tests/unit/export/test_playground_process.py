"""The playground process `tuneforge server` starts (export/playground_process.py), in this process: every request
needs the shared secret; adapters load only from under an allowed root (a symbolic link out is refused), hot-add
and unload again; a registry adapter that a later version trained on is merged into its base as training did; a
base that does not generate text (CLIP, LLaVA, a classification head) is refused from its config, with the reason
in the refusal file and exit code 3, before any weights load."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.export.playground_process import (
    EXIT_NOT_SERVABLE,
    SECRET_ENV,
    SECRET_HEADER,
    NotServable,
    check_generates,
    create_process_app,
    load_base,
    main,
)
from tuneforge.spec.jobdir import BASE_OF_ADAPTER

SECRET = "s" * 43
ASK = [{"role": "user", "content": "Say hi to Zed."}]


def lora(base, path, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(path)
    return path


@pytest.fixture
def app(tiny_model_dir, tmp_path):
    from fastapi.testclient import TestClient

    from tuneforge.export.playground import Playground

    model, tokenizer_dir = load_base(str(tiny_model_dir), torch.float32)
    playground = Playground.on_base(model, tokenizer_dir=tokenizer_dir, name="base")
    allowed = tmp_path / "registry"
    allowed.mkdir()
    with TestClient(create_process_app(playground, secret=SECRET, allowed_roots=[allowed])) as client:
        yield client, playground, allowed


def test_every_request_needs_the_secret_and_adapters_come_only_from_allowed_roots(app, tiny_model_dir, tmp_path):
    client, playground, allowed = app
    assert client.get("/v1/models").status_code == 403
    assert client.get("/v1/models", headers={SECRET_HEADER: SECRET[:-1] + "x"}).status_code == 403
    ok = {SECRET_HEADER: SECRET}
    assert [m["id"] for m in client.get("/v1/models", headers=ok).json()["data"]] == ["base"]

    outside = lora(tiny_model_dir, tmp_path / "outside", 1)
    refused = client.put("/tuneforge/adapters/a1", json={"path": str(outside)}, headers=ok)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden_path"
    (allowed / "link").symlink_to(outside)
    assert client.put("/tuneforge/adapters/a1", json={"path": str(allowed / "link")}, headers=ok).status_code == 403
    assert client.put("/tuneforge/adapters/a1", json={"path": str(outside)}).status_code == 403  # no secret

    ask = {"messages": ASK, "temperature": 0, "max_tokens": 24}
    plain = client.post("/v1/chat/completions", json={"model": "base", **ask}, headers=ok).json()
    inside = [lora(tiny_model_dir, allowed / f"a{i}", i) for i in (1, 2)]
    for i, path in enumerate(inside, start=1):
        assert client.put(f"/tuneforge/adapters/a{i}", json={"path": str(path)}, headers=ok).json()["adapters"] == \
            [f"a{n}" for n in range(1, i + 1)]
    answers = [client.post("/v1/chat/completions", json={"model": m, **ask}, headers=ok).json()["choices"][0]["message"]
               ["content"] for m in ("a1", "a2", "base")]
    assert answers[2] == plain["choices"][0]["message"]["content"] and len(set(answers)) == 3
    # Unloading the active adapter, then the last one: the others, and the base, answer as before.
    assert client.delete("/tuneforge/adapters/a2", headers=ok).json()["adapters"] == ["a1"]
    again = client.post("/v1/chat/completions", json={"model": "a1", **ask}, headers=ok).json()
    assert again["choices"][0]["message"]["content"] == answers[0]
    assert client.delete("/tuneforge/adapters/a1", headers=ok).json()["adapters"] == []
    gone = client.post("/v1/chat/completions", json={"model": "a1", **ask}, headers=ok)
    assert gone.status_code == 404
    assert client.post("/v1/chat/completions", json={"model": "base", **ask}, headers=ok).json() \
        ["choices"][0]["message"]["content"] == answers[2]
    assert not hasattr(playground.model, "peft_config")  # back to the plain base model


def test_an_adapter_trained_on_is_merged_into_its_base_down_the_lineage(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = lora(tiny_model_dir, tmp_path / "v1", 1)
    (first / BASE_OF_ADAPTER).write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    merged, tokenizer_dir = load_base(str(first), torch.float32)
    assert tokenizer_dir == first
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          first).eval()
    ids = torch.tensor([[5, 17, 33, 2, 90]])
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, reference(ids).logits, atol=1e-5)
    (tmp_path / "v0").mkdir()
    (tmp_path / "v0" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=BASE_OF_ADAPTER):
        load_base(str(tmp_path / "v0"), torch.float32)


def test_bases_that_do_not_generate_text_are_refused_with_the_reason(tiny_model_dir, tiny_clip_dir, tiny_llava_dir,
                                                                      tmp_path, monkeypatch):
    check_generates(tiny_model_dir)  # a causal language model passes
    with pytest.raises(NotServable, match=r"a clip model \(CLIPModel\), which transformers cannot load as a causal"):
        check_generates(tiny_clip_dir)
    with pytest.raises(NotServable, match="a llava model"):
        check_generates(tiny_llava_dir)
    scorer = tmp_path / "scorer"  # a reward model trained in full: the tiny llama's config with a score head
    scorer.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (scorer / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(NotServable, match=r"classification head \(LlamaForSequenceClassification\)"):
        check_generates(scorer)

    # `tuneforge serve` on it: the same reason as its error (exit 2), not AutoModelForCausalLM's traceback.
    from tuneforge.export.playground import Playground
    from tuneforge.export.source import ExportError

    with pytest.raises(ExportError, match="clip model"):
        Playground(tiny_clip_dir)

    # The process itself: the reason in the refusal file (no path in it), exit code 3, nothing served.
    monkeypatch.setenv(SECRET_ENV, SECRET)
    refusal, port = tmp_path / "refused", tmp_path / "port"
    assert main(["--base", str(tiny_clip_dir), "--name", "base", "--port-file", str(port),
                 "--refusal-file", str(refusal)]) == EXIT_NOT_SERVABLE
    assert "clip model" in refusal.read_text() and str(tiny_clip_dir) not in refusal.read_text() and not port.exists()

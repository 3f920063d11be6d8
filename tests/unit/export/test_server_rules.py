"""Adapter checks against what vLLM / SGLang / TGI load: one adapter per broken rule, built with PEFT on the tiny
model (no training), then the export refused by name, or merged when asked."""

import json

import pytest

from tuneforge.export import ServerRulesError, export_model
from tuneforge.export.server_rules import VLLM_MAX_LORA_RANKS, check_adapter, read_adapter_facts, vllm_max_lora_rank


def make_adapter(tmp_path, base_dir, name="adapter", *, added_token=False, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if added_token:
        tokenizer.add_tokens(["<tool>"])
        model.resize_token_embeddings(model.config.vocab_size + 64)
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora}
    peft_model = get_peft_model(model, LoraConfig(**config))
    path = tmp_path / name
    peft_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def failed_rules(path, base, target="vllm"):
    return {f.rule for f in check_adapter(read_adapter_facts(path, base), target)}


def test_a_plain_lora_adapter_passes_every_server(tmp_path, tiny_model_dir):
    path = make_adapter(tmp_path, tiny_model_dir)
    for target in ("vllm", "sglang", "tgi"):
        assert failed_rules(path, tiny_model_dir, target) == set()


@pytest.mark.parametrize(("lora", "rule"), [
    ({"use_dora": True}, "dora"),
    ({"bias": "lora_only"}, "bias"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 1024}, "rank"),
])
def test_vllm_names_the_rule_an_adapter_breaks(tmp_path, tiny_model_dir, lora, rule):
    path = make_adapter(tmp_path, tiny_model_dir, **lora)
    assert rule in failed_rules(path, tiny_model_dir)


def test_added_tokens_are_refused_by_vllm(tmp_path, tiny_model_dir):
    path = make_adapter(tmp_path, tiny_model_dir, added_token=True, modules_to_save=["embed_tokens", "lm_head"])
    failures = check_adapter(read_adapter_facts(path, tiny_model_dir), "vllm")
    added = next(f for f in failures if f.rule == "added_tokens")
    assert "tokens were added" in added.message and "vocabulary rows" in added.message
    assert "lora_model.py" in added.source
    # Merged, the added token's embedding and the larger vocabulary come along.
    result = export_model(path, format="adapter", target="vllm", out=tmp_path / "merged", fallback="merged")
    config = json.loads((tmp_path / "merged" / "model" / "config.json").read_text())
    assert config["vocab_size"] == 384 and result.descriptor["fallback_from"]


def test_rslora_passes_vllm_but_not_sglang(tmp_path, tiny_model_dir):
    path = make_adapter(tmp_path, tiny_model_dir, use_rslora=True)
    assert failed_rules(path, tiny_model_dir, "vllm") == set()  # PEFTHelper scales by alpha / sqrt(r)
    assert failed_rules(path, tiny_model_dir, "sglang") == {"rslora"}


def test_max_lora_rank_is_the_smallest_vllm_choice_that_holds_the_rank():
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 9, 300, 320, 500, 512, 513)] == [1, 8, 8, 16, 320, 320, 512, 512,
                                                                                     None]


def test_a_refused_adapter_export_writes_nothing_and_falls_back_to_merged_when_asked(tmp_path, tiny_model_dir):
    path = make_adapter(tmp_path, tiny_model_dir, use_dora=True, init_lora_weights=False)
    out = tmp_path / "export"
    with pytest.raises(ServerRulesError) as refused:
        export_model(path, format="adapter", target="vllm", out=out)
    assert "dora:" in str(refused.value) and "--fallback merged" in str(refused.value)
    assert not out.exists() and not list(tmp_path.glob(".export.staging*"))

    result = export_model(path, format="adapter", target="vllm", out=out, fallback="merged")
    assert result.format == "merged" and (out / "model" / "config.json").is_file()
    serve = json.loads((out / "serve.json").read_text())
    assert serve["fallback_from"] and serve["fallback_from"][0].startswith("dora:")
    assert serve["checks"]["merge"]["max_abs_diff"] <= serve["checks"]["merge"]["tolerance"]
    assert serve["checks"]["merge"]["adapter_effect"] > 100 * serve["checks"]["merge"]["tolerance"]  # DoRA changed the logits
    assert "--enable-lora" not in serve["commands"]["vllm"]

"""What each serving engine accepts in a PEFT adapter, checked before an export is written.

Servers find out on the first load (vLLM) or the first request that an adapter uses a feature they do not
implement; these rules say so at export time, by name, with where the rule comes from. Each rule reads only
`adapter_config.json`, the adapter's tensor names and shapes, and the tokenizer sizes, so a check costs
milliseconds and needs no GPU.

Sources (read in vLLM's and SGLang's own code, not their docs):
- vLLM `vllm/lora/peft_helper.py`, `PEFTHelper._validate_features` and `validate_legal`: "vLLM only supports
  modules_to_save being None", "vLLM does not yet support DoRA", "LoRA rank {r} is greater than
  max_lora_rank", and bias: older releases "Adapter bias cannot be used without bias_enabled"
  (`--enable-lora-bias`), current main "Adapter bias is not supported." unconditionally.
- vLLM `vllm/config/lora.py`: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]` is the only
  set `--max-lora-rank` accepts (1 was added after 0.8; older releases checked
  `possible_max_ranks = (8, 16, 32, 64, 128, 256, 320, 512)`), and `lora_extra_vocab_size` is deprecated:
  "Additional vocabulary support for LoRA adapters is being phased out".
- vLLM `vllm/lora/lora_model.py`, `LoRAModel.from_lora_tensors`: an embedding LoRA must match the base
  model's vocabulary size ("The embedding LoRA size ... must be consistent with the base model's vocabulary
  size"), and `vllm/lora/utils.py`, `parse_fine_tuned_lora_name`: any tensor other than lora_A / lora_B /
  lora_embedding_A / lora_embedding_B "is unsupported LoRA weight" (DoRA magnitudes, modules_to_save copies).
- SGLang `python/sglang/srt/lora/lora.py`, `LoRAAdapter.__init__`: `assert peft_type == "lora"` and
  `scaling = lora_alpha / r` (no rsLoRA: an rsLoRA adapter would be served at the wrong scale); it loads only
  lora_A / lora_B weights of the decoder layers. Its `--max-lora-rank` takes any integer.
- TGI: in maintenance mode upstream; its adapter rules were not read from its source. The TGI layout applies
  the vLLM feature rules (no DoRA, modules_to_save, bias or added tokens) as a conservative stand-in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Target = Literal["vllm", "sglang", "tgi", "llama.cpp"]
TARGETS: tuple[str, ...] = ("vllm", "sglang", "tgi", "llama.cpp")

# vllm/config/lora.py MaxLoRARanks: the values --max-lora-rank accepts.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "embed_out")
LORA_TENSOR_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


@dataclass(frozen=True)
class RuleFailure:
    rule: str  # a short name: dora, modules_to_save, bias, added_tokens, rank, rslora, peft_type, tensors
    message: str  # what is wrong with this adapter and what the server does with it
    source: str  # where the server enforces it

    def __str__(self) -> str:
        return f"{self.rule}: {self.message} ({self.source})"


@dataclass(frozen=True)
class AdapterFacts:
    """What the rules look at, read once from an adapter directory."""

    config: dict
    tensors: dict[str, tuple[int, ...]]  # name -> shape
    adapter_vocab: int | None  # tokens of the tokenizer saved with the adapter (None: none saved)
    base_vocab: int  # rows of the base model's embedding (config.vocab_size)
    base_tokenizer_vocab: int | None

    @property
    def rank(self) -> int:
        ranks = [int(self.config.get("r", 0))]
        ranks += [int(v) for v in (self.config.get("rank_pattern") or {}).values()]
        return max(ranks)


def read_adapter_facts(adapter_dir: Path, base_dir: Path) -> AdapterFacts:
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    tensors: dict[str, tuple[int, ...]] = {}
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="numpy") as handle:
            for name in handle.keys():
                tensors[name] = tuple(handle.get_slice(name).get_shape())
    base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    base_vocab = int(base_config.get("vocab_size") or base_config.get("text_config", {}).get("vocab_size"))
    return AdapterFacts(config, tensors, _tokenizer_size(adapter_dir), base_vocab, _tokenizer_size(base_dir))


def _tokenizer_size(directory: Path) -> int | None:
    """len(tokenizer) from tokenizer.json (the vocabulary plus added tokens), without loading transformers."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))  # BPE: a dict; Unigram: a list
    ids |= {token["id"] for token in data.get("added_tokens", [])}
    return max(ids) + 1 if ids else 0


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank choice that holds rank, or None when no choice does."""
    return next((choice for choice in VLLM_MAX_LORA_RANKS if choice >= rank), None)


# ---- the rules -----------------------------------------------------------------------------------

PEFT_HELPER = "vllm/lora/peft_helper.py PEFTHelper.validate_legal"


def _peft_type(facts: AdapterFacts, source: str) -> list[RuleFailure]:
    kind = str(facts.config.get("peft_type", "")).upper()
    if kind != "LORA":
        return [RuleFailure("peft_type", f"peft_type is {kind or 'missing'}; only LORA adapters load", source)]
    return []


def _dora(facts: AdapterFacts, source: str) -> list[RuleFailure]:
    if facts.config.get("use_dora") or any("lora_magnitude_vector" in name for name in facts.tensors):
        return [RuleFailure("dora", "the adapter is DoRA (use_dora: true); the server does not implement DoRA", source)]
    return []


def _modules_to_save(facts: AdapterFacts, source: str) -> list[RuleFailure]:
    modules = facts.config.get("modules_to_save") or []
    if modules:
        return [RuleFailure("modules_to_save", f"modules_to_save is {list(modules)} (whole trained copies of "
                            "those modules); only LoRA A/B weights load", source)]
    return []


def _bias(facts: AdapterFacts, source: str) -> list[RuleFailure]:
    bias = facts.config.get("bias", "none")
    if bias != "none":
        return [RuleFailure("bias", f"bias is {bias!r}; only bias 'none' loads", source)]
    return []


def _added_tokens(facts: AdapterFacts, source: str) -> list[RuleFailure]:
    problems = []
    if facts.adapter_vocab is not None and facts.base_tokenizer_vocab is not None and \
            facts.adapter_vocab > facts.base_tokenizer_vocab:
        problems.append(f"the adapter's tokenizer has {facts.adapter_vocab} tokens, the base's "
                        f"{facts.base_tokenizer_vocab}: tokens were added")
    for name, shape in facts.tensors.items():
        if "lora_embedding_A" in name:
            rows = shape[1]  # (r, vocabulary)
        elif "lm_head" in name and name.endswith("lora_B.weight"):
            rows = shape[0]  # (vocabulary, r)
        elif any(part in name for part in EMBEDDINGS) and not name.endswith(LORA_TENSOR_SUFFIXES) and len(shape) == 2:
            rows = shape[0]  # a whole saved embedding or output layer
        else:
            continue
        if rows != facts.base_vocab:
            problems.append(f"{name} has {rows} vocabulary rows, the base model {facts.base_vocab}")
    if facts.config.get("trainable_token_indices"):
        problems.append("trainable_token_indices is set (trained embeddings of chosen tokens)")
    if problems:
        return [RuleFailure("added_tokens", "; ".join(problems) + "; the server serves the base vocabulary only",
                            source)]
    return []


def _tensors(facts: AdapterFacts, source: str) -> list[RuleFailure]:
    odd = sorted(name for name in facts.tensors if not name.endswith(LORA_TENSOR_SUFFIXES))
    if odd:
        return [RuleFailure("tensors", f"{len(odd)} tensor(s) are not LoRA A/B weights, e.g. {odd[0]}", source)]
    return []


def _vllm_rank(facts: AdapterFacts, source: str) -> list[RuleFailure]:
    if vllm_max_lora_rank(facts.rank) is None:
        return [RuleFailure("rank", f"rank {facts.rank} is above the largest --max-lora-rank choice "
                            f"{VLLM_MAX_LORA_RANKS[-1]} (choices {', '.join(map(str, VLLM_MAX_LORA_RANKS))})", source)]
    return []


def _rslora(facts: AdapterFacts, source: str) -> list[RuleFailure]:
    if facts.config.get("use_rslora"):
        return [RuleFailure("rslora", "the adapter is rsLoRA (scale alpha/sqrt(r)); the server scales by alpha/r, "
                            "so it would apply the update at the wrong strength", source)]
    return []


RULES = {
    "vllm": [
        (_peft_type, "vllm/lora/peft_helper.py PEFTHelper.from_local_dir (a LoRA adapter_config.json)"),
        (_modules_to_save, "vllm/lora/peft_helper.py PEFTHelper._validate_features"),
        (_dora, "vllm/lora/peft_helper.py PEFTHelper._validate_features; vllm/lora/lora_model.py"),
        (_bias, PEFT_HELPER),
        (_added_tokens, "vllm/lora/lora_model.py LoRAModel.from_lora_tensors; vllm/config/lora.py"),
        (_tensors, "vllm/lora/utils.py parse_fine_tuned_lora_name"),
        (_vllm_rank, "vllm/config/lora.py MaxLoRARanks; " + PEFT_HELPER),
    ],
    "sglang": [
        (_peft_type, "sglang/srt/lora/lora.py LoRAAdapter.__init__"),
        (_modules_to_save, "sglang/srt/lora/lora.py (loads lora_A/lora_B weights only)"),
        (_dora, "sglang/srt/lora/lora.py (no DoRA magnitude)"),
        (_bias, "sglang/srt/lora/lora.py (no adapter bias)"),
        (_added_tokens, "sglang/srt/lora/lora.py (base vocabulary)"),
        (_rslora, "sglang/srt/lora/lora.py LoRAAdapter.__init__ scaling = lora_alpha / r"),
    ],
    "tgi": [
        (_peft_type, "TGI layout: vLLM's rules as a conservative stand-in"),
        (_modules_to_save, "TGI layout: vLLM's rules as a conservative stand-in"),
        (_dora, "TGI layout: vLLM's rules as a conservative stand-in"),
        (_bias, "TGI layout: vLLM's rules as a conservative stand-in"),
        (_added_tokens, "TGI layout: vLLM's rules as a conservative stand-in"),
    ],
}


def check_adapter(facts: AdapterFacts, target: str) -> list[RuleFailure]:
    """Every rule of target that the adapter breaks (empty: the server loads it)."""
    if target not in RULES:
        raise ValueError(f"adapter exports go to {', '.join(RULES)}; {target} loads a merged model or a GGUF file")
    failures: list[RuleFailure] = []
    for rule, source in RULES[target]:
        failures.extend(rule(facts, source))
    return failures

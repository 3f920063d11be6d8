"""Model architectures described by their numbers: built-in presets, or a Hugging Face config.json.

The planner needs shapes, not weights: a preset or a config is enough to count parameters exactly,
so planning a 70B job downloads nothing and imports no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from tuneforge.planner.errors import PlannerError
from tuneforge.planner.vision import VisionTower, tiny_llava_tower, vision_from_config

# The projections of a Llama-style decoder layer, in the order they run; LoRA targets are named by these.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclass(frozen=True)
class Linear:
    """One projection of a decoder layer: `copies` > 1 for the experts of a mixture-of-experts layer."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    copies: int = 1

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features * self.copies

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features * self.copies if self.bias else 0)


@dataclass(frozen=True)
class ModelArch:
    """A Llama-family decoder (Llama, Mistral, Mixtral, Qwen2, SmolLM2): what memory and FLOPs depend on."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2 has biases on q, k and v
    num_experts: int = 1  # Mixtral: every expert's weights are resident ...
    experts_per_token: int = 1  # ... but only the top-k run for each token
    vision: VisionTower | None = None  # a vision-language model's encoder and projector (planner/vision.py)

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "num_experts", "experts_per_token"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise PlannerError(f"model {self.name}: {field} must be a positive integer, found {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise PlannerError(
                f"model {self.name}: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise PlannerError(
                f"model {self.name}: num_experts_per_tok ({self.experts_per_token}) exceeds the {self.num_experts} experts"
            )

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_linears(self) -> tuple[Linear, ...]:
        h, e = self.hidden_size, self.num_experts
        return (
            Linear("q_proj", h, self.q_width, self.attention_bias),
            Linear("k_proj", h, self.kv_width, self.attention_bias),
            Linear("v_proj", h, self.kv_width, self.attention_bias),
            Linear("o_proj", self.q_width, h),
            Linear("gate_proj", h, self.intermediate_size, copies=e),
            Linear("up_proj", h, self.intermediate_size, copies=e),
            Linear("down_proj", self.intermediate_size, h, copies=e),
        )

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts if self.num_experts > 1 else 0

    @property
    def layer_linear_params(self) -> int:
        """Parameters of one layer's projections (biases included), the ones 4-bit quantization packs."""
        return sum(linear.params for linear in self.layer_linears())

    @property
    def layer_params(self) -> int:
        norms = 2 * self.hidden_size
        return self.layer_linear_params + self.router_params + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Parameters of a separate output projection; zero when it shares the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        final_norm = self.hidden_size
        vision = self.vision.num_params if self.vision else 0
        return (self.embedding_params + self.lm_head_params + self.num_layers * self.layer_params + final_norm
                + vision)

    @property
    def quantizable_params(self) -> int:
        """Parameters bitsandbytes quantizes: the decoder's Linear layers (not embeddings, norms, lm_head)."""
        return self.num_layers * (self.layer_linear_params + self.router_params)

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply for every token (all experts counted)."""
        return self.quantizable_params + self.vocab_size * self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters used per token: for a mixture of experts only the top-k experts' MLPs count."""
        if self.num_experts == 1:
            return self.num_params
        expert = 3 * self.hidden_size * self.intermediate_size
        idle = (self.num_experts - self.experts_per_token) * expert * self.num_layers
        return self.num_params - idle

    @property
    def active_matmul_params(self) -> int:
        """Parameters multiplied per token: the decoder's projections (top-k experts only) and the LM head.

        The embedding lookup is no matmul, but a tied LM head still multiplies by the embedding matrix.
        """
        attention = sum(linear.params for linear in self.layer_linears()[:4])
        mlp = 3 * self.hidden_size * self.intermediate_size * self.experts_per_token
        return self.num_layers * (attention + mlp + self.router_params) + self.vocab_size * self.hidden_size

    def packed_row_cap(self) -> int:
        """The longest packed row worth building on SDPA / eager (spec/hyperparameters.py:sdpa_row_cap)."""
        from tuneforge.spec.hyperparameters import sdpa_row_cap

        return sdpa_row_cap(self.active_matmul_params, self.hidden_size, self.num_layers)

    def largest_layer_params(self) -> int:
        """The biggest unit an FSDP / ZeRO-3 all-gather materializes: a decoder layer or the embedding."""
        return max(self.layer_params, self.embedding_params)

    def with_name(self, name: str) -> ModelArch:
        return replace(self, name=name)


def _llama(name, vocab, hidden, inter, layers, heads, kv_heads, *, tie=False, head_dim=None, **extra) -> ModelArch:
    return ModelArch(
        name=name, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim or hidden // heads, tie_word_embeddings=tie, **extra,
    )


# The numbers are those of each model's published config.json.
PRESETS: dict[str, ModelArch] = {
    "llama-3-8b": _llama("llama-3-8b", 128256, 4096, 14336, 32, 32, 8),
    "llama-3-70b": _llama("llama-3-70b", 128256, 8192, 28672, 80, 64, 8),
    "mistral-7b": _llama("mistral-7b", 32000, 4096, 14336, 32, 32, 8),
    "mixtral-8x7b": _llama("mixtral-8x7b", 32000, 4096, 14336, 32, 32, 8, num_experts=8, experts_per_token=2),
    "qwen2.5-7b": _llama("qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, attention_bias=True),
    "smollm2-135m": _llama("smollm2-135m", 49152, 576, 1536, 30, 9, 3, tie=True),
    # engine/tiny_model.py: 256 bytes + 3 special tokens, padded to a multiple of 64.
    "tiny-llama": _llama("tiny-llama", 320, 64, 128, 2, 4, 2, tie=True),
    # engine/vision/tiny.py: tiny-llama's decoder (plus the <image> token) behind a 2-layer CLIP tower.
    "tiny-llava": _llama("tiny-llava", 320, 64, 128, 2, 4, 2, tie=True, vision=tiny_llava_tower()),
}
# The names a JobSpec uses for its built-in base models.
PRESET_ALIASES = {"smollm2-135m-instruct": "smollm2-135m"}

# Defaults of transformers' config classes for keys a config.json may leave out.
_UNTIED_BY_DEFAULT = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen2_vl",
                      "qwen2_vl_text"}
_QKV_BIAS = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_vl_text"}


def arch_from_config(config: dict, name: str, processor: dict | None = None) -> ModelArch:
    """A ModelArch from the keys of a Hugging Face config.json of a Llama-style decoder, or of a vision-language
    model around one (its vision tower counted from vision_config and the processor's image sizes)."""
    wrapper = config
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers keep the decoder in text_config
        config = {**config["text_config"], "model_type": config["text_config"].get("model_type", config.get("model_type"))}
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in config]
    if missing:
        raise PlannerError(
            f"{name}: expected a Llama-style decoder config with {', '.join(required)}; missing {', '.join(missing)}"
        )
    model_type = config.get("model_type", "")
    heads = config["num_attention_heads"]
    experts = config.get("num_local_experts") or config.get("num_experts") or 1
    inter = config.get("moe_intermediate_size") if experts > 1 and config.get("moe_intermediate_size") else config["intermediate_size"]
    try:
        return ModelArch(
            name=name,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=inter,
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tie_word_embeddings=config.get("tie_word_embeddings", model_type not in _UNTIED_BY_DEFAULT),
            attention_bias=bool(config.get("attention_bias", model_type in _QKV_BIAS)),
            num_experts=experts,
            experts_per_token=config.get("num_experts_per_tok", 1) if experts > 1 else 1,
            vision=vision_from_config(wrapper, config["hidden_size"], processor),
        )
    except TypeError as exc:
        raise PlannerError(f"{name}: a config value has the wrong type ({exc})") from None


def load_model_arch(model: str) -> ModelArch:
    """A preset name, a JobSpec built-in name, a config.json path, or a local Hugging Face model directory."""
    key = PRESET_ALIASES.get(model, model)
    if key in PRESETS:
        return PRESETS[key] if key == model else PRESETS[key].with_name(model)
    path = Path(model).expanduser()
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        if path.is_dir():
            raise PlannerError(f"model {model!r}: {path} has no config.json, so it is not a Hugging Face model directory")
        raise PlannerError(
            f"model {model!r}: expected a preset ({', '.join(sorted(PRESETS))}), a config.json, "
            "or a local Hugging Face model directory"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlannerError(f"{config_path}: expected a JSON model config ({exc})") from None
    if not isinstance(config, dict):
        raise PlannerError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    return arch_from_config(config, name=str(path.name if path.is_dir() else config_path.parent.name or config_path),
                            processor=_processor_config(config_path.parent) if "vision_config" in config else None)


def _processor_config(directory: Path) -> dict:
    """A VLM's image sizes: processor_config.json (transformers 5) or preprocessor_config.json, when present."""
    for file in ("processor_config.json", "preprocessor_config.json"):
        try:
            loaded = json.loads((directory / file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(loaded, dict):
            return loaded
    return {}


def format_params(count: float) -> str:
    """1234567 -> '1.23M', for tables."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.{max(0, 3 - len(str(int(count // scale))))}f}{unit}"
    return str(int(math.floor(count)))

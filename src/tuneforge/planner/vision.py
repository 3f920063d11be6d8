"""A vision-language model's image side, counted for the planner: the vision tower (a ViT encoder), the projector
into the language model, how many positions an image fills in each, and what they add to memory and FLOPs.

The numbers come from the model's config.json (vision_config, and the processor's sizes where the image's token
count depends on them: Idefics3's tiles, Qwen2-VL's pixel budget) or from the built-in tiny-llava's constants. What
the language model does with the image tokens is already in the decoder's terms: they are positions of its
sequence (dataset.max_seq_length counts them). What is added here is what runs before the decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuneforge.planner.errors import PlannerError

MAX_IMAGES_PER_EXAMPLE = 64  # data/images.py refuses more per example (as OpenAI does)
# What the vision tower's linear layers are called per encoder family, in the order they run.
_CLIP_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class VisionTower:
    """The encoder and projector of a VLM (LLaVA, Idefics3 / SmolVLM, Qwen2-VL), by their shapes."""

    family: str  # llava, idefics3, qwen2_vl
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    embedding_params: int  # patch embedding, position embedding, class token, the tower's own norms
    encoder_positions: int  # positions the encoder runs per image (patches, class token), all tiles counted
    image_tokens: int  # positions one image fills in the language model's sequence
    projector_shapes: tuple[tuple[int, ...], ...]  # the projector's tensors: trained whole when it trains
    projector_input: int  # width of what the projector reads per language-model image token
    fused_qkv: bool = False  # Qwen2-VL's vision blocks have one qkv projection
    attention_span: int = 0  # positions one attention pass sees (one tile for Idefics3); 0: encoder_positions
    quick_gelu: bool = False  # x * sigmoid(1.702 x) keeps its input, the sigmoid and the product (GELU: its input)

    @property
    def span(self) -> int:
        return self.attention_span or self.encoder_positions

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "encoder_positions",
                     "image_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PlannerError(f"vision tower ({self.family}): {name} must be a positive integer, found {value!r}")

    def layer_linears(self) -> tuple[tuple[str, int, int], ...]:
        """(name, in, out) of one encoder layer's projections, all with biases."""
        h, i = self.hidden_size, self.intermediate_size
        attention = (("qkv", h, 3 * h), ("proj", h, h)) if self.fused_qkv else (
            ("q_proj", h, h), ("k_proj", h, h), ("v_proj", h, h), ("out_proj", h, h))
        return attention + (("fc1", h, i), ("fc2", i, h))

    @property
    def layer_params(self) -> int:
        norms = 2 * 2 * self.hidden_size  # two LayerNorms, weight and bias
        return sum(n_in * n_out + n_out for _, n_in, n_out in self.layer_linears()) + norms

    @property
    def tower_params(self) -> int:
        return self.embedding_params + self.num_layers * self.layer_params

    @property
    def projector_params(self) -> int:
        return sum(math.prod(shape) for shape in self.projector_shapes)

    @property
    def num_params(self) -> int:
        return self.tower_params + self.projector_params

    def most_images(self, seq_len: int) -> int:
        """Images one example of seq_len positions can hold: the worst case the planner must fit."""
        return max(1, min(MAX_IMAGES_PER_EXAMPLE, seq_len // self.image_tokens))

    def encoder_positions_for(self, images: int, seq_len: int) -> float:
        """Encoder positions of `images` images, at most what fits seq_len language-model positions (an
        example longer than that is dropped before it trains)."""
        fitting = min(images * self.image_tokens, seq_len)
        return fitting * self.encoder_positions / self.image_tokens

    def lora_linears(self, targets: tuple[str, ...], all_linear: bool) -> list[tuple[str, int, int]]:
        """The encoder layer's projections a LoRA adapter reaches: every one for all-linear, else those named."""
        return [linear for linear in self.layer_linears() if all_linear or linear[0] in targets]


def _layer_norm(width: int) -> int:
    return 2 * width


def _clip_encoder(vision: dict, *, class_token: bool, conv_bias: bool, pre_norm: bool) -> tuple[int, int, int, int]:
    """(hidden, patches per tile, embedding params, channels) of a CLIP / SigLIP vision config."""
    h, patch = vision.get("hidden_size", 768), vision.get("patch_size", 32)
    channels = vision.get("num_channels", 3)
    patches = (vision.get("image_size", 224) // patch) ** 2
    positions = patches + int(class_token)
    embedding = channels * patch * patch * h + (h if conv_bias else 0) + positions * h + (h if class_token else 0)
    embedding += _layer_norm(h) * (2 if pre_norm else 1)  # post_layernorm (and CLIP's pre_layrnorm)
    return h, patches, embedding, channels


def _llava(config: dict, text_hidden: int) -> VisionTower:
    vision = config.get("vision_config") or {}
    h, patches, embedding, _ = _clip_encoder(vision, class_token=True, conv_bias=False, pre_norm=True)
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise PlannerError("llava config: vision_feature_layer as a list of layers is not planned; one layer only")
    full = config.get("vision_feature_select_strategy", "default") == "full"  # keep the class token's feature
    bias = config.get("multimodal_projector_bias", True)
    projector = ((text_hidden, h), (text_hidden,) * bias, (text_hidden, text_hidden), (text_hidden,) * bias)
    return VisionTower("llava", h, vision.get("intermediate_size", 3072), vision.get("num_hidden_layers", 12),
                       vision.get("num_attention_heads", 12), embedding, patches + 1, patches + int(full),
                       tuple(s for s in projector if s), h,
                       quick_gelu=vision.get("hidden_act", "quick_gelu") == "quick_gelu")


def _idefics3(config: dict, text_hidden: int, processor: dict) -> VisionTower:
    vision = config.get("vision_config") or {}
    h, patches, embedding, _ = _clip_encoder(vision, class_token=False, conv_bias=True, pre_norm=False)
    scale = config.get("scale_factor", 2)
    tiles = 1
    images = processor.get("image_processor", processor)
    if images.get("do_image_splitting", True):
        longest = (images.get("size") or {}).get("longest_edge", 4 * 364)
        tile = (images.get("max_image_size") or {}).get("longest_edge", 364)
        tiles += math.ceil(longest / tile) ** 2  # the tiles of the resized image and one global view
    width = h * scale * scale  # the pixel shuffle folds scale x scale patches into one token
    return VisionTower("idefics3", h, vision.get("intermediate_size", 3072), vision.get("num_hidden_layers", 12),
                       vision.get("num_attention_heads", 12), embedding, tiles * patches,
                       tiles * patches // (scale * scale), ((text_hidden, width),), width, attention_span=patches)


def _qwen2_vl(config: dict, text_hidden: int, processor: dict) -> VisionTower:
    vision = config.get("vision_config") or {}
    d, patch = vision.get("embed_dim", 1280), vision.get("patch_size", 14)
    merge, temporal = vision.get("spatial_merge_size", 2), vision.get("temporal_patch_size", 2)
    channels = vision.get("in_channels", 3)
    images = processor.get("image_processor", processor)
    max_pixels = images.get("max_pixels") or (images.get("size") or {}).get("longest_edge") or 12845056
    patches = max(merge * merge, max_pixels // (patch * patch) // (merge * merge) * (merge * merge))
    width = d * merge * merge
    merger = ((d,), (d,), (width, width), (width,), (vision.get("hidden_size", text_hidden), width),
              (vision.get("hidden_size", text_hidden),))  # ln_q, then the two-layer MLP
    embedding = channels * temporal * patch * patch * d
    return VisionTower("qwen2_vl", d, int(d * vision.get("mlp_ratio", 4)), vision.get("depth", 32),
                       vision.get("num_heads", 16), embedding, patches, patches // (merge * merge), merger, width,
                       fused_qkv=True, quick_gelu=vision.get("hidden_act", "quick_gelu") == "quick_gelu")


def vision_from_config(config: dict, text_hidden: int, processor: dict | None = None) -> VisionTower | None:
    """The vision tower of a VLM config.json (None for a text model); `processor` is the model's
    processor_config.json / preprocessor_config.json, where the image's size is."""
    model_type = config.get("model_type")
    if "vision_config" not in config:
        return None
    processor = processor or {}
    if model_type == "llava":
        return _llava(config, text_hidden)
    if model_type in ("idefics3", "smolvlm"):
        return _idefics3(config, text_hidden, processor)
    if model_type == "qwen2_vl":
        return _qwen2_vl(config, text_hidden, processor)
    raise PlannerError(f"model type {model_type}: the planner counts the vision towers of llava, idefics3, smolvlm and "
                       "qwen2_vl models")


# The built-in tiny-llava's numbers: engine/vision/tiny.py builds it with them (the planner sits below the
# engine, so they live here).
IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 patches + the class token: 17 image tokens per image
TINY_TEXT_HIDDEN, TINY_VISION_HIDDEN = 64, 32


def tiny_llava_tower() -> VisionTower:
    """The built-in tiny-llava's tower (engine/vision/tiny.py builds it with these numbers)."""
    vision = {"hidden_size": TINY_VISION_HIDDEN, "intermediate_size": 2 * TINY_VISION_HIDDEN, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}
    return _llava({"vision_config": vision, "vision_feature_layer": -1, "vision_feature_select_strategy": "full"},
                  TINY_TEXT_HIDDEN)


# ---- what the image side adds to one training step -------------------------------------------------------------


def trainable_tensors(tower: VisionTower, setup) -> list[tuple[int, ...]]:
    """Shapes the image side trains: the projector whole (when it trains), the tower's LoRA or every weight."""
    from tuneforge.planner.models import LINEAR_NAMES

    shapes = list(tower.projector_shapes) if setup.projector == "trained" else []
    if setup.vision_tower != "trained":
        return shapes
    if setup.method == "full":
        layer = [s for _, n_in, n_out in tower.layer_linears() for s in ((n_out, n_in), (n_out,))]
        layer += [(tower.hidden_size,)] * 4
        return shapes + layer * tower.num_layers + [(tower.embedding_params,)]
    all_linear = set(setup.lora_targets) == set(LINEAR_NAMES)
    rank = setup.lora_rank
    adapted = [s for _, n_in, n_out in tower.lora_linears(setup.lora_targets, all_linear)
               for s in ((rank, n_in), (n_out, rank))]
    return shapes + adapted * tower.num_layers


def encoder_layer_saved(tower: VisionTower, setup, bytes_per_value: int) -> float:
    """Bytes autograd keeps per encoder position for one layer whose activations need a gradient: both
    LayerNorms' inputs and outputs, q, k, v and the attention output (SDPA), the MLP's hidden activation
    before and after the nonlinearity (and quick_gelu's sigmoid), and each adapted projection's rank-wide LoRA
    intermediate."""
    from tuneforge.planner.models import LINEAR_NAMES

    h, i = tower.hidden_size, tower.intermediate_size
    saved = bytes_per_value * (8 * h + (3 if tower.quick_gelu else 2) * i)
    if setup.attention == "eager":
        saved += tower.num_heads * tower.span * (4 + bytes_per_value)  # softmax per image
    if setup.trains_adapters:
        all_linear = set(setup.lora_targets) == set(LINEAR_NAMES)
        saved += bytes_per_value * setup.lora_rank * len(tower.lora_linears(setup.lora_targets, all_linear))
    return saved


def activations(tower: VisionTower, setup, bytes_per_value: int) -> dict[str, float]:
    """Bytes of one micro-batch's images: the tower's saved tensors (when it trains; a frozen tower runs without
    a graph and holds one layer's working set), and what the projector keeps (its input and hidden layer)."""
    images = setup.micro_batch * setup.images_per_example
    if not images:
        return {}
    positions = tower.encoder_positions_for(setup.images_per_example, setup.seq_len) * setup.micro_batch
    tokens = positions * tower.image_tokens / tower.encoder_positions  # language-model image tokens
    h, i, c = tower.hidden_size, tower.intermediate_size, bytes_per_value
    out: dict[str, float] = {}
    if setup.vision_tower == "trained":
        per_layer = encoder_layer_saved(tower, setup, c)
        kept_layers = 1 if setup.gradient_checkpointing else tower.num_layers
        checkpoints = tower.num_layers * c * h if setup.gradient_checkpointing else 0
        out["vision tower"] = positions * (kept_layers * per_layer + checkpoints)
    else:
        out["vision tower (no graph, one layer at a time)"] = positions * c * (3 * h + 2 * i)
    if setup.projector == "trained" or setup.vision_tower == "trained":
        widest = max(shape[0] for shape in tower.projector_shapes)
        out["projector"] = tokens * c * (tower.projector_input + 2 * widest)
    return out


def flops_per_token(tower: VisionTower, setup) -> float:
    """Model FLOPs of the image side per language-model position (the planner's unit): the encoder and projector
    run on the micro-batch's images, forward only when frozen."""
    if not setup.images_per_example:
        return 0.0
    positions = tower.encoder_positions_for(setup.images_per_example, setup.seq_len)
    matmul = tower.num_layers * sum(n_in * n_out for _, n_in, n_out in tower.layer_linears())
    attention = 4 * tower.num_layers * tower.hidden_size * tower.span
    multiplier = {"frozen": 2}.get(setup.vision_tower, 6 if setup.method == "full" else 4)
    encoder = positions * (multiplier * matmul + (multiplier / 2) * attention)
    projector = positions * tower.image_tokens / tower.encoder_positions * 6 * tower.projector_params
    return (encoder + projector) / setup.seq_len

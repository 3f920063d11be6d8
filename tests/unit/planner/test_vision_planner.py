"""The planner on vision-language models: the vision tower and projector counted (parameters exactly, against the
models transformers builds), the images' activations against what autograd really saves, and the estimate moving
the right way with images, the tower's training and checkpointing; the cost counts image tokens."""

from __future__ import annotations

import pytest

from tuneforge.planner.cost import training_tokens
from tuneforge.planner.memory import estimate_memory
from tuneforge.planner.models import arch_from_config, load_model_arch
from tuneforge.planner.plan import plan_job
from tuneforge.planner.setup import TrainingSetup
from tuneforge.spec.job import JobSpec

CPU = dict(gpu="cpu", precision="fp32", seq_len=256, micro_batch=4, lora_rank=8, lora_dropout=0.0)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("builder", ["build_tiny_llava_dir", "build_tiny_idefics3_dir"])
def test_vlm_parameters_are_counted_exactly_with_the_tower_and_projector(tmp_path, builder):
    from transformers import AutoModelForImageTextToText

    from tuneforge.engine.vision import tiny

    directory = getattr(tiny, builder)(tmp_path / "m")
    model = AutoModelForImageTextToText.from_pretrained(directory)
    arch = load_model_arch(str(directory))
    parts = ("model.vision_tower", "model.multi_modal_projector") if builder == "build_tiny_llava_dir" else (
        "model.vision_model", "model.connector")
    assert arch.num_params == _count(model)
    assert arch.vision.tower_params == _count(model.get_submodule(parts[0]))
    assert arch.vision.projector_params == _count(model.get_submodule(parts[1]))
    if builder == "build_tiny_llava_dir":
        assert load_model_arch("tiny-llava").num_params == _count(model)  # the built-in preset is the same model
        assert arch.vision.image_tokens == 17
    else:
        assert arch.vision.image_tokens == 4  # 16 patches, pixel-shuffled by 2 (processor_config.json: no splitting)


def test_qwen2_vl_tower_merger_and_pixel_budget_are_counted():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=300, video_token_id=301,
                           vision_start_token_id=302, vision_end_token_id=303, tie_word_embeddings=True)
    model = Qwen2VLForConditionalGeneration(config)
    arch = arch_from_config(config.to_dict(), "qwen2-vl", {"image_processor": {"max_pixels": 64 * 64}})
    assert arch.num_params == _count(model)
    assert arch.vision.projector_params == _count(model.model.visual.merger)
    assert arch.attention_bias
    # 64 x 64 pixels: 8 x 8 patches of 8, merged 2 x 2 into 16 language-model tokens.
    assert (arch.vision.encoder_positions, arch.vision.image_tokens) == (64, 16)


def test_the_estimate_grows_with_images_and_with_a_trained_tower():
    llava, llama = load_model_arch("tiny-llava"), load_model_arch("tiny-llama")
    setup = TrainingSetup(**CPU)
    text = estimate_memory(llama, setup)
    no_images = estimate_memory(llava, setup)
    one = estimate_memory(llava, setup.but(images_per_example=1))
    four = estimate_memory(llava, setup.but(images_per_example=4))
    trained = estimate_memory(llava, setup.but(images_per_example=4, vision_tower="trained"))
    frozen_projector = estimate_memory(llava, setup.but(images_per_example=4, projector="frozen"))
    assert no_images.weights > text.weights  # the tower and projector are resident, images or not
    assert one.activations > no_images.activations and four.activations > one.activations
    assert trained.activations > four.activations and trained.trainable_params > four.trainable_params
    tower = llava.vision
    assert four.trainable_params - frozen_projector.trainable_params == tower.projector_params
    lora = sum(8 * (n_in + n_out) for _, n_in, n_out in tower.layer_linears()) * tower.num_layers
    assert trained.trainable_params - four.trainable_params == lora  # all-linear reaches the tower's projections
    checkpointed = estimate_memory(llava, setup.but(images_per_example=4, vision_tower="trained",
                                                     gradient_checkpointing=True))
    assert (checkpointed.detail["image_activations"]["vision tower"]
            < trained.detail["image_activations"]["vision tower"])
    full = estimate_memory(llava, setup.but(method="full", images_per_example=4, vision_tower="trained"))
    assert full.trainable_params == llava.num_params  # every weight of every part


def _saved_bytes(model, batch: dict) -> int:
    """Bytes of the tensors autograd keeps for backward during one loss forward (parameters excluded)."""
    import torch

    from tuneforge.engine.vision.loss import VisionLMLoss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        VisionLMLoss(model)(**batch)
    return sum(saved.values())


@pytest.mark.parametrize("images", [1, 3])
def test_a_trained_towers_planned_activations_match_what_autograd_saves(images):
    """LoRA on a 4-layer, 128-wide CLIP tower at 64 x 64 pixels: what training the tower adds to the step's saved
    tensors (measured with saved_tensors_hooks: trained minus frozen) is the planner's vision-tower term within
    15%."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              image_size=64, patch_size=8)
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=259, vision_feature_layer=-1,
                         vision_feature_select_strategy="full", tie_word_embeddings=True)
    arch = arch_from_config(config.to_dict(), "llava-64")
    per_image, batch_size = arch.vision.image_tokens, 2
    seq = images * per_image + 20
    torch.manual_seed(0)
    ids = torch.randint(3, 250, (batch_size, seq))
    ids[:, : images * per_image] = 259
    labels = ids.clone()
    labels[:, : images * per_image] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(batch_size * images, 3, 64, 64)}

    def measured(tower: str) -> int:
        model = LlavaForConditionalGeneration(config).eval()
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and (n.startswith("model.language_model.") or (tower == "trained" and n.startswith("model.vision_tower.")))]
        model.requires_grad_(False)
        adapted = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=names,
                                                   modules_to_save=["multi_modal_projector"]))
        return _saved_bytes(adapted, batch)

    setup = TrainingSetup(gpu="cpu", precision="fp32", seq_len=seq, micro_batch=batch_size, lora_rank=8,
                          lora_dropout=0.0, images_per_example=images, vision_tower="trained")
    planned = estimate_memory(arch, setup).detail["image_activations"]["vision tower"]
    added = measured("trained") - measured("frozen")
    assert planned == pytest.approx(added, rel=0.15)


def _vlm_spec(**vision) -> JobSpec:
    return JobSpec.model_validate({"method": "vlm", "model": {"base_model": "tiny-llava"},
                                   "dataset": {"path": "chats.jsonl", "max_seq_length": 256},
                                   "resources": {"gpu_type": "cpu"}, "vision": vision})


def test_a_vlm_job_plans_its_images_and_the_parts_that_train():
    frozen = plan_job(_vlm_spec())
    assert frozen.setup.images_per_example == 256 // 17  # as many as fit max_seq_length: the worst case
    assert frozen.setup.vision_tower == "frozen" and frozen.setup.projector == "trained"
    trained = plan_job(_vlm_spec(vision_tower="trained"))
    assert trained.memory.activations > frozen.memory.activations
    one = plan_job(_vlm_spec(), images_per_example=1)
    assert one.memory.activations < frozen.memory.activations
    assert one.throughput.model_flops_per_token < frozen.throughput.model_flops_per_token
    assert plan_job(_vlm_spec()).to_dict()["model"]["architecture"]["vision"]["image_tokens"] == 17


def test_the_cost_counts_each_images_tokens():
    spec = _vlm_spec()
    stats = {"characters": 4000, "turns": 200, "images": 100}
    text_only = training_tokens(spec, examples=100, stats=stats, validation_examples=0)
    with_images = training_tokens(spec, examples=100, stats=stats, validation_examples=0, image_tokens=17)
    # 4000 characters / 4 + 8 template tokens x 2 turns = 26 text tokens per example, plus one image's 17.
    assert with_images.tokens / text_only.tokens == pytest.approx((26 + 17) / 26, rel=1e-3)
    assert "17 tokens per image" in with_images.basis

"""Tiny vision models built from configs, for tests and the smoke jobs: a LLaVA (a 2-layer CLIP vision tower,
its projector and a 2-layer Llama), an Idefics3 (SmolVLM's architecture: a SigLIP-style tower, the pixel-shuffle
connector, a Llama) and a CLIP, each with a byte-level tokenizer and a real processor.

Nothing is downloaded: the weights are seeded random, the tokenizers are the tiny Llama's bytes, and the
processors are transformers' own (LlavaProcessor, Idefics3Processor, CLIPProcessor), so every code path is the
real one.
"""

from __future__ import annotations

from pathlib import Path

# tiny-llava's image size, patch size and widths: the planner counts it from the same numbers.
from tuneforge.planner.vision import IMAGE_SIZE, PATCH_SIZE, TINY_TEXT_HIDDEN, TINY_VISION_HIDDEN

IMAGE_TOKEN = "<image>"
# ChatML whose content may be processor parts: {"type": "image"} renders the processor's image placeholder.
VISION_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _image_processor():
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    return ImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _vision_config(hidden_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                            projection_dim=hidden_size)


def build_tiny_llava_dir(directory: str | Path, *, hidden_size: int = TINY_TEXT_HIDDEN, seed: int = 0) -> Path:
    """A seeded random tiny LLaVA with its LlavaProcessor (CLIP image processor, byte tokenizer + <image>)."""
    import torch
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tuneforge.engine.tiny_model import build_byte_tokenizer

    directory = Path(directory)
    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    config = LlavaConfig(vision_config=_vision_config(TINY_VISION_HIDDEN), text_config=_text_config(tokenizer, hidden_size),
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG (a job builds it mid-run)
        torch.default_generator.manual_seed(seed)  # the CPU generator alone: fork_rng(devices=[]) restores no GPU one
        model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    processor = LlavaProcessor(image_processor=_image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="full", num_additional_image_tokens=1,
                               chat_template=VISION_CHATML_TEMPLATE, image_token=IMAGE_TOKEN)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _text_config(tokenizer, hidden_size: int):
    from transformers import LlamaConfig

    # initializer_range 0.2: with the default 0.02 the frozen, tied LM head of a 64-wide model gives logits of about
    # +-1 after the final norm, and LoRA cannot move the loss below ~4.5 nats (measured). No pad_token_id: it would
    # make the embedding's padding row (shared with EOS here, tied to the head) zero and untrainable, so EOS could
    # never win against the larger logits.
    return LlamaConfig(vocab_size=((len(tokenizer) + 63) // 64) * 64, hidden_size=hidden_size,
                       intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                       initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, rope_theta=10000.0)


def build_tiny_idefics3_dir(directory: str | Path, *, hidden_size: int = 64, seed: int = 0) -> Path:
    """A seeded random tiny Idefics3 (SmolVLM's architecture) with its Idefics3Processor: one 32 x 32 image is
    4 image tokens (16 patches, pixel-shuffled by 2) between its markers; no image splitting."""
    import torch
    from transformers import GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    try:
        from transformers import Idefics3ImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import Idefics3ImageProcessor as ImageProcessor
    from tuneforge.engine.tiny_model import build_byte_tokenizer

    directory = Path(directory)
    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", IMAGE_TOKEN,
                                                                "<global-img>", "<end_of_utterance>"]})
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=_text_config(tokenizer, hidden_size).to_dict(),
                            scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                            tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator alone: fork_rng(devices=[]) restores no GPU one
        model = Idefics3ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    image_processor = ImageProcessor(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                     max_image_size={"longest_edge": IMAGE_SIZE})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(IMAGE_SIZE // PATCH_SIZE) ** 2 // 4,
                                  chat_template=VISION_CHATML_TEMPLATE)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_clip_tokenizer():
    """Bytes, then CLIP's start and end of text (the end has the largest id, as in CLIP), added around each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|startoftext|>", "<|endoftext|>"]
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[(t, vocab[t]) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[1], unk_token=specials[1], model_max_length=64)


def build_tiny_clip_dir(directory: str | Path, *, hidden_size: int = 32, seed: int = 0) -> Path:
    """A seeded random tiny CLIP (2-layer towers) with its CLIPProcessor."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig

    directory = Path(directory)
    tokenizer = build_clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                          projection_dim=hidden_size, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=_vision_config(hidden_size).to_dict(),
                        projection_dim=hidden_size)
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG (a job builds it mid-run)
        torch.default_generator.manual_seed(seed)  # the CPU generator alone: fork_rng(devices=[]) restores no GPU one
        model = CLIPModel(config)
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=_image_processor(), tokenizer=tokenizer).save_pretrained(directory)
    return directory

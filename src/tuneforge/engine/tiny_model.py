"""A tiny Llama with a byte-level tokenizer, built from a config: for tests and the smoke job.

With the 49k-token vocabulary of a real tokenizer even a 2-layer model spends most of a CPU step on the
logits, so the tiny model gets its own tokenizer: the 256 bytes plus ChatML's special tokens. It speaks
the same chat template as SmolLM2, so every code path (templates, masks, EOS) is the real one.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.data.templating import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_byte_tokenizer():
    """A fast byte-level tokenizer: one token per UTF-8 byte, plus the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # as in SmolLM2: pad and EOS share an id
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model_dir(
    directory: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    head_dim: int | None = None,
) -> Path:
    """Write a randomly initialized (seeded) tiny Llama and its tokenizer as a Hugging Face directory.
    head_dim (default hidden_size / num_heads) lets a test give the model odd-sized tensors."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = build_byte_tokenizer()
    vocab_size = ((len(tokenizer) + 63) // 64) * 64  # a multiple of 64, as real models pad their vocabularies
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
        head_dim=head_dim or hidden_size // num_heads,
    )
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG (a job builds it mid-run)
        torch.default_generator.manual_seed(seed)  # the CPU generator alone: fork_rng(devices=[]) restores no GPU one
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory

"""Write a Llama-family Hugging Face model as one GGUF file (F16 or Q8_0) for llama.cpp and Ollama.

Tensor names and the Q/K row order follow llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel`): names through
gguf-py's `TensorNameMap` for MODEL_ARCH.LLAMA, and q_proj / k_proj rows permuted per head (`LlamaModel.permute`,
which transformers' GGUF loader undoes in `LlamaTensorProcessor._reverse_permute_weights`). 1-D tensors (norms)
stay F32, as llama.cpp keeps them; a tied output layer is not written (llama.cpp and transformers re-tie it).
The tokenizer goes in as a byte-level BPE ("gpt2") vocabulary with its merges, special token ids, token types
and the chat template, so the file is self-contained.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.export.source import ExportError

GGUF_TYPES = {"f16": "F16", "q8_0": "Q8_0"}
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def permute_qk(weights, n_head: int, n_head_kv: int | None):
    """llama.cpp's LlamaModel.permute: HF's rotary half-split order to GGML's interleaved order."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(model_dir: Path, target: Path, *, gguf_type: str, name: str) -> None:
    """model_dir: a Hugging Face directory (the merged or fully fine-tuned model, with its tokenizer)."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(f"GGUF export supports {', '.join(SUPPORTED_MODEL_TYPES)} models; {model_dir} is "
                          f"{config.model_type!r}")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"GGUF export of a model with scaled rotary embeddings ({rope}) is not supported")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for the tensor {hf_name}")
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, heads, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, heads, kv_heads)
        if data.ndim == 1:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            if data.shape[-1] % 32:
                raise ExportError(f"Q8_0 needs rows that are a multiple of 32 values; {hf_name} has {data.shape[-1]}")
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(backend):
        raise ExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama 3 / SmolLM style); "
                          f"this tokenizer is {model.get('type')}")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(f"the tokenizer has {len(vocab)} tokens, more than the model's vocabulary {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    special = set(tokenizer.all_special_ids)
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    for token, index in vocab.items():
        tokens[index] = token
        if index in special or (token in added and added[token].special):
            types[index] = gguf.TokenType.CONTROL
        elif token in added:
            types[index] = gguf.TokenType.USER_DEFINED
        else:
            types[index] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # a pure byte vocabulary: readers that find no merges derive them from the scores (none come out)
        writer.add_token_scores([0.0] * vocab_size)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _byte_level(backend: dict) -> bool:
    def has_byte_level(part) -> bool:
        if not isinstance(part, dict):
            return False
        if part.get("type") == "ByteLevel":
            return True
        return any(has_byte_level(p) for p in part.get("pretokenizers", []) or [])

    return has_byte_level(backend.get("pre_tokenizer"))


def _pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for the pre-tokenizer split (`tokenizer.ggml.pre`): the name of the tokenizer's Split regex
    in the table transformers reads GGUF files with; "gpt-2" for a plain ByteLevel(use_regex=True), whose regex is
    llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2 one (llama-vocab.cpp); else "default"."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # an older transformers without the table
        GGUF_PRE_TOKENIZER_SPLITS = {}
    patterns: list[str] = []

    def collect(part) -> None:
        if isinstance(part, dict):
            if part.get("type") == "Split":
                pattern = part.get("pattern") or {}
                patterns.append(pattern.get("Regex") or pattern.get("String") or "")
            for p in part.get("pretokenizers", []) or []:
                collect(p)

    pre = backend.get("pre_tokenizer") or {}
    collect(pre)
    for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
        if split in patterns:
            return name
    if not patterns and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"

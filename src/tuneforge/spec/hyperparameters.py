"""Resolve "auto" hyperparameters the way hosted fine-tuning APIs do, from the dataset size and method.

Epochs follow OpenAI's published rule (openai-cookbook, "Data preparation and analysis for chat model
fine-tuning"): aim at 3 epochs, but at least 100 and at most 25,000 examples seen, within 1-25 epochs.
The batch grows with the data (about 0.2% of the examples, as OpenAI describes, as a power of two
within 8-256: small batches waste accelerators, huge ones take too few steps). It is counted in
examples; with packing it becomes the number of rows that hold that many examples. Learning rates are the
usual ones for the method (METHOD_LEARNING_RATES): for SFT 2e-4 with LoRA/QLoRA (the QLoRA paper) and 2e-5
for full fine-tuning; the preference and RL methods take TRL's defaults for full fine-tuning and the rates
measured with an adapter in bench/rlhf.py and bench/rlhf_online.py.
The micro-batch (per_device_batch_size) needs the hardware and is resolved by the recipe. The packed row
length rule lives here too (torch-free): the recipe packs by it and the cost estimate prices it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tuneforge.spec.job import JobSpec

TARGET_EPOCHS, MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 3, 100, 25_000
MIN_EPOCHS, MAX_EPOCHS = 1, 25
MIN_BATCH, MAX_BATCH = 8, 256
LEARNING_RATES = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}  # SFT's
# (method) -> (with an adapter, full fine-tuning). Full: TRL's RewardConfig 1e-4, DPOConfig and GRPOConfig 1e-6.
# With an adapter: reward and DPO as SFT (bench/rlhf.py trained both at 2e-4-3e-4), PPO/GRPO 5e-5
# (bench/rlhf_online.py, the shipped configs).
METHOD_LEARNING_RATES = {"sft": (2e-4, 2e-5), "reward": (2e-4, 1e-4), "dpo": (2e-4, 1e-6), "ppo": (5e-5, 1e-6),
                         "grpo": (5e-5, 1e-6), "vlm": (2e-4, 2e-5), "clip": (1e-4, 1e-5), "eval": (2e-4, 2e-5)}


def default_learning_rate(method: str, adapter_type: str) -> float:
    """What learning_rate: auto is for a method and adapter type (OpenAI's learning_rate_multiplier scales it)."""
    with_adapter, full = METHOD_LEARNING_RATES[method]
    return full if adapter_type == "full" else with_adapter


def auto_epochs(num_examples: int) -> float:
    if num_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return float(min(MAX_EPOCHS, MIN_TARGET_EXAMPLES // num_examples))
    if num_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return float(max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // num_examples))
    return float(TARGET_EPOCHS)


def auto_batch_size(num_examples: int, world_size: int = 1) -> int:
    target = max(1.0, num_examples * 0.002)
    batch = 2 ** round(math.log2(target))
    batch = min(MAX_BATCH, max(MIN_BATCH, batch))
    # Every device gets the same share of a step.
    return math.ceil(batch / world_size) * world_size


def resolve_hyperparameters(spec: JobSpec, num_examples: int, *, num_rows: int | None = None,
                            micro_batch: int | None = None) -> JobSpec:
    """A copy of spec with learning_rate, num_epochs, batch_size and (given micro_batch) the micro-batch
    and accumulation filled in. micro_batch is the per-device micro-batch the hardware allows; num_rows
    the packed rows when packing (batches then count rows: an auto batch is the rows that hold as many
    examples as it would unpacked)."""
    training = spec.training.model_copy()
    world = spec.resources.num_gpus * spec.resources.num_nodes
    if training.learning_rate == "auto":
        training.learning_rate = default_learning_rate(spec.method, spec.adapter.type)
    if training.num_epochs == "auto":
        training.num_epochs = auto_epochs(num_examples)
    micro, accum = training.per_device_batch_size, training.gradient_accumulation_steps
    if training.batch_size == "auto":
        if micro != "auto" and accum != "auto":
            training.batch_size = micro * accum * world
        else:
            training.batch_size = auto_batch_size(num_examples, world)
            if num_rows:
                # Packed: as many rows as carry that many examples, so a packed job takes as many optimizer
                # steps of as many examples as an unpacked one (rows counted as examples took ~30x fewer).
                rows = max(1, round(training.batch_size * num_rows / num_examples))
                training.batch_size = math.ceil(rows / world) * world
    per_device = math.ceil(training.batch_size / world)
    if micro == "auto" and accum != "auto":
        micro = math.ceil(per_device / accum)
    if micro == "auto" and micro_batch is not None:
        micro = min(micro_batch, per_device)
    if micro != "auto":
        micro = min(micro, per_device)
        training.per_device_batch_size = micro
        training.gradient_accumulation_steps = math.ceil(per_device / micro)
    return spec.model_copy(update={"training": training})


# Rows hold about this many average examples: best-fit decreasing then fills them to ~95-99%.
EXAMPLES_PER_ROW = 4
ROW_MULTIPLE = 64
# On SDPA / eager a packed row's attention costs per token in proportion to the row's length (the whole
# row x row product is computed under the block-diagonal mask); the matmuls cost per token whatever the row.
# Rows stop growing where that attention term reaches ATTENTION_SHARE of the matmul FLOPs. Measured on
# SmolLM2-135M LoRA (2-core CPU, fully packed rows of 4 examples): 240 tokens/s at 512-token rows, 224 at
# 1024, 171 at 1472; the rule puts its cap at 576. Never below MIN_ROW_CAP: under 512 tokens the attention
# term is small on any model, and per-row overheads dominate (tiny test models would get 64-token rows).
ATTENTION_SHARE = 0.15
MIN_ROW_CAP = 512
# packing: auto stays off where rows would hold fewer examples than this on average (long examples under
# the cap): such rows save no padding and pay the block-diagonal mask, measured ~10% slower per token than
# the same tokens unpacked (SmolLM2-135M, rows of 256-1472 tokens).
MIN_EXAMPLES_PER_ROW = 1.5


def sdpa_row_cap(matmul_params: int, hidden_size: int, num_layers: int) -> int:
    """The longest packed row worth building on SDPA / eager for a model: per token, the matmuls take
    2 x matmul_params FLOPs forward and the attention over a row of L tokens 4 x L x hidden x layers
    (QK^T and AV)."""
    cap = ATTENTION_SHARE * 2 * matmul_params / (4 * hidden_size * num_layers)
    return max(MIN_ROW_CAP, int(cap) // ROW_MULTIPLE * ROW_MULTIPLE)


def sdpa_row_length(mean: float, max_seq_length: int, row_cap: int | None = None) -> int:
    """The SDPA / eager row for examples of `mean` tokens: about EXAMPLES_PER_ROW of them, at most row_cap,
    rounded up to ROW_MULTIPLE, at most max_seq_length. The recipe packs by it (packed_row_length) and the
    cost estimate prices it (planner/cost.py:packed_row_tokens)."""
    wanted = EXAMPLES_PER_ROW * mean if row_cap is None else min(EXAMPLES_PER_ROW * mean, row_cap)
    return min(max_seq_length, -(-int(wanted) // ROW_MULTIPLE) * ROW_MULTIPLE)


def packed_row_length(lengths: Sequence[int], max_seq_length: int, attention: str,
                      row_cap: int | None = None) -> tuple[int, str]:
    """The row length to pack into, and why. Flash-attention's variable-length kernel costs per example,
    so rows are max_seq_length. SDPA and eager compute the whole row x row attention under the
    block-diagonal mask, so a row of short examples costs as if it were one long sequence (2048-token
    rows of short chats trained at about a third of the tokens/s of 512-token rows): rows are sized
    from the data instead, about EXAMPLES_PER_ROW average examples, and at most row_cap (sdpa_row_cap of
    the model) where they would pass it. Examples longer than the row train alone in a row of their own
    (100 chats of ~361 tokens packed into 1472-token rows trained at half the real tokens/s and twice the
    memory of plain batches, docs/defaults.md)."""
    if attention == "flash_attention_2" or not lengths:
        return max_seq_length, f"rows of max_seq_length {max_seq_length} ({attention} attends per example)"
    mean, longest = sum(lengths) / len(lengths), max(lengths)
    capped = row_cap is not None and EXAMPLES_PER_ROW * mean > row_cap
    row = sdpa_row_length(mean, max_seq_length, row_cap)
    alone = sum(1 for length in lengths if length > row)
    why = (f"rows of {row} tokens: {attention} computes each row's whole attention, so rows hold about "
           f"{EXAMPLES_PER_ROW} average examples ({mean:.0f} tokens; longest {longest})")
    if capped:
        why += f", at most {row_cap} tokens where the attention would pass {ATTENTION_SHARE:.0%} of the matmuls"
    if alone:
        why += f"; {alone} longer example{'s' if alone > 1 else ''} in rows of their own"
    return row, why + f", rather than max_seq_length {max_seq_length}"

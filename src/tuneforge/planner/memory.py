"""Peak memory per device of one training step, the way tuneforge's engine trains.

Every term follows what the code keeps alive: the dtype the engine stores the weights in, the tensors
autograd saves for backward in a Hugging Face Llama layer (what each op saves depends on which of its
inputs need a gradient, so LoRA saves much less than full fine-tuning), the chunked fused loss of
engine/loss.py, and what FSDP / ZeRO shard. docs/planner.md derives the terms and checks them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tuneforge.planner import vision
from tuneforge.planner.hardware import GiB, device
from tuneforge.planner.models import ModelArch
from tuneforge.planner.setup import TrainingSetup

LOGITS_CHUNK_ELEMENTS = 1 << 25  # engine/loss.py: float32 logits per chunk
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights ...
NESTED_BLOCK = 256  # ... and, with double quantization, one float32 absmax per 256 of those (8-bit) absmaxes
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes 8-bit optimizers keep 32-bit state for tensors smaller than this
BNB_8BIT_BLOCK = 256
CUDA_CONTEXT_BYTES = 0.5 * GiB  # CUDA context + cuBLAS workspace outside torch's allocator
NCCL_BYTES = 0.5 * GiB  # communicator buffers when more than one rank
FRAGMENTATION = 0.05  # caching-allocator reserve over allocated at peak
# A CPU training process also grows by memory that is not tensors: module and adapter objects, the
# autograd graph, code imported while the model loads, kernel scratch. Measured with tiny-llama, whose
# tensors are negligible (bench/planner_vs_measured.py; docs/planner.md).
CPU_RUNTIME_BYTES = 8 * (1 << 20)
GATHERED_UNITS = 2  # FSDP / ZeRO-3: the unit being computed and the one being prefetched


def compute_bytes(setup: TrainingSetup) -> int:
    return 4 if setup.precision == "fp32" else 2


def quantized_bytes_per_param(setup: TrainingSetup) -> float:
    """Bytes per weight of a bitsandbytes-quantized Linear, quantization constants included."""
    if setup.quantization == "int8":
        return 1.0
    constants = (1 / NF4_BLOCK + 4 / (NF4_BLOCK * NESTED_BLOCK)) if setup.double_quantization else 4 / NF4_BLOCK
    return 0.5 + constants


def trainable_tensors(arch: ModelArch, setup: TrainingSetup) -> list[tuple[int, ...]]:
    """Shapes of the trainable tensors: the optimizer's state is built per tensor, some of it factored."""
    image_side = vision.trainable_tensors(arch.vision, setup) if arch.vision else []
    return decoder_trainable_tensors(arch, setup) + image_side


def decoder_trainable_tensors(arch: ModelArch, setup: TrainingSetup) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    if setup.method == "full":
        for linear in arch.layer_linears():
            for _ in range(linear.copies):
                shapes.append((linear.out_features, linear.in_features))
                if linear.bias:
                    shapes.append((linear.out_features,))
        if arch.router_params:
            shapes.append((arch.num_experts, arch.hidden_size))
        shapes += [(arch.hidden_size,), (arch.hidden_size,)]
        shapes = shapes * arch.num_layers
        shapes.append((arch.vocab_size, arch.hidden_size))
        if not arch.tie_word_embeddings:
            shapes.append((arch.vocab_size, arch.hidden_size))
        shapes.append((arch.hidden_size,))
        return shapes
    rank = setup.lora_rank
    for linear in arch.layer_linears():
        if linear.name in setup.lora_targets:
            shapes += [(rank, linear.in_features), (linear.out_features, rank)] * linear.copies
    return shapes * arch.num_layers


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def optimizer_state_bytes(shapes: list[tuple[int, ...]], optimizer: str) -> float:
    """State of the optimizers of engine/optim.py for float32 parameters (master weights, LoRA weights)."""
    total = 0.0
    for shape in shapes:
        n = _numel(shape)
        if optimizer == "adamw":
            total += 8 * n  # exp_avg and exp_avg_sq in the parameter's dtype
        elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_8BIT_BLOCK) if n >= BNB_8BIT_MIN_SIZE else 8 * n
        elif optimizer == "adafactor":
            # transformers' Adafactor without momentum (beta1=None): a row and a column second moment.
            total += 4 * (shape[0] + shape[1]) if len(shape) == 2 else 4 * n
        else:  # sgd with momentum
            total += 4 * n
    return total


def optimizer_step_transient(shapes: list[tuple[int, ...]], optimizer: str, on_gpu: bool) -> float:
    """Temporaries of one optimizer step: per-tensor loops allocate a few tensors the size of the largest."""
    if not shapes:
        return 0.0
    largest = 4 * max(_numel(shape) for shape in shapes)
    if optimizer == "adamw":
        return 0.0 if on_gpu else 2 * largest  # engine/optim.py uses the fused kernel on CUDA
    return {"adafactor": 3, "sgd": 1}.get(optimizer, 1) * largest


@dataclass(frozen=True)
class LayerActivations:
    """Bytes autograd keeps per token for one decoder layer, and the backward pass's working set."""

    saved: float
    working: float
    detail: dict[str, float] = field(default_factory=dict)


def _saved_inputs(readers: int, width: int, *, shared_bytes: int | None, copy_bytes: int, dropout_mask: int) -> float:
    """Per token: what `readers` trainable consumers of one tensor keep of it for their weight gradients.

    A consumer that reads the tensor as it is shares it (counted once); one that casts it first (autocast,
    PEFT's cast to the adapter dtype) or passes it through dropout keeps its own copy.
    """
    if readers == 0:
        return 0.0
    if dropout_mask:
        return readers * (copy_bytes + dropout_mask) * width
    if shared_bytes is not None:
        return shared_bytes * width
    return readers * copy_bytes * width


def layer_activations(arch: ModelArch, setup: TrainingSetup, *, seq_len: int, padded: bool) -> LayerActivations:
    """Saved tensors of one Llama decoder layer under the setup (see the module docstring)."""
    h, i, nh, q_width, kv_width = arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.q_width, arch.kv_width
    c = compute_bytes(setup)
    full, adapters = setup.method == "full", setup.trains_adapters
    on_gpu = device(setup.gpu).is_gpu
    sharded_bf16 = full and setup.strategy != "ddp" and setup.mixed
    # The residual stream's dtype: float32 master weights under autocast (full + ddp) and bitsandbytes
    # models (prepare_model_for_kbit_training upcasts the embeddings and norms) keep it in float32.
    residual = 4 if (full and not sharded_bf16) or setup.quantized else c
    # bitsandbytes layers return their input's dtype; plain Linear layers under autocast return c.
    projection = residual if setup.quantized else c
    targets = set(setup.lora_targets) if adapters else set()
    dropout_mask = (1 if on_gpu else 4) if adapters and setup.lora_dropout > 0 else 0

    def savers(names: tuple[str, ...]) -> int:
        return len(names) if full else sum(name in targets for name in names)

    def inputs_of(names: tuple[str, ...], width: int, dtype: int) -> float:
        # Full fine-tuning reads the tensor as it is unless autocast must cast it; PEFT casts the input to
        # the float32 adapter dtype and autocast casts it back, so under mixed precision every adapter copies.
        if full:
            shared = dtype if dtype == c else None
        else:
            shared = dtype if (not setup.mixed and dtype == 4) else None
        return _saved_inputs(savers(names), width, shared_bytes=shared, copy_bytes=c,
                             dropout_mask=dropout_mask if adapters else 0)

    detail: dict[str, float] = {}
    # RMSNorm keeps the float32 view of its input (pow and mul need it) and, when its weight trains,
    # the normalized input.
    detail["norms"] = 2 * 4 * h + (2 * residual * h if full else 0)
    detail["qkv_inputs"] = inputs_of(("q_proj", "k_proj", "v_proj"), h, residual)
    detail["mlp_inputs"] = inputs_of(("gate_proj", "up_proj"), h, residual)

    repeat_kv = setup.attention != "flash_attention_2" and padded and arch.num_kv_heads < nh
    kv = q_width if repeat_kv else kv_width  # transformers repeats K/V for GQA when a padding mask is passed
    if setup.attention == "eager":
        # q, repeated k and v, the float32 softmax and its cast back (when compute is not float32).
        scores = nh * seq_len * (4 + (c if c != 4 else 0))
        detail["attention"] = c * (q_width + 2 * kv) + scores
    else:
        # SDPA / flash: q, k, v, the output and the float32 log-sum-exp per head.
        detail["attention"] = c * (2 * q_width + 2 * kv) + 4 * nh
        if setup.attention == "sdpa" and padded:
            # SDPA turns the boolean padding mask into an additive one in the query's dtype, per layer,
            # and its memory-efficient / CPU-flash backward keeps it: seq_len values per token.
            detail["attention_mask"] = c * seq_len
    detail["o_proj_input"] = inputs_of(("o_proj",), q_width, c)
    k = arch.experts_per_token
    # gate and up outputs and silu(gate); the product is what down_proj keeps.
    detail["mlp"] = k * 3 * projection * i + (k * c * h if arch.num_experts > 1 else 0)
    detail["down_proj_input"] = k * inputs_of(("down_proj",), i, projection)
    if adapters:
        # Each adapted projection's lora_A output, kept by lora_B.
        detail["lora"] = sum(
            c * setup.lora_rank * (k if linear.copies > 1 else 1)
            for linear in arch.layer_linears() if linear.name in targets
        )
    saved = sum(detail.values())
    # Backward of one layer: gradients w.r.t. the residual and the MLP intermediates (plus the
    # attention scores in eager mode).
    working = 2 * residual * h + 3 * projection * i * k
    if setup.attention == "eager":
        working += 2 * 4 * nh * seq_len
    return LayerActivations(saved=saved, working=working, detail=detail)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. `peak_allocated` compares with torch.cuda.max_memory_allocated; `total` must fit."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # with the setup's gradient-checkpointing choice
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    logits: float  # the fused loss: saved hidden-state gradient, one logits chunk (+ LM-head gradient, full)
    buffers: float  # autocast weight copies, gathered FSDP / ZeRO-3 units, DDP buckets, dequantization
    optimizer_step: float  # temporaries of the optimizer step
    peak_allocated: float
    overhead: float  # CUDA context, NCCL, allocator fragmentation; on CPU the process's non-tensor growth
    total: float
    host_offload: float  # bytes per rank held in host RAM by CPU offload
    trainable_params: int
    detail: dict = field(default_factory=dict)

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("logits / loss", self.logits),
            ("buffers", self.buffers),
            ("optimizer step temporaries", self.optimizer_step),
        ]


def estimate_memory(arch: ModelArch, setup: TrainingSetup) -> MemoryEstimate:
    """Peak memory per device of a training step of `arch` under `setup`."""
    c = compute_bytes(setup)
    gpu = device(setup.gpu)
    full = setup.method == "full"
    g = setup.shard_group
    n = arch.num_params
    strategy = setup.strategy
    shards_grads = strategy != "ddp"  # every sharded strategy shards gradients and optimizer state
    offload = setup.cpu_offload
    fsdp = strategy.startswith("fsdp")
    host = 0.0

    shapes = trainable_tensors(arch, setup)
    trainable = sum(_numel(shape) for shape in shapes)

    # Weights: full fine-tuning keeps float32 master weights (autocast computes in half precision);
    # adapters train a frozen base stored in the compute dtype, or quantized, plus float32 adapters.
    if full:
        working = c if setup.mixed else 4
        if strategy == "ddp":
            resident = 4.0 * n
        elif setup.shards_parameters:
            # FSDP keeps a float32 shard and gathers half-precision units; ZeRO-3 keeps both partitions.
            shard = 4.0 * n / g + (c * n / g if strategy == "zero3" and setup.mixed else 0)
            resident, host = (0.0, shard) if offload else (shard, 0.0)
        else:  # SHARD_GRAD_OP / ZeRO-2: the working copy stays whole during the step, the master is sharded
            master = 4.0 * n / g if (setup.mixed or fsdp) else 0.0
            resident = working * n + (0.0 if offload else master)
            host += master if offload else 0.0
    else:
        if setup.quantized:
            rest = n - arch.quantizable_params
            base = arch.quantizable_params * quantized_bytes_per_param(setup) + 4.0 * rest
        else:
            base = float(c * n)
        adapters = 4.0 * trainable  # PEFT keeps adapters in float32 (autocast_adapter_dtype)
        if setup.shards_parameters:
            resident, host = ((0.0, (base + adapters) / g) if offload else ((base + adapters) / g, 0.0))
        else:
            resident = base + adapters

    # Gradients in the trainable parameters' dtype (float32), sharded by every strategy but DDP.
    gradients = 4.0 * trainable / (g if shards_grads else 1)
    if offload:
        host += gradients
        gradients = 0.0
    optimizer = optimizer_state_bytes(shapes, setup.optimizer) / (g if shards_grads else 1)
    if offload:
        host += optimizer
        optimizer = 0.0

    # Activations of one micro-batch, padded to seq_len (the engine pads to the longest example).
    tokens = setup.micro_batch * setup.seq_len
    padded = setup.micro_batch > 1
    layer = layer_activations(arch, setup, seq_len=setup.seq_len, padded=padded)
    sharded_bf16 = full and strategy != "ddp" and setup.mixed
    residual = 4 if (full and not sharded_bf16) or setup.quantized else c
    final_norm = 4 * arch.hidden_size + (residual * arch.hidden_size if full else 0)
    shared = 2 * setup.seq_len * arch.head_dim * 4  # RoPE cos / sin
    if setup.attention == "sdpa" and padded:
        shared += setup.micro_batch * setup.seq_len**2  # the boolean 4-D mask transformers builds once
    elif setup.attention == "eager":
        shared += setup.micro_batch * setup.seq_len**2 * c
    per_token_tail = final_norm + layer.working
    without_ckpt = tokens * (arch.num_layers * layer.saved + per_token_tail) + shared
    # Checkpointing keeps each layer's input and recomputes one layer at a time in backward.
    with_ckpt = tokens * (arch.num_layers * residual * arch.hidden_size + layer.saved + per_token_tail) + shared
    # A VLM's images: the tower and projector run on the micro-batch's images before the decoder.
    image_side = vision.activations(arch.vision, setup, c) if arch.vision else {}
    if arch.vision:
        without_ckpt += sum(vision.activations(arch.vision, setup.but(gradient_checkpointing=False), c).values())
        with_ckpt += sum(vision.activations(arch.vision, setup.but(gradient_checkpointing=True), c).values())
    activations = with_ckpt if setup.gradient_checkpointing else without_ckpt

    # The fused loss (engine/loss.py): only positions with labels reach the LM head, a chunk at a time.
    loss_rows = math.ceil(setup.loss_fraction * setup.micro_batch * (setup.seq_len - 1))
    chunk_rows = min(loss_rows, max(1, LOGITS_CHUNK_ELEMENTS // arch.vocab_size))
    vh = arch.vocab_size * arch.hidden_size
    logits = (
        2 * loss_rows * arch.hidden_size * residual  # the gathered hidden states and their gradient
        + chunk_rows * arch.vocab_size * 8  # float32 logits and logsumexp's temporary
        + (2 * 4.0 * vh if full else 0)  # the LM-head gradient computed in forward, and its matmul temporary
    )

    # Buffers that live beside the model.
    buffers = 0.0
    detail_buffers = {}
    if strategy == "ddp" and setup.mixed:
        # autocast caches a half-precision copy of every float32 weight it casts for the step's forward.
        detail_buffers["autocast weight copies"] = c * (arch.matmul_params if full else trainable)
    if setup.shards_parameters:
        unit = arch.largest_layer_params()
        unit_bytes = (c if setup.mixed else 4) if full else (
            quantized_bytes_per_param(setup) if setup.quantized else c)
        detail_buffers["gathered units"] = GATHERED_UNITS * unit * unit_bytes + (c * unit if full else 0)
    if strategy == "ddp" and setup.world_size > 1:
        detail_buffers["DDP gradient buckets"] = 4.0 * trainable
    if strategy == "zero2":
        detail_buffers["ZeRO reduce buckets"] = 2 * 4.0 * arch.hidden_size**2
    if setup.quantized:
        # bitsandbytes dequantizes one weight at a time for the matmul.
        largest = max(linear.in_features * linear.out_features for linear in arch.layer_linears())
        detail_buffers["dequantization"] = c * largest
    buffers = sum(detail_buffers.values())

    step = optimizer_step_transient(shapes, setup.optimizer, gpu.is_gpu)
    if offload:
        step = 0.0  # the optimizer runs on the host

    # The peak: at the end of forward (activations, loss, buffers) or at the end of backward (all
    # gradients, none of the activations). Gradients fill in as activations are freed; gradients
    # accumulated from earlier micro-batches are there from the start.
    static = resident + optimizer
    grads_in_forward = gradients if setup.grad_accum > 1 else 4.0 * arch.layer_params * (full and not shards_grads)
    forward_peak = activations + logits + buffers + grads_in_forward
    backward_end = gradients + step + (detail_buffers.get("DDP gradient buckets", 0.0)
                                       + detail_buffers.get("gathered units", 0.0)
                                       + detail_buffers.get("ZeRO reduce buckets", 0.0))
    peak = static + max(forward_peak, backward_end)
    if gpu.is_gpu:
        overhead = CUDA_CONTEXT_BYTES + (NCCL_BYTES if setup.world_size > 1 else 0) + FRAGMENTATION * peak
    else:
        overhead = CPU_RUNTIME_BYTES
    return MemoryEstimate(
        weights=resident,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        activations_without_checkpointing=without_ckpt,
        activations_with_checkpointing=with_ckpt,
        logits=logits,
        buffers=buffers,
        optimizer_step=step,
        peak_allocated=peak,
        overhead=overhead,
        total=peak + overhead,
        host_offload=host,
        trainable_params=trainable,
        detail={
            "layer_activations_per_token": layer.detail,
            "buffers": detail_buffers,
            "tokens_per_micro_batch": tokens,
            "loss_positions": loss_rows,
            **({"images_per_micro_batch": setup.micro_batch * setup.images_per_example,
                "image_activations": image_side} if arch.vision else {}),
        },
    )

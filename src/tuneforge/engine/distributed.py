"""Several training processes: the process group, who does what, and how the model is shared.

One process per GPU (or per CPU slot, with the gloo backend, so the whole path runs without a GPU),
launched by torchrun. Rank 0 writes events and final artifacts; every rank trains. DDP replicates the
model and averages gradients; FSDP2 (`fully_shard`) shards parameters, gradients and optimizer state
per decoder layer. Collectives have a timeout, and each step starts with a tiny all-reduce that carries
stop requests, so a dead or stopping peer is noticed at the next step instead of hanging the job.
`prepare` is the one call a recipe makes: the strategy's module, optimizer and schedule, and how they
are checkpointed and gathered.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (imports the model, fills the tokenization cache), the others
        after it, so they find the work done instead of repeating it side by side."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, on CPU for gloo, on the GPU for NCCL)."""
        if not self.enabled:
            return values
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on some rank (a stop request, a failed save)."""
        return bool(self.sum([1.0 if flag else 0.0])[0]) if self.enabled else flag

    def broadcast(self, value):
        """Rank 0's value, on every rank (e.g. which checkpoint to resume from)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        if not self.enabled:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def shard(self, items: list) -> tuple[list, int]:
        """This rank's contiguous share of items, and how many the largest share has (so every rank runs
        the same number of collectives)."""
        per_rank = -(-len(items) // self.world_size) if items else 0
        return items[self.rank * per_rank : (self.rank + 1) * per_rank], per_rank


def init_distributed(timeout_s: float) -> Distributed:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(loss_module: torch.nn.Module, *, strategy: str, sharding: str, cpu_offload: bool, precision,
         parallel: Distributed, num_nodes: int = 1, weights_dir=None) -> torch.nn.Module:
    """The module the training step calls: DDP around the loss module, or FSDP2 on each decoder layer
    and on the loss module itself (the root, which holds embeddings, final norm and LM head). A base
    built without weights (engine/sharded_loading.py) is sharded first, then each rank reads its shard
    from weights_dir."""
    if not parallel.enabled:
        return loss_module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [parallel.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(loss_module, device_ids=device_ids)
    if strategy == "deepspeed":
        return loss_module  # start_deepspeed wraps it, once the optimizer exists
    if strategy != "fsdp":
        raise ValueError(f"resources.strategy {strategy}: expected ddp, fsdp or deepspeed")
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": sharding != "shard_grad_op"}
    if precision.mixed:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    if cpu_offload and torch.cuda.is_available():  # on a CPU the shards already live in host memory
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if sharding == "hybrid_shard":
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        per_node = parallel.world_size // num_nodes
        kwargs["mesh"] = init_device_mesh(device_type, (num_nodes, per_node), mesh_dim_names=("replicate", "shard"))
    # Quantized base weights (QLoRA's 4-bit, int8) are frozen and carry their quantization state beside
    # the tensor, which sharding would lose: they stay whole on every rank (at 0.5 byte per parameter,
    # 35 GB for a 70B base) while the adapter, its gradients and optimizer state are sharded.
    quantized = {p for p in loss_module.parameters() if type(p).__name__ in ("Params4bit", "Int8Params")}
    if quantized:
        kwargs["ignored_params"] = quantized
    from tuneforge.engine.sharded_loading import load_fsdp_shards, unloaded_weights

    unloaded = unloaded_weights(loss_module)
    if unloaded and weights_dir is None:
        raise ValueError("the model was built without its weights but no weights directory was given to load them from")
    for layer in loss_module.base_model().get_decoder().layers:
        fully_shard(layer, **kwargs)
    fully_shard(loss_module, **kwargs)
    if unloaded:
        load_fsdp_shards(loss_module, weights_dir, unloaded, precision.device)
    return loss_module


@dataclass
class Prepared:
    """What a recipe trains with under its strategy (single, ddp, fsdp, deepspeed)."""

    strategy: str
    train_module: torch.nn.Module  # what the step calls: DDP, FSDP's root, a DeepSpeed engine, or the loss itself
    state_module: torch.nn.Module  # what checkpoints save and restore
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object | None
    parameters: list[torch.nn.Parameter] = field(default_factory=list)  # the trainable ones, for clipping
    accumulation: int = 1  # micro-batches per step DeepSpeed expects

    @property
    def sharded(self) -> bool:
        """FSDP: checkpoints are one torch.distributed.checkpoint shard per rank."""
        return self.strategy == "fsdp"

    @property
    def wrapped_state(self) -> bool:
        # FSDP shards and ZeRO partitions are saved, restored and gathered through the wrapped module.
        return self.strategy in ("fsdp", "deepspeed")

    def passes(self, per_rank: int, micro: int) -> int:
        """Forward/backward passes every rank runs in a step (the same on every rank)."""
        return self.accumulation if self.strategy == "deepspeed" else -(-per_rank // micro)

    def eval_module(self) -> torch.nn.Module:
        return unwrap(self.train_module)

    def final_state_dict(self, *, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """A sharded model's weights gathered on rank 0 (collective); None when the model holds them whole."""
        return full_state_dict(self.train_module, trainable_only=trainable_only) if self.wrapped_state else None

    def rank_memory(self) -> dict[str, int]:
        return rank_memory(self.train_module, self.optimizer)


def prepare(loss_module: torch.nn.Module, model: torch.nn.Module, *, spec, strategy: str, parallel: Distributed,
            precision, total_steps: int, weights_dir=None) -> Prepared:
    """Shard or replicate the loss module across ranks, then build the optimizer and the schedule on what
    each rank holds (FSDP replaces the parameters, so the optimizer comes after), and start DeepSpeed's
    engine around them. spec is the resolved JobSpec (training.precision filled in)."""
    from tuneforge.engine.optim import build_optimizer, build_scheduler

    resources = spec.resources
    train_module = wrap(loss_module, strategy=strategy, sharding=resources.fsdp_sharding, cpu_offload=resources.cpu_offload,
                        precision=precision, parallel=parallel, num_nodes=resources.num_nodes, weights_dir=weights_dir)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, spec.training)
    scheduler = build_scheduler(optimizer, spec.training, total_steps)
    scaler = precision.grad_scaler()
    if strategy == "deepspeed":
        from tuneforge.launch.deepspeed import check_config, config_for, config_source

        ds_config = config_for(spec)
        check_config(ds_config, world_size=parallel.world_size, source=config_source(spec))
        train_module = start_deepspeed(loss_module, optimizer, scheduler, ds_config)
        scaler = None  # DeepSpeed scales fp16 losses itself
    prepared = Prepared(strategy, train_module, model, optimizer, scheduler, scaler, parameters,
                        accumulation=spec.training.gradient_accumulation_steps)
    if prepared.wrapped_state:
        prepared.state_module = train_module
    return prepared


def full_state_dict(root: torch.nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole state of a sharded root module (FSDP, or a DeepSpeed engine), gathered to CPU on
    rank 0 (others get {}), with the keys of the model inside it (CausalLMLoss's `model.` prefix
    removed). Collective."""
    if is_deepspeed(root):
        if root.zero_optimization_stage() == 3:
            state = root._zero3_consolidated_16bit_state_dict() or {}  # rank 0 only; every rank must call
        else:  # ZeRO-2 keeps the parameters whole on every rank
            state = root.module.state_dict() if dist.get_rank() == 0 else {}
        trainable = {name for name, p in root.module.named_parameters() if p.requires_grad}
        return {key.removeprefix("model."): value.detach().cpu() for key, value in state.items()
                if not trainable_only or key in trainable}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(root, options=options)
    return {key.removeprefix("model."): value for key, value in state.items()}


def is_deepspeed(module) -> bool:
    return hasattr(module, "is_gradient_accumulation_boundary")


def start_deepspeed(loss_module: torch.nn.Module, optimizer, scheduler, config: dict):
    """A DeepSpeed ZeRO engine around the loss module, running our optimizer and schedule."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=loss_module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    if engine.zero_optimization_stage() == 3:
        # The fused loss reads the LM head's weight without calling the module: ZeRO-3 must gather it
        # for CausalLMLoss's own forward too.
        head = loss_module.base_model().get_output_embeddings()
        if head is not None:  # a reward model has a score head instead, called as a module
            deepspeed.zero.register_external_parameter(loss_module, head.weight)
    return engine


@contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if enabled or is_deepspeed(module) or (not hasattr(module, "no_sync") and not hasattr(module, "set_requires_gradient_sync")):
        yield
        return
    if hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
        return
    module.set_requires_gradient_sync(False)  # FSDP2
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """What evaluation calls: the loss module inside DDP or a DeepSpeed engine (ZeRO-3's hooks live on
    the module), or FSDP2's root itself (its forward gathers the shards)."""
    return module.module if hasattr(module, "no_sync") and hasattr(module, "module") else module


@contextmanager
def gathered(module: torch.nn.Module):
    """Inside: an FSDP-sharded module's root weights (embeddings, final norm, LM head) are whole, so
    code that does not go through its forward (generate) can run; decoder layers gather themselves."""
    if not hasattr(module, "unshard"):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def rank_memory(module: torch.nn.Module, optimizer) -> dict[str, int]:
    """What this rank holds: its parameters (its shard under FSDP), their gradients, the optimizer
    state, and the peak memory of the process (GPU allocations, or the resident set on a CPU)."""
    def local(t):
        if hasattr(t, "ds_tensor"):  # ZeRO-3: the parameter is empty outside forward, its shard is here
            return t.ds_tensor
        return t.to_local() if hasattr(t, "to_local") else t

    pairs = [(p, local(p)) for p in module.parameters()]
    optimizer_bytes = sum(local(v).numel() * local(v).element_size() for state in optimizer.state.values()
                          for v in state.values() if torch.is_tensor(v))
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss()
    return {
        "parameters": sum(t.numel() for _, t in pairs),
        "parameter_bytes": sum(t.numel() * t.element_size() for _, t in pairs),
        "trainable_parameters": sum(t.numel() for p, t in pairs if p.requires_grad),
        "optimizer_state_bytes": optimizer_bytes,
        "peak_memory_bytes": peak,
    }


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM: unlike getrusage's ru_maxrss, not inherited from the
    launcher across fork + exec)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

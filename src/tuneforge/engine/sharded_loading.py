"""Load a base model straight into its shards, so no rank ever holds the whole model in host memory.

Every rank builds the model without weights (FSDP2: each weight a placeholder of its shape that holds
one value, on the training device; ZeRO-3: under DeepSpeed's `zero.Init`, which partitions each
parameter as it is created), the adapter goes on top, the model is sharded, and only then are the
weights read from the safetensors files, one tensor at a time:
FSDP2 ranks each slice their own shard out of the tensor (`distribute_tensor` with no source rank, no
communication); ZeRO-3 ranks each read only the flat range of the tensor that DeepSpeed's partition
(`param.ds_tensor`) holds, straight from the memory-mapped file. The buffer is one tensor (FSDP2) or
one partition (ZeRO-3; zero.Init itself holds one parameter whole while it partitions it, and on a
CPU the freed memory is handed back to the OS before the next), so a rank's peak host memory while loading is about its shard plus the largest tensor, not the
model (bench/load_memory.py measures both paths). Quantized bases (QLoRA, int8) keep the whole path, where
transformers already quantizes tensor by tensor as it loads, and stay whole on every rank anyway.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from tuneforge.engine.model_loading import attention_implementation, weights_dtype
from tuneforge.engine.precision import Precision
from tuneforge.spec.job import JobSpec

CHECKPOINT_KEY = "tuneforge_checkpoint_keys"  # set on each unloaded weight: its names in the model (one is saved)


def loads_sharded(spec: JobSpec, *, strategy: str, world_size: int) -> bool:
    """Whether this job's ranks load only their shards: FSDP or ZeRO-3 over several processes, a
    full-precision base, resources.model_loading auto (planner/host_memory.py plans with the same rule)."""
    from tuneforge.planner.host_memory import sharded_load

    return strategy in ("fsdp", "deepspeed") and sharded_load(spec, world_size)


def empty_base_model(model_dir: str | Path, spec: JobSpec, precision: Precision, *, strategy: str,
                     full_finetune: bool):
    """The base model's modules without their weights: placeholders (FSDP), or partitioned empty by
    zero.Init (ZeRO-3); buffers (RoPE's frequencies) are computed as usual. Each weight remembers its
    checkpoint names for loading. The random-number state is left as it was, so the adapter initializes
    exactly as it does on a loaded model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.engine.base_models import safetensors_model_dir

    safetensors_model_dir(Path(model_dir))  # never a pickle
    config = AutoConfig.from_pretrained(model_dir)
    dtype = weights_dtype(precision, full_finetune=full_finetune)
    kwargs = {"dtype": dtype, "attn_implementation": attention_implementation(spec.model.attn_implementation,
                                                                              precision.device)}
    with torch.random.fork_rng(devices=[]), _empty_parameters(spec, strategy, dtype, precision.device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()  # skipped while the weights are empty; from_pretrained ties them after loading
    model.config.use_cache = False
    for name, parameter in model.named_parameters(remove_duplicate=False):
        # A tied weight has several names; the checkpoint holds it under one of them.
        setattr(parameter, CHECKPOINT_KEY, getattr(parameter, CHECKPOINT_KEY, ()) + (name,))
    if strategy != "deepspeed":
        _placeholder_weights(model, precision.device)
    return model


@contextmanager
def _empty_parameters(spec: JobSpec, strategy: str, dtype: torch.dtype, device: torch.device):
    from transformers.initialization import no_init_weights

    if strategy == "deepspeed":
        import deepspeed

        # zero.Init partitions each parameter as its module is built; random init would be thrown away.
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=_zero_init_config(spec, dtype)), \
                _freed_memory_returned(device.type == "cpu"):
            yield
        return
    from accelerate import init_empty_weights

    with no_init_weights(), init_empty_weights(include_buffers=False):
        yield


@contextmanager
def _freed_memory_returned(enabled: bool):
    """zero.Init allocates each parameter whole on the training device, broadcasts it, keeps the rank's
    partition and frees the rest. On a CPU that is host memory, and glibc keeps the freed blocks in its
    heap between the partitions (measured on a ~1.1B model: rank 1 kept ~630 MiB over its 1,042 MiB
    shard); handing them back to the OS before each next parameter keeps the peak at the shard plus one
    parameter (bench/load_memory.py). On a GPU the whole parameters live in device memory."""
    trim = _malloc_trim() if enabled else None
    if trim is None:
        yield
        return

    def before_each_parameter(module, name, parameter):
        trim(0)  # returns None, so the parameter is registered unchanged

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(before_each_parameter)
    try:
        yield
    finally:
        handle.remove()


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is another (musl, macOS): nothing to return there."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _zero_init_config(spec: JobSpec, dtype: torch.dtype) -> dict:
    """What zero.Init reads (the ZeRO section, parameter offload, the partitions' dtype); batch sizes are
    not resolved yet and do not matter to it. The dtype goes in the config, not as zero.Init's dtype
    argument: DeepSpeed 0.19 drops that argument where the accelerator lacks fp16 (a CPU) and partitions
    in bfloat16 (`dtype or torch.float16 if ... else torch.bfloat16 ...` in _set_dtype), which turned a
    full fine-tune's float32 master weights into bfloat16."""
    from tuneforge.launch.deepspeed import generated_config

    zero = (spec.resources.deepspeed_config or generated_config(spec))["zero_optimization"]
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}


def _placeholder_weights(model: torch.nn.Module, device: torch.device) -> None:
    """Replace each meta weight by one value expanded to its shape, on the training device: it has the
    device, dtype and shape PEFT looks at (an adapter goes where its base is, so on the meta device it
    would lose its initial values) and no memory; an in-place write to it fails loudly. wrap turns them
    back into meta weights for fully_shard (which takes contiguous ones only)."""
    placeholders: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or parameter.device.type != "meta":
                continue
            if id(parameter) not in placeholders:  # a tied weight gets one placeholder under both names
                value = torch.zeros((), dtype=parameter.dtype, device=device).expand(parameter.shape)
                placeholders[id(parameter)] = torch.nn.Parameter(value, requires_grad=parameter.requires_grad)
                setattr(placeholders[id(parameter)], CHECKPOINT_KEY, getattr(parameter, CHECKPOINT_KEY))
            module._parameters[name] = placeholders[id(parameter)]


# ---- FSDP2 ----------------------------------------------------------------------------------------


def unloaded_weights(loss_module: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Before sharding: each placeholder's name in the loss module and its names in the checkpoint, and
    the placeholder turned into a meta weight (fully_shard shards meta weights without memory)."""
    keys, metas = {}, {}
    for module_name, module in loss_module.named_modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or not hasattr(parameter, CHECKPOINT_KEY):
                continue
            keys[f"{module_name}.{name}" if module_name else name] = getattr(parameter, CHECKPOINT_KEY)
            if id(parameter) not in metas:
                metas[id(parameter)] = torch.nn.Parameter(torch.empty_like(parameter, device="meta"),
                                                          requires_grad=parameter.requires_grad)
            module._parameters[name] = metas[id(parameter)]
    return keys


def load_fsdp_shards(root: torch.nn.Module, model_dir: str | Path, keys: dict[str, tuple[str, ...]],
                     device: torch.device) -> None:
    """Give a fully_shard-ed root's meta weights their storage (to_empty, which takes the whole module:
    the adapter's shards and the buffers are put back), then fill each rank's shard, one tensor at a
    time from the safetensors files."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    states = [*root.named_parameters(), *root.named_buffers()]
    kept = {name: local(t).detach().clone() for name, t in states if t.device.type != "meta"}
    root.to_empty(device=device)
    parameters = dict(root.named_parameters())
    with torch.no_grad():
        for name, t in [*root.named_parameters(), *root.named_buffers()]:
            if name in kept:
                local(t).copy_(kept.pop(name))
    with SafetensorsReader(model_dir) as reader, torch.no_grad():
        for name, names in keys.items():
            if name not in parameters:
                continue  # a tied weight's second name: loaded under its first
            tensor, full = parameters[name], reader.tensor(names)
            if tuple(full.shape) != tuple(tensor.shape):
                raise ValueError(f"{names[0]}: the checkpoint's tensor is {tuple(full.shape)}, the model's config "
                                 f"makes it {tuple(tensor.shape)}")
            full = full.to(device=tensor.device, dtype=tensor.dtype)
            if isinstance(tensor, DTensor):
                # No source rank: every rank cuts its own piece, nothing crosses the network.
                tensor.to_local().copy_(distribute_tensor(full, tensor.device_mesh, tensor.placements,
                                                          src_data_rank=None).to_local())
            else:
                tensor.copy_(full)
            del full


# ---- ZeRO-3 ---------------------------------------------------------------------------------------


def load_zero3_partitions(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Fill a zero.Init-partitioned base model: each rank reads, parameter by parameter, only the
    elements of its own partitions from the safetensors files; nothing is gathered or sent."""
    import deepspeed.comm as dist

    with SafetensorsReader(model_dir) as reader, torch.no_grad():
        for parameter in model.parameters():  # a tied weight is listed (and filled) once
            if not hasattr(parameter, CHECKPOINT_KEY):
                continue
            names = getattr(parameter, CHECKPOINT_KEY)
            reader.check_shape(names, tuple(parameter.ds_shape))
            _fill_partition(reader, names, parameter.ds_tensor, rank=parameter.ds_zero_partition_rank)
            if getattr(parameter, "ds_secondary_tensor", None) is not None:  # hpZ's copy within the node
                _fill_partition(reader, names, parameter.ds_secondary_tensor,
                                rank=dist.get_rank(group=parameter.ds_zero_param_process_group))


def _fill_partition(reader: SafetensorsReader, names: tuple[str, ...], partition: torch.Tensor, *, rank: int) -> None:
    """DeepSpeed's layout (partition_parameters.py, _partition_param): the parameter flattened in row
    order and padded with zeros to a multiple of the group's size; rank r holds elements
    [r * n, (r + 1) * n) of it, n = partition.ds_numel, so the last ranks' partitions end in padding."""
    if hasattr(partition, "ds_quant_scale"):
        # planner/host_memory.sharded_load sends such configs (zero_quantized_nontrainable_weights) down the whole path.
        raise ValueError(f"{names[0]}: DeepSpeed keeps this weight's partition quantized, which the partition reader "
                         "does not do; set resources.model_loading to whole")
    size, total = partition.ds_numel, reader.numel(names)
    start = min(rank * size, total)
    stop = min(start + size, total)
    flat = partition.view(-1)
    if stop > start:
        flat[:stop - start].copy_(reader.flat_range(names, start, stop))
    flat[stop - start:].zero_()


# ---- reading ---------------------------------------------------------------------------------------


class SafetensorsReader:
    """One tensor, or one flat range of a tensor, at a time from a model directory's safetensors files
    (one file, or shards with an index). Each read opens its file and closes it again: an open
    safe_open keeps every page it has touched mapped into the process (measured: its resident set grew
    by each tensor read and fell only at close), which would bring the whole model back into each
    rank's memory."""

    def __init__(self, model_dir: str | Path):
        self.files = sorted(Path(model_dir).glob("*.safetensors"))
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def __enter__(self) -> SafetensorsReader:
        from safetensors import safe_open

        for path in self.files:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    self._where[key] = path
                    self._shapes[key] = tuple(handle.get_slice(key).get_shape())  # from the header, no data read
        return self

    def __exit__(self, *exc) -> None:
        self._where.clear()
        self._shapes.clear()

    def keys(self) -> set[str]:
        return set(self._where)

    def tensor(self, names: tuple[str, ...]) -> torch.Tensor:
        """The weight saved under one of names (a tied weight has several)."""
        saved = self._saved(names)
        tensor = self._read(saved[0])
        for other in saved[1:]:  # a tied weight saved twice must be saved the same
            self._check_tied(saved[0], other, tensor, self._read(other))
        return tensor

    def check_shape(self, names: tuple[str, ...], shape: tuple[int, ...]) -> None:
        saved = self._shapes[self._saved(names)[0]]
        if saved != shape:
            raise ValueError(f"{names[0]}: the checkpoint's tensor is {saved}, the model's config makes it {shape}")

    def numel(self, names: tuple[str, ...]) -> int:
        return math.prod(self._shapes[self._saved(names)[0]])

    def flat_range(self, names: tuple[str, ...], start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the weight flattened in row order, read without the rest of it."""
        saved = self._saved(names)
        values = self._read_range(saved[0], start, stop)
        for other in saved[1:]:  # each rank compares the range it reads
            self._check_tied(saved[0], other, values, self._read_range(other, start, stop))
        return values

    def _saved(self, names: tuple[str, ...]) -> list[str]:
        saved = [name for name in names if name in self._where]
        if not saved:
            raise KeyError(f"{' / '.join(names)}: not in the safetensors files of this model "
                           f"({', '.join(p.name for p in self.files)}); set resources.model_loading to whole to load it "
                           "the way transformers does")
        return saved

    @staticmethod
    def _check_tied(key: str, other: str, values: torch.Tensor, other_values: torch.Tensor) -> None:
        if not torch.equal(values, other_values):
            raise ValueError(f"{key} and {other} are one tied weight in this model's config but differ in its "
                             "safetensors files; set resources.model_loading to whole")

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key).clone()  # a copy of its own, before the mapping closes

    def _read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        if not self._shapes[key]:  # a scalar has no rows to slice
            return self._read(key).reshape(-1)[start:stop]
        with safe_open(str(self._where[key]), framework="pt", device="cpu") as handle:
            pieces = list(_flat_pieces(handle.get_slice(key), self._shapes[key], start, stop))
        # Slicing copies out of the mapping already; joining is needed only where a range spans rows unevenly.
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _flat_pieces(saved, shape: tuple[int, ...], start: int, stop: int, index: tuple = ()):
    """The elements [start, stop) of saved[index] flattened, as few 1-D reads as the row layout allows: a
    partial first row, the whole rows between, a partial last row (each partial row read the same way one
    dimension down), so no more than the range itself is ever read."""
    if start >= stop:
        return
    if len(shape) <= 1:
        yield saved[(*index, slice(start, stop))].reshape(-1)
        return
    row = math.prod(shape[1:])
    first, last = start // row, (stop - 1) // row
    if first == last:  # the range lies within one row
        yield from _flat_pieces(saved, shape[1:], start - first * row, stop - first * row, (*index, slice(first, first + 1)))
        return
    if start % row:
        yield from _flat_pieces(saved, shape[1:], start % row, row, (*index, slice(first, first + 1)))
        first += 1
    whole_stop = stop // row
    if whole_stop > first:
        yield saved[(*index, slice(first, whole_stop))].reshape(-1)
    if stop % row:
        yield from _flat_pieces(saved, shape[1:], 0, stop % row, (*index, slice(whole_stop, whole_stop + 1)))


def load_sharded_base(model_dir: str | Path, spec: JobSpec, precision: Precision, *, strategy: str,
                      full_finetune: bool):
    """The base model for a job that loads_sharded: FSDP's still empty (wrap fills each rank's shard once
    it is sharded, the adapter included), ZeRO-3's partitioned and filled now, before the adapter."""
    model = empty_base_model(model_dir, spec, precision, strategy=strategy, full_finetune=full_finetune)
    if strategy == "deepspeed":
        load_zero3_partitions(model, model_dir)
    return model



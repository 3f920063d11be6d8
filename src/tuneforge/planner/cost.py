"""How much a job costs: the price table (per device type, on-demand and spot, per tenant) and the estimate
of a job's GPU-hours, wall time and money from its tokens x epochs and the planner's throughput model.

Torch-free, like the rest of the planner: the API prices a job at submission, the worker prices what runs.
Prices are USD per device-hour (one GPU, or one CPU training process for `cpu` jobs). The defaults are
typical 2026 GPU-cloud list prices (docs/cost.md); an operator replaces any of them, and gives tenants
their negotiated rates, in a YAML or JSON file named by TUNEFORGE_PRICE_TABLE.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneforge.planner.errors import PlannerError

Market = Literal["on_demand", "spot"]
PRICE_TABLE_ENV = "TUNEFORGE_PRICE_TABLE"

# USD per device-hour (on-demand, spot). On-demand: what GPU clouds list for one GPU of an 8-GPU node
# (hyperscalers list 1.5-3x more); spot / interruptible: about 40-50% of it. cpu: a training process of
# a few cores on a general-purpose instance.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "t4": (0.35, 0.12),
    "l4": (0.80, 0.30),
    "a10g": (1.00, 0.40),
    "a100-40gb": (1.60, 0.70),
    "a100-80gb": (2.00, 0.90),
    "h100-80gb": (3.00, 1.50),
    "h200": (3.80, 2.00),
    "b200": (5.50, 3.00),
    "cpu": (0.05, 0.02),
}

# What the recipe does per trained token beyond one SFT-style step, in step-equivalents: DPO also runs the
# reference model's forward pass (2N of a LoRA step's 4N FLOPs); an eval run only runs forward passes.
# PPO and GRPO spend most of their time generating rollouts, which this model does not estimate.
METHOD_FACTOR = {"sft": 1.0, "reward": 1.0, "dpo": 1.5, "eval": 1 / 3}
# Without a tokenizer's count (uploads are validated without one), tokens are characters / 4 (BPE
# tokenizers on English text) plus the chat template's markers, about 8 tokens per message.
CHARS_PER_TOKEN = 4.0
TEMPLATE_TOKENS_PER_TURN = 8
# Process start, imports and model load before the first step: a fixed part and the weights at disk speed.
STARTUP_SECONDS = 20.0
LOAD_BYTES_PER_SECOND = 500e6
# CPU jobs have no published peak: fp32 FLOP/s one core sustains in matmuls (AVX2 / AVX-512 FMA) and
# the fraction a small-model training step reaches (kernel launches and Python dominate).
CPU_FLOPS_PER_CORE = 50e9
CPU_MFU = 0.15


# ---- the price table -------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


USD = Annotated[float, Field(ge=0, le=1000)]


class DevicePrice(_Strict):
    on_demand: USD | None = Field(None, description="USD per device-hour at on-demand prices.")
    spot: USD | None = Field(None, description="USD per device-hour on spot / interruptible capacity.")


DeviceName = Literal["t4", "l4", "a10g", "a100-40gb", "a100-80gb", "h100-80gb", "h200", "b200", "cpu"]


class TenantPrices(_Strict):
    discount: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="A fraction taken off every list price (0.2: 20% off); a tenant's own prices are not discounted.")
    market: Market | None = Field(None, description="Which price the tenant's jobs are charged; default the table's.")
    prices: dict[DeviceName, DevicePrice] = Field(default_factory=dict, description="The tenant's negotiated rates.")


class PriceFile(_Strict):
    market: Market = Field("on_demand", description="Which price jobs are charged: on_demand or spot.")
    prices: dict[DeviceName, DevicePrice] = Field(default_factory=dict, description="List prices replacing the defaults.")
    tenants: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")], TenantPrices] = Field(default_factory=dict)


@dataclass(frozen=True)
class Rate:
    """What one device-hour costs a tenant: the charged price, both list prices, and where it came from."""

    device: str
    market: Market
    price_per_hour: float
    on_demand: float
    spot: float
    source: Literal["default", "price table", "tenant"]


class PriceTable:
    def __init__(self, file: PriceFile | None = None):
        self.file = file or PriceFile()

    def list_price(self, device: str) -> tuple[tuple[float, float], str]:
        if device not in DEFAULT_PRICES:
            raise PlannerError(f"price: no device {device!r}; expected one of {', '.join(DEFAULT_PRICES)}")
        on_demand, spot = DEFAULT_PRICES[device]
        given = self.file.prices.get(device)
        if given is None:
            return (on_demand, spot), "default"
        return (given.on_demand if given.on_demand is not None else on_demand,
                given.spot if given.spot is not None else spot), "price table"

    def rate(self, device: str, tenant_id: str | None = None) -> Rate:
        (on_demand, spot), source = self.list_price(device)
        tenant = self.file.tenants.get(tenant_id or "")
        market = self.file.market
        if tenant is not None:
            market = tenant.market or market
            own = tenant.prices.get(device)
            on_demand, spot = on_demand * (1 - tenant.discount), spot * (1 - tenant.discount)
            if own is not None:
                on_demand = own.on_demand if own.on_demand is not None else on_demand
                spot = own.spot if own.spot is not None else spot
            if tenant.discount or own is not None:
                source = "tenant"
        charged = on_demand if market == "on_demand" else spot
        return Rate(device, market, round(charged, 6), round(on_demand, 6), round(spot, 6), source)

    def rates(self, tenant_id: str | None = None) -> list[Rate]:
        return [self.rate(device, tenant_id) for device in DEFAULT_PRICES]


def parse_price_table(text: str, *, source: str) -> PriceTable:
    """A price table from YAML or JSON text; errors name the file and the field."""
    import yaml

    try:
        raw = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PlannerError(f"{source}: not valid {'JSON' if source.endswith('.json') else 'YAML'} ({exc})") from None
    try:
        return PriceTable(PriceFile.model_validate(raw if raw is not None else {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "[key]") or "(top level)"
        raise PlannerError(f"{source}: {where}: {first['msg']}") from None


_loaded: dict[str, tuple[int, PriceTable]] = {}  # path -> (mtime, the table last read from it)
log = logging.getLogger("tuneforge.cost")


def price_table() -> PriceTable:
    """The operator's price table (TUNEFORGE_PRICE_TABLE), re-read when the file changes; the defaults without one.

    The first read of a bad file raises (the server and workers refuse to start on it); a later edit
    that does not parse keeps the table last read and logs why, so running jobs keep being priced."""
    path = os.environ.get(PRICE_TABLE_ENV)
    if not path:
        return PriceTable()
    known = _loaded.get(path)
    try:
        mtime = Path(path).stat().st_mtime_ns
        if known is None or known[0] != mtime:
            _loaded[path] = (mtime, parse_price_table(Path(path).read_text(encoding="utf-8"), source=path))
    except (OSError, PlannerError) as exc:
        message = (f"{PRICE_TABLE_ENV}={path}: cannot read the price table ({exc.strerror})"
                   if isinstance(exc, OSError) else str(exc))
        if known is None:
            raise PlannerError(message) from None
        log.error("%s; keeping the price table read before", message)
        _loaded[path] = (mtime if not isinstance(exc, OSError) else known[0], known[1])
    return _loaded[path][1]


# ---- the estimate ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostEstimate:
    device: str
    devices: int
    tokens: int  # trained tokens (all epochs), in step-equivalents for the method
    tokens_per_second: float | None  # over all devices
    wall_seconds: float | None  # start-up and training steps, no queueing
    gpu_hours: float | None  # device-hours charged: wall time x devices
    price_per_gpu_hour: float
    market: Market
    cost_usd: float | None
    on_demand_usd: float | None
    spot_usd: float | None
    basis: str  # how the tokens and the throughput were arrived at

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_tokens_per_second(hardware_flops_per_token: float, processes: int, cores: int | None = None) -> float:
    """A CPU job's tokens/s per process: this machine's cores shared by the job's processes."""
    cores = cores or os.cpu_count() or 1
    return CPU_FLOPS_PER_CORE * max(1.0, cores / processes) * CPU_MFU / hardware_flops_per_token


def estimate_cost(plan, *, tokens: int, rate: Rate, basis: str = "") -> CostEstimate:
    """GPU-hours, wall time and money of training `tokens` on the plan's setup at `rate`."""
    setup, throughput = plan.setup, plan.throughput
    devices = setup.world_size
    per_second = throughput.tokens_per_second
    if per_second is None and setup.gpu == "cpu":
        per_second = cpu_tokens_per_second(throughput.hardware_flops_per_token, devices) * devices
        basis += f"; cpu: {CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core at {CPU_MFU:.0%} utilization"
    if not per_second:
        return CostEstimate(setup.gpu, devices, tokens, None, None, None, rate.price_per_hour, rate.market,
                            None, None, None, basis + f"; no throughput estimate for {setup.gpu}")
    weight_bytes = plan.model.num_params * (2 if setup.mixed else 4)
    wall = STARTUP_SECONDS + weight_bytes / LOAD_BYTES_PER_SECOND + tokens / per_second
    hours = wall * devices / 3600
    return CostEstimate(setup.gpu, devices, tokens, per_second, wall, hours, rate.price_per_hour, rate.market,
                        hours * rate.price_per_hour, hours * rate.on_demand, hours * rate.spot, basis.lstrip("; "))


def tokens_per_example(stats: dict, examples: int, max_seq_length: int) -> tuple[float, str]:
    """Mean tokens of one example from a dataset report's statistics, and how it was counted."""
    if stats.get("total_tokens"):
        mean, how = stats["total_tokens"] / examples, "the tokenizer's count"
    else:
        turns = stats.get("turns") or examples
        mean = (stats.get("characters") or 0) / examples / CHARS_PER_TOKEN + TEMPLATE_TOKENS_PER_TURN * turns / examples
        how = f"characters / {CHARS_PER_TOKEN:g} + {TEMPLATE_TOKENS_PER_TURN} template tokens per message"
    return min(mean, float(max_seq_length)), how


def training_tokens(spec, *, examples: int, stats: dict) -> tuple[int, str] | None:
    """Tokens a job trains on (examples x epochs, or max_steps x batch) in SFT step-equivalents; None for a
    method this model cannot price (PPO / GRPO generate) or an empty dataset."""
    from tuneforge.spec.hyperparameters import resolve_hyperparameters

    factor = METHOD_FACTOR.get(spec.method)
    if factor is None or examples < 1:
        return None
    mean, how = tokens_per_example(stats, examples, spec.dataset.max_seq_length)
    training = resolve_hyperparameters(spec, examples).training
    if training.max_steps:
        trained = training.max_steps * training.batch_size
        what = f"{training.max_steps} steps x {training.batch_size} examples"
    else:
        epochs = float(training.num_epochs) if spec.method != "eval" else 1.0
        trained = examples * epochs
        what = f"{examples} examples x {epochs:g} epochs" if spec.method != "eval" else f"{examples} examples"
    tokens = int(trained * mean * factor)
    note = f" x {factor:g} for {spec.method}" if factor != 1 else ""
    return tokens, f"{what} x {mean:,.0f} tokens ({how}){note}"

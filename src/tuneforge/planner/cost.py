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
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

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
# PPO and GRPO are counted by rollout_tokens: their steps generate, score and then train.
METHOD_FACTOR = {"sft": 1.0, "reward": 1.0, "dpo": 1.5, "vlm": 1.0, "clip": 1.0, "eval": 1 / 3}
# Without a tokenizer's count (uploads are validated without one), tokens are characters / 4 (BPE
# tokenizers on English text) plus the chat template's markers, about 8 tokens per message.
CHARS_PER_TOKEN = 4.0
# Best-fit decreasing fills packed rows to 95-99% (data/packing.py); the estimate takes the low end.
PACKED_FILL = 0.95
TEMPLATE_TOKENS_PER_TURN = 8
# Process start, imports and model load before the first step: a fixed part and the weights at disk speed
# (measured on an idle 2-core machine: 9-10 s to the first step of SmolLM2-135M with the model imported).
STARTUP_SECONDS = 10.0
LOAD_BYTES_PER_SECOND = 500e6
# What every optimizer step costs besides its FLOPs: the optimizer update, clipping, the step's events and
# Python; it is what a tiny model's step is made of, and a small share of a real one's.
STEP_OVERHEAD_SECONDS = 0.05
# CPU jobs have no published peak: the fp32 FLOP/s one core sustains in a training step, measured with
# bench/quality.py on an idle 2-core AVX-512 Xeon: SmolLM2-135M LoRA 173, full 213, QLoRA 165 GFLOP/s over
# both cores (the planner's FLOPs per token times the measured real tokens/s). A core without AVX-512
# sustains about half.
CPU_FLOPS_PER_CORE = 85e9


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
    return CPU_FLOPS_PER_CORE * max(1.0, cores / processes) / hardware_flops_per_token


def estimate_cost(plan, *, tokens: int, rate: Rate, basis: str = "", steps: int = 0) -> CostEstimate:
    """GPU-hours, wall time and money of training `tokens` in `steps` optimizer steps on the plan's setup at
    `rate`."""
    setup, throughput = plan.setup, plan.throughput
    devices = setup.world_size
    per_second = throughput.tokens_per_second
    if per_second is None and setup.gpu == "cpu":
        per_second = cpu_tokens_per_second(throughput.hardware_flops_per_token, devices) * devices
        basis += f"; cpu: {CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s sustained per core"
    if not per_second:
        return CostEstimate(setup.gpu, devices, tokens, None, None, None, rate.price_per_hour, rate.market,
                            None, None, None, basis + f"; no throughput estimate for {setup.gpu}")
    weight_bytes = plan.model.num_params * (2 if setup.mixed else 4)
    wall = STARTUP_SECONDS + weight_bytes / LOAD_BYTES_PER_SECOND + tokens / per_second + steps * STEP_OVERHEAD_SECONDS
    hours = wall * devices / 3600
    return CostEstimate(setup.gpu, devices, tokens, per_second, wall, hours, rate.price_per_hour, rate.market,
                        hours * rate.price_per_hour, hours * rate.on_demand, hours * rate.spot, basis.lstrip("; "))


class Generation(NamedTuple):
    """What one model does in an eval run: read `prompts` prompts of about `prompt_tokens` tokens each and
    write up to `new_tokens` tokens for each."""
    what: str  # "the model" or "judge NAME", for the basis
    prompts: int
    prompt_tokens: float
    new_tokens: int


def generation_tokens(work: Generation) -> tuple[int, str]:
    """SFT step-equivalent tokens of a generation pass, by evaluation_tokens' measured rule: the prefill is a
    forward (1/3 of a trained token per prompt token), a decoded token costs about one trained token."""
    tokens = int(work.prompts * (work.prompt_tokens / 3 + work.new_tokens))
    return tokens, (f"{work.what}: {work.prompts} prompts of ~{work.prompt_tokens:,.0f} tokens + up to "
                    f"{work.new_tokens} generated each")


def combined_estimate(parts: list[CostEstimate]) -> CostEstimate:
    """One job's estimate from its parts run one after another in one process on the same device and rate (an
    eval run's model, then its judges): each loads its weights, the process starts once; hours and money follow
    the wall time. A part without a throughput makes the whole unpriced."""
    if len(parts) == 1 or any(part.gpu_hours is None for part in parts):
        return next((part for part in parts if part.gpu_hours is None), parts[0])
    first, each = parts[0], sum(part.wall_seconds for part in parts)
    wall = each - STARTUP_SECONDS * (len(parts) - 1)
    scale = wall / each
    tokens = sum(part.tokens for part in parts)
    compute = sum(part.tokens / part.tokens_per_second for part in parts)
    return CostEstimate(first.device, first.devices, tokens, tokens / compute if compute else None, wall,
                        scale * sum(part.gpu_hours for part in parts), first.price_per_gpu_hour, first.market,
                        scale * sum(part.cost_usd for part in parts), scale * sum(part.on_demand_usd for part in parts),
                        scale * sum(part.spot_usd for part in parts), "; ".join(part.basis for part in parts))


def tokens_per_example(stats: dict, examples: int, max_seq_length: int, image_tokens: int = 0) -> tuple[float, str]:
    """Mean tokens of one example from a dataset report's statistics, and how it was counted; a VLM's images
    fill `image_tokens` positions each (the validator counts images, not their tokens: that is the model's)."""
    if stats.get("total_tokens"):
        mean, how = stats["total_tokens"] / examples, "the tokenizer's count"
    else:
        turns = stats.get("turns") or examples
        mean = (stats.get("characters") or 0) / examples / CHARS_PER_TOKEN + TEMPLATE_TOKENS_PER_TURN * turns / examples
        how = f"characters / {CHARS_PER_TOKEN:g} + {TEMPLATE_TOKENS_PER_TURN} template tokens per message"
    if image_tokens and stats.get("images"):
        mean += stats["images"] / examples * image_tokens
        how += f" + {image_tokens} tokens per image"
    return min(mean, float(max_seq_length)), how


def packs(spec, arch) -> bool:
    """Whether the recipe will pack this job's examples: `training.packing`, or for auto the SFT recipe's rule
    (engine/model_loading.py:packing_support) on the planner's model, which is a Llama-family decoder; its
    mixture-of-experts models (Mixtral) are the family packing is not verified for."""
    if spec.training.packing != "auto":
        return bool(spec.training.packing)
    return spec.method == "sft" and arch.num_experts == 1


def packed_row_tokens(mean: float, max_seq_length: int, row_cap: int | None = None) -> float:
    """Real tokens in one packed row: the SDPA rule of spec/hyperparameters.py:packed_row_length (rows of about
    EXAMPLES_PER_ROW average examples, in multiples of ROW_MULTIPLE, at most row_cap and max_seq_length) filled
    to PACKED_FILL by best-fit decreasing, and never less than one average example (longer examples train
    alone; a row shorter than two average examples holds about one, and packing: auto stays off where
    rows would hold under MIN_EXAMPLES_PER_ROW: priced as examples). Workers with
    flash-attention pack max_seq_length rows; that is a worker's property, not the job's, so the estimate
    counts the SDPA rows."""
    from tuneforge.spec.hyperparameters import sdpa_row_length

    row = sdpa_row_length(mean, max_seq_length, row_cap)
    return mean if row < 2 * mean else row * PACKED_FILL


def evaluation_tokens(spec, *, validation_examples: int, mean: float, steps: float) -> tuple[int, str]:
    """The job's evaluations in SFT step-equivalents: each pass (the base before training, every
    eval_every_steps, the final one) runs the likelihood forward (1/3 of a step per token) and, for generated
    metrics and graders, a prefill and greedy decoding of up to max_new_tokens. Decoding runs one token per
    forward over a batch at about a third of a training step's efficiency, so a generated token costs about
    one trained token (measured: 32 json-extraction examples took 12.6-14 s per pass, the rule gives 13 s)."""
    evaluation = spec.evaluation
    count = min(validation_examples, evaluation.max_eval_examples or validation_examples)
    if count < 1 or spec.method not in ("sft", "reward", "dpo"):
        return 0, ""
    passes = 1 + int(evaluation.eval_before_training)
    if evaluation.eval_every_steps:
        passes += int(steps // evaluation.eval_every_steps)
    per_example = mean / 3
    if evaluation.needs_generation():
        per_example += mean / 3 + min(float(evaluation.max_new_tokens), mean)
    return int(passes * count * per_example), f"{passes} evaluation{'s' if passes > 1 else ''} of {count} examples"


class TokenCount(NamedTuple):
    tokens: int  # SFT step-equivalent tokens, evaluations included
    steps: int  # optimizer steps
    basis: str  # how they were counted


def training_tokens(spec, *, examples: int, stats: dict, packed: bool = False, row_cap: int | None = None,
                    validation_examples: int | None = None, image_tokens: int = 0) -> TokenCount | None:
    """Tokens a job trains on (examples x epochs, or max_steps x batch) in SFT step-equivalents, its
    evaluations included (PPO and GRPO: rollout_tokens); None for a method this model cannot price or an
    empty dataset. `packed`: the job packs (see packs()); a max_steps job's explicit batch then counts rows of
    several examples, at most row_cap tokens (ModelArch.packed_row_cap). Without a validation file
    (validation_examples None) train_split carves the validation set out of the examples. `image_tokens`: the
    positions one image fills for a VLM (ModelArch.vision.image_tokens)."""
    from tuneforge.spec.hyperparameters import resolve_hyperparameters

    if spec.method in ("ppo", "grpo"):
        return rollout_tokens(spec, prompts=examples, stats=stats, validation_prompts=validation_examples)
    factor = METHOD_FACTOR.get(spec.method)
    if factor is None or examples < 1:
        return None
    mean, how = tokens_per_example(stats, examples, spec.dataset.max_seq_length, image_tokens)
    if validation_examples is None and spec.method != "eval":
        validation_examples = examples - max(1, round(examples * spec.dataset.train_split))
        examples -= validation_examples
    training = resolve_hyperparameters(spec, examples).training
    if training.max_steps:
        explicit_batch = spec.training.batch_size != "auto" or "auto" not in (
            spec.training.per_device_batch_size, spec.training.gradient_accumulation_steps)
        counts_rows = packed and explicit_batch
        per_item = packed_row_tokens(mean, spec.dataset.max_seq_length, row_cap) if counts_rows else mean
        trained = training.max_steps * training.batch_size * per_item / mean
        steps = float(training.max_steps)
        what = f"{training.max_steps} steps x {training.batch_size} " + (
            f"packed rows of ~{per_item:,.0f} tokens (~{per_item / mean:.1f} examples each)" if counts_rows else "examples")
    else:
        epochs = float(training.num_epochs) if spec.method != "eval" else 1.0
        trained = examples * epochs
        steps = trained / training.batch_size
        what = f"{examples} examples x {epochs:g} epochs" if spec.method != "eval" else f"{examples} examples"
    tokens = int(trained * mean * factor)
    note = f" x {factor:g} for {spec.method}" if factor != 1 else ""
    basis = f"{what} x {mean:,.0f} tokens ({how}){note}"
    evaluated, passes = evaluation_tokens(spec, validation_examples=validation_examples or 0, mean=mean, steps=steps)
    if evaluated:
        tokens += evaluated
        basis += f"; {passes}: {evaluated:,} step-equivalent tokens"
    return TokenCount(tokens, math.ceil(steps), basis)


# A token the RL sampler (engine/rl/sampling.py: one KV-cached forward per position, per-row seeded nucleus
# sampling) decodes, in step-equivalents. Fitted on this project's 2-core CPU with bench/cost_estimate.py
# (SmolLM2-135M, 32 and 4 completions a step): at one step-equivalent a token (the evaluations' rule) GRPO was
# priced 57% and PPO 34% low, at 5 they are 12% and 11% low. Decoding a few tokens a forward is memory- and
# overhead-bound, far from a training step's efficiency. Not measured on a GPU.
SAMPLED_TOKEN_COST = 5.0


def rollout_tokens(spec, *, prompts: int, stats: dict, validation_prompts: int | None = None) -> TokenCount | None:
    """PPO and GRPO in SFT step-equivalents. Each step samples completions of its rollout.prompts_per_step
    prompts (GRPO: grpo.num_generations of each): a prefill (a forward, 1/3 of a token) and up to
    rollout.max_new_tokens decoded tokens at SAMPLED_TOKEN_COST step-equivalents each (measured). The full rollout.max_new_tokens is counted: sampled completions often run to it, and an
    estimate that budgets hold jobs to had better be high than low. Then forwards over prompt and completion:
    PPO the policy's log-probabilities and values, the reference, a reward model; GRPO the reference (beta > 0),
    the sampling policy's log-probabilities (num_iterations > 1), a reward model. Then training on them: PPO
    ppo_epochs passes, GRPO num_iterations. The held-out evaluations (before training, every eval_every_steps,
    the final one) decode greedily up to evaluation.max_new_tokens and score the answers with the reference."""
    if prompts < 1:
        return None
    rollout, data = spec.rollout, spec.dataset
    prompt, how = tokens_per_example(stats, prompts, max(1, data.max_seq_length - rollout.max_new_tokens))
    if validation_prompts is None:  # train_split carves the held-out prompts out of the training file
        validation_prompts = prompts - max(1, round(prompts * data.train_split))
        prompts -= validation_prompts
    from tuneforge.spec.hyperparameters import resolve_hyperparameters

    training = resolve_hyperparameters(spec, prompts).training  # the epochs as the recipe resolves them
    # engine/rl/setup.py's PromptSchedule: whole steps of prompts_per_step prompts per epoch.
    steps = training.max_steps or max(1, round(prompts // rollout.prompts_per_step * float(training.num_epochs)))
    completion, sequence = float(rollout.max_new_tokens), prompt + rollout.max_new_tokens
    reward_model = rollout.reward_model is not None
    if spec.method == "ppo":
        samples, passes = rollout.prompts_per_step, spec.ppo.ppo_epochs
        forwards = 2 + reward_model
        updates = spec.ppo.ppo_epochs * spec.ppo.num_mini_batches
    else:
        samples, passes = rollout.prompts_per_step * spec.grpo.num_generations, spec.grpo.num_iterations
        forwards = (spec.grpo.beta > 0) + (spec.grpo.num_iterations > 1) + reward_model
        updates = spec.grpo.num_iterations
    per_step = samples * (prompt / 3 + SAMPLED_TOKEN_COST * completion + forwards * sequence / 3 + passes * sequence)
    tokens = int(steps * per_step)
    basis = (f"{steps} steps x {samples} completions of {prompt:,.0f} prompt ({how}) + {completion:,.0f} sampled tokens: "
             f"generation, {forwards} scoring forward{'s' if forwards != 1 else ''}, {passes} training "
             f"pass{'es' if passes != 1 else ''}")
    count = min(validation_prompts, spec.evaluation.max_eval_examples or validation_prompts)
    if count > 0:
        evaluations = 1 + int(spec.evaluation.eval_before_training)
        if spec.evaluation.eval_every_steps:
            evaluations += steps // spec.evaluation.eval_every_steps
        answer = float(spec.evaluation.max_new_tokens)
        evaluated = int(evaluations * count * (prompt / 3 + SAMPLED_TOKEN_COST * answer
                                               + (1 + reward_model) * (prompt + answer) / 3))
        tokens += evaluated
        basis += f"; {evaluations} evaluation{'s' if evaluations > 1 else ''} of {count} prompts: {evaluated:,} step-equivalent tokens"
    return TokenCount(tokens, steps * updates, basis)

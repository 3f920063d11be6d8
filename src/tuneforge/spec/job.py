"""JobSpec: the one schema for a fine-tuning job, read by the CLI, stored by the API, run by recipes.

Every field has a default (where one makes sense) and a one-line description; the descriptions are
the `--help` text of `tuneforge train` and the API schema. Choices are closed literals, never import
paths, so a job spec cannot name code to run.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tuneforge.spec.evals import EvalRunSpec, local_refs_only
from tuneforge.spec.graders import MAX_GRADERS, Grader
from tuneforge.spec.monitoring import MonitoringSpec
from tuneforge.spec.preference import DpoSpec, RewardModelSpec
from tuneforge.spec.reinforcement import GrpoSpec, PpoSpec, RolloutSpec
from tuneforge.spec.vision import VisionSpec, base_model_problem, vision_problem

BUILTIN_BASE_MODELS = ("smollm2-135m-instruct", "tiny-llama", "tiny-llava", "tiny-clip")  # tiny-*: built from configs

# Every number has an upper bound that the database (32-bit integer columns), numpy (32-bit seeds) and
# real hardware can hold, and every list a length: a request can never overflow a column or make the
# server echo megabytes in each job listing.
MAX_COUNT = 1_000_000_000  # steps, examples, intervals
MAX_BATCH = 1 << 20
MAX_SEQ_LENGTH = 1 << 20  # tokens
MAX_GPUS_PER_NODE = 64
MAX_NODES = 1024
MAX_TARGET_MODULES = 256
MAX_DEEPSPEED_CONFIG_BYTES = 64 * 1024

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(gt=0, le=MAX_BATCH)]
PositiveFloat = Annotated[float, Field(gt=0)]
ModuleName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.]+$")]

# vlm, clip: the methods that see images (spec/vision.py); eval: an eval run (no training, spec/evals.py)
Method = Literal["sft", "reward", "dpo", "ppo", "grpo", "vlm", "clip", "eval", "export"]
# export: an export of a registered model as deploy: describes it (the Exports API schedules it; no dataset)
NO_DATASET = "none"  # dataset.path of a method that reads no data (export)
PREFERENCE_METHODS = ("reward", "dpo")  # train on preference pairs
RL_METHODS = ("ppo", "grpo")  # sample completions and score them
# The record formats (data/formats.py) each method trains on: checked against dataset.format here and
# against an uploaded file's detected format at admission.
METHOD_FORMATS = {
    "sft": ("chat", "instruction", "completion", "text", "preference"),  # preference: the chosen reply
    "reward": ("preference",),
    "dpo": ("preference",),
    "ppo": ("prompt", "chat"),  # chat: the turns before the last assistant reply are the prompt
    "grpo": ("prompt", "chat"),
    "vlm": ("image_chat",),  # a vision-language model on chats with images (spec/vision.py)
    "clip": ("image_text",),  # contrastive image-text pairs
}
VISION_METHODS = ("vlm", "clip")
DEFAULT_METRICS = ("loss", "perplexity")
# Methods that measure themselves on held-out data (reward: loss, pair accuracy and margin; ppo / grpo:
# reward, pass rate and KL): of evaluation.metrics they take only these (or the untouched default), and
# evaluation.graders are sft's and dpo's.
OWN_METRICS = {"reward": ("loss",), "ppo": (), "grpo": (), "clip": ("loss",)}  # clip: loss and retrieval recall@k

GpuType = Literal[
    "any", "cpu", "t4", "l4", "a10g", "a100-40gb", "a100-80gb", "h100-80gb", "h200", "b200"
]


class Section(BaseModel):
    """A part of the job spec: unknown keys are an error, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    base_model: str = Field(
        "smollm2-135m-instruct", max_length=4096,
        description="Built-in base model (smollm2-135m-instruct, tiny-llama; tiny-llava for vlm, tiny-clip for clip) or a "
        "local Hugging Face model directory.",
    )
    quantization: Literal["none", "int8", "nf4", "fp4"] = Field(
        "none", description="Load the base weights quantized with bitsandbytes: none, int8, nf4 or fp4 (4-bit is QLoRA)."
    )
    double_quantization: bool = Field(
        True, description="4-bit only: also quantize the quantization constants (saves ~0.4 bits per parameter)."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="4-bit only: dtype of the matmuls on dequantized weights; auto follows training.precision."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel: auto picks flash_attention_2 when installed on a GPU, else sdpa."
    )

    @field_validator("base_model")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a built-in base model or a model directory")
        return value


class DatasetSpec(Section):
    path: str = Field(
        ..., max_length=4096, description="Training data file: JSONL, JSON array, CSV or Parquet, optionally gzipped."
    )
    format: Literal["auto", "chat", "instruction", "completion", "text", "preference", "prompt", "image_chat",
                    "image_text"] = Field(
        "auto", description="Record format; auto detects it from the fields of the first record."
    )
    max_seq_length: int = Field(2048, gt=0, le=MAX_SEQ_LENGTH, description="Longest tokenized example, after the prompt template.")
    prompt_template: Literal["auto", "chat", "alpaca", "plain"] = Field(
        "auto",
        description="How records become text: chat (the tokenizer's chat template), alpaca, plain (prompt+completion); "
        "auto uses chat for chat/instruction data and plain for completion data.",
    )
    too_long: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What to do with an example longer than max_seq_length: drop it, truncate it, or fail."
    )
    validation_path: str | None = Field(
        None, max_length=4096, description="Validation data file; when empty, train_split carves a validation set out of path."
    )
    train_split: float = Field(
        0.95, gt=0.0, le=1.0, description="Fraction of path used for training when validation_path is empty."
    )


class AdapterSpec(Section):
    type: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora (adapter on a frozen base), qlora (LoRA on a 4-bit base) or full fine-tuning."
    )
    rank: int = Field(16, gt=0, le=4096, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, le=1e6, description="LoRA scaling alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=MAX_TARGET_MODULES)] | Literal[
        "all-linear"] = Field(
        "all-linear", description='Module names to adapt (e.g. ["q_proj", "v_proj"]) or "all-linear".'
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class TrainingSpec(Section):
    learning_rate: Annotated[float, Field(gt=0, le=10)] | Auto = Field(
        "auto", description="Peak learning rate; auto: with LoRA / QLoRA 2e-4 (sft, reward, dpo, vlm), 1e-4 (clip) or "
        "5e-5 (ppo, grpo); full fine-tuning 2e-5 (sft, vlm), 1e-5 (clip), 1e-4 (reward), 1e-6 (dpo, ppo, grpo)."
    )
    batch_size: PositiveInt | Auto = Field(
        "auto", description="Examples per optimizer step over all devices (the effective batch); auto grows with the data."
    )
    per_device_batch_size: PositiveInt | Auto = Field(
        "auto", description="Examples per micro-batch on each device; auto: the largest that fits, backing off on OOM."
    )
    gradient_accumulation_steps: PositiveInt | Auto = Field(
        "auto", description="Micro-batches per optimizer step; auto: what batch_size and per_device_batch_size imply."
    )
    num_epochs: Annotated[float, Field(gt=0, le=10_000)] | Auto = Field(
        "auto", description="Passes over the training data (ignored when max_steps is set); auto: 3, fewer or more "
        "so that small and large datasets see a sensible number of examples."
    )
    max_steps: int | None = Field(None, gt=0, le=MAX_COUNT, description="Optimizer steps to run; overrides num_epochs.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps with a linear learning-rate warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"] = Field(
        "adamw", description="Optimizer: adamw, adamw_8bit / paged_adamw_8bit (bitsandbytes), adafactor or sgd."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="Decoupled weight decay (not applied to biases and norms).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this value; empty disables.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Training precision; auto is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for data order, splits, adapter initialization and dropout.")
    packing: bool | Auto = Field(
        "auto",
        description="Pack several examples into each row, each attending only to itself; auto packs where isolation "
        "is verified for the model (Llama, Qwen2/3, Mistral families). Rows are max_seq_length long with "
        "flash-attention, else sized from the data (about 4 average examples, at least the longest). With "
        "packing, batch sizes count rows; an auto batch is the rows holding as many examples as it would unpacked.",
    )
    padding_free: bool | Auto = Field(
        "auto",
        description="Without packing, the examples of a micro-batch share rows no longer than its longest example, "
        "each attending only to itself, instead of one padded row each: the same examples, loss and gradients with "
        "fewer padding tokens. auto: where packing isolation is verified for the model. Packed rows are already "
        "padding-free, so it applies only when packing is off.",
    )
    logging_steps: int = Field(1, gt=0, le=MAX_COUNT, description="Write a metrics event every N optimizer steps.")


class ResourcesSpec(Section):
    num_gpus: int = Field(1, ge=1, le=MAX_GPUS_PER_NODE, description="Training processes per node, one per GPU (CPU processes when there is no GPU).")
    gpu_type: GpuType = Field("any", description="GPU model the job needs; any takes what the worker has.")
    num_nodes: int = Field(1, ge=1, le=MAX_NODES, description="Machines to train on.")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="How several processes share the work: ddp, fsdp (sharded) or deepspeed (ZeRO)."
    )
    fsdp_sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard"] = Field(
        "full_shard",
        description="FSDP: full_shard shards parameters, gradients and optimizer state; shard_grad_op keeps "
        "parameters gathered between forward and backward; hybrid_shard shards within a node, replicates across.",
    )
    cpu_offload: bool = Field(
        False, description="Keep sharded parameters, gradients and optimizer state in CPU memory (FSDP, DeepSpeed)."
    )
    deepspeed_stage: Literal[2, 3] = Field(
        3, description="DeepSpeed ZeRO stage: 2 shards gradients and optimizer state, 3 also the parameters."
    )
    deepspeed_config: dict[str, Any] | None = Field(
        None,
        description="Your own DeepSpeed config as a JSON object (in a job file: a mapping, or the path of a JSON "
        "file that is read when the spec is loaded); replaces the config generated from this spec. Keys that "
        "name files, directories or commands are refused.",
    )
    model_loading: Literal["auto", "whole"] = Field(
        "auto", description="auto: with fsdp or ZeRO-3 over several processes (a full-precision base), each rank "
        "builds the model without weights and reads only its shard from the safetensors files, so host memory "
        "holds about the model / processes; whole: every rank loads the whole model first, then shards it.",
    )
    host_memory_gb: float | None = Field(
        None, gt=0, le=1e6, description="Host RAM per node in GiB the job may use, checked at submission against "
        "what loading the model needs on a node; default: this machine's RAM for a local job, unchecked elsewhere.",
    )
    collective_timeout_s: float = Field(
        600.0, gt=0, le=7 * 86400, description="Seconds a collective may wait for the other ranks before the job fails."
    )
    priority: int = Field(
        0, ge=-100, le=100, description="Scheduling priority among the same tenant's queued jobs; higher starts first."
    )
    max_cost_usd: float | None = Field(
        None, gt=0, le=1e9, description="Budget of this job in USD (retries and evaluation included): refused at "
        "submission when its estimate is over it, stopped at its next checkpoint when its cost reaches it."
    )
    max_gpu_hours: float | None = Field(
        None, gt=0, le=1e9, description="Budget of this job in GPU-hours (CPU process-hours for cpu jobs), enforced "
        "like max_cost_usd."
    )

    @field_validator("deepspeed_config", mode="before")
    @classmethod
    def _inline_object(cls, value: Any) -> Any:
        # A path is read by the job-file loader (spec/loader.py); a spec itself never names a file.
        if isinstance(value, str):
            raise ValueError("expected the DeepSpeed config itself, a JSON object; a path to a JSON file is read "
                             "only from a job file or command-line override of `tuneforge train`")
        if isinstance(value, dict) and len(json.dumps(value, default=str)) > MAX_DEEPSPEED_CONFIG_BYTES:
            raise ValueError(f"the DeepSpeed config is larger than {MAX_DEEPSPEED_CONFIG_BYTES // 1024} KiB")
        return value

    @model_validator(mode="after")
    def _deepspeed_config_needs_deepspeed(self) -> ResourcesSpec:
        if self.deepspeed_config is not None and self.strategy != "deepspeed":
            raise ValueError(f"deepspeed_config is set but strategy is {self.strategy}; set strategy to deepspeed "
                             "or remove deepspeed_config")
        return self


LIKELIHOOD_METRICS = ("loss", "perplexity", "token_accuracy")
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "token_f1", "accuracy", "json_valid",
                      "json_schema")
EvalMetric = Literal["loss", "perplexity", "token_accuracy", "rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match",
                     "token_f1", "accuracy", "json_valid", "json_schema"]
LOWER_IS_BETTER = ("loss", "perplexity")  # every other metric and every grader score: higher is better
MAX_JSON_SCHEMA_BYTES = 64 * 1024


def one_group_pattern(value: str) -> str:
    """An answer extractor: a valid regular expression with exactly one capturing group (the answer)."""
    try:
        pattern = re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    if pattern.groups != 1:
        raise ValueError(f"needs exactly one capturing group (the answer), found {pattern.groups}")
    return value


class AccuracySpec(Section):
    """How the accuracy metric reads the answer out of an output: exactly one of choices or regex."""

    choices: Annotated[str, Field(min_length=2, max_length=26, pattern=r"^[A-Z]+$")] | None = Field(
        None, description='Choice letters, e.g. "ABCD": the answer is the letter the output names; the reference '
        "is a letter."
    )
    regex: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        None, description="A Python regular expression with one group: the answer in the output."
    )
    extract_reference: bool = Field(
        False, description="regex: read the reference's answer with the regex too (e.g. GSM8K's '#### 42')."
    )

    @field_validator("regex")
    @classmethod
    def _one_group(cls, value: str | None) -> str | None:
        return value if value is None else one_group_pattern(value)

    @model_validator(mode="after")
    def _one_extractor(self) -> AccuracySpec:
        if (self.regex is None) == (self.choices is None):
            raise ValueError('set exactly one of choices (e.g. "ABCD") or regex (a pattern with one group)')
        if self.choices is not None and len(set(self.choices)) != len(self.choices):
            raise ValueError(f"choices must be distinct letters, got {self.choices!r}")
        if self.extract_reference and self.regex is None:
            raise ValueError("extract_reference applies to regex only")
        return self

    def options(self) -> dict[str, Any]:
        """The accuracy metric's options (evaluation/metrics.py AccuracyOptions)."""
        return self.model_dump(exclude_none=True, exclude_defaults=True)


class EvaluationSpec(Section):
    metrics: Annotated[list[EvalMetric], Field(max_length=len(EvalMetric.__args__))] = Field(
        default_factory=lambda: ["loss", "perplexity"],
        description="Metrics on the validation set. Likelihood (teacher-forced, on the trained tokens): loss, "
        "perplexity, token_accuracy. Generated (greedy answers vs the reference): rouge1, rouge2, rougeL, bleu, chrf, "
        "exact_match, token_f1, accuracy (with evaluation.accuracy), json_valid, json_schema (with json_schema).",
    )
    graders: Annotated[list[Grader], Field(max_length=MAX_GRADERS)] = Field(
        default_factory=list,
        description="More criteria in OpenAI's grader shapes (string_check, text_similarity, score_model, label_model, "
        "multi), scored on each generated answer; {{item.reference}} is the reference answer. Each grader's mean "
        "score is reported under its name.",
    )
    accuracy: AccuracySpec | None = Field(
        None, description='accuracy: how the answer is read from an output: {choices: "ABCD"} (the letter it names) '
        "or {regex: PATTERN with one group, extract_reference: false}.",
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="json_schema: the JSON Schema each answer must match (an object; $ref only inside it)."
    )
    eval_every_steps: int | None = Field(
        None, gt=0, le=MAX_COUNT,
        description="Evaluate the metrics and graders every N optimizer steps and at the last; empty: only at the end.",
    )
    eval_before_training: bool = Field(True, description="Also evaluate the base model, so the report shows the gain.")
    max_eval_examples: int | None = Field(200, gt=0, le=MAX_COUNT, description="Evaluate on at most this many validation examples.")
    max_new_tokens: int = Field(64, gt=0, le=MAX_SEQ_LENGTH, description="Generation budget per example for generated metrics.")
    generation_batch_size: int = Field(
        16, gt=0, le=4096, description="Prompts generated together (left-padded, sorted by length, KV cache)."
    )
    report_samples: int = Field(
        5, ge=0, le=100, description="Example generations shown side by side (base vs fine-tuned) in the report."
    )

    @field_validator("metrics")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        if len(json.dumps(value, default=str)) > MAX_JSON_SCHEMA_BYTES:
            raise ValueError(f"the JSON schema is larger than {MAX_JSON_SCHEMA_BYTES // 1024} KiB")
        local_refs_only(value, "json_schema")
        return value

    @model_validator(mode="after")
    def _options_match_metrics(self) -> EvaluationSpec:
        if "json_schema" in self.metrics and self.json_schema is None:
            raise ValueError("metric json_schema needs evaluation.json_schema (the schema answers must match)")
        if "accuracy" in self.metrics and self.accuracy is None:
            raise ValueError('metric accuracy needs evaluation.accuracy: choices (e.g. "ABCD") or regex (one group)')
        names = [g.name for g in self.graders]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"grader names must be unique: {', '.join(repeated)} appear more than once")
        clashing = sorted(set(names) & set(EvalMetric.__args__))
        if clashing:
            raise ValueError(f"grader names {', '.join(clashing)} are metric names; rename the graders")
        return self

    def metric_options(self, name: str) -> dict[str, Any] | None:
        """What evaluation/metrics.py's score(name, ...) takes as options, from these fields."""
        if name == "accuracy" and self.accuracy is not None:
            return self.accuracy.options()
        if name == "json_schema":
            return {"schema": self.json_schema}
        return None

    def generated(self) -> list[str]:
        """The metrics that need generated answers."""
        return [m for m in self.metrics if m in GENERATION_METRICS]

    def needs_generation(self) -> bool:
        return bool(self.generated() or self.graders)

    def measured(self) -> list[str]:
        """Every name a result can carry: the metrics (loss brings token_accuracy), then the graders."""
        names = list(self.metrics)
        if "loss" in names and "token_accuracy" not in names:
            names.insert(names.index("loss") + 1, "token_accuracy")
        return names + [g.name for g in self.graders]


class CheckpointSpec(Section):
    every_steps: int | None = Field(None, gt=0, le=MAX_COUNT, description="Save a checkpoint every N optimizer steps.")
    every_minutes: float | None = Field(30.0, gt=0, le=525_600, description="Save a checkpoint every M minutes of training.")
    keep_last: int = Field(2, ge=1, le=1000, description="Newest checkpoints to keep (plus the best and the one resumed from).")
    max_restarts: int = Field(
        2, ge=0, le=100, description="Restarts from the last checkpoint after a crash, kill or out-of-memory before the job fails."
    )
    best_by: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="The metric or grader name (one of evaluation.metrics or evaluation.graders) that marks the "
        "best checkpoint, measured every evaluation.eval_every_steps; a new best is saved at once and always kept. "
        "Empty: the validation loss when it is measured.",
    )
    best_direction: Literal["auto", "min", "max"] = Field(
        "auto", description="Whether a lower (min) or higher (max) best_by is better; auto: min for loss and "
        "perplexity, max for every other metric and grader."
    )
    output: Literal["last", "best"] = Field(
        "last", description="What the job outputs (and evaluates at the end): the weights after the last step, or the "
        "best checkpoint's (needs evaluation.eval_every_steps)."
    )

    def objective(self, evaluation: EvaluationSpec) -> tuple[str, str] | None:
        """(metric or grader name, min or max) that picks the best checkpoint, or None when nothing does."""
        name = self.best_by or ("loss" if "loss" in evaluation.metrics else None)
        if name is None:
            return None
        if self.best_direction != "auto":
            return name, self.best_direction
        return name, "min" if name in LOWER_IS_BETTER else "max"

    def check_against(self, evaluation: EvaluationSpec) -> None:
        """best_by names something the evaluation measures; output best has something to pick by."""
        if self.best_by is not None and self.best_by not in evaluation.measured():
            raise ValueError(f"checkpoint.best_by {self.best_by!r} is not measured: expected one of "
                             f"evaluation.metrics or evaluation.graders ({', '.join(evaluation.measured())})")
        if self.output == "best":
            if self.objective(evaluation) is None:
                raise ValueError("checkpoint.output best needs checkpoint.best_by (or loss in evaluation.metrics)")
            if evaluation.eval_every_steps is None:
                raise ValueError("checkpoint.output best needs evaluation.eval_every_steps: checkpoints are compared "
                                 "by the metrics measured during training")


class DeploySpec(Section):
    """Run `tuneforge export` on the job's output when it succeeds, into DIR/export (export/deploy.py)."""

    target: Literal["none", "vllm", "sglang", "tgi", "llama.cpp"] = Field(
        "none", description="Export the result for this server when the job succeeds (none: no export)."
    )
    format: Literal["auto", "adapter", "merged", "gguf"] = Field(
        "auto", description="auto: gguf for llama.cpp, merged for full fine-tuning or merge_adapter, else the adapter."
    )
    merge_adapter: bool = Field(
        False, description="Export the adapter merged into its full-precision base (format merged) instead of the adapter."
    )
    fallback: Literal["none", "merged"] = Field(
        "none", description="When the adapter breaks a rule of the server (DoRA, bias, rank...): fail the export or merge it."
    )
    gguf_type: Literal["f16", "q8_0"] | None = Field(
        None, description="llama.cpp only: GGUF tensor type, f16 (when empty) or q8_0."
    )
    gpu_type: Literal["t4", "l4", "a10g", "a100-40gb", "a100-80gb", "h100-80gb", "h200", "b200"] | None = Field(
        None, description="vllm / sglang / tgi: the serving GPU, for the tensor-parallel size of the commands (h100-80gb when empty)."
    )

    def export_format(self, adapter: AdapterSpec) -> str:
        """The format deploy exports (target is not none)."""
        if self.format != "auto":
            return self.format
        if self.target == "llama.cpp":
            return "gguf"
        return "merged" if self.merge_adapter or adapter.type == "full" else "adapter"

    def check_against(self, adapter: AdapterSpec, *, method: str = "sft") -> None:
        """Refuse at submission what the export would refuse after training."""
        if self.target == "none":
            if self.format != "auto" or self.merge_adapter or self.fallback != "none" or self.gguf_type or self.gpu_type:
                raise ValueError("deploy.format, merge_adapter, fallback, gguf_type and gpu_type need a deploy.target")
            return
        if method == "reward":
            raise ValueError("deploy: a reward model scores text and is not served for generation; set deploy.target none")
        fmt = self.export_format(adapter)
        if self.merge_adapter and fmt == "adapter":
            raise ValueError("deploy.merge_adapter true contradicts deploy.format adapter")
        if self.gguf_type is not None and fmt != "gguf":
            raise ValueError(f"deploy.gguf_type applies to format gguf (deploy.target llama.cpp), not {fmt}")
        if self.gpu_type is not None and fmt == "gguf":
            raise ValueError("deploy.gpu_type sizes vLLM / SGLang / TGI commands; llama.cpp takes none")
        if self.fallback != "none" and fmt != "adapter":
            raise ValueError(f"deploy.fallback applies to adapter exports; this deploy exports {fmt}")
        if (fmt == "gguf") != (self.target == "llama.cpp"):
            raise ValueError(f"deploy.format {fmt} does not serve on deploy.target {self.target}: llama.cpp loads gguf, "
                             "vllm / sglang / tgi load an adapter or a merged model")
        if fmt == "adapter" and adapter.type == "full":
            raise ValueError("deploy.format adapter: adapter.type full trains every weight and has no adapter; "
                             "use format merged (or auto)")
        if fmt == "adapter" and self.fallback == "none" and adapter.use_dora:
            raise ValueError(f"deploy.target {self.target} does not load DoRA adapters (adapter.use_dora): set "
                             "deploy.format merged or deploy.fallback merged")
        if fmt == "adapter" and self.fallback == "none" and self.target == "vllm" and adapter.rank > 512:
            raise ValueError(f"deploy.target vllm serves LoRA ranks up to 512 (--max-lora-rank); adapter.rank is "
                             f"{adapter.rank}: set deploy.format merged or deploy.fallback merged")
        if fmt == "adapter" and self.fallback == "none" and self.target == "sglang" and adapter.use_rslora:
            raise ValueError("deploy.target sglang scales adapters by alpha / r and would serve an rsLoRA adapter "
                             "(adapter.use_rslora) at the wrong strength: set deploy.format merged or deploy.fallback merged")


class ExportRunSpec(Section):
    """method export: the registered model an export job exports (api/routers/exports.py); deploy: says how."""

    model: str | None = Field(
        None, max_length=300, description="The fine-tuned model id (ft:...) exported; the worker swaps it for its files."
    )


class JobSpec(Section):
    """A fine-tuning job: what to train, on what, how, with what resources."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Short name for the job (letters, digits, . _ -); used in the job directory name.",
    )
    method: Method = Field(
        "sft", description="Training method: sft (supervised fine-tuning), reward (a reward model on preference pairs), "
        "dpo (direct preference optimization), ppo or grpo (online RL against a reward model or graders), vlm (a "
        "vision-language model on chats with images), clip (contrastive image-text pairs); eval: an "
        "eval run (the Evals API schedules it; nothing is trained)."
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="The base model and how it is loaded.")
    dataset: DatasetSpec = Field(..., description="Training and validation data.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec, description="What is trained: LoRA, QLoRA or all weights.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimization hyperparameters.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Hardware the job asks for.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="What is measured on validation data.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="When checkpoints are written.")
    deploy: DeploySpec = Field(default_factory=DeploySpec, description="Export for serving.")
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="method dpo: the preference loss and its reference.")
    reward: RewardModelSpec = Field(default_factory=RewardModelSpec, description="method reward: the reward model's loss.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="methods ppo and grpo: sampling and the reward.")
    ppo: PpoSpec = Field(default_factory=PpoSpec, description="method ppo: clipping, value loss, GAE and KL control.")
    grpo: GrpoSpec = Field(default_factory=GrpoSpec, description="method grpo: group size, clipping and KL.")
    vision: VisionSpec = Field(default_factory=VisionSpec, description="method vlm: what of the vision tower and the "
                               "projector trains beside the language model.")
    eval_run: EvalRunSpec = Field(default_factory=EvalRunSpec, description="method eval: the model an eval run asks, "
                                  "the prompt of each item (dataset.path holds the items) and the graders.")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="System sampling, MFU, "
                                       "reporters (TensorBoard, MLflow, W&B) and alerts.")
    export_run: ExportRunSpec = Field(default_factory=ExportRunSpec, description="method export: the registered "
                                      "model exported, as deploy: says (format, target, fallback, gguf_type, gpu_type).")

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        quant = self.model.quantization
        if self.adapter.type == "qlora" and quant in ("none", "int8"):
            if quant == "int8":
                raise ValueError("adapter.type qlora needs a 4-bit base: set model.quantization to nf4 or fp4")
            # QLoRA means a 4-bit base; NF4 is what the QLoRA paper uses.
            self.model.quantization = "nf4"
        if self.adapter.type == "full" and quant != "none":
            raise ValueError(
                f"adapter.type full trains every weight and cannot use a quantized base (model.quantization is {quant})"
            )
        if quant == "int8" and self.resources.strategy == "fsdp":
            raise ValueError(
                "model.quantization int8 cannot train under resources.strategy fsdp: PyTorch's distributed checkpoint "
                "cannot save bitsandbytes 8-bit layers; use nf4 (QLoRA, which FSDP supports) or strategy ddp"
            )
        self._method_consistent()
        self.checkpoint.check_against(self.evaluation)
        self.deploy.check_against(self.adapter, method=self.method)
        training, world = self.training, self.resources.num_gpus * self.resources.num_nodes
        sizes = (training.batch_size, training.per_device_batch_size, training.gradient_accumulation_steps)
        if "auto" not in sizes and sizes[0] != sizes[1] * sizes[2] * world:
            raise ValueError(
                f"training.batch_size {sizes[0]} must equal per_device_batch_size x gradient_accumulation_steps x "
                f"devices = {sizes[1]} x {sizes[2]} x {world}; set one of them to auto"
            )
        return self

    def _method_consistent(self) -> None:
        training = self.training
        if training.padding_free is True and training.packing is True:
            raise ValueError("training.padding_free applies without packing (packed rows are already padding-free): "
                             "set training.packing or training.padding_free to auto or false")
        for name in ("packing", "padding_free"):
            if getattr(training, name) is True and self.method not in ("sft", *VISION_METHODS):
                raise ValueError(f"training.{name}: method {self.method} batches its own records (pairs, prompts or "
                                 "items) and never packs them; leave it auto or set it to false")
        fmt = self.dataset.format
        formats = METHOD_FORMATS.get(self.method)
        if formats is not None and fmt != "auto" and fmt not in formats:
            raise ValueError(f"method {self.method} trains on {' or '.join(formats)} records: dataset.format must be "
                             f"{' or '.join(formats)} (or auto), not {fmt}")
        evaluation = self.evaluation
        own_metrics = OWN_METRICS.get(self.method)
        if own_metrics is not None and (evaluation.graders or tuple(evaluation.metrics) != DEFAULT_METRICS
                                        and not set(evaluation.metrics) <= set(own_metrics)):
            own = {"reward": "loss, reward_accuracy and reward_margin on held-out pairs",
                   "clip": "loss and retrieval recall@1/5/10 on held-out image-text pairs"}.get(
                self.method, "mean reward, pass rate and KL on held-out prompts (its graders are rollout.graders)")
            raise ValueError(f"method {self.method} measures {own}: evaluation.metrics and evaluation.graders apply to "
                             "sft and dpo; leave them at their defaults")
        if self.method in RL_METHODS:
            world = self.resources.num_gpus * self.resources.num_nodes
            if self.training.batch_size != "auto":
                raise ValueError(f"training.batch_size: an optimizer step of method {self.method} trains on the "
                                 "completions of rollout.prompts_per_step prompts; leave it auto and set "
                                 "rollout.prompts_per_step")
            if self.resources.strategy != "ddp":
                raise ValueError(f"resources.strategy {self.resources.strategy}: method {self.method} samples from the "
                                 "policy with whole weights on every device; use ddp")
            if self.rollout.prompts_per_step % world:
                raise ValueError(f"rollout.prompts_per_step {self.rollout.prompts_per_step} must be a multiple of the "
                                 f"{world} devices")
        if self.method == "dpo" and self.dpo.reference == "adapter_disabled" and self.adapter.type == "full":
            raise ValueError("dpo.reference adapter_disabled needs an adapter (lora or qlora); full fine-tuning has none "
                             "to disable: use precomputed (or auto)")
        if self.method == "dpo" and "token_accuracy" in evaluation.metrics:
            raise ValueError("evaluation.metrics token_accuracy is not measured by method dpo: use loss (with the "
                             "preference margin and accuracy), perplexity (of the chosen replies) or generated metrics")
        if self.method == "eval" and not self.eval_run.testing_criteria:
            raise ValueError("method eval needs eval_run.testing_criteria (the graders that score each item)")
        if self.method == "eval" and self.resources.num_gpus * self.resources.num_nodes != 1:
            raise ValueError("method eval runs in one process: resources.num_gpus and num_nodes must be 1")
        if self.method == "export" and (self.export_run.model is None or self.deploy.target == "none"):
            raise ValueError("method export needs export_run.model (the model exported) and a deploy.target")
        if self.method == "export" and self.dataset.path != NO_DATASET:
            raise ValueError(f"method export reads no data: dataset.path must be {NO_DATASET!r}")
        if self.method != "export" and self.export_run.model is not None:
            raise ValueError(f"export_run applies to method export only, not {self.method}; remove it")
        if self.method != "eval" and not self.eval_run.is_default():
            raise ValueError(f"eval_run applies to method eval only, not {self.method}; remove it")
        if problem := base_model_problem(self):
            raise ValueError(problem)
        if self.method != "vlm" and not self.vision.is_default():
            raise ValueError(f"vision applies to method vlm only, not {self.method}; remove it")
        if self.method in VISION_METHODS and (problem := vision_problem(self)):
            raise ValueError(problem)
        if self.method in RL_METHODS and not self.rollout.has_reward():
            raise ValueError(f"method {self.method} needs a reward: set rollout.reward_model (a reward model) or "
                             "rollout.graders (string_check, text_similarity, score_model, label_model, multi)")

"""JobSpec: the one schema for a fine-tuning job, read by the CLI, stored by the API, run by recipes.

Every field has a default (where one makes sense) and a one-line description; the descriptions are
the `--help` text of `tuneforge train` and the API schema. Choices are closed literals, never import
paths, so a job spec cannot name code to run.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tuneforge.spec.preference import DpoSpec, RewardModelSpec
from tuneforge.spec.reinforcement import GrpoSpec, PpoSpec, RolloutSpec

BUILTIN_BASE_MODELS = ("smollm2-135m-instruct", "tiny-llama")

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

Method = Literal["sft", "reward", "dpo", "ppo", "grpo"]
PREFERENCE_METHODS = ("reward", "dpo")  # train on preference pairs
RL_METHODS = ("ppo", "grpo")  # sample completions and score them

GpuType = Literal[
    "any", "cpu", "t4", "l4", "a10g", "a100-40gb", "a100-80gb", "h100-80gb", "h200", "b200"
]


class Section(BaseModel):
    """A part of the job spec: unknown keys are an error, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    base_model: str = Field(
        "smollm2-135m-instruct", max_length=4096,
        description="Built-in base model (smollm2-135m-instruct, tiny-llama) or a local Hugging Face model directory.",
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
    format: Literal["auto", "chat", "instruction", "completion", "text", "preference"] = Field(
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
        "auto", description="Peak learning rate; auto: 2e-4 for LoRA and QLoRA, 2e-5 for full fine-tuning."
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
    collective_timeout_s: float = Field(
        600.0, gt=0, le=7 * 86400, description="Seconds a collective may wait for the other ranks before the job fails."
    )
    priority: int = Field(
        0, ge=-100, le=100, description="Scheduling priority among the same tenant's queued jobs; higher starts first."
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


class EvaluationSpec(Section):
    metrics: list[Literal["loss", "perplexity", "exact_match"]] = Field(
        default_factory=lambda: ["loss", "perplexity"], max_length=8,
        description="Metrics on the validation set: loss, perplexity, exact_match (greedy generation vs the reference).",
    )
    eval_every_steps: int | None = Field(None, gt=0, le=MAX_COUNT, description="Evaluate every N optimizer steps; empty: only at the end.")
    eval_before_training: bool = Field(True, description="Also evaluate the base model, so the summary shows the gain.")
    max_eval_examples: int | None = Field(200, gt=0, le=MAX_COUNT, description="Evaluate on at most this many validation examples.")
    max_new_tokens: int = Field(64, gt=0, le=MAX_SEQ_LENGTH, description="Generation budget per example for generated metrics.")


class CheckpointSpec(Section):
    every_steps: int | None = Field(None, gt=0, le=MAX_COUNT, description="Save a checkpoint every N optimizer steps.")
    every_minutes: float | None = Field(30.0, gt=0, le=525_600, description="Save a checkpoint every M minutes of training.")
    keep_last: int = Field(2, ge=1, le=1000, description="Newest checkpoints to keep (plus the best by validation loss).")
    max_restarts: int = Field(
        2, ge=0, le=100, description="Restarts from the last checkpoint after a crash, kill or out-of-memory before the job fails."
    )


class DeploySpec(Section):
    target: Literal["none", "vllm", "tgi", "playground"] = Field(
        "none", description="Where the result will be served; decides the export layout."
    )
    merge_adapter: bool = Field(False, description="Also write the base model with the adapter merged in.")


class JobSpec(Section):
    """A fine-tuning job: what to train, on what, how, with what resources."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Short name for the job (letters, digits, . _ -); used in the job directory name.",
    )
    method: Method = Field(
        "sft", description="Training method: sft (supervised fine-tuning), reward (a reward model on preference pairs), "
        "dpo (direct preference optimization), ppo or grpo (online RL against a reward model or graders)."
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
        training, world = self.training, self.resources.num_gpus * self.resources.num_nodes
        sizes = (training.batch_size, training.per_device_batch_size, training.gradient_accumulation_steps)
        if "auto" not in sizes and sizes[0] != sizes[1] * sizes[2] * world:
            raise ValueError(
                f"training.batch_size {sizes[0]} must equal per_device_batch_size x gradient_accumulation_steps x "
                f"devices = {sizes[1]} x {sizes[2]} x {world}; set one of them to auto"
            )
        return self

    def _method_consistent(self) -> None:
        fmt = self.dataset.format
        if self.method in PREFERENCE_METHODS and fmt not in ("auto", "preference"):
            raise ValueError(f"method {self.method} trains on preference pairs: dataset.format must be preference "
                             f"(or auto), not {fmt}")
        if self.method in RL_METHODS and not self.rollout.has_reward():
            raise ValueError(f"method {self.method} needs a reward: set rollout.reward_model (a reward model) or "
                             "rollout.graders (string_check, text_similarity, score_model, label_model, multi)")

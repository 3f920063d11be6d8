"""Reward models: a scalar head on the base, the Bradley-Terry loss, and loading a trained one by directory.

The model is transformers' `AutoModelForSequenceClassification` with num_labels=1 (a bias-free linear
`score` head on the last hidden state, read at the last token that is not padding), exactly what TRL's
RewardTrainer trains and what PPO / GRPO and judges load. With LoRA the head is trained whole beside the
adapter (PEFT's task_type SEQ_CLS puts it in modules_to_save); with full fine-tuning everything is.

A trained reward model is a directory: DIR/adapter/ (PEFT adapter + head, with the tokenizer) or
DIR/model/ (the whole model), and in it reward_model.json saying what it is and which base it needs.
`load_reward_model(DIR)` takes the job directory or that output directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.engine.preference.pairs import pairs_in

MANIFEST = "reward_model.json"


class RewardLoss(nn.Module):
    """-log sigmoid(r_chosen - r_rejected) per pair, + center_rewards_coefficient * (r_chosen + r_rejected)^2
    as TRL's RewardTrainer (whose mean over the batch is this sum over pairs divided by the pairs).
    forward returns (summed loss, pairs, pairs ranked right, summed metrics: rewards_chosen,
    rewards_rejected, margin)."""

    accuracy_metric = "accuracy"

    def __init__(self, model: nn.Module, center_rewards_coefficient: float | None = None):
        super().__init__()
        self.model, self.center = model, center_rewards_coefficient

    normalizer = staticmethod(pairs_in)

    def base_model(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, attention_mask=None, per_pair: bool = False):
        rewards = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1)
        chosen, rejected = rewards.float().chunk(2)
        losses = -F.logsigmoid(chosen - rejected)
        if self.center is not None:
            losses = losses + self.center * (chosen + rejected) ** 2
        if per_pair:
            return {"loss": losses.detach(), "chosen_rewards": chosen.detach(), "rejected_rewards": rejected.detach()}
        metrics = {"rewards_chosen": chosen.detach().sum(), "rewards_rejected": rejected.detach().sum(),
                   "margin": (chosen - rejected).detach().sum()}
        return losses.sum(), losses.numel(), (chosen > rejected).sum(), metrics


def reward_metrics(values: dict[str, list[float]]) -> dict[str, float]:
    """Held-out pair accuracy and mean reward margin (and the loss) from per-pair values."""
    n = len(values.get("loss", []))
    if not n:
        return {}
    margins = [c - r for c, r in zip(values["chosen_rewards"], values["rejected_rewards"])]
    return {"loss": sum(values["loss"]) / n, "reward_accuracy": sum(m > 0 for m in margins) / n,
            "reward_margin": sum(margins) / n}


def load_reward_base(model_dir: str | Path, spec, precision, *, full_finetune: bool, pad_token_id: int):
    """The base with a fresh scalar head (seeded by the job's seed), loaded the way engine/model_loading.py
    loads a causal LM: dtype, attention kernel, quantization."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.engine.model_loading import _keep_4bit_weights_trainable, attention_implementation, quantization_config

    from tuneforge.engine.base_models import safetensors_model_dir

    safetensors_model_dir(Path(model_dir))  # safetensors only (engine/model_files.py)
    quantization = quantization_config(spec, precision.dtype)
    kwargs = {"dtype": torch.float32 if full_finetune else precision.dtype, "num_labels": 1, "use_safetensors": True,
              "attn_implementation": attention_implementation(spec.attn_implementation, precision.device)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": precision.device}
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
    if quantization is None:
        model.to(precision.device)
    elif precision.device.type == "cpu":
        _keep_4bit_weights_trainable(model)
    model.config.pad_token_id = pad_token_id  # where the head reads: the last token that is not padding
    model.config.use_cache = False
    return model


def head_in_float32(model: nn.Module) -> None:
    """Train the head (a copy in modules_to_save under LoRA) in float32, like the LoRA weights, whatever
    dtype the frozen base is stored in: a bf16 head would take its updates rounded."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "score" in name.split("."):
            parameter.data = parameter.data.float()


def write_manifest(output: Path, *, base_model: str, base_model_dir: Path, adapter: str, pad_token_id: int) -> None:
    (output / MANIFEST).write_text(json.dumps({
        "kind": "reward_model", "num_labels": 1, "base_model": base_model, "base_model_dir": str(base_model_dir),
        "adapter": adapter, "pad_token_id": pad_token_id,
        "load": "tuneforge.engine.preference.load_reward_model(path) or transformers "
                "AutoModelForSequenceClassification (model/) / PeftModel over it (adapter/)",
    }, indent=2) + "\n")


def reward_model_dir(path: str | Path) -> Path:
    """The directory holding reward_model.json: path itself, or a reward job's adapter/ or model/."""
    path = Path(path)
    for candidate in (path, path / "adapter", path / "model"):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise FileNotFoundError(f"{path} holds no trained reward model ({MANIFEST} in it, or in its adapter/ or model/)")


def load_reward_model(path: str | Path, precision: str | torch.dtype | None = None, *, device: str | torch.device | None = None):
    """(reward model, tokenizer) from a reward job's directory (or its adapter/ or model/), in eval mode.

    precision: fp32 / bf16 / fp16 or a torch dtype (default fp32). The model is a transformers
    sequence-classification model (a PeftModel over one for LoRA); `model(input_ids, attention_mask).logits[:, 0]`
    is the reward, read at the last non-padding token, as in training. Score texts rendered with the
    tokenizer's chat template (score_conversations does that) so they look like the training pairs."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.engine.model_loading import load_tokenizer

    from tuneforge.engine.base_models import safetensors_model_dir

    directory = safetensors_model_dir(reward_model_dir(path), what="reward model")  # an adapter or a model
    manifest = json.loads((directory / MANIFEST).read_text())
    dtype = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        precision, precision) if not isinstance(precision, torch.dtype) else precision
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"precision {precision!r}: expected fp32, bf16, fp16 or a torch dtype")
    tokenizer = load_tokenizer(directory)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        base_dir = Path(manifest["base_model_dir"])
        if not base_dir.is_dir():
            from tuneforge.engine.base_models import resolve_base_model

            base_dir = resolve_base_model(manifest["base_model"])
        base = AutoModelForSequenceClassification.from_pretrained(safetensors_model_dir(base_dir), num_labels=1,
                                                                  dtype=dtype, use_safetensors=True)
        base.config.pad_token_id = manifest["pad_token_id"]
        model = PeftModel.from_pretrained(base, directory)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    model.config.pad_token_id = manifest["pad_token_id"]
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], *, batch_size: int = 16) -> list[float]:
    """The reward of each conversation (a prompt's messages and the assistant's reply), rendered and
    tokenized exactly as the reward model's training pairs were."""
    from tuneforge.data.batching import collate
    from tuneforge.data.formats import Example
    from tuneforge.data.templating import PromptRenderer

    renderer = PromptRenderer(tokenizer, "chat")
    device = next(model.parameters()).device
    rewards: list[float] = []
    for start in range(0, len(conversations), batch_size):
        examples = [Example(0, "chat", {"messages": list(c)}) for c in conversations[start : start + batch_size]]
        batch = collate(renderer.tokenize_many(examples), tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        rewards.extend(float(v) for v in logits[:, 0].float())
    return rewards

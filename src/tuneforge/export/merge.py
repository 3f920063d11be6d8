"""Merge a LoRA adapter into its base in full precision, and accept the merge only if it changes nothing.

The base is always loaded unquantized in float32, even when the adapter was trained on a 4-bit base
(QLoRA): merging into 4-bit weights would round the update away (and bitsandbytes cannot store the sum
exactly). The merged model must give the adapter model's logits on a few prompts, in float32, within
MERGE_TOLERANCE, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.export.source import ExportError

# |merged - adapter| <= MERGE_TOLERANCE * max(1, max |adapter logit|), over every position and vocabulary entry of
# every check prompt, in float32. W + s*B@A against W x + s*B(A x) differs only by float32 rounding order
# (measured ~1e-7 relative on the tiny test model); a wrong merge (scale, transposition, a missed module) is off by
# the size of the adapter's own effect, orders of magnitude more.
MERGE_TOLERANCE = 1e-4

CHECK_CONVERSATIONS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Ana is 31 and lives in Lima."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
)
CHECK_TEXTS = ("The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n")


class MergeMismatch(ExportError):
    """The merged model's logits differ from the adapter model's: the merge is refused."""


@dataclass(frozen=True)
class LogitCheck:
    prompts: int
    max_abs_diff: float
    scale: float  # max |reference logit|
    tolerance: float  # the bound max_abs_diff had to stay within (absolute)
    adapter_effect: float | None = None  # max |adapter - base| logit: how much the adapter changes the base
    mean_abs_diff: float | None = None  # for the record: the typical difference, not only the largest

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def check_prompts(tokenizer) -> list[torch.Tensor]:
    """Token ids of the check prompts: chat conversations through the model's own template, and plain text."""
    prompts = []
    if tokenizer.chat_template:
        for messages in CHECK_CONVERSATIONS:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompts.append(text)
    prompts.extend(CHECK_TEXTS)
    return [torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:256]]) for text in prompts]


@torch.no_grad()
def prompt_logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in prompts]


def compare_logits(reference: list[torch.Tensor], candidate: list[torch.Tensor], *, relative: float) -> LogitCheck:
    """The largest absolute difference, against relative * max(1, the largest reference logit)."""
    diffs = [(r - c).abs() for r, c in zip(reference, candidate, strict=True)]
    scale = max(float(r.abs().max()) for r in reference)
    mean = float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs))
    return LogitCheck(len(reference), max(float(d.max()) for d in diffs), scale, relative * max(1.0, scale),
                      mean_abs_diff=mean)


def load_base_fp32(base_dir: Path):
    """The base model in float32 on the CPU: never quantized, whatever the training loaded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return model.eval()


def load_tokenizer_for(adapter_dir: Path, base_dir: Path):
    """The tokenizer the adapter was trained with (saved beside it, with the chat template the job used),
    else the base's."""
    from transformers import AutoTokenizer

    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    return AutoTokenizer.from_pretrained(source)


def merge_adapter(adapter_dir: Path, base_dir: Path, *, tolerance: float = MERGE_TOLERANCE):
    """(merged float32 model, tokenizer, LogitCheck). Raises MergeMismatch when the logits differ."""
    from peft import PeftModel

    from tuneforge.export.server_rules import EMBEDDINGS, LORA_TENSOR_SUFFIXES, read_adapter_facts

    tokenizer = load_tokenizer_for(adapter_dir, base_dir)
    base = load_base_fp32(base_dir)
    # An adapter trained with added tokens saved whole embedding / output layers with more rows than the base's.
    saved = [shape[0] for name, shape in read_adapter_facts(adapter_dir, base_dir).tensors.items()
             if any(part in name for part in EMBEDDINGS) and not name.endswith(LORA_TENSOR_SUFFIXES) and len(shape) == 2]
    rows = max([len(tokenizer), *saved])
    if rows > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(rows)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged, check = merge_checked(peft_model, prompt_logits, check_prompts(tokenizer), tolerance=tolerance,
                                  what=f"merging {adapter_dir} into {base_dir} changed the logits")
    return merged, tokenizer, check


def merge_checked(peft_model, logits_of, inputs, *, tolerance: float, what: str):
    """(merged model, LogitCheck): merge_and_unload, refused with MergeMismatch (nothing written) when the
    merged model's logits on `inputs` (logits_of(model, inputs)) differ from the adapter model's beyond the
    tolerance; the check also records how far the adapter moves the base's logits (its effect)."""
    with_adapter = logits_of(peft_model, inputs)
    with peft_model.disable_adapter():
        without = logits_of(peft_model, inputs)
    merged = peft_model.merge_and_unload()
    check = compare_logits(with_adapter, logits_of(merged, inputs), relative=tolerance)
    effect = max(float((a - b).abs().max()) for a, b in zip(with_adapter, without, strict=True))
    check = LogitCheck(check.prompts, check.max_abs_diff, check.scale, check.tolerance, effect, check.mean_abs_diff)
    if not check.max_abs_diff <= check.tolerance:  # also refuses NaN
        raise MergeMismatch(
            f"{what}: max |merged - adapter| = {check.max_abs_diff:.3g} over {check.prompts} prompts, above the "
            f"tolerance {check.tolerance:.3g} ({tolerance:g} x max(1, max |logit| = {check.scale:.3g}), float32); "
            "nothing was written")
    return merged, check


def save_merged(model, tokenizer, target: Path, *, dtype: torch.dtype) -> None:
    """Write the merged model in dtype with its tokenizer (and chat template) and generation config, then check
    that the files reload to exactly the weights that were verified (cast to dtype)."""
    from safetensors.torch import load_file

    model = model.to(dtype)
    model.config.use_cache = True
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    expected = {k: v for k, v in model.state_dict().items()}
    saved: dict[str, torch.Tensor] = {}
    for shard in sorted(target.glob("*.safetensors")):
        saved.update(load_file(str(shard)))
    missing = [k for k in saved if k not in expected]
    wrong = [k for k, v in saved.items() if k in expected and not torch.equal(v, expected[k].to(v.dtype))]
    if missing or wrong or not saved:
        raise ExportError(f"the merged model written to {target} does not reload to the verified weights "
                          f"({(missing + wrong)[:3]})")

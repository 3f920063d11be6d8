"""The VLM recipe end to end on a tiny LLaVA built from a config (a 2-layer CLIP vision tower, its projector, a
2-layer Llama; and a tiny Idefics3, SmolVLM's architecture), on generated coloured shapes ("What colour is the
shape?"): the loss goes down and the trained model names the colour where the base never does; the vision tower stays unchanged while the projector and the
LoRA weights train; the adapter reloads with PEFT and answers as in the job; the labels are the assistant's
tokens only (never an image token); kill -9 resumes bit-identically; 2 DDP processes train like one (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_job_dir
from tuneforge.engine.events import read_events
from tuneforge.recipes import vlm
from tuneforge.spec.jobdir import read_summary


def vlm_job(tmp_path: Path, model_dir: Path, shapes: Path, name: str = "job", **sections) -> Path:
    base = {
        "method": "vlm",
        "dataset": {"path": str(shapes / "chat.train.jsonl"), "validation_path": str(shapes / "chat.val.jsonl"),
                    "max_seq_length": 256},
        "adapter": {"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
        "training": {"learning_rate": 1e-2, "batch_size": 8, "per_device_batch_size": 8, "max_steps": 80, "seed": 0},
        "evaluation": {"metrics": ["loss", "exact_match"], "max_new_tokens": 8, "max_eval_examples": 16},
        "checkpoint": {"every_steps": 40, "keep_last": 1},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return make_job_dir(tmp_path / name, model_dir, **base)


def test_lora_vlm_learns_the_colour_with_the_vision_tower_frozen(tmp_path, tiny_llava_dir, shapes_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from tuneforge.data.loading import load_examples
    from tuneforge.engine.precision import resolve_precision
    from tuneforge.engine.vision.data import VisionChatTokenizer
    from tuneforge.engine.vision.models import load_processor, part_parameters
    from tuneforge.evaluation.vision import vlm_answers

    job_dir = vlm_job(tmp_path, tiny_llava_dir, shapes_dir)
    summary = vlm.run(job_dir, progress=False)
    base, tuned = summary.eval.base, summary.eval.fine_tuned
    assert summary.method == "vlm" and summary.output == "adapter" and read_summary(job_dir) == summary
    assert base.exact_match == 0.0 and tuned.exact_match >= 0.75, (base, tuned)  # measured: 0.0 -> 0.94
    assert tuned.loss < base.loss / 4
    losses = [e["data"]["train_loss"] for e in read_events(job_dir)
              if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 4
    plan = next(e["data"] for e in read_events(job_dir) if e["data"].get("kind") == "plan")
    assert plan["packing"] is False and "cut through images" in plan["packing_disabled_because"]
    assert tuned.samples and all(s.prediction in ("red", "green", "blue", "yellow") for s in tuned.samples[:4])

    # What trained: LoRA on the language model, the projector whole beside it; nothing of the vision tower.
    adapter = load_file(job_dir / "adapter" / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k for k in adapter)
    assert any("language_model" in k and "lora_B" in k for k in adapter)
    assert not any("vision_tower" in k for k in adapter)
    assert (job_dir / "adapter" / "processor_config.json").is_file()

    # The adapter reloads with PEFT over the base; its vision tower is the base's, its projector is not.
    original = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    before_tower = part_parameters(original, "model.vision_tower")
    before_projector = part_parameters(original, "model.multi_modal_projector")
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir),
                                         job_dir / "adapter")
    after_tower = part_parameters(reloaded, "model.vision_tower")
    assert all(torch.equal(before_tower[k], after_tower[k]) for k in before_tower)
    saved = reloaded.get_base_model().model.multi_modal_projector.modules_to_save["default"]
    projector = dict(saved.named_parameters())
    assert any(not torch.equal(before_projector[k], projector[k]) for k in before_projector)
    lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)

    # ... and answers the held-out questions as the job measured.
    processor = load_processor(job_dir / "adapter")
    tokenizer = VisionChatTokenizer(processor, processor.image_token_id, shapes_dir)
    examples, _ = load_examples(shapes_dir / "chat.val.jsonl")
    _, answers, references = vlm_answers(reloaded, tokenizer, examples, max_new_tokens=8, batch_size=16,
                                         precision=resolve_precision("fp32", torch.device("cpu")))
    assert sum(a == r for a, r in zip(answers, references)) / len(answers) == tuned.exact_match


def test_labels_are_the_assistant_reply_and_never_an_image_token(tiny_llava_dir, shapes_dir):
    from tuneforge.data.loading import load_examples
    from tuneforge.engine.vision.data import VisionBatcher, VisionChatTokenizer
    from tuneforge.engine.vision.models import load_processor

    processor = load_processor(tiny_llava_dir)
    tokenizer = VisionChatTokenizer(processor, processor.image_token_id, shapes_dir)
    example = load_examples(shapes_dir / "chat.val.jsonl")[0][0]
    item = tokenizer.tokenize(example)
    ids, labels = item.tokens.input_ids, item.tokens.labels
    assert item.image_tokens == 17 == int((ids == processor.image_token_id).sum())  # 16 patches + the class token
    trained = [int(i) for i, label in zip(ids, labels) if label != -100]
    assert processor.tokenizer.decode(trained) == example.record["messages"][1]["content"][0]["text"] + "<|im_end|>"
    assert not ((labels != -100) & (ids == processor.image_token_id)).any()
    batch = VisionBatcher([item, item], processor.tokenizer.pad_token_id, tokenizer).collate([0, 1])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["input_ids"].shape == (2, len(ids))


def test_the_vision_tower_trains_when_asked(tmp_path, tiny_llava_dir, shapes_dir):
    job_dir = vlm_job(tmp_path, tiny_llava_dir, shapes_dir, vision={"vision_tower": "trained", "projector": "frozen"},
                      training={"max_steps": 2}, evaluation={"metrics": ["loss"], "eval_before_training": False})
    vlm.run(job_dir, progress=False)
    adapter = load_file(job_dir / "adapter" / "adapter_model.safetensors")
    assert any("vision_tower" in k and "lora_A" in k for k in adapter)
    assert not any("multi_modal_projector" in k for k in adapter)


def test_an_idefics3_smolvlm_trains_its_connector_beside_the_lora(tmp_path, shapes_dir):
    from tuneforge.engine.vision.tiny import build_tiny_idefics3_dir

    model_dir = build_tiny_idefics3_dir(tmp_path / "idefics3")
    job_dir = vlm_job(tmp_path, model_dir, shapes_dir, training={"max_steps": 40}, evaluation={"metrics": ["loss"]})
    summary = vlm.run(job_dir, progress=False)
    assert summary.eval.fine_tuned.loss < summary.eval.base.loss / 4  # measured: 6.54 -> 0.4
    adapter = load_file(job_dir / "adapter" / "adapter_model.safetensors")
    assert any("connector" in k for k in adapter) and any("text_model" in k and "lora_B" in k for k in adapter)
    assert not any("vision_model" in k for k in adapter)
    dataset = next(e["data"] for e in read_events(job_dir) if e["data"].get("kind") == "dataset")
    assert dataset["train_image_tokens"] == 4 * dataset["train_images"]  # 16 patches pixel-shuffled by 2


def test_qlora_quantizes_the_language_model_only_and_its_adapter_reloads(tmp_path, tiny_llava_dir, shapes_dir):
    """QLoRA: the language model's linear layers in 4-bit NF4 (bitsandbytes, on CPU as text QLoRA), the vision
    tower and projector left in full precision; the loss goes down and the adapter reloads over the 4-bit base."""
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel

    from tuneforge.engine.precision import resolve_precision
    from tuneforge.engine.vision.data import VisionBatcher, VisionChatTokenizer
    from tuneforge.engine.vision.loss import VisionLMLoss
    from tuneforge.engine.vision.models import load_processor, load_vlm
    from tuneforge.data.loading import load_examples
    from tuneforge.spec.jobdir import read_spec

    job_dir = vlm_job(tmp_path, tiny_llava_dir, shapes_dir, adapter={"type": "qlora"},
                      training={"max_steps": 40}, evaluation={"metrics": ["loss"]})
    summary = vlm.run(job_dir, progress=False)
    assert summary.eval.fine_tuned.loss < summary.eval.base.loss / 2, summary.eval
    adapter = load_file(job_dir / "adapter" / "adapter_model.safetensors")
    assert any("language_model" in k and "lora_B" in k for k in adapter) and not any("vision_tower" in k for k in adapter)

    spec = read_spec(job_dir)
    base = load_vlm(tiny_llava_dir, spec, resolve_precision(spec.training.precision, torch.device("cpu")))
    language = [m for n, m in base.named_modules() if n.startswith("model.language_model.") and isinstance(m, torch.nn.Linear)]
    assert language and all(isinstance(m, Linear4bit) for m in language)
    kept = [m for n, m in base.named_modules() if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))
            and isinstance(m, torch.nn.Linear)]
    assert kept and not any(isinstance(m, Linear4bit) for m in kept)
    assert all(m.weight.dtype == torch.float32 for m in kept)

    processor = load_processor(tiny_llava_dir)
    tokenizer = VisionChatTokenizer(processor, processor.image_token_id, shapes_dir)
    items = [tokenizer.tokenize(e) for e in load_examples(shapes_dir / "chat.val.jsonl")[0][:8]]
    batch = VisionBatcher(items, processor.tokenizer.pad_token_id, tokenizer).collate(range(len(items)))
    with torch.no_grad():
        loss, tokens, _ = VisionLMLoss(base)(**{k: v for k, v in batch.items() if k != "tokens"})
        base_loss = float(loss) / tokens
        reloaded = PeftModel.from_pretrained(base, job_dir / "adapter").eval()
        loss, tokens, _ = VisionLMLoss(reloaded)(**{k: v for k, v in batch.items() if k != "tokens"})
    assert float(loss) / tokens < base_loss / 2


def recipe(job_dir: Path, home: Path, faults: str = "") -> int:
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "TUNEFORGE_FAULT_INJECTION": faults}
    done = subprocess.run([sys.executable, "-m", "tuneforge.recipes.vlm", "--job-dir", str(job_dir), "--no-progress"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, -9):
        print(done.stdout, done.stderr)
    return done.returncode


@pytest.mark.slow  # the runtime's exact resume is tested on the SFT, DPO and reward recipes in the default suite
def test_kill_9_then_resume_is_bit_identical(tmp_path, tiny_llava_dir, shapes_dir, tuneforge_home):
    sections = {"adapter": {"dropout": 0.1}, "training": {"max_steps": 6, "per_device_batch_size": 4},
                "evaluation": {"metrics": ["loss"], "eval_before_training": False},
                "checkpoint": {"every_steps": 2, "keep_last": 2, "max_restarts": 0}}
    reference = vlm_job(tmp_path, tiny_llava_dir, shapes_dir, "reference", **sections)
    assert recipe(reference, tuneforge_home) == 0
    job_dir = vlm_job(tmp_path, tiny_llava_dir, shapes_dir, "killed", **sections)
    assert recipe(job_dir, tuneforge_home, "kill_at_step=3") == -9
    assert recipe(job_dir, tuneforge_home) == 0
    assert [e["data"]["step"] for e in read_events(job_dir) if e["data"].get("kind") == "resumed"] == [2]

    def steps(path):
        return {e["data"]["step"]: (e["data"]["train_loss"], tuple(e["data"]["example_ids"]))
                for e in read_events(path) if e["type"] == "metrics" and "train_loss" in e["data"]}

    assert steps(job_dir) == steps(reference) and sorted(steps(job_dir)) == list(range(1, 7))
    ours = load_file(job_dir / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert read_summary(job_dir).eval == read_summary(reference).eval


@pytest.mark.slow  # two processes and a reference run: ~40 s on a loaded 2-core machine
def test_ddp_with_2_processes_trains_like_one(tmp_path, tiny_llava_dir, shapes_dir, tuneforge_home):
    from tuneforge.launch.commands import recipe_command
    from tuneforge.launch.supervisor import supervise
    from tuneforge.spec.jobdir import read_spec

    sections = {"training": {"max_steps": 3, "per_device_batch_size": 4, "gradient_accumulation_steps": 1},
                "evaluation": {"metrics": ["loss"], "eval_before_training": False}}
    single = vlm_job(tmp_path, tiny_llava_dir, shapes_dir, "single",
                     **{**sections, "training": {**sections["training"], "per_device_batch_size": 8}})
    assert recipe(single, tuneforge_home) == 0
    ddp = vlm_job(tmp_path, tiny_llava_dir, shapes_dir, "ddp", **sections, resources={"num_gpus": 2, "strategy": "ddp"})
    env = {"TUNEFORGE_HOME": str(tuneforge_home), "PYTHONPATH": str(REPO / "src")}
    assert supervise(ddp, recipe_command(read_spec(ddp), ddp), max_restarts=0, env=env).status == "succeeded"

    def losses(path):
        return {e["data"]["step"]: e["data"]["train_loss"] for e in read_events(path)
                if e["type"] == "metrics" and "train_loss" in e["data"]}

    ours, theirs = losses(ddp), losses(single)
    assert sorted(ours) == sorted(theirs) == [1, 2, 3]
    assert all(abs(ours[s] - theirs[s]) <= 1e-4 * abs(theirs[s]) for s in theirs)
    adapter, reference = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (ddp, single))
    assert adapter.keys() == reference.keys()
    assert all(torch.allclose(adapter[k], reference[k], atol=1e-5) for k in adapter)

"""The CLIP recipe end to end on a tiny CLIP built from a config, on generated coloured shapes and their captions
("a red circle"): the contrastive loss goes down and retrieval recall@k over the held-out pairs goes up, LoRA
trains both towers with the projections beside it (the temperature stays), the adapter reloads with PEFT and
retrieves as in the job; full fine-tuning trains every weight; kill -9 resumes bit-identically (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_job_dir
from tuneforge.engine.events import read_events
from tuneforge.recipes import clip
from tuneforge.spec.jobdir import read_summary


def clip_job(tmp_path: Path, model_dir: Path, shapes: Path, name: str = "job", **sections) -> Path:
    base = {
        "method": "clip",
        "dataset": {"path": str(shapes / "pairs.train.jsonl"), "validation_path": str(shapes / "pairs.val.jsonl")},
        "adapter": {"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
        "training": {"learning_rate": 3e-3, "batch_size": 16, "per_device_batch_size": 16, "max_steps": 40, "seed": 0},
        "evaluation": {"metrics": ["loss"]},
        "checkpoint": {"every_steps": 20, "keep_last": 1},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return make_job_dir(tmp_path / name, model_dir, **base)


def test_lora_clip_retrieves_better_and_reloads(tmp_path, tiny_clip_dir, shapes_dir):
    from peft import PeftModel
    from transformers import CLIPModel

    from tuneforge.engine.precision import resolve_precision
    from tuneforge.engine.vision.data import ImageTextPair, PairBatcher
    from tuneforge.engine.vision.loss import ClipLoss
    from tuneforge.engine.vision.models import load_processor
    from tuneforge.evaluation.vision import clip_retrieval

    job_dir = clip_job(tmp_path, tiny_clip_dir, shapes_dir)
    summary = clip.run(job_dir, progress=False)
    base, tuned = summary.eval.base, summary.eval.fine_tuned
    assert summary.method == "clip" and summary.output == "adapter" and read_summary(job_dir) == summary
    # measured: recall@1 0.04 -> 0.42, recall@5 0.42 -> 1.0 over the 12 held-out pairs
    assert tuned.recall_at_1 >= base.recall_at_1 + 0.2 and tuned.recall_at_5 >= base.recall_at_5 + 0.3
    assert tuned.loss < base.loss and tuned.recall_at_10 >= base.recall_at_10
    metrics = [e["data"] for e in read_events(job_dir) if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert "train_image_to_text_accuracy" in metrics[0]
    assert sum(m["train_loss"] for m in metrics[-5:]) < sum(m["train_loss"] for m in metrics[:5])

    adapter = load_file(job_dir / "adapter" / "adapter_model.safetensors")
    assert any("text_model" in k and "lora_B" in k for k in adapter)
    assert any("vision_model" in k and "lora_B" in k for k in adapter)
    assert any("visual_projection" in k for k in adapter) and any("text_projection" in k for k in adapter)
    reloaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), job_dir / "adapter")
    assert torch.equal(reloaded.get_base_model().logit_scale, CLIPModel.from_pretrained(tiny_clip_dir).logit_scale)
    processor = load_processor(job_dir / "adapter")
    rows = [json.loads(line) for line in (shapes_dir / "pairs.val.jsonl").read_text().splitlines()]
    pairs = [ImageTextPair(row["image"], row["text"], line) for line, row in enumerate(rows, 1)]
    again = clip_retrieval(ClipLoss(reloaded), PairBatcher(pairs, processor, shapes_dir, max_length=64),
                           batch_size=32, precision=resolve_precision("fp32", torch.device("cpu")))
    assert again["recall_at_1"] == tuned.recall_at_1 and again["recall_at_5"] == tuned.recall_at_5


def test_full_clip_fine_tuning_trains_every_weight(tmp_path, tiny_clip_dir, shapes_dir):
    from transformers import CLIPModel

    job_dir = clip_job(tmp_path, tiny_clip_dir, shapes_dir, adapter={"type": "full"},
                       training={"learning_rate": 1e-3, "max_steps": 4},
                       evaluation={"eval_before_training": False})
    summary = clip.run(job_dir, progress=False)
    assert summary.output == "model" and summary.eval.fine_tuned.recall_at_1 is not None
    before, after = CLIPModel.from_pretrained(tiny_clip_dir), CLIPModel.from_pretrained(job_dir / "model")
    assert not torch.equal(before.logit_scale, after.logit_scale)
    assert not torch.equal(before.vision_model.embeddings.patch_embedding.weight,
                           after.vision_model.embeddings.patch_embedding.weight)


@pytest.mark.slow  # three recipe processes; test_vlm_recipe.py covers the runtime's exact resume by default
def test_kill_9_then_resume_is_bit_identical(tmp_path, tiny_clip_dir, shapes_dir, tuneforge_home):
    import os
    import subprocess
    import sys

    from conftest import REPO

    def recipe(job_dir: Path, faults: str = "") -> int:
        env = {**os.environ, "TUNEFORGE_HOME": str(tuneforge_home), "TUNEFORGE_FAULT_INJECTION": faults}
        done = subprocess.run([sys.executable, "-m", "tuneforge.recipes.clip", "--job-dir", str(job_dir),
                               "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        if done.returncode not in (0, -9):
            print(done.stdout, done.stderr)
        return done.returncode

    sections = {"adapter": {"dropout": 0.1}, "training": {"max_steps": 6, "batch_size": 8, "per_device_batch_size": 8},
                "evaluation": {"eval_before_training": False},
                "checkpoint": {"every_steps": 2, "keep_last": 2, "max_restarts": 0}}
    reference = clip_job(tmp_path, tiny_clip_dir, shapes_dir, "reference", **sections)
    assert recipe(reference) == 0
    job_dir = clip_job(tmp_path, tiny_clip_dir, shapes_dir, "killed", **sections)
    assert recipe(job_dir, "kill_at_step=3") == -9
    assert recipe(job_dir) == 0
    assert [e["data"]["step"] for e in read_events(job_dir) if e["data"].get("kind") == "resumed"] == [2]

    def steps(path):
        return {e["data"]["step"]: (e["data"]["train_loss"], tuple(e["data"]["example_ids"]))
                for e in read_events(path) if e["type"] == "metrics" and "train_loss" in e["data"]}

    assert steps(job_dir) == steps(reference) and sorted(steps(job_dir)) == list(range(1, 7))
    ours = load_file(job_dir / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert read_summary(job_dir).eval == read_summary(reference).eval

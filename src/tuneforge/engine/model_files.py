"""The model directories tuneforge loads hold safetensors weights only, never pickle.

Unpickling runs code, so a base model, adapter, reward or judge directory with pickle files (.bin, .pt,
.pth, .pkl, .ckpt) is refused by name before any library opens it, and transformers is told to read
safetensors only. The trainer state tuneforge writes into its own checkpoints (optimizer.pt, rng.pt, ...)
is read with torch.load(weights_only=True), which rebuilds tensors and never calls into pickled code.
Torch-free: the API and the scheduler may check a directory before they register it.
"""

from __future__ import annotations

import re
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# What engine/checkpoint.py writes beside a checkpoint's safetensors weights (read with weights_only=True).
TRAINER_STATE = re.compile(r"(optimizer|scheduler|scaler|rng(-\d+)?)\.pt")


class PickleWeightsRefused(ValueError):
    """A model directory that holds pickle files, or no safetensors weights at all."""


def check_safetensors_dir(directory: str | Path, *, what: str) -> Path:
    """directory, if the files a loader would read there are safetensors; else a PickleWeightsRefused that
    names `what` (e.g. "model.base_model"), the directory's name and the offending files."""
    directory = Path(directory)
    files = [p for p in directory.iterdir() if p.is_file()] if directory.is_dir() else []
    pickles = sorted(p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES and not TRAINER_STATE.fullmatch(p.name))
    if pickles:
        raise PickleWeightsRefused(
            f"{what} {directory.name!r}: holds pickle file(s) {', '.join(pickles[:5])}; tuneforge loads safetensors "
            "weights only, since loading a pickle can run arbitrary code. Convert the model where you trust it "
            "(model.save_pretrained(DIR, safe_serialization=True)) and remove the pickle files")
    if not any(p.name.endswith(".safetensors") for p in files):
        raise PickleWeightsRefused(f"{what} {directory.name!r}: has no .safetensors weights (expected model.safetensors, "
                                   "its shards, or adapter_model.safetensors)")
    return directory

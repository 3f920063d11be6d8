"""Model imports cannot run code: pickle weights are refused wherever a model is loaded, every torch.load
in src/ has weights_only=True, no call passes trust_remote_code=True, and a pickle canary (a file that
creates a marker when unpickled) placed where a model is loaded never fires."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "tuneforge"


def unsafe_calls(source: str, filename: str = "<test>") -> list[str]:
    """torch.load without weights_only=True, trust_remote_code set to anything but False, pickle imports."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found += [f"{filename}:{node.lineno}: imports {n}" for n in names
                  if n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib")]
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name) \
                and func.value.id == "torch":
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
        if "trust_remote_code" in keywords:
            value = keywords["trust_remote_code"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{filename}:{node.lineno}: trust_remote_code is not False")
        if None in keywords:  # **kwargs could carry trust_remote_code: only literal dicts are checked
            value = keywords[None]
            if isinstance(value, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "trust_remote_code"
                                                   for k in value.keys):
                found.append(f"{filename}:{node.lineno}: trust_remote_code passed in **kwargs")
    return found


def test_the_checker_finds_what_it_looks_for():
    assert len(unsafe_calls("torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)")) == 2
    assert len(unsafe_calls("import pickle\nfrom dill import loads\nimport json")) == 2
    assert len(unsafe_calls("f(x, trust_remote_code=True)\nf(x, trust_remote_code=flag)\nf(**{'trust_remote_code': 1})"
                            "\nf(x, trust_remote_code=False)")) == 3


def test_no_unsafe_loading_anywhere_in_src():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        problems += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)))
    assert problems == []


class Canary:
    """Unpickled, it creates its marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def canary(tmp_path):
    import torch

    marker = tmp_path / "PICKLE-RAN"
    path = tmp_path / "canary.bin"
    torch.save({"model.embed_tokens.weight": Canary(marker)}, path)
    return path, marker


def test_the_canary_is_live(canary):
    """Loaded the unsafe way, it fires: so its staying silent below means something."""
    import torch

    path, marker = canary
    torch.load(path, weights_only=False)
    assert marker.exists()


def model_with(tmp_path: Path, tiny_model_dir: Path, name: str, canary_path: Path, *, keep_safetensors: bool) -> Path:
    directory = tmp_path / name
    shutil.copytree(tiny_model_dir, directory)
    if not keep_safetensors:
        (directory / "model.safetensors").unlink()
    shutil.copy(canary_path, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("keep_safetensors", [False, True])
def test_a_model_directory_with_pickle_weights_is_refused_and_the_canary_never_fires(
        tmp_path, tiny_model_dir, canary, keep_safetensors):
    import torch

    from tuneforge.engine.base_models import ModelNotFound, resolve_base_model
    from tuneforge.engine.model_loading import load_base_model
    from tuneforge.engine.precision import resolve_precision
    from tuneforge.evaluation.judges import JudgeError, judge_for
    from tuneforge.spec.job import ModelSpec

    path, marker = canary
    model_dir = model_with(tmp_path, tiny_model_dir, f"pickled-{keep_safetensors}", path,
                           keep_safetensors=keep_safetensors)
    with pytest.raises(ModelNotFound, match=r"model.base_model 'pickled-\w+': holds pickle file\(s\) pytorch_model.bin"):
        resolve_base_model(str(model_dir))
    with pytest.raises(ModelNotFound, match="pickle"):
        load_base_model(model_dir, ModelSpec(base_model=str(model_dir)), resolve_precision("fp32", torch.device("cpu")),
                        full_finetune=True)
    with pytest.raises(JudgeError, match="pickle"):  # a score_model / label_model judge run locally
        judge_for(str(model_dir))
    assert not marker.exists()


def test_a_reward_model_with_pickle_weights_is_refused(tmp_path, tiny_model_dir, canary):
    from tuneforge.engine.base_models import ModelNotFound
    from tuneforge.engine.preference.reward import load_reward_model

    path, marker = canary
    reward_dir = model_with(tmp_path, tiny_model_dir, "reward", path, keep_safetensors=False)
    (reward_dir / "reward_model.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="reward model 'reward': holds pickle file"):
        load_reward_model(reward_dir)
    assert not marker.exists()


def test_checkpoint_state_is_read_without_unpickling_code(tmp_path, canary):
    """Trainer state (optimizer.pt, ...) is allowed beside a checkpoint's weights because it is read with
    weights_only=True: the canary in its place is refused, not run."""
    import pickle

    import torch

    path, marker = canary
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()

"""Exports of a whole model directory (what full fine-tuning publishes): no merge, dtype conversion that reloads
to the verified weights, GGUF read back; and the requests an export refuses."""

import json

import pytest
import torch

from tuneforge.export import ExportError, export_model


def test_a_whole_model_exports_merged_in_bfloat16(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    result = export_model(tiny_model_dir, format="merged", out=tmp_path / "out", dtype="bfloat16", name="tiny")
    assert result.descriptor["checks"]["merge"].startswith("none")
    saved = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, original[k].to(torch.bfloat16)) for k, v in saved.items())
    serve = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert "--dtype bfloat16" in serve["commands"]["vllm"] and "--served-model-name tiny" in serve["commands"]["vllm"]
    assert (tmp_path / "out" / "chat_template.jinja").read_text().startswith("{% for message in messages %}")


def test_a_whole_model_exports_to_gguf(tiny_model_dir, tmp_path):
    result = export_model(tiny_model_dir, format="gguf", gguf_type="q8_0", out=tmp_path / "g", name="tiny")
    assert (tmp_path / "g" / "tiny-Q8_0.gguf").is_file() and not (tmp_path / "g" / ".hf-float32").exists()
    check = result.descriptor["checks"]["gguf"]
    assert check["max_abs_diff"] <= check["tolerance"] and check["relative_tolerance"] == 8e-2


def test_an_adapter_export_of_a_whole_model_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ExportError, match="not an adapter"):
        export_model(tiny_model_dir, format="adapter", out=tmp_path / "a")
    with pytest.raises(ExportError, match="expected a job directory"):
        export_model(tmp_path, format="merged", out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"format": "merged", "gguf_type": "q8_0"}, "--gguf-type applies to --format gguf"),
    ({"format": "gguf", "dtype": "bfloat16"}, "--dtype applies to adapter and merged"),
    ({"format": "gguf", "gpu": "h200"}, "llama.cpp takes none"),
    ({"format": "merged", "fallback": "merged"}, "--fallback applies to --format adapter"),
    ({"format": "gguf", "target": "vllm"}, "for --target llama.cpp"),
])
def test_an_option_that_would_not_shape_the_export_is_refused(tiny_model_dir, tmp_path, options, message):
    with pytest.raises(ExportError, match=message):
        export_model(tiny_model_dir, out=tmp_path / "o", **options)
    assert not (tmp_path / "o").exists()

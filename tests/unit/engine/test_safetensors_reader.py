"""The safetensors reader behind sharded loading: a flat range of a saved tensor, read without the rest of
it, must be exactly that range of the flattened tensor, for any shape and any cut (ZeRO-3 partitions start
and end mid-row); a tied weight saved twice must be saved the same."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tuneforge.engine.sharded_loading import SafetensorsReader

SHAPES = {"vector": (7,), "matrix": (5, 3), "cube": (2, 3, 4), "column": (6, 1), "scalar": ()}


@pytest.fixture
def saved(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    save_file({k: v for k, v in tensors.items() if k != "cube"}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"cube": tensors["cube"].to(torch.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    tensors["cube"] = tensors["cube"].to(torch.bfloat16)
    return tmp_path, tensors


def test_every_flat_range_of_every_shape_reads_exactly_those_elements(saved):
    model_dir, tensors = saved
    with SafetensorsReader(model_dir) as reader:
        for name, tensor in tensors.items():
            flat = tensor.reshape(-1)
            assert reader.numel((name,)) == flat.numel()
            for start in range(flat.numel()):
                for stop in range(start + 1, flat.numel() + 1):
                    values = reader.flat_range((name,), start, stop)
                    assert values.dtype == tensor.dtype and torch.equal(values, flat[start:stop]), (name, start, stop)


def test_a_shape_the_config_does_not_make_is_refused_with_both_shapes(saved):
    model_dir, _ = saved
    with SafetensorsReader(model_dir) as reader, pytest.raises(ValueError, match=r"matrix: .* \(5, 3\), .* \(3, 5\)"):
        reader.check_shape(("matrix",), (3, 5))


def test_a_tied_weight_saved_twice_differently_is_refused(tmp_path):
    save_file({"embed": torch.ones(4, 2), "head": torch.ones(4, 2)}, str(tmp_path / "same.safetensors"))
    with SafetensorsReader(tmp_path) as reader:
        assert torch.equal(reader.flat_range(("embed", "head"), 1, 6), torch.ones(5))
    save_file({"embed": torch.ones(4, 2), "head": torch.zeros(4, 2)}, str(tmp_path / "same.safetensors"))
    with SafetensorsReader(tmp_path) as reader, pytest.raises(ValueError, match="embed and head are one tied weight"):
        reader.flat_range(("embed", "head"), 1, 6)


def test_a_weight_missing_from_the_files_names_itself_and_the_files(saved):
    model_dir, _ = saved
    with SafetensorsReader(model_dir) as reader, pytest.raises(KeyError, match="lm_head.weight: not in .*model-00001"):
        reader.flat_range(("lm_head.weight",), 0, 1)

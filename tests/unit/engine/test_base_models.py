"""The built-in base models' cache: building a missing model leaves the job's RNG where it was."""

from __future__ import annotations

import pytest
import torch

from tuneforge.engine.base_models import ensure_builtin_model, needs_import


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llava", "tiny-clip"])
def test_building_a_builtin_model_mid_run_leaves_the_rng_alone(name):
    # A job seeds every rank, then its main rank alone builds a missing model (the others wait), then every
    # rank initializes its adapter: what the main rank draws after the build must be what the others draw.
    torch.manual_seed(1234)
    expected = torch.rand(16)
    torch.manual_seed(1234)
    assert needs_import(name)
    ensure_builtin_model(name)
    assert not needs_import(name)
    assert torch.equal(torch.rand(16), expected)

import pytest
import torch

from tuneforge.engine.model_loading import load_base_model
from tuneforge.engine.precision import resolve_precision
from tuneforge.spec.job import ModelSpec


def test_4bit_gradients_stay_exact_after_an_eval_pass(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode; training after it must stay exact."""
    bnb = pytest.importorskip("bitsandbytes")
    precision = resolve_precision("fp32", torch.device("cpu"))
    model = load_base_model(tiny_model_dir, ModelSpec(quantization="nf4"), precision, full_finetune=False)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)

    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(3, 20).unsqueeze(0))
    model.train()
    x = torch.randn(2, 7, layer.in_features, requires_grad=True)
    layer(x).pow(2).sum().backward()
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    reference = x.detach().clone().requires_grad_(True)
    (reference @ dequantized.t()).pow(2).sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-4)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"

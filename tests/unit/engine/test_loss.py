import torch
import torch.nn.functional as F

from tuneforge.engine import loss as loss_module
from tuneforge.engine.loss import CausalLMLoss, linear_cross_entropy


def test_chunked_linear_cross_entropy_matches_reference(monkeypatch):
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_ELEMENTS", 7 * 50)  # 7 rows per chunk, with a ragged last chunk
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    loss, correct = linear_cross_entropy(hidden, weight, targets)
    (loss * 0.5).backward()
    ours = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.5).backward()
    assert torch.allclose(loss.double(), reference, atol=1e-5)
    assert int(correct) == int((logits.argmax(-1) == targets).sum())
    assert torch.allclose(ours[0], hidden.grad, atol=1e-6) and torch.allclose(ours[1], weight.grad, atol=1e-6)


def test_causal_lm_loss_equals_transformers_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    input_ids = torch.randint(3, 200, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 15:] = 0
    labels = input_ids.clone()
    labels[:, :6] = -100
    labels[attention_mask == 0] = -100
    loss_sum, tokens, _ = CausalLMLoss(model)(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    reference = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert tokens == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(loss_sum / tokens, reference, atol=1e-5)

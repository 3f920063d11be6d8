"""Packed examples attend only to themselves: per-example losses equal the unpacked ones."""

import numpy as np
import pytest
import torch

from tuneforge.data.batching import collate
from tuneforge.data.packing import best_fit_decreasing, collate_packed
from tuneforge.data.templating import TokenizedExample
from tuneforge.engine.loss import CausalLMLoss


def per_example_losses(model, batch, rows):
    """Summed loss of each example, from the per-token losses of one forward pass over the batch."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids")).logits.float()
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=-100)
    out = {}
    for r, row in enumerate(rows):
        offset = 0
        for example in row:
            n = len(example.input_ids)
            out[example.line] = float(token_loss[r, offset : offset + n - 1].sum())
            offset += n
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    examples = []
    for line, n in enumerate([40, 13, 27, 9, 33, 21, 5], start=1):
        ids = rng.integers(3, 250, n).astype(np.int32)
        labels = np.where(np.arange(n) >= n // 3, ids, -100).astype(np.int32)  # loss on the last two thirds
        examples.append(TokenizedExample(ids, labels, line))
    rows = [[examples[i] for i in row] for row in best_fit_decreasing([len(e.input_ids) for e in examples], 64)]
    assert any(len(row) > 1 for row in rows)
    packed = per_example_losses(model, collate_packed(rows, 0, attention=attention), rows)
    unpacked = {}
    for example in examples:
        unpacked.update(per_example_losses(model, collate([example], 0), [[example]]))
    assert packed.keys() == unpacked.keys()
    for line in packed:
        assert packed[line] == pytest.approx(unpacked[line], abs=1e-5)

    # And through tuneforge's training loss: the packed batch's summed loss is the sum of the parts.
    loss_module = CausalLMLoss(model)
    batch = collate_packed(rows, 0, attention=attention)
    batch.pop("tokens")
    with torch.no_grad():
        total, count, _ = loss_module(**batch)
    assert float(total) == pytest.approx(sum(unpacked.values()), abs=1e-4)
    assert count == sum(int((e.labels[1:] != -100).sum()) for e in examples)


def test_position_ids_alone_do_not_isolate_examples_on_sdpa(tiny_model_dir):
    """Why the block-diagonal mask exists: without it the second example sees the first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    first, second = (TokenizedExample(rng.integers(3, 250, n).astype(np.int32), rng.integers(3, 250, n).astype(np.int32), i)
                     for i, n in ((1, 30), (2, 20)))
    batch = collate_packed([[first, second]], 0, attention="sdpa")
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, 30:]
        alone = model(input_ids=torch.from_numpy(second.input_ids.astype(np.int64))[None]).logits[0]
    assert (leaky - alone).abs().max() > 0.01


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_padding_free_micro_batch_trains_like_the_padded_one_in_fewer_rows(tiny_model_dir, attention):
    """training.padding_free: the same examples in shared rows give the padded batch's loss, token count and
    gradients, in fewer rows of the same length."""
    from transformers import AutoModelForCausalLM

    from tuneforge.data.batching import Batcher

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention, dtype=torch.float32)
    rng = np.random.default_rng(2)
    examples = []
    for line, n in enumerate([60, 58, 12, 30, 9, 25, 17, 6], start=1):  # long-tailed: two long, six short
        ids = rng.integers(3, 250, n).astype(np.int32)
        examples.append(TokenizedExample(ids, np.where(np.arange(n) >= n // 2, ids, -100).astype(np.int32), line))
    units = list(range(len(examples)))
    padded = Batcher(examples, 0, attention=attention).collate(units)
    shared = Batcher(examples, 0, attention=attention, padding_free=True).collate(units)
    assert shared["input_ids"].shape[1] == padded["input_ids"].shape[1] == 60
    assert shared["input_ids"].shape[0] < padded["input_ids"].shape[0] == 8
    assert int(shared["tokens"]) == int(padded["tokens"])

    def loss_and_grads(batch):
        model.zero_grad()
        batch = {k: v for k, v in batch.items() if k != "tokens"}
        total, count, _ = CausalLMLoss(model)(**batch)
        total.backward()
        return float(total), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}

    (free_loss, free_count, free_grads), (pad_loss, pad_count, pad_grads) = loss_and_grads(shared), loss_and_grads(padded)
    assert free_count == pad_count and free_loss == pytest.approx(pad_loss, rel=1e-5)
    for name, grad in pad_grads.items():
        torch.testing.assert_close(free_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_keeps_the_padded_batch_when_sharing_saves_little(tiny_model_dir):
    """Rows of about one example each would only add the block-diagonal mask's cost."""
    from tuneforge.data.batching import Batcher

    examples = [TokenizedExample(np.arange(3, 3 + n, dtype=np.int32), np.arange(3, 3 + n, dtype=np.int32), i)
                for i, n in enumerate([40, 39, 38, 37, 36, 35, 34, 5], start=1)]  # 8 rows or 7: not worth a mask
    batch = Batcher(examples, 0, padding_free=True).collate(list(range(8)))
    assert batch["input_ids"].shape == (8, 40) and "position_ids" not in batch

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

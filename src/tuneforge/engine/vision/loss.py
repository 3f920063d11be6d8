"""The training losses of vision models, in the runtime's loss contract (engine/loss.py): forward returns
(summed loss, units counted, units right) and `normalizer(batch)` says the units before any forward.

VisionLMLoss: a VLM's next-token loss on the label tokens (the assistant's), through the model's own
multimodal forward (image features placed at the image tokens), then the same fused, chunked LM head as text.
ClipLoss: CLIP's symmetric contrastive loss (CLIPModel(return_loss=True)) over a micro-batch of pairs; its
units are pairs and "right" counts images whose nearest caption in the micro-batch is their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.data.templating import IGNORE_INDEX
from tuneforge.engine.loss import CausalLMLoss, _fusable, linear_cross_entropy


class VisionLMLoss(CausalLMLoss):
    """Wraps a VLM (plain or PEFT): (summed token loss, label tokens, correct next-token predictions)."""

    def forward(self, input_ids, labels, attention_mask=None, **image_inputs):
        base = self.base_model()
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **image_inputs).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        hidden = hidden[:, :-1][keep]
        targets = targets[keep]
        lm_head = base.get_output_embeddings()
        if _fusable(lm_head, base.config.get_text_config()):
            loss, correct = linear_cross_entropy(hidden, lm_head.weight, targets)
        else:
            logits = lm_head(hidden).float()
            loss = F.cross_entropy(logits, targets, reduction="sum")
            correct = (logits.argmax(dim=-1) == targets).sum()
        return loss, targets.numel(), correct


class ClipLoss(nn.Module):
    """Wraps a CLIPModel (plain or PEFT): (mean contrastive loss x pairs, pairs, images matched to their caption)."""

    accuracy_metric = "image_to_text_accuracy"  # what the loop's train accuracy counts

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def normalizer(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def base_model(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, attention_mask, pixel_values):
        output = self.base_model()(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                   return_loss=True)
        pairs = input_ids.shape[0]
        own = torch.arange(pairs, device=input_ids.device)
        correct = (output.logits_per_image.argmax(dim=-1) == own).sum()
        # CLIP's loss is the mean over the micro-batch; the runtime divides sums by the step's pairs.
        return output.loss.float() * pairs, pairs, correct

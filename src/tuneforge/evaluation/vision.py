"""Evaluation of vision models on held-out data: a VLM's likelihood metrics and its greedy answers to image
questions (exact match, ROUGE, ... against the reference reply); CLIP's retrieval recall@k.

Recall@k: every validation image is a query over every validation caption (and every caption over every
image); a query scores 1 when its own pair is among its k most similar. The summary reports the mean of both
directions; recall@k with k at least the number of pairs is 1 by construction, so it is left out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tuneforge.data.formats import Example
from tuneforge.engine.vision.data import PairBatcher, VisionBatcher, VisionChatTokenizer, image_inputs
from tuneforge.evaluation.metrics import score
from tuneforge.spec.job import GENERATION_METRICS, EvaluationSpec

RECALL_AT = (1, 5, 10)


@torch.no_grad()
def vlm_likelihood(loss_module: nn.Module, batcher: VisionBatcher, *, batch_size: int, precision) -> dict[str, float]:
    """Token-weighted loss on the assistant tokens, its perplexity and next-token accuracy."""
    was_training = loss_module.training
    loss_module.eval()
    total = tokens = correct = 0.0
    for start in range(0, len(batcher), batch_size):
        batch = batcher.collate(range(start, min(start + batch_size, len(batcher))))
        inputs = {k: v.to(precision.device) for k, v in batch.items() if k != "tokens"}
        with precision.autocast():
            loss_sum, count, right = loss_module(**inputs)
        total, tokens, correct = total + float(loss_sum), tokens + int(count), correct + int(right)
    loss_module.train(was_training)
    if not tokens:
        return {}
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / tokens}


@torch.no_grad()
def vlm_answers(model: nn.Module, tokenizer: VisionChatTokenizer, examples: list[Example], *, max_new_tokens: int,
                batch_size: int, precision) -> tuple[list[str], list[str], list[str]]:
    """(prompts, greedy answers, references) for the examples' last assistant turns, left-padded batches."""
    processor = tokenizer.processor
    pad_id = processor.tokenizer.pad_token_id
    eos_id = processor.tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    prompts, answers, references = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = [tokenizer.prompt(example) for example in examples[start : start + batch_size]]
        rows = [tokenizer.ids(text, tokenizer.images(refs)) for text, refs, _ in chunk]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        images = tokenizer.images([ref for _, refs, _ in chunk for ref in refs])
        extra = {k: v.to(precision.device) for k, v in image_inputs(processor.image_processor, images).items()}
        with precision.autocast():
            output = model.generate(input_ids=input_ids.to(precision.device),
                                    attention_mask=attention_mask.to(precision.device), **extra,
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                    eos_token_id=eos_id, use_cache=True)
        for i, (text, _, reference) in enumerate(chunk):
            answers.append(processor.tokenizer.decode(output[i, width:], skip_special_tokens=True).strip())
            prompts.append(text)
            references.append(reference)
    model.train(was_training)
    return prompts, answers, references


def generated_metrics(answers: list[str], references: list[str], spec: EvaluationSpec) -> dict[str, float]:
    """The evaluation.metrics that compare generated answers with the references."""
    wanted = [name for name in spec.metrics if name in GENERATION_METRICS]
    return {name: score(name, answers, references, options=spec.metric_options(name)).value for name in wanted}


@torch.no_grad()
def clip_retrieval(loss_module: nn.Module, batcher: PairBatcher, *, batch_size: int, precision) -> dict[str, float]:
    """Held-out contrastive loss (over batches of batch_size pairs) and retrieval recall@k over all pairs."""
    was_training = loss_module.training
    loss_module.eval()
    model = loss_module.base_model()
    image_embeds, text_embeds = [], []
    loss_total, loss_pairs = 0.0, 0
    for start in range(0, len(batcher), batch_size):
        units = list(range(start, min(start + batch_size, len(batcher))))
        batch = {k: v.to(precision.device) for k, v in batcher.collate(units).items() if k != "tokens"}
        with precision.autocast():
            if len(units) > 1:  # one pair alone has no negatives
                loss_total, loss_pairs = loss_total + float(loss_module(**batch)[0]), loss_pairs + len(units)
            image_embeds.append(_features(model.get_image_features(pixel_values=batch["pixel_values"])).float())
            text_embeds.append(_features(model.get_text_features(input_ids=batch["input_ids"],
                                                                 attention_mask=batch["attention_mask"])).float())
    loss_module.train(was_training)
    images = nn.functional.normalize(torch.cat(image_embeds), dim=-1)
    texts = nn.functional.normalize(torch.cat(text_embeds), dim=-1)
    similarity = images @ texts.T
    n = similarity.shape[0]
    own = torch.arange(n, device=similarity.device)
    result = {"loss": loss_total / loss_pairs} if loss_pairs else {}
    for k in RECALL_AT:
        if k >= n:
            continue
        image_to_text = (similarity.topk(k, dim=1).indices == own[:, None]).any(dim=1).float().mean()
        text_to_image = (similarity.T.topk(k, dim=1).indices == own[:, None]).any(dim=1).float().mean()
        result[f"recall_at_{k}"] = float((image_to_text + text_to_image) / 2)
    return result


def _features(value) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return value if isinstance(value, torch.Tensor) else value.pooler_output

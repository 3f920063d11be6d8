"""Image chats and image-text pairs as model inputs: token ids with assistant-only labels, and batches whose
images go through the model's image processor.

A chat is rendered by the processor's own chat template; its image placeholders are expanded by the processor
into the image's tokens. The loss spans come from renders of each prefix of the conversation (as
data/templating.py does for text), measured in tokens by the processor itself on the prefix, so they stay right
whatever the expansion is (LLaVA's N copies of one token, Idefics3's rows and columns of tiles). A prefix must
tokenize as the start of the whole conversation, or the template is refused. Image tokens never carry loss.
Images are decoded when a batch is built (not kept in memory), from the dataset's own references.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneforge.data.batching import collate as collate_tokens
from tuneforge.data.formats import Example, parts_text
from tuneforge.data.images import load_image
from tuneforge.data.templating import IGNORE_INDEX, TemplateError, TokenizedExample


@dataclass
class VisionExample:
    """One tokenized image chat: ids and labels (TokenizedExample) and the images its placeholders expand."""

    tokens: TokenizedExample
    images: list[str]  # references, in order of appearance (data: URLs or paths under the dataset's folder)
    image_tokens: int  # positions the images fill

    @property
    def line(self) -> int:
        return self.tokens.line

    def __len__(self) -> int:
        return len(self.tokens)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a processor's chat template: parts without the image bytes (the template only places them)."""
    return [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                                            for p in m["content"]]} for m in messages]


def _images_of(messages: list[dict[str, Any]]) -> list[str]:
    return [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]


class VisionChatTokenizer:
    """Tokenizes image_chat examples with a VLM's processor; images are resolved against base_dir."""

    def __init__(self, processor, image_token_id: int, base_dir: Path):
        if not processor.chat_template:
            raise TemplateError("the model's processor has no chat template: method vlm renders conversations with it")
        self.processor, self.image_token_id, self.base_dir = processor, image_token_id, base_dir
        tokenizer = processor.tokenizer
        specials = set(tokenizer.all_special_tokens)
        specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        self._specials = sorted((s for s in specials if s and s != getattr(processor, "image_token", None)),
                                key=len, reverse=True)

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(template_messages(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def images(self, references: list[str]) -> list:
        return [load_image(reference, base_dir=self.base_dir) for reference in references]

    def ids(self, text: str, images: list) -> list[int]:
        """The processor's token ids of text with its images expanded (no special tokens added: the template
        writes them)."""
        encoded = self.processor(text=[text], images=images or None, add_special_tokens=False)
        return list(encoded["input_ids"][0])

    def _end_of_turn(self, rendered: str, content_end: int) -> int:
        """Through the first special token after the reply (the end-of-turn token trains: the model learns to stop)."""
        tail = rendered[content_end:]
        hits = [(tail.find(token), token) for token in self._specials if tail.find(token) >= 0]
        if hits:
            position, token = min(hits)
            return content_end + position + len(token)
        return content_end + len(tail.rstrip())

    def tokenize(self, example: Example) -> VisionExample:
        messages = example.record["messages"]
        references = _images_of(messages)
        images = self.images(references)
        text = self.render(messages, generation_prompt=False)
        input_ids = self.ids(text, images)
        labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int32)
        ids = np.asarray(input_ids, dtype=np.int32)
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight", 1) == 0:
                continue
            before = self.render(messages[:index], generation_prompt=True) if index else ""
            through = self.render(messages[: index + 1], generation_prompt=False)
            reply = parts_text(message["content"])
            found = through.find(reply, len(before))
            if not (through.startswith(before) and text.startswith(through)) or found < 0:
                raise TemplateError("the processor's chat template renders a conversation differently depending on "
                                    "what follows, so assistant loss masks cannot be computed")
            end = self._end_of_turn(through, found + len(reply))
            prior = _images_of(messages[:index])
            start_ids = self.ids(before, images[: len(prior)]) if before else []
            end_ids = self.ids(through[:end], images[: len(prior)])
            if input_ids[: len(end_ids)] != end_ids or end_ids[: len(start_ids)] != start_ids:
                raise TemplateError("the processor tokenizes a conversation's start differently from the whole "
                                    "conversation, so assistant loss masks cannot be placed on its tokens")
            labels[len(start_ids) : len(end_ids)] = ids[len(start_ids) : len(end_ids)]
        is_image = ids == self.image_token_id
        labels[is_image] = IGNORE_INDEX  # never in the loss, whatever the template did
        return VisionExample(TokenizedExample(ids, labels, example.line), references, int(is_image.sum()))

    def prompt(self, example: Example) -> tuple[str, list[str], str]:
        """(the prompt before the last assistant reply, its images, the reply): what generation answers."""
        messages = example.record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:last]
        return self.render(prompt, generation_prompt=True), _images_of(prompt), parts_text(messages[last]["content"])


def fit_vision_examples(items: list[VisionExample], *, max_seq_length: int, too_long: str, file: str):
    """The too-long policy for image chats: drop or error (never truncate: that would cut through images);
    examples with nothing to learn are dropped. Returns (kept, dropped_too_long, dropped_no_labels)."""
    from tuneforge.data.problems import DataError, DataProblem

    kept, long_lines, no_labels = [], [], 0
    for item in items:
        if len(item) > max_seq_length:
            long_lines.append(item.line)
        elif item.tokens.num_label_tokens == 0:
            no_labels += 1
        else:
            kept.append(item)
    if too_long == "error" and long_lines:
        raise DataError([DataProblem(file, line, "too_long", "", f"at most {max_seq_length} tokens once templated, "
                                     "image tokens included", "a longer example") for line in long_lines])
    return kept, len(long_lines), no_labels


def image_inputs(image_processor, images: list) -> dict[str, torch.Tensor]:
    """What the image processor makes of a batch's images (pixel_values, and whatever else the model takes)."""
    if not images:
        return {}
    processed = image_processor(images=images, return_tensors="pt")
    return {key: value for key, value in processed.items() if isinstance(value, torch.Tensor)}


class VisionBatcher:
    """The runtime loop's batcher for image chats: one example per unit (no packing), right-padded token
    tensors plus the images of the micro-batch, processed in order of appearance."""

    row_length = None  # no packing: units are examples

    def __init__(self, items: list[VisionExample], pad_id: int, tokenizer: VisionChatTokenizer):
        self.items, self.pad_id, self.tokenizer = items, pad_id, tokenizer
        self.packing = False

    def __len__(self) -> int:
        return len(self.items)

    def example_ids(self, unit_ids) -> list[int]:
        return list(unit_ids)

    def unit_lengths(self) -> list[int]:
        return [len(item) for item in self.items]

    def collate(self, unit_ids) -> dict[str, torch.Tensor]:
        chosen = [self.items[u] for u in unit_ids]
        batch = collate_tokens([item.tokens for item in chosen], self.pad_id)
        images = self.tokenizer.images([ref for item in chosen for ref in item.images])
        batch.update(image_inputs(self.tokenizer.processor.image_processor, images))
        return batch


@dataclass
class ImageTextPair:
    image: str  # a reference
    text: str
    line: int


class PairBatcher:
    """CLIP's batcher: a micro-batch of image-text pairs, the captions tokenized (padded, truncated to the text
    tower's positions) and the images processed. The negatives of the contrastive loss are the micro-batch's."""

    row_length = None
    packing = False

    def __init__(self, pairs: list[ImageTextPair], processor, base_dir: Path, *, max_length: int):
        self.pairs, self.processor, self.base_dir, self.max_length = pairs, processor, base_dir, max_length

    def __len__(self) -> int:
        return len(self.pairs)

    def example_ids(self, unit_ids) -> list[int]:
        return list(unit_ids)

    def unit_lengths(self) -> list[int]:
        return [len(pair.text) for pair in self.pairs]

    def text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.processor.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                           return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def images(self, unit_ids) -> dict[str, torch.Tensor]:
        images = [load_image(self.pairs[u].image, base_dir=self.base_dir) for u in unit_ids]
        return image_inputs(self.processor.image_processor, images)

    def collate(self, unit_ids) -> dict[str, torch.Tensor]:
        batch = self.text_inputs([self.pairs[u].text for u in unit_ids])
        batch.update(self.images(unit_ids))
        batch["tokens"] = batch["attention_mask"].sum()
        return batch

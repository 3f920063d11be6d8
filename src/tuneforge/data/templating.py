"""Turn examples into token ids and labels, with the loss only on what the model should learn to say.

The chat template is rendered by the tokenizer itself; loss masks are computed from character spans
(prefix renders of the conversation) mapped onto tokens through the fast tokenizer's offsets. This works
for templates without `{% generation %}` markers (SmolLM2, Llama, Qwen...) and keeps the end-of-turn
token in the loss, so the model learns to stop even when pad and EOS share an id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

import numpy as np

from tuneforge.data.formats import Example, Format
from tuneforge.data.problems import DataError, DataProblem

IGNORE_INDEX = -100
Template = Literal["chat", "alpaca", "plain"]
# Unicode private-use characters that wrap trained replies in a marked render; never in real text.
MARK_START, MARK_END = "\ue000", "\ue001"

# ChatML, for base models whose tokenizer ships no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class TemplateError(ValueError):
    """The prompt template cannot render this data, or renders it in a way masks cannot follow."""


@dataclass
class TokenizedExample:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32; IGNORE_INDEX where no loss is taken; aligned with input_ids (the loss shifts)
    line: int

    @property
    def num_label_tokens(self) -> int:
        # Labels predict the next token, so the first position never contributes.
        return int((self.labels[1:] != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    examples_in: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    too_long_lines: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples_in": self.examples_in,
            "truncated": self.truncated,
            "dropped_too_long": self.dropped_too_long,
            "dropped_no_labels": self.dropped_no_labels,
        }


def resolve_template(template: str, fmt: Format, tokenizer) -> Template:
    """Pick the concrete template for `auto`, and refuse combinations that cannot work."""
    if template == "auto":
        if fmt in ("completion", "text"):
            return "plain"
        if fmt == "instruction" and not tokenizer.chat_template:
            return "alpaca"
        return "chat"
    if fmt == "text" and template != "plain":
        raise TemplateError(f"text data trains on the raw text: dataset.prompt_template must be plain or auto, not {template}")
    if template == "alpaca" and fmt != "instruction":
        raise TemplateError(f"dataset.prompt_template alpaca needs instruction data (instruction/input/output), not {fmt}")
    if template == "plain" and fmt in ("chat", "preference"):
        raise TemplateError(f"dataset.prompt_template plain needs completion, instruction or text data, not {fmt}")
    return template  # type: ignore[return-value]


class PromptRenderer:
    """Renders examples to text with loss spans, for one tokenizer and template."""

    def __init__(self, tokenizer, template: Template):
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("tuneforge needs a fast (Rust) tokenizer to map loss masks onto tokens")
        self.tokenizer = tokenizer
        self.template = template
        if template == "chat" and not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
        specials = set(tokenizer.all_special_tokens)
        specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        self._special_tokens = sorted((s for s in specials if s), key=len, reverse=True)
        self._compiled = _compiled_template(tokenizer.chat_template) if template == "chat" else None
        self._template_kwargs = dict(tokenizer.special_tokens_map)

    # --- rendering -------------------------------------------------------------------------------------
    def _apply(self, messages: list[dict], generation_prompt: bool) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self._compiled is not None:
            # The same compiled template and variables apply_chat_template uses, without its per-call overhead.
            return self._compiled.render(messages=plain, add_generation_prompt=generation_prompt, **self._template_kwargs)
        return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)

    def _plain_parts(self, example: Example) -> tuple[str, str]:
        record = example.record
        if example.format == "completion":
            return record["prompt"], record["completion"]
        if example.format == "text":
            return "", record["text"]
        if self.template == "alpaca":
            pattern = ALPACA_WITH_INPUT if record["input"] else ALPACA_NO_INPUT
            return pattern.format(instruction=record["instruction"], input=record["input"]), record["output"]
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "") + "\n\n"
        return prompt, record["output"]

    def _end_of_turn(self, rendered: str, content_end: int) -> int:
        """End of the trained span: through the first special token after the content (the EOT)."""
        tail = rendered[content_end:]
        hits = [(tail.find(tok), tok) for tok in self._special_tokens if tail.find(tok) >= 0]
        if hits:
            position, token = min(hits)
            return content_end + position + len(token)
        return content_end + len(tail.rstrip())

    def render(self, example: Example) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans that carry loss."""
        if self.template != "chat":
            prompt, completion = self._plain_parts(example)
            eos = self.tokenizer.eos_token or ""
            return prompt + completion + eos, [(len(prompt), len(prompt) + len(completion) + len(eos))]
        messages = example.as_messages()
        text = self._apply(messages, generation_prompt=False)
        spans = self._marked_spans(messages, text)
        return (text, spans) if spans is not None else (text, self._prefix_spans(messages, text))

    def _marked_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]] | None:
        """Spans from one render with the trained replies wrapped in private-use markers.

        None when the markers do not survive the template unchanged (it rewrites content), in which
        case the slower prefix renders decide."""
        trained = {i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0}
        if any(MARK_START in m["content"] or MARK_END in m["content"] for m in messages):
            return None
        marked = self._apply([dict(m, content=f"{MARK_START}{m['content']}{MARK_END}") if i in trained else m
                              for i, m in enumerate(messages)], generation_prompt=False)
        pieces, spans, position = [], [], 0
        rest = marked
        while True:
            start = rest.find(MARK_START)
            if start < 0:
                pieces.append(rest)
                break
            end = rest.find(MARK_END, start)
            if end < 0:
                return None
            pieces.append(rest[:start])
            position += start
            content = rest[start + 1 : end]
            pieces.append(content)
            spans.append((position, position + len(content)))
            position += len(content)
            rest = rest[end + 1 :]
        if "".join(pieces) != text or len(spans) != len(trained) or MARK_END in rest:
            return None
        return [(start, self._end_of_turn(text, end)) for start, end in spans]

    def _prefix_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Spans from renders of each prefix of the conversation: slower, works for any stable template."""
        spans = []
        last = len(messages) - 1
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight", 1) == 0:
                continue
            prefix = self._apply(messages[:index], generation_prompt=True) if index else ""
            through = text if index == last else self._apply(messages[: index + 1], generation_prompt=False)
            if not (through.startswith(prefix) and text.startswith(through)):
                raise TemplateError(
                    "the chat template renders a conversation differently depending on what follows "
                    "(e.g. it rewrites earlier turns), so assistant loss masks cannot be computed"
                )
            found = through.find(message["content"], len(prefix))
            content_end = found + len(message["content"]) if found >= 0 else len(prefix)
            spans.append((len(prefix), self._end_of_turn(through, content_end)))
        return spans

    def generation_prompt(self, example: Example) -> tuple[str, str]:
        """(prompt to generate from, reference answer): everything before the last assistant turn."""
        if self.template != "chat":
            return self._plain_parts(example)
        messages = example.as_messages()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return self._apply(messages[:last], generation_prompt=True), messages[last]["content"]

    # --- tokenizing ------------------------------------------------------------------------------------
    def tokenize(self, example: Example) -> TokenizedExample:
        return self.tokenize_many([example])[0]

    def tokenize_many(self, examples: list[Example]) -> list[TokenizedExample]:
        """Tokenize a batch in one call to the (parallel, Rust) tokenizer; labels from character spans."""
        rendered = [self.render(example) for example in examples]
        return self._labelled(rendered, self._encode(rendered), examples)

    def tokenize_stream(self, examples: Iterable[Example], batch_size: int = 512) -> Iterator[TokenizedExample]:
        """tokenize_many over a stream, rendering the next batch while the tokenizer encodes this one.

        The Rust tokenizer releases the GIL, so template rendering (Python) and encoding overlap."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            previous = None  # (rendered, examples, encoding future) of the batch being encoded
            for batch in _batches(examples, batch_size):
                rendered = [self.render(example) for example in batch]
                if previous is not None:
                    yield from self._labelled(previous[0], previous[2].result(), previous[1])
                previous = (rendered, batch, pool.submit(self._encode, rendered))
            if previous is not None:
                yield from self._labelled(previous[0], previous[2].result(), previous[1])

    def _encode(self, rendered: list[tuple[str, list]]):
        # Chat templates write their own BOS; plain text gets the tokenizer's usual special tokens.
        # The Rust tokenizer directly: transformers' per-encoding conversion costs as much as encoding.
        return self.tokenizer.backend_tokenizer.encode_batch(
            [text for text, _ in rendered], add_special_tokens=self.template != "chat")

    def _labelled(self, rendered, encodings, examples) -> list[TokenizedExample]:
        """Labels: the tokens that start inside a trained character span (a token straddling the span's
        start belongs to the prompt)."""
        out = []
        for (_, spans), encoding, example in zip(rendered, encodings, examples):
            input_ids = np.array(encoding.ids, dtype=np.int32)
            labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int32)
            for start, end in spans:
                token_range = _token_range(encoding, start, end)
                if token_range is None:  # a span not covered token by token: read every offset
                    offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
                    inside = (offsets[:, 0] >= start) & (offsets[:, 0] < end) & (offsets[:, 1] > offsets[:, 0])
                    labels[inside] = input_ids[inside]
                else:
                    first, last = token_range
                    labels[first : last + 1] = input_ids[first : last + 1]
            out.append(TokenizedExample(input_ids, labels, example.line))
        return out


def _token_range(encoding, start: int, end: int) -> tuple[int, int] | None:
    """(first, last) token starting in [start, end), from two lookups instead of every token's offsets."""
    if end <= start:
        return None
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
    if first is None or last is None:
        return None
    if encoding.token_to_chars(first)[0] < start:
        first += 1
    return (first, last) if first <= last else None


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _compiled_template(template: str):
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: apply_chat_template is correct, only slower
        return None
    return _compile_jinja_template(template)


def fit_to_length(
    items: list[TokenizedExample], *, max_seq_length: int, too_long: str = "drop", file: str = "dataset",
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Apply the too-long policy (drop, truncate or error) and drop examples left with nothing to learn."""
    stats = TokenizeStats(examples_in=len(items))
    out: list[TokenizedExample] = []
    for item in items:
        if len(item.input_ids) > max_seq_length:
            stats.too_long_lines.append(item.line)
            if too_long == "drop":
                stats.dropped_too_long += 1
                continue
            if too_long == "truncate":
                stats.truncated += 1
                item = TokenizedExample(item.input_ids[:max_seq_length], item.labels[:max_seq_length], item.line)
        if item.num_label_tokens == 0:
            stats.dropped_no_labels += 1
            continue
        out.append(item)
    if too_long == "error" and stats.too_long_lines:
        raise DataError(
            [
                DataProblem(file, line, "too_long", "", f"at most {max_seq_length} tokens once templated", "a longer example")
                for line in stats.too_long_lines
            ]
        )
    return out, stats


def tokenize_examples(
    examples: list[Example],
    renderer: PromptRenderer,
    *,
    max_seq_length: int,
    too_long: str = "drop",
    file: str = "dataset",
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize examples (in batches) and fit them to max_seq_length."""
    tokenized = [item for start in range(0, len(examples), 256) for item in renderer.tokenize_many(examples[start : start + 256])]
    return fit_to_length(tokenized, max_seq_length=max_seq_length, too_long=too_long, file=file)

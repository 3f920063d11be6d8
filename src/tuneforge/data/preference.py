"""Preference pairs as tokens: the prompt and each reply rendered by the chat template, the replies labelled.

A pair (prompt, chosen, rejected) becomes two token sequences, prompt + chosen and prompt + rejected, rendered
with the same template and masks as SFT (data/templating.py): the prompt's tokens carry no label (assistant
turns inside a multi-turn prompt included), each reply's tokens through its end-of-turn token do. DPO sums the
log-probabilities of the labelled tokens; a reward model reads the whole sequence. Here, not in engine/, so
`tuneforge data validate` counts pair tokens exactly as training sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tuneforge.data.formats import Example
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.data.templating import IGNORE_INDEX, PromptRenderer, TokenizedExample, TokenizeStats

BATCH = 256


@dataclass(frozen=True)
class TokenizedPair:
    chosen: TokenizedExample
    rejected: TokenizedExample
    line: int

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _turns(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else [dict(m) for m in value]


def pair_conversations(example: Example) -> tuple[Example, Example]:
    """(prompt + chosen, prompt + rejected) as chat examples whose only trained turns are the reply's."""
    record = example.record
    # Assistant turns of a multi-turn prompt are context, never trained (weight 0).
    prompt = [dict(m, weight=0) if m["role"] == "assistant" else m for m in _turns(record["prompt"], "user")]
    replies = []
    for key in ("chosen", "rejected"):
        reply = [{"role": m["role"], "content": m["content"]} for m in _turns(record[key], "assistant")]
        replies.append(Example(example.line, "chat", {"messages": prompt + reply}))
    return replies[0], replies[1]


def prompt_length(item: TokenizedExample) -> int:
    """Tokens before the first labelled one: the prompt."""
    labelled = np.flatnonzero(item.labels != IGNORE_INDEX)
    return int(labelled[0]) if len(labelled) else len(item.labels)


def _keep_prompt_end(item: TokenizedExample, max_prompt_length: int | None) -> TokenizedExample:
    cut = prompt_length(item) - max_prompt_length if max_prompt_length else 0
    if cut <= 0:
        return item
    return TokenizedExample(item.input_ids[cut:], item.labels[cut:], item.line)


def tokenize_pairs(examples: list[Example], renderer: PromptRenderer) -> list[TokenizedPair]:
    """Every pair at full length (no length policy applied)."""
    out = []
    for start in range(0, len(examples), BATCH):
        batch = examples[start : start + BATCH]
        conversations = [conversation for example in batch for conversation in pair_conversations(example)]
        tokens = renderer.tokenize_many(conversations)
        out.extend(TokenizedPair(tokens[2 * i], tokens[2 * i + 1], example.line) for i, example in enumerate(batch))
    return out


def fit_pairs(pairs: list[TokenizedPair], *, max_seq_length: int, max_prompt_length: int | None = None,
              too_long: str = "drop", file: str = "dataset", need_labels: bool = True
              ) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Keep at most max_prompt_length prompt tokens (from the end), then apply the too-long policy to each
    sequence: drop the pair, truncate the sequence's end, or fail. need_labels: a pair whose reply lost every
    label token to truncation is dropped (DPO learns nothing from it; a reward model reads whole sequences)."""
    stats = TokenizeStats(examples_in=len(pairs))
    kept: list[TokenizedPair] = []
    for pair in pairs:
        sides = [_keep_prompt_end(item, max_prompt_length) for item in (pair.chosen, pair.rejected)]
        if any(len(item) > max_seq_length for item in sides):
            stats.too_long_lines.append(pair.line)
            if too_long == "drop":
                stats.dropped_too_long += 1
                continue
            if too_long == "truncate":
                stats.truncated += 1
                sides = [TokenizedExample(i.input_ids[:max_seq_length], i.labels[:max_seq_length], i.line) for i in sides]
        if need_labels and any(item.num_label_tokens == 0 for item in sides):
            stats.dropped_no_labels += 1
            continue
        kept.append(TokenizedPair(sides[0], sides[1], pair.line))
    if too_long == "error" and stats.too_long_lines:
        raise DataError([DataProblem(file, line, "too_long", "", f"both sequences of a pair at most {max_seq_length} "
                                     "tokens once templated", "a longer one") for line in stats.too_long_lines])
    return kept, stats

"""LLM-as-judge: pairwise comparison in both orders (position bias controlled) and single-answer scores.

The default prompts follow MT-Bench (Zheng et al., 2023, "Judging LLM-as-a-judge"): an impartial judge
explains, then ends with a verdict in double brackets ([[A]], [[B]], [[C]] for a tie; [[7]] for a
score). The user's rubric is added to the judge's instructions. Replies the parser cannot read are
counted and reported, never dropped silently or guessed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tuneforge.evaluation.judges import Judge
from tuneforge.evaluation.statistics import Interval, WinTieLoss, bootstrap_mean_interval, wilson_interval, win_tie_loss

PAIRWISE_SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. You should choose the assistant that follows the user's instructions "
    "and answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of "
    "the responses to influence your evaluation. Be as objective as possible. After providing your explanation, "
    'output your final verdict by strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if '
    'assistant B is better, and "[[C]]" for a tie.'
)
PAIRWISE_USER_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{first}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{second}\n[The End of Assistant B's Answer]"
)
SINGLE_SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by "
    "providing a short explanation. Be as objective as possible. After providing your explanation, you must "
    "rate the response on a scale of {low} to {high} by strictly following this format: \"[[rating]]\", for "
    'example: "Rating: [[{example}]]".'
)
SINGLE_USER_TEMPLATE = (
    "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
RUBRIC_HEADER = "\n\nJudge by this rubric, which takes precedence over the general factors above:\n"

Position = Literal["A", "B", "tie"]
Side = Literal["a", "b", "tie"]
PairVerdict = Literal["a", "b", "tie", "inconsistent", "unparsed"]


# ---- what the judge is shown ------------------------------------------------------------------------


def item_conversation(item: Any) -> list[dict[str, str]]:
    """The prompt of an evaluation item as messages: everything before its last assistant turn.

    An item is a prompt string, a dataset record (chat `messages`, `prompt` as text or messages,
    `question`, `instruction` with optional `input`, OpenAI's `input.messages`) or a data.formats.Example.
    """
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if hasattr(item, "as_messages") and hasattr(item, "record"):
        return _before_last_assistant(item.as_messages())
    if not isinstance(item, dict):
        raise ValueError(f"an evaluation item is a prompt string or a record, found {type(item).__name__}")
    if isinstance(item.get("messages"), list):
        return _before_last_assistant(item["messages"])
    if isinstance(item.get("instruction"), str):  # Alpaca: its input is the instruction's context
        extra = item.get("input")
        return [{"role": "user", "content": item["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra else "")}]
    for key in ("prompt", "question", "input"):
        value = item.get(key)
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if isinstance(value, list):
            return _before_last_assistant(value)
        if isinstance(value, dict) and isinstance(value.get("messages"), list):
            return _before_last_assistant(value["messages"])
    raise ValueError(f"an evaluation item needs messages, prompt, question, instruction or input; found fields "
                     f"{', '.join(sorted(item)) or 'none'}")


def _before_last_assistant(messages: list) -> list[dict[str, str]]:
    plain = [{"role": str(m.get("role", "user")), "content": _text(m.get("content", ""))} for m in messages
             if isinstance(m, dict)]
    assistant = [i for i, m in enumerate(plain) if m["role"] == "assistant"]
    if assistant and assistant[-1] > 0:
        plain = plain[: assistant[-1]]
    if not plain:
        raise ValueError("an evaluation item's conversation has no messages before its answer")
    return plain


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def item_question(item: Any) -> str:
    """The prompt as the text a judge or an annotator reads: a lone user message as it is, else a transcript."""
    conversation = item_conversation(item)
    if len(conversation) == 1 and conversation[0]["role"] == "user":
        return conversation[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in conversation)


def _system(prompt: str, rubric: str | None) -> str:
    return prompt + (RUBRIC_HEADER + rubric.strip() if rubric and rubric.strip() else "")


def pairwise_conversation(question: str, first: str, second: str, *, rubric: str | None = None,
                          system_prompt: str = PAIRWISE_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The messages asking which of two answers (shown as A = first, B = second) is better."""
    return [{"role": "system", "content": _system(system_prompt, rubric)},
            {"role": "user", "content": PAIRWISE_USER_TEMPLATE.format(question=question, first=first, second=second)}]


def single_conversation(question: str, answer: str, *, scale: tuple[float, float], rubric: str | None = None,
                        system_prompt: str = SINGLE_SYSTEM_PROMPT) -> list[dict[str, str]]:
    low, high = (_number(v) for v in scale)
    example = _number(scale[0] + (scale[1] - scale[0]) / 2)
    system = system_prompt.format(low=low, high=high, example=example)
    return [{"role": "system", "content": _system(system, rubric)},
            {"role": "user", "content": SINGLE_USER_TEMPLATE.format(question=question, answer=answer)}]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# ---- reading the judge's reply ----------------------------------------------------------------------

_BRACKETED = re.compile(r"\[\[\s*(A|B|C|(?i:tie))\s*\]\]")
_LABELLED = re.compile(
    r"(?i:verdict|winner|decision|better(?:\s+answer|\s+response)?|answer|choice)\s*(?i:is)?\s*[:=\-]?\s*[*_`\"'(\[]*\s*"
    r"(?i:(?:assistant|answer|response|model)\s+)?(A|B|C|(?i:tie))\b"
)
_BARE = {"a": "A", "b": "B", "c": "tie", "tie": "tie", "draw": "tie", "equal": "tie", "both": "tie"}
_BARE_PREFIX = re.compile(r"^(?:assistant|answer|response|model)\s+")
_TRIM = " \t\r\n*_`\"'.!:()[]"


def parse_verdict(reply: str) -> Position | None:
    """The position a pairwise judge preferred: "A" (shown first), "B" (second), "tie", or None.

    Read in this order: the last [[A]] / [[B]] / [[C]] / [[tie]] (a judge restating the format before
    its verdict does not count twice); a reply that is only a verdict ("A", "**B**", "Assistant A.",
    "tie"); the last labelled verdict ("Verdict: B", "Final verdict: tie", "The better answer is A").
    Anything else is None: counted as unparseable, never guessed.
    """
    if not reply:
        return None
    found = _BRACKETED.findall(reply)
    if found:
        return _position(found[-1])
    bare = _BARE_PREFIX.sub("", reply.strip(_TRIM).lower())
    if bare in _BARE:
        return _BARE[bare]  # type: ignore[return-value]
    found = _LABELLED.findall(reply)
    if found:
        return _position(found[-1])
    return None


def _position(token: str) -> Position:
    return "tie" if token.upper() in ("C", "TIE") else token.upper()  # type: ignore[return-value]


_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SCORE_BRACKETED = re.compile(r"\[\[\s*" + _NUMBER + r"\s*(?:/\s*\d+(?:\.\d+)?)?\s*\]\]")
_SCORE_LABELLED = re.compile(r"(?i:rating|score|grade)\s*(?i:is)?\s*[:=]?\s*[*_`\[]*\s*" + _NUMBER)
_SCORE_BARE = re.compile(r"^\s*" + _NUMBER + r"\s*(?:/\s*\d+(?:\.\d+)?)?\s*\.?\s*$")


def parse_score(reply: str, scale: tuple[float, float]) -> float | None:
    """The score in a single-answer reply: the last [[7]], else the last "Rating: 7", else a reply that is
    only a number ("7", "7/10"). A score outside the scale is None, like an unreadable one."""
    if not reply:
        return None
    for pattern in (_SCORE_BRACKETED, _SCORE_LABELLED):
        found = pattern.findall(reply)
        if found:
            value = float(found[-1])
            break
    else:
        match = _SCORE_BARE.match(reply.strip(" *_`"))
        if match is None:
            return None
        value = float(match.group(1))
    low, high = scale
    return value if low <= value <= high else None


# ---- pairwise ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairJudgement:
    """One pair, judged twice. `a_first` / `b_first` are the winners (in a / b terms) when answer a,
    respectively answer b, was shown first; None when that reply was unreadable."""

    index: int
    a_first: Side | None
    b_first: Side | None
    verdict: PairVerdict
    replies: tuple[str, str]

    def to_dict(self) -> dict:
        return {"index": self.index, "a_first": self.a_first, "b_first": self.b_first, "verdict": self.verdict,
                "replies": list(self.replies)}


@dataclass(frozen=True)
class PairwiseReport:
    """Answers a against answers b, each pair judged in both orders.

    outcome: a's wins / ties / losses over the decided pairs, with Wilson intervals. score: the mean of
    1 / 0.5 / 0 per decided pair (a tie is half a win), with a bootstrap interval. self_agreement: the
    share of pairs, both replies readable, whose two verdicts agree once the order is undone (1 means
    the order never changed the judge's mind). first_position: the share of readable, non-tie replies
    that chose whichever answer was shown first (0.5 is unbiased).
    """

    labels: tuple[str, str]
    disagreement: Literal["tie", "inconsistent"]
    judgements: list[PairJudgement]
    outcome: WinTieLoss
    score: Interval
    self_agreement: Interval
    first_position: Interval
    unparseable_replies: int
    unparsed_pairs: int
    inconsistent_pairs: int

    def to_dict(self, *, with_judgements: bool = True) -> dict:
        data = {
            "labels": list(self.labels),
            "disagreement": self.disagreement,
            "pairs": len(self.judgements),
            "outcome": self.outcome.to_dict(),
            "score": self.score.to_dict(),
            "self_agreement": self.self_agreement.to_dict(),
            "first_position": self.first_position.to_dict(),
            "unparseable_replies": self.unparseable_replies,
            "unparsed_pairs": self.unparsed_pairs,
            "inconsistent_pairs": self.inconsistent_pairs,
        }
        if with_judgements:
            data["judgements"] = [j.to_dict() for j in self.judgements]
        return data


def _check_lengths(items: Sequence, **answers: Sequence[str]) -> None:
    for name, values in answers.items():
        if len(values) != len(items):
            raise ValueError(f"{name} has {len(values)} answers for {len(items)} items; one answer per item")


def combine_orders(a_first: Side | None, b_first: Side | None, disagreement: Literal["tie", "inconsistent"]) -> PairVerdict:
    """The verdict on one pair from its two orders (MT-Bench's rule).

    Both readable and equal: that verdict. Both readable and different (including a win in one order and
    a tie in the other): a tie, or with disagreement="inconsistent" a separate verdict left out of the win
    / tie / loss rates. Either reply unreadable: "unparsed", left out of the rates and counted.
    """
    if a_first is None or b_first is None:
        return "unparsed"
    if a_first == b_first:
        return a_first
    return "tie" if disagreement == "tie" else "inconsistent"


def pairwise(judge: Judge, items: Sequence[Any], answers_a: Sequence[str], answers_b: Sequence[str], *,
             rubric: str | None = None, labels: tuple[str, str] = ("a", "b"),
             disagreement: Literal["tie", "inconsistent"] = "tie", max_tokens: int = 512, temperature: float = 0.0,
             seed: int | None = None, confidence: float = 0.95, system_prompt: str = PAIRWISE_SYSTEM_PROMPT
             ) -> PairwiseReport:
    """Judge answers_a[i] against answers_b[i] for each item, once with a shown first and once with b first.

    All 2n conversations go to the judge in one `complete` call, so a local judge batches them and an
    endpoint judge keeps several requests in flight.
    """
    _check_lengths(items, answers_a=answers_a, answers_b=answers_b)
    if disagreement not in ("tie", "inconsistent"):
        raise ValueError(f"disagreement must be 'tie' or 'inconsistent', found {disagreement!r}")
    conversations = []
    for item, a, b in zip(items, answers_a, answers_b):
        question = item_question(item)
        conversations.append(pairwise_conversation(question, a, b, rubric=rubric, system_prompt=system_prompt))
        conversations.append(pairwise_conversation(question, b, a, rubric=rubric, system_prompt=system_prompt))
    replies = judge.complete(conversations, max_tokens=max_tokens, temperature=temperature, seed=seed) if conversations else []
    if len(replies) != len(conversations):
        raise RuntimeError(f"the judge returned {len(replies)} replies for {len(conversations)} conversations")

    judgements, unreadable, first_chosen, decisive = [], 0, 0, 0
    for i in range(len(items)):
        reply_a_first, reply_b_first = replies[2 * i], replies[2 * i + 1]
        position_a_first, position_b_first = parse_verdict(reply_a_first), parse_verdict(reply_b_first)
        for position in (position_a_first, position_b_first):
            if position is None:
                unreadable += 1
            elif position != "tie":
                decisive += 1
                first_chosen += position == "A"
        a_first = None if position_a_first is None else {"A": "a", "B": "b", "tie": "tie"}[position_a_first]
        b_first = None if position_b_first is None else {"A": "b", "B": "a", "tie": "tie"}[position_b_first]
        judgements.append(PairJudgement(i, a_first, b_first, combine_orders(a_first, b_first, disagreement),
                                        (reply_a_first, reply_b_first)))

    verdicts = [j.verdict for j in judgements]
    wins, ties, losses = verdicts.count("a"), verdicts.count("tie"), verdicts.count("b")
    readable = [j for j in judgements if j.a_first is not None and j.b_first is not None]
    agreeing = sum(j.a_first == j.b_first for j in readable)
    points = [1.0] * wins + [0.5] * ties + [0.0] * losses
    return PairwiseReport(
        labels=tuple(labels),
        disagreement=disagreement,
        judgements=judgements,
        outcome=win_tie_loss(wins, ties, losses, confidence=confidence),
        score=bootstrap_mean_interval(points, confidence=confidence, seed=seed or 0),
        self_agreement=wilson_interval(agreeing, len(readable), confidence=confidence),
        first_position=wilson_interval(first_chosen, decisive, confidence=confidence),
        unparseable_replies=unreadable,
        unparsed_pairs=verdicts.count("unparsed"),
        inconsistent_pairs=verdicts.count("inconsistent"),
    )


# ---- single answer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SingleReport:
    """One score per answer (None where the reply was unreadable or off the scale) and their mean with a
    bootstrap interval over the scored answers."""

    scale: tuple[float, float]
    scores: list[float | None]
    mean: Interval
    unparseable_replies: int
    replies: list[str] = field(repr=False)

    def to_dict(self, *, with_replies: bool = True) -> dict:
        data = {"scale": list(self.scale), "answers": len(self.scores), "scored": self.mean.n, "mean": self.mean.to_dict(),
                "unparseable_replies": self.unparseable_replies, "scores": self.scores}
        if with_replies:
            data["replies"] = self.replies
        return data


def single(judge: Judge, items: Sequence[Any], answers: Sequence[str], *, rubric: str | None = None,
           scale: tuple[float, float] = (1, 10), max_tokens: int = 512, temperature: float = 0.0,
           seed: int | None = None, confidence: float = 0.95, system_prompt: str = SINGLE_SYSTEM_PROMPT) -> SingleReport:
    """Score each answer on `scale` (MT-Bench's single-answer grading, 1 to 10 by default)."""
    _check_lengths(items, answers=answers)
    low, high = scale
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"scale must be (low, high) with low < high, found {scale!r}")
    conversations = [single_conversation(item_question(item), answer, scale=(low, high), rubric=rubric,
                                         system_prompt=system_prompt) for item, answer in zip(items, answers)]
    replies = judge.complete(conversations, max_tokens=max_tokens, temperature=temperature, seed=seed) if conversations else []
    if len(replies) != len(conversations):
        raise RuntimeError(f"the judge returned {len(replies)} replies for {len(conversations)} conversations")
    scores = [parse_score(reply, (low, high)) for reply in replies]
    scored = [s for s in scores if s is not None]
    return SingleReport(scale=(low, high), scores=scores,
                        mean=bootstrap_mean_interval(scored, confidence=confidence, seed=seed or 0),
                        unparseable_replies=len(scores) - len(scored), replies=list(replies))

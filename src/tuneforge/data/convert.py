"""Convert examples between formats, where the target can hold what the source says, and nothing is lost.

A conversion that would drop information (a multi-turn chat into one instruction, a system prompt into
a completion) is an error naming the line, not a silent truncation.
"""

from __future__ import annotations

from tuneforge.data.formats import Example, Format
from tuneforge.data.problems import DataProblem
from tuneforge.data.templating import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

TARGETS: tuple[Format, ...] = ("chat", "instruction", "completion", "text", "preference")


class ConversionError(ValueError):
    """One example cannot be expressed in the target format."""

    def __init__(self, problem: DataProblem):
        super().__init__(str(problem))
        self.problem = problem


def _fail(example: Example, file: str, target: str, why: str) -> ConversionError:
    return ConversionError(DataProblem(file, example.line, "not_convertible", "", f"an example {target} can hold", why))


def _single_turn(example: Example, file: str, target: str) -> tuple[str, str]:
    """(user, assistant) of a one-question, one-answer conversation."""
    messages = example.as_messages()
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"]:
        detail = "a system prompt" if "system" in roles else f"{len(messages)} messages ({', '.join(roles)})"
        raise _fail(example, file, target, f"{detail}; only a single user/assistant exchange converts")
    return messages[0]["content"], messages[1]["content"]


def convert(example: Example, target: Format, *, file: str = "data") -> dict:
    """The example as a record of the target format."""
    source, record = example.format, example.record
    if target == source:
        return record
    if target == "chat":
        if source == "text":
            raise _fail(example, file, target, "plain text has no turns to split into messages")
        return {"messages": [{"role": m["role"], "content": m["content"], **({"weight": m["weight"]} if "weight" in m else {})}
                             for m in example.as_messages()]}
    if target == "instruction":
        if source == "completion":
            return {"instruction": record["prompt"], "input": "", "output": record["completion"]}
        if source in ("chat", "preference"):
            user, assistant = _single_turn(example, file, target)
            return {"instruction": user, "input": "", "output": assistant}
    if target == "completion":
        if source == "instruction":
            prompt = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
            return {"prompt": prompt, "completion": record["output"]}
        if source in ("chat", "preference"):
            user, assistant = _single_turn(example, file, target)
            return {"prompt": user, "completion": assistant}
    if target == "text":
        if source == "completion":
            return {"text": record["prompt"] + record["completion"]}
        if source == "instruction":
            pattern = ALPACA_WITH_INPUT if record["input"] else ALPACA_NO_INPUT
            return {"text": pattern.format(instruction=record["instruction"], input=record["input"]) + record["output"]}
    raise _fail(example, file, target, f"{source} data has no {'rejected reply' if target == 'preference' else 'such form'}")

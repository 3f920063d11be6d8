"""Convert examples between formats, where the target can hold what the source says, and nothing is lost.

A conversion that would drop information (a multi-turn chat into one instruction, a system prompt into
a completion) is an error naming the line, not a silent truncation. Preference data is written in one of
three shapes (PREFERENCE_SHAPES): TRL's prompt / chosen / rejected, OpenAI's input / preferred_output /
non_preferred_output, or ShareGPT's conversations / chosen / rejected; any of them reads back as preference.
"""

from __future__ import annotations

from tuneforge.data.formats import IMAGE_FORMATS, Example, Format
from tuneforge.data.problems import DataProblem
from tuneforge.data.templating import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

TARGETS: tuple[Format, ...] = ("chat", "instruction", "completion", "text", "preference")
PREFERENCE_SHAPES = ("trl", "openai", "sharegpt")
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}


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


def _turns(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else \
        [{"role": m["role"], "content": m["content"]} for m in value]


def _single_reply(example: Example, file: str, shape: str, key: str) -> list[dict]:
    reply = _turns(example.record[key], "assistant")
    if len(reply) != 1:
        raise _fail(example, file, f"the {shape} preference shape", f"{key} has {len(reply)} assistant messages; "
                    "it holds exactly one")
    return reply


def preference_record(example: Example, shape: str, *, file: str = "data") -> dict:
    """A preference example in one of PREFERENCE_SHAPES. TRL's keeps strings where the source has plain
    strings, messages everywhere otherwise (TRL reads a record as conversational or not as a whole)."""
    record = example.record
    if shape == "trl":
        if all(isinstance(record[k], str) for k in ("prompt", "chosen", "rejected")):
            return {"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"]}
        return {"prompt": _turns(record["prompt"], "user"), "chosen": _turns(record["chosen"], "assistant"),
                "rejected": _turns(record["rejected"], "assistant")}
    prompt = _turns(record["prompt"], "user")
    chosen, rejected = (_single_reply(example, file, shape, k) for k in ("chosen", "rejected"))
    if shape == "openai":
        return {"input": {"messages": prompt}, "preferred_output": chosen, "non_preferred_output": rejected}
    if shape == "sharegpt":
        def turn(message):
            return {"from": SHAREGPT_FROM[message["role"]], "value": message["content"]}

        return {"conversations": [turn(m) for m in prompt], "chosen": turn(chosen[0]), "rejected": turn(rejected[0])}
    raise ValueError(f"unknown preference shape {shape}: expected one of {', '.join(PREFERENCE_SHAPES)}")


def convert(example: Example, target: Format, *, file: str = "data", shape: str | None = None) -> dict:
    """The example as a record of the target format (preference: in `shape`, TRL's by default)."""
    source, record = example.format, example.record
    if shape is not None and target != "preference":
        raise ValueError(f"a shape ({shape}) applies to preference data only, not to {target}")
    if target == source == "preference":
        return preference_record(example, shape or "trl", file=file)
    if target == source:
        return record
    if source in IMAGE_FORMATS:  # text formats cannot hold the images
        raise _fail(example, file, target, f"{source} records hold images, which {target} records cannot")
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

"""Dataset record formats: detect which one a record is, validate it field by field, normalize it.

chat:        {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, "weight"?: 0|1}]}
instruction: {"instruction": str, "input"?: str, "output": str}       (Alpaca)
completion:  {"prompt": str, "completion": str}
Extra keys (ids, metadata) are allowed and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tuneforge.data.problems import DataProblem, json_type, short_repr

Format = Literal["chat", "instruction", "completion"]
FORMATS: tuple[Format, ...] = ("chat", "instruction", "completion")
ROLES = ("system", "user", "assistant", "tool")
FORMAT_FIELDS = {"chat": "messages", "instruction": "instruction + output", "completion": "prompt + completion"}


@dataclass(frozen=True)
class Example:
    """One validated training example in its normalized form."""

    line: int  # where it came from, for error messages downstream (e.g. too long once templated)
    format: Format
    record: dict[str, Any]

    def as_messages(self) -> list[dict[str, Any]]:
        """The example as a conversation, for chat templates."""
        if self.format == "chat":
            return self.record["messages"]
        if self.format == "instruction":
            user = self.record["instruction"]
            if self.record.get("input"):
                user = f"{user}\n\n{self.record['input']}"
            return [{"role": "user", "content": user}, {"role": "assistant", "content": self.record["output"]}]
        return [
            {"role": "user", "content": self.record["prompt"]},
            {"role": "assistant", "content": self.record["completion"]},
        ]


def detect_format(record: dict[str, Any]) -> Format | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "completion"
    return None


class _Checker:
    """Collects the problems of one record."""

    def __init__(self, file: str, line: int):
        self.file, self.line, self.problems = file, line, []

    def add(self, kind: str, field: str, expected: str, found: str) -> None:
        self.problems.append(DataProblem(self.file, self.line, kind, field, expected, found))

    def text(self, record: dict, key: str, field: str, *, required: bool = True, allow_empty: bool = False) -> None:
        if key not in record or record[key] is None:
            if required:
                self.add("missing_field", field, "a string", "no such field")
            return
        value = record[key]
        if not isinstance(value, str):
            self.add("wrong_type", field, "a string", f"{json_type(value)} {short_repr(value)}")
        elif not allow_empty and not value.strip():
            self.add("empty_content", field, "non-empty text", "an empty string")


def _check_chat(record: dict, check: _Checker) -> None:
    messages = record.get("messages")
    if not isinstance(messages, list):
        check.add("wrong_type", "messages", "an array of messages", json_type(messages))
        return
    if not messages:
        check.add("no_assistant_turn", "messages", "at least a user and an assistant message", "an empty array")
        return
    roles = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            check.add("wrong_type", field, "a message object with role and content", json_type(message))
            continue
        role = message.get("role")
        if role is None:
            check.add("missing_field", f"{field}.role", f"one of {', '.join(ROLES)}", "no such field")
        elif role not in ROLES:
            check.add("unknown_role", f"{field}.role", f"one of {', '.join(ROLES)}", short_repr(role))
        roles.append(role)
        check.text(message, "content", f"{field}.content")
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                check.add("misplaced_weight", f"{field}.weight", "weight only on assistant messages", f"weight on a {role} message")
            elif weight not in (0, 1) or isinstance(weight, bool):
                check.add("wrong_type", f"{field}.weight", "0 or 1", short_repr(weight))
    if any(r not in ROLES for r in roles):
        return
    for index, role in enumerate(roles):
        if role == "system" and index > 0:
            check.add("roles_out_of_order", f"messages[{index}].role", "system only as the first message", "system later on")
        if role == "tool" and (index == 0 or roles[index - 1] not in ("assistant", "tool")):
            check.add("roles_out_of_order", f"messages[{index}].role", "a tool message after an assistant message", "tool elsewhere")
    first = next((i for i, r in enumerate(roles) if r != "system"), None)
    if first is not None and roles[first] == "assistant":
        check.add("roles_out_of_order", f"messages[{first}].role", "a user message before the first assistant message", "assistant")
    assistants = [m for m, r in zip(messages, roles) if r == "assistant"]
    if not assistants:
        check.add("no_assistant_turn", "messages", "at least one assistant message to learn from", "none")
    elif all(isinstance(m, dict) and m.get("weight", 1) == 0 for m in assistants):
        check.add("no_assistant_turn", "messages", "at least one assistant message with weight 1", "every weight 0")


def validate_record(record: dict[str, Any], fmt: Format, *, file: str, line: int) -> list[DataProblem]:
    """Every problem of one record for the given format; empty when it is usable."""
    check = _Checker(file, line)
    if fmt == "chat":
        if "messages" not in record:
            check.add("missing_field", "messages", "a messages array (chat format)", f"fields {sorted(record)}")
        else:
            _check_chat(record, check)
    elif fmt == "instruction":
        check.text(record, "instruction", "instruction")
        check.text(record, "input", "input", required=False, allow_empty=True)
        check.text(record, "output", "output")
    else:
        check.text(record, "prompt", "prompt", allow_empty=True)
        check.text(record, "completion", "completion")
    return check.problems


def normalize(record: dict[str, Any], fmt: Format) -> dict[str, Any]:
    """Keep only the fields a format uses, with defaults filled in."""
    if fmt == "chat":
        return {"messages": [dict(m) for m in record["messages"]]}
    if fmt == "instruction":
        return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
    return {"prompt": record["prompt"], "completion": record["completion"]}

"""Dataset record formats: detect which one a record is, validate it field by field, normalize it.

chat:        {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, "weight"?: 0|1}]}
             ShareGPT {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}]} becomes chat.
instruction: {"instruction": str, "input"?: str, "output": str}       (Alpaca)
completion:  {"prompt": str, "completion": str}
text:        {"text": str}                                            (continued pre-training: loss on all)
preference:  TRL's {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages} (or chosen and
             rejected whole conversations, the prompt their common start), OpenAI's {"input": {"messages": [...]},
             "preferred_output": [...], "non_preferred_output": [...]}, or ShareGPT's {"conversations": [...],
             "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}
prompt:      {"messages": [system / developer / user turns, no assistant reply], ...} or {"prompt": str | messages, ...}
             (OpenAI's reinforcement fine-tuning rows): what online RL samples from; every other field is kept,
             graders read it as {{item.field}}
image_chat:  chat whose message content may be a list of parts, {"type": "text", "text": str} and
             {"type": "image_url", "image_url": {"url": data: URL or path}} (OpenAI's vision fine-tuning format);
             normalized to HF processor parts, {"type": "text", "text"} and {"type": "image", "image": url}
image_text:  {"image": url (or {"url": url}), "text" (or "caption"): str}: image-caption pairs (CLIP)
             Images are checked by data/images.py (decoding, formats, sizes, where a reference may point).
Extra keys (ids, metadata) are allowed and ignored (a prompt record keeps them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tuneforge.data.problems import DataProblem, json_type, short_repr

Format = Literal["chat", "instruction", "completion", "text", "preference", "prompt", "image_chat", "image_text"]
FORMATS: tuple[Format, ...] = ("chat", "instruction", "completion", "text", "preference", "prompt", "image_chat",
                               "image_text")
IMAGE_FORMATS = ("image_chat", "image_text")  # records that hold images (data/images.py checks them)
PROMPT_ROLES = ("system", "developer", "user", "assistant")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant", "tool": "tool", "function_response": "tool"}
FORMAT_FIELDS = {
    "chat": "messages (or ShareGPT conversations)",
    "instruction": "instruction + output",
    "completion": "prompt + completion",
    "text": "text",
    "preference": "prompt + chosen + rejected (or input + preferred_output + non_preferred_output)",
    "prompt": "messages without an assistant reply, or prompt alone (prompts for ppo / grpo)",
    "image_chat": "messages whose content holds image_url parts",
    "image_text": "image + text (or caption)",
}


@dataclass(frozen=True)
class Example:
    """One validated training example in its normalized form."""

    line: int  # where it came from, for error messages downstream (e.g. too long once templated)
    format: Format
    record: dict[str, Any]

    def as_messages(self) -> list[dict[str, Any]]:
        """The example as a conversation, for chat templates (preference: the prompt and the chosen reply)."""
        record = self.record
        if self.format == "chat":
            return record["messages"]
        if self.format == "image_chat":  # the text of each turn (its images are in the record's parts)
            return [{**m, "content": parts_text(m["content"])} for m in record["messages"]]
        if self.format == "image_text":
            return [{"role": "user", "content": record["text"]}]
        if self.format == "instruction":
            user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        if self.format == "preference":
            return _as_turns(record["prompt"], "user") + _as_turns(record["chosen"], "assistant")
        if self.format == "text":
            raise ValueError("text examples have no conversation; they train on the whole text")
        if self.format == "prompt":
            prompt = record["messages"] if "messages" in record else _as_turns(record["prompt"], "user")
            while prompt and prompt[-1].get("role") == "assistant":  # a reference answer, not the prompt
                prompt = prompt[:-1]
            return prompt
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def _as_turns(value: str | list, role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def parts_text(parts: list[dict[str, Any]]) -> str:
    """The text of a normalized image_chat content: its text parts joined."""
    return "".join(part["text"] for part in parts if part["type"] == "text")


def detect_format(record: dict[str, Any]) -> Format | None:
    # Content given as parts (text and image_url) is OpenAI's vision format; a string content is chat.
    messages = record.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages):
        return "image_chat"
    if "image" in record and ("text" in record or "caption" in record):
        return "image_text"
    # Before chat: a ShareGPT preference record holds its prompt as "conversations".
    if "chosen" in record and "rejected" in record or "preferred_output" in record:
        return "preference"
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) and m.get("role") != "assistant"
                                                       for m in messages):
        return "prompt"  # a conversation to be continued: what online RL samples from
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    if "prompt" in record:
        return "prompt"
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


def sharegpt_to_messages(conversations: list) -> list:
    """ShareGPT turns ({"from", "value"}) as chat messages; unknown speakers are kept for the validator."""
    messages = []
    for turn in conversations:
        if isinstance(turn, dict) and "from" in turn:
            speaker = turn["from"]
            message = {"role": SHAREGPT_ROLES.get(speaker, speaker), "content": turn.get("value")}
            if "weight" in turn:
                message["weight"] = turn["weight"]
            messages.append(message)
        else:
            messages.append(turn)
    return messages


def _check_messages(messages: Any, check: _Checker, field: str, *, need_assistant: bool = True,
                    allowed_roles: tuple[str, ...] = ROLES) -> None:
    if not isinstance(messages, list):
        check.add("wrong_type", field, "an array of messages", json_type(messages))
        return
    if not messages:
        check.add("no_assistant_turn" if need_assistant else "empty_content", field,
                  "at least a user and an assistant message" if need_assistant else "at least one message",
                  "an empty array")
        return
    roles = []
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            check.add("wrong_type", where, "a message object with role and content", json_type(message))
            roles.append(None)
            continue
        role = message.get("role")
        if role is None:
            check.add("missing_field", f"{where}.role", f"one of {', '.join(allowed_roles)}", "no such field")
        elif role not in allowed_roles:
            check.add("unknown_role", f"{where}.role", f"one of {', '.join(allowed_roles)}", short_repr(role))
        roles.append(role)
        check.text(message, "content", f"{where}.content")
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                check.add("misplaced_weight", f"{where}.weight", "weight only on assistant messages", f"weight on a {role} message")
            elif weight not in (0, 1) or isinstance(weight, bool):
                check.add("wrong_type", f"{where}.weight", "0 or 1", short_repr(weight))
    if any(r not in allowed_roles for r in roles) or not need_assistant:
        return
    for index, role in enumerate(roles):
        if role == "system" and index > 0:
            check.add("roles_out_of_order", f"{field}[{index}].role", "system only as the first message", "system later on")
        if role == "tool" and (index == 0 or roles[index - 1] not in ("assistant", "tool")):
            check.add("roles_out_of_order", f"{field}[{index}].role", "a tool message after an assistant message",
                      "tool elsewhere")
    first = next((i for i, r in enumerate(roles) if r != "system"), None)
    if first is not None and roles[first] == "assistant":
        check.add("roles_out_of_order", f"{field}[{first}].role", "a user message before the first assistant message",
                  "assistant")
    assistants = [m for m, r in zip(messages, roles) if r == "assistant"]
    if not assistants:
        check.add("no_assistant_turn", field, "at least one assistant message to learn from", "none")
    elif all(isinstance(m, dict) and m.get("weight", 1) == 0 for m in assistants):
        check.add("no_assistant_turn", field, "at least one assistant message with weight 1", "every weight 0")


def _check_reply(record: dict, key: str, check: _Checker) -> None:
    """A preference reply: a string, or assistant messages."""
    value = record.get(key)
    if value is None:
        check.add("missing_field", key, "a string or an array of assistant messages", "no such field")
    elif isinstance(value, list):
        _check_messages(value, check, key, need_assistant=False, allowed_roles=("assistant",))
    else:
        check.text(record, key, key)


def _openai_preference(record: dict[str, Any], check: _Checker) -> dict[str, Any] | None:
    """OpenAI's preference form as prompt / chosen / rejected, or None after reporting what is wrong."""
    source = record.get("input")
    if not isinstance(source, dict) or "messages" not in source:
        check.add("missing_field", "input.messages", "the prompt as input.messages", f"input is {json_type(source)}")
        return None
    _check_messages(source["messages"], check, "input.messages", need_assistant=False,
                    allowed_roles=("system", "user", "assistant", "tool"))
    for key in ("preferred_output", "non_preferred_output"):
        if key not in record:
            check.add("missing_field", key, "an array with the assistant reply", "no such field")
        else:
            _check_messages(record[key], check, key, need_assistant=False, allowed_roles=("assistant",))
    if check.problems:
        return None
    return {"prompt": source["messages"], "chosen": record["preferred_output"], "rejected": record["non_preferred_output"]}


def _trl_or_sharegpt_preference(record: dict[str, Any]) -> dict[str, Any]:
    """ShareGPT's preference shape ({"conversations": [...], "chosen": {"from": "gpt", "value": ...}, "rejected":
    {...}}) and TRL's implicit-prompt shape (chosen and rejected full conversations, the prompt their common
    start) as prompt / chosen / rejected; other records unchanged (the validator then says what is wrong)."""
    if "prompt" not in record and "conversations" in record and isinstance(record["conversations"], list):
        def reply(value):
            if isinstance(value, dict) and "from" in value:
                return sharegpt_to_messages([value])
            return sharegpt_to_messages(value) if isinstance(value, list) else value

        return {"prompt": sharegpt_to_messages(record["conversations"]), "chosen": reply(record.get("chosen")),
                "rejected": reply(record.get("rejected"))}
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if ("prompt" not in record and isinstance(chosen, list) and isinstance(rejected, list)
            and all(isinstance(m, dict) for m in chosen + rejected)):
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared:
            return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    return record


def _check_prompt(record: dict[str, Any], check: _Checker) -> dict[str, Any]:
    """A prompt to sample from: messages (a trailing assistant turn is a reference answer, kept for graders)
    or a prompt string / messages. The whole record is kept: graders read its other fields."""
    field = "messages" if "messages" in record else "prompt"
    value = record.get(field)
    if value is None:
        check.add("missing_field", "messages", "a prompt as messages or prompt", f"fields {sorted(record)}")
    elif isinstance(value, str):
        check.text(record, field, field)
    else:
        _check_messages(value, check, field, need_assistant=False, allowed_roles=PROMPT_ROLES)
        if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") == "assistant"
                                                     for m in value):
            check.add("no_prompt_turn", field, "a system, developer or user turn to answer", "only assistant messages")
    return dict(record)


IMAGE_ROLES = ("user",)  # as in OpenAI's vision fine-tuning: images in user messages only


def _content_parts(content: Any, check: _Checker, where: str, role: Any) -> list[dict[str, Any]] | None:
    """A message's content as processor parts ({"type": "text"} / {"type": "image"}), or None after reporting."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        check.add("wrong_type", where, "a string or an array of content parts", json_type(content))
        return None
    parts = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                check.add("wrong_type", f"{at}.text", "a string", json_type(part.get("text")))
                continue
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                check.add("missing_field", f"{at}.image_url.url", "the image as a data: URL or a path", json_type(url))
                continue
            if isinstance(image, dict) and image.get("detail", "auto") not in ("auto", "low", "high"):
                check.add("wrong_type", f"{at}.image_url.detail", "auto, low or high", short_repr(image.get("detail")))
                continue
            if role not in IMAGE_ROLES:
                check.add("misplaced_image", at, "images in user messages only", f"an image in a {role} message")
                continue
            parts.append({"type": "image", "image": url})
        else:
            check.add("unknown_part", f"{at}.type", "text or image_url", short_repr(kind))
    return parts


def _check_image_chat(record: dict[str, Any], check: _Checker) -> dict[str, Any] | None:
    """Chat with content parts: the parts checked here, roles and order by the chat rules on the text."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        check.add("missing_field" if messages is None else "wrong_type", "messages", "a messages array",
                  json_type(messages))
        return None
    normalized, flat = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            flat.append(message)
            continue
        parts = _content_parts(message.get("content"), check, f"messages[{index}].content", message.get("role"))
        parts = parts or []
        normalized.append({**message, "content": parts})
        text = parts_text(parts)
        # An image alone is content: the chat rules below see it as a placeholder.
        flat.append({**message, "content": text if text.strip() or not any(p["type"] == "image" for p in parts)
                     else "<image>"})
    _check_messages(flat, check, "messages")
    return None if check.problems else {"messages": normalized}


def _check_image_text(record: dict[str, Any], check: _Checker) -> dict[str, Any] | None:
    image = record.get("image")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        check.add("missing_field" if image is None else "wrong_type", "image",
                  "the image as a data: URL or a path (or {url: ...})", json_type(image))
    key = "text" if "text" in record else "caption"
    check.text(record, key, key)
    return None if check.problems else {"image": url, "text": record[key]}


def validate_record(record: dict[str, Any], fmt: Format, *, file: str, line: int) -> list[DataProblem]:
    """Every problem of one record for the given format; empty when it is usable."""
    return validate_and_normalize(record, fmt, file=file, line=line)[1]


def validate_and_normalize(record: dict[str, Any], fmt: Format, *, file: str, line: int
                           ) -> tuple[dict[str, Any] | None, list[DataProblem]]:
    """(normalized record or None, problems): one pass that both checks and converts."""
    check = _Checker(file, line)
    if fmt == "chat":
        if "messages" in record:
            messages, field = record["messages"], "messages"
        elif "conversations" in record:
            messages, field = record["conversations"], "conversations"
            if isinstance(messages, list):
                messages = sharegpt_to_messages(messages)
        else:
            check.add("missing_field", "messages", "a messages array (chat format)", f"fields {sorted(record)}")
            return None, check.problems
        _check_messages(messages, check, field)
        normalized = {"messages": [dict(m) for m in messages]} if not check.problems else None
    elif fmt == "instruction":
        check.text(record, "instruction", "instruction")
        check.text(record, "input", "input", required=False, allow_empty=True)
        check.text(record, "output", "output")
        normalized = {"instruction": record.get("instruction"), "input": record.get("input") or "",
                      "output": record.get("output")}
    elif fmt == "completion":
        check.text(record, "prompt", "prompt", allow_empty=True)
        check.text(record, "completion", "completion")
        normalized = {"prompt": record.get("prompt"), "completion": record.get("completion")}
    elif fmt == "text":
        check.text(record, "text", "text")
        normalized = {"text": record.get("text")}
    elif fmt == "prompt":
        normalized = _check_prompt(record, check)
    elif fmt == "image_chat":
        normalized = _check_image_chat(record, check)
    elif fmt == "image_text":
        normalized = _check_image_text(record, check)
    else:
        if "preferred_output" in record:
            normalized = _openai_preference(record, check)
        else:
            record = _trl_or_sharegpt_preference(record)
            prompt = record.get("prompt")
            if isinstance(prompt, list):
                _check_messages(prompt, check, "prompt", need_assistant=False)
            else:
                check.text(record, "prompt", "prompt", allow_empty=True)
            _check_reply(record, "chosen", check)
            _check_reply(record, "rejected", check)
            normalized = {"prompt": prompt if prompt is not None else "", "chosen": record.get("chosen"),
                          "rejected": record.get("rejected")}
            if not check.problems and normalized["chosen"] == normalized["rejected"]:
                check.add("identical_pair", "rejected", "a rejected reply different from the chosen one", "the same reply")
    return (None if check.problems else normalized), check.problems


def normalize(record: dict[str, Any], fmt: Format) -> dict[str, Any]:
    """Keep only the fields a format uses, with defaults filled in (the record must be valid)."""
    normalized, problems = validate_and_normalize(record, fmt, file="record", line=0)
    if problems:
        raise ValueError(str(problems[0]))
    return normalized

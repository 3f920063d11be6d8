"""Prompt datasets for online RL: what the policy is asked, and the row graders read.

A record holds the prompt as `messages` (OpenAI's reinforcement fine-tuning shape: system / developer /
user turns; a trailing assistant turn, if any, is a reference and not part of the prompt) or as
`prompt` (a string, or messages). Every other field stays in the row, where graders reach it as
`{{item.field}}`. Problems are reported per line, every one of them, before anything is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.problems import DataError, DataProblem, json_type, short_repr
from tuneforge.data.reader import iter_records
from tuneforge.data.templating import CHATML_TEMPLATE, TemplateError

PROMPT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    item: dict[str, Any]  # the dataset row, for graders
    messages: tuple[dict[str, str], ...]  # the prompt as a conversation (a string prompt: one user turn)
    text: str  # the rendered prompt the policy continues
    ids: tuple[int, ...]


class PromptSet:
    """The prompts a run samples from; a step's units are prompt indices."""

    def __init__(self, prompts: list[Prompt]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]

    def example_ids(self, unit_ids) -> list[int]:
        return [int(i) for i in unit_ids]


def _messages_problem(messages: Any, field: str) -> tuple[str, str] | None:
    """(expected, found) when messages is not a usable prompt conversation."""
    if not isinstance(messages, list) or not messages:
        return "a non-empty array of messages", json_type(messages) if not isinstance(messages, list) else "[]"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{field}[{index}] a message object", json_type(message)
        if message.get("role") not in PROMPT_ROLES:
            return f"{field}[{index}].role one of {', '.join(PROMPT_ROLES)}", short_repr(message.get("role"))
        if not isinstance(message.get("content"), str):
            return f"{field}[{index}].content a string", json_type(message.get("content"))
    if all(m["role"] == "assistant" for m in messages):
        return "a prompt turn (system, developer or user)", "only assistant messages"
    return None


def prompt_of(record: dict[str, Any]) -> tuple[str | list[dict], str] | DataProblem:
    """(the prompt: text or messages, its field) of one record, or what is wrong with it (line 0)."""
    field = "messages" if "messages" in record else "prompt"
    value = record.get(field)
    if value is None:
        return DataProblem("", 0, "missing_field", "messages", "a prompt as messages or prompt",
                           f"fields {sorted(record)}")
    if isinstance(value, str):
        if not value.strip():
            return DataProblem("", 0, "empty_content", field, "non-empty text", "an empty string")
        return value, field
    problem = _messages_problem(value, field)
    if problem is not None:
        return DataProblem("", 0, "wrong_type", field, *problem)
    messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in value]
    while messages and messages[-1]["role"] == "assistant":  # a reference answer, not the prompt
        messages.pop()
    return messages, field


def check_prompts(path: str | Path, *, min_prompts: int = 1) -> int:
    """How many prompts path holds, or DataError with every problem (no tokenizer needed: the CLI's check
    before a job directory exists)."""
    name, count, problems = str(path), 0, []
    for line, record in iter_records(path):
        found = record if isinstance(record, DataProblem) else prompt_of(record)
        if isinstance(found, DataProblem):
            problems.append(DataProblem(name, line or found.line, found.kind, found.field, found.expected, found.found))
        else:
            count += 1
    if problems:
        raise DataError(problems, headline=f"{name}: {len(problems)} problem(s); nothing was trained")
    if count < min_prompts:
        raise DataError([DataProblem(name, 0, "too_few_examples", "", f"at least {min_prompts} prompts", str(count))])
    return count


def render_prompt(tokenizer, prompt: str | list[dict], template: str) -> str:
    """The text the policy continues: messages through the chat template with the assistant's turn
    opened; a string as is (plain) or as one user turn (chat). template: auto, chat or plain."""
    if template == "alpaca":
        raise TemplateError("dataset.prompt_template alpaca is for instruction data; RL prompts use chat or plain")
    as_chat = template == "chat" or (template == "auto" and isinstance(prompt, list))
    if not as_chat:
        if isinstance(prompt, list):
            raise TemplateError("dataset.prompt_template plain needs prompt strings, not messages")
        return prompt
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_prompts(path: str | Path, tokenizer, *, template: str, max_prompt_tokens: int, too_long: str) -> PromptSet:
    """Every record of path as a Prompt, or DataError with every problem (line, field, expected, found).
    Prompts over max_prompt_tokens are dropped, cut from the left (keeping the end, where the question
    and the assistant's turn are) or refused, as too_long says."""
    name = str(path)
    prompts, problems = [], []
    for line, record in iter_records(path):
        if isinstance(record, DataProblem):
            problems.append(record)
            continue
        found = prompt_of(record)
        if isinstance(found, DataProblem):
            problems.append(DataProblem(name, line, found.kind, found.field, found.expected, found.found))
            continue
        text = render_prompt(tokenizer, found[0], template)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > max_prompt_tokens:
            if too_long == "drop":
                continue
            if too_long == "error":
                problems.append(DataProblem(name, line, "too_long", found[1],
                                            f"at most {max_prompt_tokens} prompt tokens (dataset.max_seq_length minus "
                                            "rollout.max_new_tokens)", f"{len(ids)} tokens"))
                continue
            ids = ids[-max_prompt_tokens:]
        messages = found[0] if isinstance(found[0], list) else [{"role": "user", "content": found[0]}]
        prompts.append(Prompt(record, tuple(messages), text, tuple(ids)))
    if problems:
        raise DataError(problems, headline=f"{name}: {len(problems)} problem(s); nothing was trained")
    return PromptSet(prompts)

"""Read a JobSpec from a YAML file plus dotted command-line overrides, with errors that name the field.

`training.learning_rate=1e-4` style overrides are parsed as YAML scalars, so numbers, booleans, null and
`[q_proj, v_proj]` lists work as they would in the file. Validation errors point at the YAML line.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.spec.job import MAX_DEEPSPEED_CONFIG_BYTES, JobSpec


class SpecError(ValueError):
    """A job spec that cannot be used; the message is meant for the user as is."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"override {text!r}: expected dotted.key=value, e.g. training.learning_rate=1e-4")
    path = key.strip().split(".")
    if any(not part for part in path):
        raise SpecError(f"override {text!r}: empty part in the key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SpecError(f"override {text!r}: the value is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict, creating sections as needed."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each mapping key path of a composed YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    return lines


def _describe(error: dict[str, Any], root: type[BaseModel]) -> str:
    """Turn one pydantic error into 'expected X, got Y' wording."""
    kind = error["type"]
    loc = [str(part) for part in error["loc"]]
    if kind == "extra_forbidden":
        section = _section_model(root, loc[:-1])
        hint = ""
        if section is not None:
            close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
            else:
                hint = f"; known fields: {', '.join(section.model_fields)}"
        return f"unknown field{hint}"
    if kind == "missing":
        return "required field is missing"
    message = error["msg"]
    if message.startswith("Input should be "):
        message = "expected " + message[len("Input should be ") :]
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if "input" in error and kind not in ("model_type",) and not isinstance(error["input"], dict):
        message += f", got {error['input']!r}"
    return message


def _section_model(root: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def field_path(loc: tuple, root: type[BaseModel]) -> tuple[str, ...]:
    """The user-facing path of an error: field names and list indices, without pydantic's union tags."""
    path: list[str] = []
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            path.append(str(part))
        elif model is not None and part in model.model_fields:
            path.append(part)
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        elif model is not None:  # an unknown key of a section
            path.append(part)
            model = None
        # else: a tag pydantic adds for each member of a union ("constrained-float", "literal['auto']")
    return tuple(path)


def _merge(messages: list[str]) -> str:
    """'expected a number, got x' + "expected 'auto', got x" -> "expected a number or 'auto', got x"."""
    if len(messages) > 1 and all(m.startswith("expected ") and ", got " in m for m in messages):
        # Keep pydantic's expectation, not its detail ("a valid integer, got a number with a fractional part").
        expectations = [m[len("expected ") :].split(", got ")[0].split(", unable to")[0] for m in messages]
        return "expected " + " or ".join(expectations) + messages[0][messages[0].rindex(", got ") :]
    return "; ".join(dict.fromkeys(messages))


def format_validation_error(
    exc: ValidationError,
    *,
    source: str,
    lines: dict[tuple, int] | None = None,
    overridden: set[tuple] | None = None,
) -> str:
    """One line per problem: `source:line: field.path: expected ..., got ...`."""
    grouped: dict[tuple, list[str]] = {}
    for error in exc.errors():
        grouped.setdefault(field_path(error["loc"], JobSpec), []).append(_describe(error, JobSpec))
    problems = []
    for loc, messages in grouped.items():
        field = ".".join(loc) or "(top level)"
        where = source
        if overridden and any(loc[: len(o)] == o for o in overridden):
            where = f"{source} (command-line override)"
        elif lines:
            # The error's own key, or the closest enclosing section that has a line.
            for depth in range(len(loc), -1, -1):
                if loc[:depth] in lines:
                    where = f"{source}:{lines[loc[:depth]]}"
                    break
        problems.append(f"{where}: {field}: {_merge(messages)}")
    return "invalid job spec\n  " + "\n  ".join(problems)


def load_job_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job spec file; raise SpecError with a readable message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, expected a YAML job spec file") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        document = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of sections (model, dataset, training, ...), got a {type(data).__name__}")
    overrides = overrides or []
    data = apply_overrides(data, overrides)
    _inline_deepspeed_config(data)
    overridden = {tuple(parse_override(o)[0]) for o in overrides}
    return validate_job_spec(data, source=str(path), lines=_key_lines(document) if document else {}, overridden=overridden)


def _inline_deepspeed_config(data: dict[str, Any]) -> None:
    """resources.deepspeed_config given as a path (relative to the current directory) is read here, once,
    into the spec: spec.json then carries the config itself, and no later reader ever opens a path."""
    resources = data.get("resources")
    path = resources.get("deepspeed_config") if isinstance(resources, dict) else None
    if not isinstance(path, str):
        return
    where = f"resources.deepspeed_config {path}"
    file = Path(path).expanduser()
    try:
        if file.stat().st_size > MAX_DEEPSPEED_CONFIG_BYTES:
            raise SpecError(f"{where}: larger than {MAX_DEEPSPEED_CONFIG_BYTES // 1024} KiB; expected a DeepSpeed JSON config")
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{where}: not UTF-8 text (byte {exc.start}); expected a DeepSpeed JSON config") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{where}: line {exc.lineno} column {exc.colno}: {exc.msg}; expected a JSON object") from None
    if not isinstance(config, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(config).__name__}")
    resources["deepspeed_config"] = config


def validate_job_spec(
    data: dict[str, Any],
    *,
    source: str = "job spec",
    lines: dict[tuple, int] | None = None,
    overridden: set[tuple] | None = None,
) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source=source, lines=lines, overridden=overridden)) from None

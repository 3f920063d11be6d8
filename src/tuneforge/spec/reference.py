"""The job spec's own reference: every dotted field with its type, default and description.

Feeds `tuneforge train --help` and `tuneforge spec`, so the docs cannot drift from the schema.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tuneforge.spec.job import JobSpec


def _type_name(annotation) -> str:
    text = str(annotation)
    for noise in ("typing.", "tuneforge.spec.job.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text


def iter_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every leaf field."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, f"{prefix}{name}.")
            continue
        if info.default is PydanticUndefined and info.default_factory is None:
            default = "(required)"
        else:
            default = repr(info.default_factory() if info.default_factory else info.default)
        yield f"{prefix}{name}", _type_name(annotation), default, info.description or ""


def reference_text() -> str:
    lines = []
    for name, type_name, default, description in iter_fields():
        lines.append(f"  {name} = {default}\n      {description} [{type_name}]")
    return "\n".join(lines)

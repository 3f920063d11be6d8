"""Flat token arrays on disk, written as examples stream in, so tokenizing a dataset larger than memory
holds one batch of examples at a time, never the dataset.

A directory holds four raw little-endian arrays: input_ids.i32 and labels.i32 (every example's tokens, one
after another), offsets.i64 (example i is [offsets[i], offsets[i+1])) and lines.i64 (each example's line in
the source file). They are memory-mapped on read; parts written by parallel workers are concatenated
file to file, a chunk at a time.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tuneforge.data.formats import Example
from tuneforge.data.problems import DataProblem
from tuneforge.data.templating import TokenizedExample

ARRAYS = {"input_ids": "<i4", "labels": "<i4", "offsets": "<i8", "lines": "<i8"}
SUFFIX = {"<i4": ".i32", "<i8": ".i64"}
FLUSH_EXAMPLES = 4096  # offsets and lines gathered before one write
COPY_CHUNK = 1 << 20  # elements of offsets shifted per step when parts are joined


def array_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX[ARRAYS[name]]}"


class TokenArrayWriter:
    """Appends tokenized examples to the four files of a directory (buffered; close() when done)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._files = {name: open(array_path(directory, name), "wb", buffering=1 << 20) for name in ARRAYS}
        self.examples = self.tokens = 0
        self._offsets: list[int] = [0]
        self._lines: list[int] = []

    def add(self, item: TokenizedExample) -> None:
        self._files["input_ids"].write(np.asarray(item.input_ids, dtype="<i4").tobytes())
        self._files["labels"].write(np.asarray(item.labels, dtype="<i4").tobytes())
        self.tokens += len(item.input_ids)
        self.examples += 1
        self._offsets.append(self.tokens)
        self._lines.append(item.line)
        if len(self._lines) >= FLUSH_EXAMPLES:
            self._flush()

    def add_all(self, items: Iterable[TokenizedExample]) -> None:
        for item in items:
            self.add(item)

    def _flush(self) -> None:
        self._files["offsets"].write(np.asarray(self._offsets, dtype="<i8").tobytes())
        self._files["lines"].write(np.asarray(self._lines, dtype="<i8").tobytes())
        self._offsets, self._lines = [], []

    def close(self) -> None:
        self._flush()
        for handle in self._files.values():
            handle.close()


def read_arrays(directory: Path) -> dict[str, np.ndarray]:
    """The four arrays, memory-mapped read-only (an empty file is an empty array: mmap cannot map it)."""
    arrays = {}
    for name, dtype in ARRAYS.items():
        path = array_path(directory, name)
        arrays[name] = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
    return arrays


def join_parts(parts: list[Path], directory: Path) -> None:
    """Concatenate part directories (in order) into directory: tokens and lines copied file to file,
    offsets shifted by the tokens before each part, a chunk at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(array_path(directory, "offsets"), "wb") as offsets:
        offsets.write(np.zeros(1, dtype="<i8").tobytes())
        shift = 0
        for part in parts:
            source = read_arrays(part)["offsets"]
            for start in range(1, len(source), COPY_CHUNK):
                offsets.write((np.asarray(source[start:start + COPY_CHUNK]) + shift).astype("<i8").tobytes())
            shift += int(source[-1]) if len(source) else 0
    for name in ("input_ids", "labels", "lines"):
        with open(array_path(directory, name), "wb") as target:
            for part in parts:
                with open(array_path(part, name), "rb") as source:
                    shutil.copyfileobj(source, target, COPY_CHUNK)


def write_examples(stream: Iterable, tokenize, directory: Path, *, keep: int) -> tuple[list[DataProblem], int]:
    """Tokenize the examples of a validation stream (iter_examples: examples and problems) into directory's
    arrays with `tokenize` (a renderer's tokenize_stream), keeping at most `keep` of the problems found among
    them so a wholly broken file cannot fill memory. Returns (problems kept, problems found)."""
    problems: list[DataProblem] = []
    found = 0

    def examples():
        nonlocal found
        for item in stream:
            if isinstance(item, Example):
                yield item
            else:
                found += 1
                if len(problems) < keep:
                    problems.append(item)

    writer = TokenArrayWriter(directory)
    try:
        writer.add_all(tokenize(examples()))
    finally:
        writer.close()
    return problems, found

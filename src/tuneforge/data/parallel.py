"""Validate and tokenize a large JSONL file on every core: one process per line-aligned byte range.

Rendering chat templates is Python work bound to one core; a 2-core machine tokenizes a large file
in about 60% of the time with two processes. Processes are forked (the tokenizer is not re-loaded
in each) before the parent has used the tokenizer's own thread pool; results come back as flat arrays
(tokenize_file), or, for the tokenization cache, are written to part files on disk as they are made
(tokenize_file_to), so no process holds more than a batch of a large file.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import numpy as np

from tuneforge.data.formats import Example
from tuneforge.data.loading import iter_examples
from tuneforge.data.problems import DataProblem
from tuneforge.data.reader import line_aligned_ranges, splittable
from tuneforge.data.templating import TokenizedExample

MIN_PARALLEL_BYTES = 8 << 20  # below this, starting processes costs more than it saves

_renderer = None  # set in the parent before forking; the children inherit it


def _default_signals() -> None:
    """A pool worker's start: SIGTERM at the OS default (then unblocked, see pool()), SIGINT the parent's."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def pool(processes: int):
    """A forked pool whose workers end on SIGTERM whatever handler the parent has.

    A fork inherits the parent's Python signal handlers (the scheduler's loops, a recipe's preemption watcher,
    Ray's driver all install one for SIGTERM), and Pool.terminate ends its workers with SIGTERM whenever its
    exit drains their stop sentinels first (a race a loaded machine loses). In the test suite, with Ray's
    driver handler inherited, workers blocked on the pool's queue lock outlived that SIGTERM and the pool's
    exit waited for them until the 900 s test timeout. SIGTERM is blocked while the workers are forked, so one
    that arrives before a worker has reset its handler stays pending until the reset, and then ends it; the
    parent's own mask is restored at once (a SIGTERM meant for it is delivered to its handler)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return multiprocessing.get_context("fork").Pool(processes, initializer=_default_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_count(path: str | Path) -> int:
    if "fork" not in multiprocessing.get_all_start_methods() or not splittable(path):
        return 1
    if Path(path).stat().st_size < MIN_PARALLEL_BYTES:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _tokenize_range(path: str, fmt: str, byte_range: tuple[int, int, int]):
    _, stream = iter_examples(path, fmt, byte_range=byte_range)
    problems: list[DataProblem] = []

    def examples():
        for item in stream:
            if isinstance(item, Example):
                yield item
            else:
                problems.append(item)

    items = list(_renderer.tokenize_stream(examples()))
    if problems:
        return None, problems
    return pack_arrays(items), []


def _tokenize_range_to(path: str, fmt: str, byte_range: tuple[int, int, int], directory: str, keep: int):
    """Write one byte range's examples to directory; (problems kept, problems found)."""
    from tuneforge.data.token_files import write_examples

    _, stream = iter_examples(path, fmt, byte_range=byte_range)
    return write_examples(stream, _renderer.tokenize_stream, Path(directory), keep=keep)


def tokenize_file_to(path: str | Path, fmt: str, renderer, workers: int, directory: Path, *,
                     keep: int = 1000) -> tuple[list[DataProblem], int]:
    """Tokenize on `workers` processes, each writing its byte range to a part under directory, then join
    the parts into directory's arrays (data/token_files.py). Returns (problems kept, problems found): with
    any problem, what was written is not a dataset and the caller removes it."""
    from tuneforge.data.token_files import join_parts

    global _renderer
    _renderer = renderer
    ranges = line_aligned_ranges(path, workers)
    parts = [directory / "parts" / str(index) for index in range(len(ranges))]
    with pool(len(ranges)) as processes:
        results = processes.starmap(_tokenize_range_to, [(str(path), fmt, r, str(part), keep)
                                                    for r, part in zip(ranges, parts)])
    _renderer = None
    problems = [p for kept, _ in results for p in kept][:keep]
    found = sum(count for _, count in results)
    if not found:
        join_parts(parts, directory)
    shutil.rmtree(directory / "parts", ignore_errors=True)
    return problems, found


def pack_arrays(items: list[TokenizedExample]) -> dict[str, np.ndarray]:
    lengths = np.fromiter((len(item.input_ids) for item in items), dtype=np.int64, count=len(items))
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return {
        "input_ids": np.concatenate([item.input_ids for item in items]) if items else np.zeros(0, np.int32),
        "labels": np.concatenate([item.labels for item in items]) if items else np.zeros(0, np.int32),
        "offsets": offsets,
        "lines": np.fromiter((item.line for item in items), dtype=np.int64, count=len(items)),
    }


def merge_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    offsets, shift = [np.zeros(1, dtype=np.int64)], 0
    for part in parts:
        offsets.append(part["offsets"][1:] + shift)
        shift += int(part["offsets"][-1])
    return {
        "input_ids": np.concatenate([p["input_ids"] for p in parts]),
        "labels": np.concatenate([p["labels"] for p in parts]),
        "offsets": np.concatenate(offsets),
        "lines": np.concatenate([p["lines"] for p in parts]),
    }


def tokenize_file(path: str | Path, fmt: str, renderer, workers: int) -> tuple[dict[str, np.ndarray] | None, list[DataProblem]]:
    """(flat arrays, []) or (None, every problem), from `workers` processes over byte ranges of the file."""
    global _renderer
    _renderer = renderer
    ranges = line_aligned_ranges(path, workers)
    with pool(len(ranges)) as processes:
        results = processes.starmap(_tokenize_range, [(str(path), fmt, r) for r in ranges])
    _renderer = None
    problems = [p for _, found in results for p in found]
    if problems:
        return None, problems
    return merge_arrays([arrays for arrays, _ in results]), []

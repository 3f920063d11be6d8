"""Tokenize a dataset once: a cache keyed by (content hash, tokenizer, template, format).

Entries live in TUNEFORGE_HOME/cache/tokenized/KEY/ as flat int32 arrays (ids, labels) plus offsets,
memory-mapped on load, so reruns and sweeps skip validation and tokenization. Building one streams: the
file is validated and tokenized a batch at a time straight into the entry's files (data/token_files.py),
so a dataset larger than memory tokenizes in bounded memory. An entry is built in a
staging directory and renamed into place under a file lock: concurrent jobs build it once, a crash
leaves no half entry, and an invalid dataset writes nothing. Examples are stored at full length; the
max_seq_length policy (drop / truncate / error) is applied on load, so sweeps over it share an entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.data.formats import Format
from tuneforge.data.loading import file_sha256, iter_examples
from tuneforge.data.parallel import tokenize_file_to, worker_count
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.data.templating import PromptRenderer, TokenizedExample
from tuneforge.data.token_files import read_arrays, write_examples
from tuneforge.home import tuneforge_home

CACHE_VERSION = 2  # 2: raw arrays written while streaming (token_files.py) instead of .npy files
BATCH = 512
MAX_PROBLEMS_KEPT = 1000  # a wholly broken 5 GB file must not fill memory with its problems


def cache_root() -> Path:
    return tuneforge_home() / "cache" / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce different ids or templates."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update((tokenizer.chat_template or "").encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass
class TokenizedDataset:
    """Tokenized examples backed by flat arrays; indexing gives zero-copy views."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray  # example i is [offsets[i], offsets[i+1])
    lines: np.ndarray
    format: Format
    cache_hit: bool = False

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> TokenizedExample:
        start, end = self.offsets[index], self.offsets[index + 1]
        return TokenizedExample(self.input_ids[start:end], self.labels[start:end], int(self.lines[index]))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _finish(directory: Path, meta: dict) -> None:
    """fsync the entry's arrays, then write meta.json, the mark of a complete entry."""
    for path in directory.iterdir():
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    examples = read_arrays(directory)["lines"].shape[0]
    (directory / "meta.json").write_text(json.dumps({**meta, "examples": examples}, indent=2))


def _read(directory: Path, fmt: Format) -> TokenizedDataset:
    return TokenizedDataset(format=fmt, cache_hit=True, **read_arrays(directory))


def _tokenize_to(path: Path, fmt: Format, renderer: PromptRenderer, directory: Path) -> None:
    """Validate and tokenize the whole file into directory, streaming (on every core for a large JSONL
    file); DataError naming every problem kind if it is invalid (the caller removes directory)."""
    workers = worker_count(path)
    if workers > 1:
        problems, found = tokenize_file_to(path, fmt, renderer, workers, directory, keep=MAX_PROBLEMS_KEPT)
    else:
        problems, found = _tokenize_serial(path, fmt, renderer, directory)
    if found:
        raise DataError(problems, headline=f"{path}: {found} problem(s); nothing was trained")
    if read_arrays(directory)["lines"].shape[0] == 0:
        raise DataError([DataProblem(str(path), 0, "too_few_examples", "", "at least 1 examples", "0")])


def _tokenize_serial(path: Path, fmt: Format, renderer: PromptRenderer, directory: Path) -> tuple[list, int]:
    _, stream = iter_examples(path, fmt)
    return write_examples(stream, lambda examples: renderer.tokenize_stream(examples, BATCH), directory,
                          keep=MAX_PROBLEMS_KEPT)


def load_tokenized(path: str | Path, fmt: Format, renderer: PromptRenderer, *, root: Path | None = None) -> TokenizedDataset:
    """The tokenized dataset for a file, from the cache or built (validated, tokenized, stored) now.

    Raises DataError, writing nothing, when the file has problems."""
    path = Path(path)
    root = root or cache_root()
    meta = {
        "version": CACHE_VERSION,
        "dataset_sha256": file_sha256(path),
        "tokenizer": tokenizer_fingerprint(renderer.tokenizer),
        "template": renderer.template,
        "format": fmt,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
    final = root / key
    if (final / "meta.json").is_file():
        return _read(final, fmt)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second job waits here, then finds the entry built
        if (final / "meta.json").is_file():
            return _read(final, fmt)
        staging = root / f".{key}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _tokenize_to(path, fmt, renderer, staging)
            _finish(staging, {**meta, "source": str(path)})
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    dataset = _read(final, fmt)
    dataset.cache_hit = False
    return dataset

"""Tokenize a dataset once: a cache keyed by (content hash, tokenizer, template, format).

Entries live in TUNEFORGE_HOME/cache/tokenized/KEY/ as flat int32 arrays (ids, labels) plus offsets,
memory-mapped on load, so reruns and sweeps skip validation and tokenization. An entry is built in a
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
from tuneforge.data.loading import file_sha256, load_examples
from tuneforge.data.parallel import pack_arrays, tokenize_file, worker_count
from tuneforge.data.problems import DataError
from tuneforge.data.templating import PromptRenderer, TokenizedExample
from tuneforge.home import tuneforge_home

CACHE_VERSION = 1
BATCH = 512


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


def _write(directory: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    for name, array in arrays.items():
        with open(directory / f"{name}.npy", "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
    (directory / "meta.json").write_text(json.dumps({**meta, "examples": len(arrays["lines"])}, indent=2))


def _read(directory: Path, fmt: Format) -> TokenizedDataset:
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("input_ids", "labels", "offsets", "lines")}
    return TokenizedDataset(format=fmt, cache_hit=True, **arrays)


def _tokenize(path: Path, fmt: Format, renderer: PromptRenderer) -> dict[str, np.ndarray]:
    """Validate and tokenize the whole file, on every core for a large JSONL file; DataError if invalid."""
    workers = worker_count(path)
    if workers > 1:
        arrays, problems = tokenize_file(path, fmt, renderer, workers)
        if problems:
            raise DataError(problems, headline=f"{path}: {len(problems)} problem(s); nothing was trained")
        return arrays
    examples, _ = load_examples(path, fmt)
    return pack_arrays(list(renderer.tokenize_stream(examples, BATCH)))


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
        arrays = _tokenize(path, fmt, renderer)
        staging = root / f".{key}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _write(staging, arrays, {**meta, "source": str(path)})
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    dataset = _read(final, fmt)
    dataset.cache_hit = False
    return dataset

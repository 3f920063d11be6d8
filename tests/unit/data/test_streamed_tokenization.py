"""The tokenization cache streams: examples are tokenized a batch at a time into the entry's files, on one
process or several, with exactly the tokens the in-memory path gives; an invalid file writes nothing and
keeps a bounded number of its problems; and (slow) a file whose token arrays are several times the memory
allowed tokenizes within it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import chat, write_jsonl
from tuneforge.data import cache, parallel, token_files
from tuneforge.data.cache import cache_root, load_tokenized
from tuneforge.data.loading import load_examples
from tuneforge.data.problems import DataError
from tuneforge.data.templating import PromptRenderer


def reference(path, renderer) -> dict[str, np.ndarray]:
    """The in-memory path the cache replaced: every example, tokenized, then concatenated."""
    examples, _ = load_examples(path, "chat")
    return parallel.pack_arrays(renderer.tokenize_many(examples))


@pytest.mark.parametrize("workers", [1, 3])
def test_streamed_entries_equal_the_in_memory_tokens(tmp_path, byte_tokenizer, monkeypatch, workers):
    records = [chat(f"question {i} " * (i % 9 + 1), f"answer {i} " * (i % 5 + 1)) for i in range(250)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    renderer = PromptRenderer(byte_tokenizer, "chat")
    # Small buffers, so offsets are flushed and parts joined in many pieces.
    monkeypatch.setattr(token_files, "FLUSH_EXAMPLES", 7)
    monkeypatch.setattr(token_files, "COPY_CHUNK", 5)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(cache, "worker_count", lambda _: workers)
    dataset = load_tokenized(path, "chat", renderer)
    expected = reference(path, renderer)
    for name in ("input_ids", "labels", "offsets", "lines"):
        assert np.array_equal(np.asarray(getattr(dataset, name)), expected[name]), name
    assert list(dataset.lines) == list(range(1, 251)) and isinstance(dataset.input_ids, np.memmap)
    again = load_tokenized(path, "chat", renderer)
    assert again.cache_hit and np.array_equal(np.asarray(again.labels), expected["labels"])


@pytest.mark.parametrize("workers", [1, 2])
def test_an_invalid_file_writes_nothing_and_keeps_a_bounded_number_of_problems(tmp_path, byte_tokenizer,
                                                                              monkeypatch, workers):
    records = [chat(f"q{i}", f"a{i}") if i % 3 else {"messages": []} for i in range(60)]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(cache, "worker_count", lambda _: workers)
    monkeypatch.setattr(cache, "MAX_PROBLEMS_KEPT", 4)
    with pytest.raises(DataError, match=r"bad.jsonl: 20 problem\(s\); nothing was trained") as refused:
        load_tokenized(path, "chat", PromptRenderer(byte_tokenizer, "chat"))
    assert len(refused.value.problems) <= 4 * workers and refused.value.problems[0].line == 1
    assert [p.name for p in cache_root().iterdir() if not p.name.endswith(".lock")] == []


CHILD = r"""
import json, os, resource, sys
os.environ["TUNEFORGE_HOME"] = sys.argv[2]
from tuneforge.data import cache
from tuneforge.data.cache import load_tokenized
from tuneforge.data.templating import PromptRenderer
from tuneforge.engine.tiny_model import build_byte_tokenizer
renderer = PromptRenderer(build_byte_tokenizer(), "chat")
# The tokenizers library's BPE cache keeps up to its capacity of pieces; for this byte-level tokenizer (no
# regex split) a piece is a whole message, so the cache alone grows ~3 KB per example until it is full.
# It is bounded by its entry count, not by the dataset; off here, so what is measured is tuneforge's path.
renderer.tokenizer.backend_tokenizer.model._resize_cache(0)
cache.worker_count = lambda _: 1  # one process: its own peak RSS is the whole cost
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dataset = load_tokenized(sys.argv[1], "chat", renderer)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kb": after - before, "tokens": int(dataset.offsets[-1])}))
"""


@pytest.mark.slow
def test_a_file_with_token_arrays_several_times_the_limit_tokenizes_within_it(tmp_path):
    """64 MB of chat JSONL makes ~500 MB of token arrays (one token per byte, ids and labels); tokenizing
    may grow the process by at most 96 MB (the limit), so its arrays are ~5x what it may hold."""
    import random

    limit_mb, rng, words = 96, random.Random(0), "data model token train loss river mountain music".split()
    path, written = tmp_path / "big.jsonl", 0
    with open(path, "w") as handle:
        while written < 64 << 20:  # every record different, of varied length
            line = json.dumps(chat(" ".join(rng.choices(words, k=rng.randint(5, 60))),
                                   " ".join(rng.choices(words, k=rng.randint(5, 200))))) + "\n"
            written += handle.write(line)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "home")], capture_output=True,
                         text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    arrays_mb = measured["tokens"] * 8 / (1 << 20)
    grew_mb = measured["grew_kb"] / 1024
    print(f"token arrays {arrays_mb:.0f} MB; tokenizing grew the process by {grew_mb:.0f} MB (limit {limit_mb} MB)")
    assert arrays_mb > 4 * limit_mb and grew_mb < limit_mb

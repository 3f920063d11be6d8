"""The tokenization cache: built once, shared by concurrent jobs, never half-written, nothing for bad data."""

import multiprocessing
import os

import numpy as np
import pytest

from conftest import chat, write_jsonl
from tuneforge.data.cache import cache_root, load_tokenized
from tuneforge.data.problems import DataError
from tuneforge.data.templating import PromptRenderer


def entries(root):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def test_second_load_is_a_hit_with_identical_tokens(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"answer {i}") for i in range(20)])
    renderer = PromptRenderer(byte_tokenizer, "chat")
    first = load_tokenized(path, "chat", renderer)
    second = load_tokenized(path, "chat", renderer)
    assert not first.cache_hit and second.cache_hit and len(entries(cache_root())) == 1
    fresh = renderer.tokenize_many(__import__("tuneforge.data.loading", fromlist=["x"]).load_examples(path)[0])
    for i in range(20):
        assert np.array_equal(second[i].input_ids, fresh[i].input_ids)
        assert np.array_equal(second[i].labels, fresh[i].labels) and second[i].line == i + 1


def test_the_key_follows_content_template_and_tokenizer(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(12)])
    load_tokenized(path, "chat", PromptRenderer(byte_tokenizer, "chat"))
    write_jsonl(path, [chat(f"q{i}", f"changed {i}") for i in range(12)])
    assert not load_tokenized(path, "chat", PromptRenderer(byte_tokenizer, "chat")).cache_hit
    tokenizer = byte_tokenizer.__class__(tokenizer_object=byte_tokenizer.backend_tokenizer,
                                         chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                         eos_token="<|im_end|>", pad_token="<|im_end|>")
    assert not load_tokenized(path, "chat", PromptRenderer(tokenizer, "chat")).cache_hit
    assert len(entries(cache_root())) == 3


def test_invalid_data_writes_nothing(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat("q", "a"), "{broken"])
    with pytest.raises(DataError):
        load_tokenized(path, "chat", PromptRenderer(byte_tokenizer, "chat"))
    assert entries(cache_root()) == [] and not any(cache_root().glob(".*staging*"))


def _build(path, home, barrier, results):
    os.environ["TUNEFORGE_HOME"] = home
    from tuneforge.engine.tiny_model import build_byte_tokenizer

    barrier.wait()
    dataset = load_tokenized(path, "chat", PromptRenderer(build_byte_tokenizer(), "chat"))
    results.put((dataset.cache_hit, int(dataset.lengths.sum())))


def test_concurrent_jobs_build_the_entry_once(tmp_path, tuneforge_home):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}" * 50, f"a{i}" * 50) for i in range(400)])
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_build, args=(path, str(tuneforge_home), barrier, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in workers]
    assert sorted(hit for hit, _ in outcomes) == [False, True, True]  # one built it, two waited and read it
    assert len({total for _, total in outcomes}) == 1 and len(entries(cache_root())) == 1


def test_parallel_tokenization_equals_one_process_and_names_lines(tmp_path, byte_tokenizer, monkeypatch):
    from tuneforge.data import parallel
    from tuneforge.data.reader import line_aligned_ranges

    records = [chat(f"question {i}" * (i % 7 + 1), f"answer {i}") for i in range(300)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    ranges = line_aligned_ranges(path, 3)
    assert len(ranges) == 3 and ranges[0][:1] == (0,) and ranges[-1][1] == path.stat().st_size
    assert [lines for _, _, lines in ranges] == sorted(lines for _, _, lines in ranges) and ranges[1][2] > 0
    renderer = PromptRenderer(byte_tokenizer, "chat")
    single = load_tokenized(path, "chat", renderer, root=tmp_path / "one")
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    assert parallel.worker_count(path) == __import__("os").cpu_count() or 1
    arrays, problems = parallel.tokenize_file(path, "chat", renderer, 3)
    assert problems == []
    assert np.array_equal(arrays["input_ids"], single.input_ids) and np.array_equal(arrays["labels"], single.labels)
    assert np.array_equal(arrays["offsets"], single.offsets) and list(arrays["lines"]) == list(range(1, 301))

    records[250] = '{"messages": broken'
    write_jsonl(path, records)
    arrays, problems = parallel.tokenize_file(path, "chat", renderer, 3)
    assert arrays is None and [(p.line, p.kind) for p in problems] == [(251, "not_json")]


def _sigterm_is_default(_: int) -> bool:
    import signal

    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_tokenization_workers_end_on_sigterm_though_their_parent_catches_it():
    # Pool.terminate ends its workers with SIGTERM when its exit has drained their stop sentinels (a race a loaded
    # machine loses); forked workers used to inherit a parent's catching handler (the scheduler's loops, a
    # recipe's preemption watcher, or one a test left behind), ignore it, and the pool's exit waited forever.
    import signal

    from tuneforge.data import parallel

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with parallel.pool(2) as processes:
            assert processes.map(_sigterm_is_default, range(4), chunksize=1) == [True] * 4
    finally:
        signal.signal(signal.SIGTERM, previous)

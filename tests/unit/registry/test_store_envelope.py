"""Envelope encryption and the key folder: chunked AES-GCM round trips, and every tampering the format
promises to catch (a flipped bit, chunks reordered or dropped, a truncated tail, another object's
context, another key); key files are private and versions never overwrite each other."""

from __future__ import annotations

import io
import os
import stat

import pytest

from tuneforge.registry.storage.envelope import (
    HEADER,
    TAG,
    DecryptionFailed,
    decrypt_stream,
    encrypt_stream,
    new_data_key,
    unwrap_key,
    wrap_key,
)
from tuneforge.registry.storage.keys import FolderKeyProvider, KeyUnavailable

CHUNK = 64


def sealed(plain: bytes, key: bytes, context: bytes = b"obj-1") -> bytes:
    out = io.BytesIO()
    assert encrypt_stream(io.BytesIO(plain), out, key, context=context, chunk=CHUNK) == len(plain)
    return out.getvalue()


def opened(data: bytes, key: bytes, context: bytes = b"obj-1") -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(data), out, key, context=context)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
def test_round_trip_at_chunk_edges(size):
    key, plain = new_data_key(), os.urandom(size)
    data = sealed(plain, key)
    assert opened(data, key) == plain
    chunks = max(1, -(-size // CHUNK))  # an empty object is one empty, authenticated chunk
    assert len(data) == HEADER.size + size + TAG * chunks


def test_tampering_is_caught():
    key, plain = new_data_key(), os.urandom(3 * CHUNK + 10)
    data = sealed(plain, key)
    block = CHUNK + TAG
    body = data[HEADER.size:]
    first, second, rest = body[:block], body[block:2 * block], body[2 * block:]
    flipped = bytearray(data)
    flipped[HEADER.size + 5] ^= 1
    cases = {
        "flipped bit": bytes(flipped),
        "reordered": data[:HEADER.size] + second + first + rest,
        "dropped chunk": data[:HEADER.size] + first + rest,
        "truncated at a chunk boundary": data[:HEADER.size] + first + second,
        "truncated mid-chunk": data[:-3],
    }
    for what, bad in cases.items():
        with pytest.raises(DecryptionFailed):
            opened(bad, key)
            pytest.fail(what)
    with pytest.raises(DecryptionFailed):
        opened(data, key, context=b"obj-2")  # moved to another object
    with pytest.raises(DecryptionFailed):
        opened(data, new_data_key())
    with pytest.raises(DecryptionFailed):
        opened(b"plain text, never encrypted", key)


def test_wrapped_keys_bind_their_context():
    kek, data_key = new_data_key(), new_data_key()
    wrapped = wrap_key(kek, data_key, context=b"t/obj/v1")
    assert data_key not in wrapped and unwrap_key(kek, wrapped, context=b"t/obj/v1") == data_key
    with pytest.raises(DecryptionFailed):
        unwrap_key(kek, wrapped, context=b"t/other/v1")


def test_key_folder_is_private_and_versions_do_not_collide(tmp_path):
    keys = FolderKeyProvider(tmp_path / "keys")
    assert [keys.new_version("tenant-a") for _ in range(3)] == [1, 2, 3] and keys.versions("tenant-a") == [1, 2, 3]
    assert stat.S_IMODE((tmp_path / "keys" / "tenant-a").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "keys" / "tenant-a").iterdir())
    files = {p.read_bytes() for p in (tmp_path / "keys" / "tenant-a").iterdir()}
    assert len(files) == 3 and all(len(k) == 32 for k in files)
    wrapped = keys.wrap("tenant-a", 2, b"k" * 32, context=b"c")
    assert keys.unwrap("tenant-a", 2, wrapped, context=b"c") == b"k" * 32
    keys.destroy_version("tenant-a", 2)
    with pytest.raises(KeyUnavailable):
        keys.unwrap("tenant-a", 2, wrapped, context=b"c")
    assert keys.new_version("tenant-a") == 4  # a destroyed version's number is never reused while a later one lives
    keys.shred("tenant-a")
    assert keys.versions("tenant-a") == []
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            keys.new_version(bad)


# ---- streaming: the Sealer (uploads encrypted as they arrive) and the SealedReader (decrypted as read) ----


@pytest.mark.parametrize("size", [0, 1, CHUNK, 2 * CHUNK, 3 * CHUNK + 7])
@pytest.mark.parametrize("piece", [1, 7, CHUNK, CHUNK + 3, 10 * CHUNK])
def test_the_sealer_takes_pieces_of_any_size_and_writes_what_decrypt_stream_opens(size, piece):
    from tuneforge.registry.storage.envelope import Sealer

    key, plain = new_data_key(), os.urandom(size)
    out = io.BytesIO()
    sealer = Sealer(out, key, context=b"obj-1", chunk=CHUNK)
    for start in range(0, size, piece):
        sealer.write(plain[start:start + piece])
    assert sealer.finish() == size
    data = out.getvalue()
    assert len(data) == len(sealed(plain, key))  # the same layout as encrypt_stream: same chunks, same tags
    assert opened(data, key) == plain
    with pytest.raises(ValueError):
        sealer.write(b"more")  # sealed: the last chunk is written


@pytest.mark.parametrize("size", [0, 5, CHUNK, 3 * CHUNK + 7])
@pytest.mark.parametrize("step", [1, 10, CHUNK, 4 * CHUNK])
def test_the_reader_returns_the_plaintext_in_reads_of_any_size(size, step):
    from tuneforge.registry.storage.envelope import SealedReader

    key, plain = new_data_key(), os.urandom(size)
    reader = SealedReader(io.BytesIO(sealed(plain, key)), key, context=b"obj-1")
    got = bytearray()
    while block := reader.read(step):
        assert len(block) <= step
        got += block
    assert bytes(got) == plain and reader.read(5) == b"" and reader.size == size
    assert io.BufferedReader(SealedReader(io.BytesIO(sealed(plain, key)), key, context=b"obj-1")).read() == plain


class CountingSource(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.taken = 0

    def read(self, n=-1):
        block = super().read(n)
        self.taken += len(block)
        return block


def test_the_reader_holds_at_most_two_chunks_of_a_large_object():
    from tuneforge.registry.storage.envelope import SealedReader

    key, plain = new_data_key(), os.urandom(100 * CHUNK)
    source = CountingSource(sealed(plain, key))
    reader = SealedReader(source, key, context=b"obj-1")
    assert reader.read(10) == plain[:10]
    assert source.taken <= HEADER.size + 2 * (CHUNK + TAG)  # the chunk being returned and the next (is it last?)
    for index in range(1, 50):
        reader.read(CHUNK)
        assert source.taken <= HEADER.size + (index + 2) * (CHUNK + TAG)


def test_the_reader_authenticates_each_chunk_before_returning_it():
    from tuneforge.registry.storage.envelope import SealedReader

    key, plain = new_data_key(), os.urandom(3 * CHUNK)
    data = bytearray(sealed(plain, key))
    data[HEADER.size + (CHUNK + TAG) + 3] ^= 1  # a bit of chunk 1
    reader = SealedReader(io.BytesIO(bytes(data)), key, context=b"obj-1")
    assert reader.read(CHUNK) == plain[:CHUNK]  # chunk 0 is genuine
    with pytest.raises(DecryptionFailed, match="chunk 1"):
        reader.read(CHUNK)  # not one byte of the tampered chunk comes out
    truncated = SealedReader(io.BytesIO(sealed(plain, key)[:-(CHUNK + TAG)]), key, context=b"obj-1")
    assert truncated.read(CHUNK) == plain[:CHUNK]
    with pytest.raises(DecryptionFailed):
        truncated.read()  # chunk 1 is not marked last: the missing tail is noticed
    with pytest.raises(DecryptionFailed, match="bad magic"):
        SealedReader(io.BytesIO(b"plain text, never encrypted"), key, context=b"obj-1")


def test_a_header_naming_a_huge_chunk_is_refused_before_anything_is_read():
    from tuneforge.registry.storage.envelope import MAGIC, SealedReader

    source = CountingSource(HEADER.pack(MAGIC, 1 << 31, b"\0" * 8) + b"x" * 100)
    with pytest.raises(DecryptionFailed, match="chunk size"):
        SealedReader(source, new_data_key(), context=b"obj-1")
    assert source.taken == HEADER.size

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

"""Envelope encryption of one object: a random 256-bit data key per object, AES-GCM over 1 MiB chunks.

Chunked so an object of any size streams through bounded memory. Each chunk's nonce is the object's
random 8-byte prefix plus the chunk index, and its associated data binds the header, the index, a
last-chunk flag and the caller's context (the object's id): chunks cannot be reordered, dropped,
truncated at a chunk boundary or moved to another object without the tag failing.

layout: b"TFE1" | chunk size (u32) | nonce prefix (8 bytes) | chunk 0 ciphertext+tag | chunk 1 ... | last
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"TFE1"
HEADER = struct.Struct(">4sI8s")
TAG = 16
CHUNK = 1 << 20
MAX_CHUNK = 64 << 20  # a header naming more is not ours: never allocate what a header asks


class DecryptionFailed(ValueError):
    """Ciphertext that does not authenticate under the key and context given: tampered, or not ours."""


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _aad(header: bytes, index: int, last: bool, context: bytes) -> bytes:
    return header + struct.pack(">I?", index, last) + context


class Sealer:
    """Encryption as the plaintext arrives in pieces of any size (an upload streaming in): whole chunks go
    out as soon as the chunk after them has begun, and finish() seals the last one. The bytes written are
    exactly what encrypt_stream writes for the same plaintext; at most one chunk plus one piece is held."""

    def __init__(self, out: BinaryIO, data_key: bytes, *, context: bytes, chunk: int = CHUNK):
        self._out, self._aead, self._context, self._chunk = out, AESGCM(data_key), context, chunk
        self._prefix = os.urandom(8)
        self._header = HEADER.pack(MAGIC, chunk, self._prefix)
        out.write(self._header)
        self._pending = bytearray()
        self._index = 0
        self.size = 0
        self._finished = False

    def write(self, data: bytes) -> None:
        if self._finished:
            raise ValueError("this object is sealed already")
        self._pending += data
        self.size += len(data)
        # A full chunk is sealed only once a byte past it exists: only then is it known not to be the last.
        while len(self._pending) > self._chunk:
            self._seal(bytes(self._pending[:self._chunk]), last=False)
            del self._pending[:self._chunk]

    def finish(self) -> int:
        """Seal the last chunk (empty only for empty plaintext); returns the plaintext size."""
        if not self._finished:
            self._seal(bytes(self._pending), last=True)
            self._pending.clear()
            self._finished = True
        return self.size

    def _seal(self, block: bytes, *, last: bool) -> None:
        nonce = self._prefix + struct.pack(">I", self._index)
        self._out.write(self._aead.encrypt(nonce, block, _aad(self._header, self._index, last, self._context)))
        self._index += 1


def encrypt_stream(src: BinaryIO, out: BinaryIO, data_key: bytes, *, context: bytes, chunk: int = CHUNK) -> int:
    """Encrypt src into out; returns the plaintext size."""
    sealer = Sealer(out, data_key, context=context, chunk=chunk)
    while block := src.read(chunk):
        sealer.write(block)
    return sealer.finish()


class SealedReader(io.RawIOBase):
    """The plaintext of a sealed stream, read like a file: each chunk is authenticated before any of its
    bytes are returned, and memory holds two chunks whatever the object's size (a download streamed to
    a client, a copy into a job's inputs). A chunk that does not authenticate raises DecryptionFailed from
    read(): what was returned before it is genuine, but the object as a whole is not to be trusted, so the
    reader of a partial result must discard it (a response is cut off; a copy is removed)."""

    def __init__(self, src: BinaryIO, data_key: bytes, *, context: bytes, close_source: bool = True):
        super().__init__()
        self._src, self._close_source = src, close_source
        header = _read_full(src, HEADER.size)
        if len(header) != HEADER.size:
            raise DecryptionFailed("not a tuneforge encrypted object (too short)")
        magic, self._chunk, self._prefix = HEADER.unpack(header)
        if magic != MAGIC:
            raise DecryptionFailed("not a tuneforge encrypted object (bad magic)")
        if not 0 < self._chunk <= MAX_CHUNK:
            raise DecryptionFailed(f"not a tuneforge encrypted object (a chunk size of {self._chunk} bytes)")
        self._aead, self._header, self._context = AESGCM(data_key), header, context
        self._index, self._done, self.size = 0, False, 0
        self._block = _read_full(src, self._chunk + TAG)
        self._plain = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> None:
        block = self._block
        following = _read_full(self._src, self._chunk + TAG) if len(block) == self._chunk + TAG else b""
        last = not following
        try:
            plain = self._aead.decrypt(self._prefix + struct.pack(">I", self._index), block,
                                       _aad(self._header, self._index, last, self._context))
        except InvalidTag:
            raise DecryptionFailed(f"chunk {self._index} does not authenticate (tampered, truncated or another key)") \
                from None
        self._plain, self._block, self._index, self._done = memoryview(plain), following, self._index + 1, last
        self.size += len(plain)

    def readinto(self, buffer) -> int:
        while not self._plain and not self._done:
            self._next_chunk()
        n = min(len(buffer), len(self._plain))
        buffer[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        while not self._plain and not self._done:
            self._next_chunk()
        data = bytes(self._plain[:size])
        self._plain = self._plain[size:]
        return data

    def close(self) -> None:
        try:
            if self._close_source and not self.closed:
                self._src.close()
        finally:
            super().close()


def decrypt_stream(src: BinaryIO, out: BinaryIO, data_key: bytes, *, context: bytes) -> int:
    """Decrypt src into out, chunk by chunk; raises DecryptionFailed at the first chunk that does not
    authenticate (what was written before it is the caller's to discard). Returns the plaintext size."""
    reader = SealedReader(src, data_key, context=context, close_source=False)
    while block := reader.read(CHUNK):
        out.write(block)
    return reader.size


def _read_full(src: BinaryIO, n: int) -> bytes:
    """n bytes, or fewer only at the end (streams such as S3 bodies may return short reads)."""
    parts, got = [], 0
    while got < n:
        part = src.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def encrypt_file(src: Path, dest: Path, data_key: bytes, *, context: bytes) -> int:
    with open(src, "rb") as plain, open(dest, "wb") as out:
        size = encrypt_stream(plain, out, data_key, context=context)
        out.flush()
        os.fsync(out.fileno())
    return size


def wrap_key(kek: bytes, data_key: bytes, *, context: bytes) -> bytes:
    """The data key sealed under a key encryption key: nonce | ciphertext+tag."""
    nonce = os.urandom(12)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, context)


def unwrap_key(kek: bytes, wrapped: bytes, *, context: bytes) -> bytes:
    try:
        return AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], context)
    except InvalidTag:
        raise DecryptionFailed("the data key does not unwrap under this tenant key") from None

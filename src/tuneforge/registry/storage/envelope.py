"""Envelope encryption of one object: a random 256-bit data key per object, AES-GCM over 1 MiB chunks.

Chunked so an object of any size streams through bounded memory. Each chunk's nonce is the object's
random 8-byte prefix plus the chunk index, and its associated data binds the header, the index, a
last-chunk flag and the caller's context (the object's id): chunks cannot be reordered, dropped,
truncated at a chunk boundary or moved to another object without the tag failing.

layout: b"TFE1" | chunk size (u32) | nonce prefix (8 bytes) | chunk 0 ciphertext+tag | chunk 1 ... | last
"""

from __future__ import annotations

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


class DecryptionFailed(ValueError):
    """Ciphertext that does not authenticate under the key and context given: tampered, or not ours."""


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _aad(header: bytes, index: int, last: bool, context: bytes) -> bytes:
    return header + struct.pack(">I?", index, last) + context


def encrypt_stream(src: BinaryIO, out: BinaryIO, data_key: bytes, *, context: bytes, chunk: int = CHUNK) -> int:
    """Encrypt src into out; returns the plaintext size."""
    aead, prefix = AESGCM(data_key), os.urandom(8)
    header = HEADER.pack(MAGIC, chunk, prefix)
    out.write(header)
    size, index, block = 0, 0, src.read(chunk)
    while True:
        following = src.read(chunk) if len(block) == chunk else b""
        last = not following
        nonce = prefix + struct.pack(">I", index)
        out.write(aead.encrypt(nonce, block, _aad(header, index, last, context)))
        size += len(block)
        if last:
            return size
        block, index = following, index + 1


def decrypt_stream(src: BinaryIO, out: BinaryIO, data_key: bytes, *, context: bytes) -> int:
    """Decrypt src into out, chunk by chunk; raises DecryptionFailed at the first chunk that does not
    authenticate (what was written before it is the caller's to discard). Returns the plaintext size."""
    header = src.read(HEADER.size)
    if len(header) != HEADER.size:
        raise DecryptionFailed("not a tuneforge encrypted object (too short)")
    magic, chunk, prefix = HEADER.unpack(header)
    if magic != MAGIC:
        raise DecryptionFailed("not a tuneforge encrypted object (bad magic)")
    aead, size, index = AESGCM(data_key), 0, 0
    block = _read_full(src, chunk + TAG)
    while True:
        following = _read_full(src, chunk + TAG) if len(block) == chunk + TAG else b""
        last = not following
        try:
            plain = aead.decrypt(prefix + struct.pack(">I", index), block, _aad(header, index, last, context))
        except InvalidTag:
            raise DecryptionFailed(f"chunk {index} does not authenticate (tampered, truncated or another key)") from None
        out.write(plain)
        size += len(plain)
        if last:
            return size
        block, index = following, index + 1


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

"""Object-store backends: a local folder (the default) and any S3-compatible store through boto3.

Both hold opaque objects by key and do the same few things: put a local file (multipart on S3 past a
threshold), download to a local file (resumable: a partial download continues with a ranged GET),
read, list, delete. Objects appear only complete: the folder backend writes beside and renames, S3
makes an object visible only when its (multipart) upload completes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

CHUNK = 1 << 20
PARTIAL = ".partial"


class StoreUrlError(ValueError):
    """A TUNEFORGE_STORE_URL tuneforge cannot use."""


class ObjectMissing(FileNotFoundError):
    def __init__(self, key: str):
        super().__init__(f"no object {key!r} in the store")
        self.key = key


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def download(self, key: str, dest: Path) -> None: ...  # resumable: continues a dest.partial
    def open(self, key: str) -> BinaryIO: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def keys(self, prefix: str = "") -> Iterator[str]: ...
    def uri(self, key: str) -> str: ...


def check_key(key: str) -> str:
    """Keys are relative, '/'-separated, with no '.' or '..' parts: a key can never leave its root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
        raise ValueError(f"not a store key: {key!r}")
    return key


class FolderStore:
    """Objects as files under a root folder (a local disk, or a shared filesystem mounted by every worker)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def download(self, key: str, dest: Path) -> None:
        partial = dest.with_name(dest.name + PARTIAL)
        with self.open(key) as src:
            done = partial.stat().st_size if partial.exists() else 0
            if done > os.fstat(src.fileno()).st_size:
                partial.unlink()  # longer than the object: not a piece of it
                done = 0
            src.seek(done)
            with open(partial, "ab") as out:
                shutil.copyfileobj(src, out, CHUNK)
        os.replace(partial, dest)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self, prefix: str = "") -> Iterator[str]:
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not path.name.startswith(".put-"):
                yield key

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()


class S3Store:
    """Objects in an S3 bucket under a prefix. Uploads past multipart_threshold go in parts (boto3's
    TransferConfig), several at once; downloads stream to a .partial file and, when one was cut off,
    continue from where it stopped with a ranged GET pinned to the object's ETag (so a changed object is
    never spliced onto an old half)."""

    def __init__(self, bucket: str, prefix: str = "", *, client=None, endpoint_url: str | None = None,
                 multipart_threshold: int = 64 << 20, multipart_chunksize: int = 16 << 20):
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = client or _s3_client(endpoint_url)
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                                       max_concurrency=4, use_threads=True)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def download(self, key: str, dest: Path, *, retries: int = 3) -> None:
        """The object at dest. A connection cut mid-body leaves dest.partial; the next try (up to `retries`
        here, or a later call) asks only for the rest."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        for attempt in range(retries + 1):
            try:
                return self._download_once(key, dest)
            except (BotoCoreError, HTTPError, ConnectionError):
                if attempt == retries:
                    raise

    def _download_once(self, key: str, dest: Path) -> None:
        partial = dest.with_name(dest.name + PARTIAL)
        head = self._head(key)
        done = partial.stat().st_size if partial.exists() else 0
        if done > head["ContentLength"]:
            partial.unlink()
            done = 0
        if done < head["ContentLength"]:
            extra = {"Range": f"bytes={done}-"} if done else {}
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), IfMatch=head["ETag"], **extra)["Body"]
            except self.client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                    partial.unlink(missing_ok=True)  # the object changed since the part we hold: start over
                    return self._download_once(key, dest)
                raise
            with open(partial, "ab") as out:
                for chunk in body.iter_chunks(CHUNK):
                    out.write(chunk)
        partial.touch()  # an empty object has no body to append
        if partial.stat().st_size != head["ContentLength"]:
            raise OSError(f"download of {key!r} stopped at {partial.stat().st_size} of {head['ContentLength']} bytes")
        os.replace(partial, dest)

    def open(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise ObjectMissing(key) from None

    def _head(self, key: str) -> dict:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ObjectMissing(key) from None
            raise

    def size(self, key: str) -> int:
        return self._head(key)["ContentLength"]

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except ObjectMissing:
            return False

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def keys(self, prefix: str = "") -> Iterator[str]:
        if prefix:
            check_key(prefix.rstrip("/"))
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        skip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                yield item["Key"][skip:]

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def _s3_client(endpoint_url: str | None):
    """A boto3 client; credentials and region come from the usual AWS_* variables or profiles."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None,
                                          region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def open_store(url: str, *, endpoint_url: str | None = None, multipart_threshold: int = 64 << 20) -> ObjectStore:
    """The store a URL names: s3://bucket/prefix, or file:///absolute/folder."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreUrlError(f"TUNEFORGE_STORE_URL={url!r}: expected s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url, multipart_threshold=multipart_threshold)
    if parsed.scheme == "file":
        if not parsed.path.startswith("/") or parsed.netloc:
            raise StoreUrlError(f"TUNEFORGE_STORE_URL={url!r}: expected file:///absolute/folder")
        return FolderStore(Path(parsed.path))
    raise StoreUrlError(f"TUNEFORGE_STORE_URL={url!r}: expected s3://bucket/prefix or file:///absolute/folder")

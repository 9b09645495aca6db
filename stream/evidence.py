"""The evidence store: the media bytes the model scored, kept by their sha256.

Why: a post's URL is the poster's to change. A host that serves image A to the worker and B to
everyone after (cloaking) would have a reviewer judge B and training learn the verdict on
whatever the URL served when the dataset sink came by. So before a review item leaves the
worker, the worker stores the bytes it fetched under the hash its Label carries; the console
and the dataset sink read media only from here and check the hash on every read. Nothing
downstream fetches a post's URL again.

Two backends behind one small interface: a local folder (the default: one machine, the local
stack, compose with a shared volume) and an S3-compatible object store (deployments), reached
with boto3 (the AWS SDK: well kept, speaks every S3-compatible server, and its retries and
signing are not ours to write). Keys are `sha256/<2 hex>/<64 hex>` under an optional prefix.
A blob is written once; a second write of the same hash is a no-op (same bytes by definition).

Hashes come off the wire (a review item's label, a decision): anything that is not 64
lowercase hex is refused before it names a path or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_BLOB_BYTES = 16 * 1024 * 1024  # above the worker's download limit (10 MiB): a bigger blob is not ours
DEFAULT_LOCATION = "var/evidence"

# What a read found: the bytes of that hash, nothing under it, or bytes of another hash
# (a corrupted or overwritten object: never shown, never trained on).
OK, MISSING, MISMATCH, UNAVAILABLE = "ok", "missing", "mismatch", "unavailable"


class EvidenceError(RuntimeError):
    """The store could not be reached or written (a disk, the object store)."""


def check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 hex digest: {str(digest)[:80]!r}")
    return digest


def object_key(digest: str, prefix: str = "") -> str:
    check_digest(digest)
    key = f"sha256/{digest[:2]}/{digest}"
    return f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key


@dataclass(frozen=True)
class Blob:
    """A verified read: `data` only when status is ok."""

    digest: str
    status: str
    data: bytes | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


class Backend(Protocol):
    """Raw storage by key; `EvidenceStore` adds the hash checks."""

    description: str

    def put(self, digest: str, data: bytes) -> bool: ...  # False when it was already there

    def get(self, digest: str) -> bytes | None: ...

    def delete(self, digest: str) -> bool: ...

    def entries(self) -> Iterator[tuple[str, float]]: ...  # (digest, stored at, epoch seconds)


class EvidenceStore:
    """Async front of a backend (its calls block: they run in threads)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def description(self) -> str:
        return self.backend.description

    async def put(self, digest: str, data: bytes) -> bool:
        """Store `data` under `digest` (its sha256, checked). True when newly written.
        Raises EvidenceError when the store cannot take it."""
        check_digest(digest)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"bytes do not hash to {digest}")
        if len(data) > MAX_BLOB_BYTES:
            raise ValueError(f"{len(data):,} bytes is over the evidence limit of {MAX_BLOB_BYTES:,}")
        try:
            return await asyncio.to_thread(self.backend.put, digest, data)
        except EvidenceError:
            raise
        except Exception as exc:  # OSError, botocore's errors: the caller decides what it costs
            raise EvidenceError(f"evidence store {self.description}: writing {digest[:12]}: {exc!r}") from exc

    async def get(self, digest: str) -> Blob:
        """The blob under `digest`, verified. Never raises for a bad digest or a bad store:
        the status says what was found (ok, missing, mismatch, unavailable)."""
        try:
            check_digest(digest)
        except ValueError as exc:
            return Blob(str(digest)[:80], MISSING, reason=str(exc))
        try:
            data = await asyncio.to_thread(self.backend.get, digest)
        except Exception as exc:
            log.warning("evidence store %s: reading %s failed: %r", self.description, digest[:12], exc)
            return Blob(digest, UNAVAILABLE, reason=f"the evidence store could not be read: {exc.__class__.__name__}")
        if data is None:
            return Blob(digest, MISSING, reason="no blob under this hash (never stored, expired or purged)")
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            log.error("evidence store %s: blob %s holds bytes hashing to %s", self.description, digest, actual)
            return Blob(digest, MISMATCH, reason=f"the stored bytes hash to {actual}, not to the scored hash")
        return Blob(digest, OK, data)

    async def delete(self, digest: str) -> bool:
        check_digest(digest)
        try:
            return await asyncio.to_thread(self.backend.delete, digest)
        except Exception as exc:
            raise EvidenceError(f"evidence store {self.description}: deleting {digest[:12]}: {exc!r}") from exc

    async def expire(self, older_than_s: float, *, now: float | None = None, keep: frozenset[str] = frozenset()) -> int:
        """Delete blobs stored more than `older_than_s` seconds ago, except those in `keep`
        (items still waiting for a reviewer). Returns how many were deleted."""
        cutoff = (time.time() if now is None else now) - older_than_s

        def sweep() -> int:
            gone = 0
            for digest, stored_at in list(self.backend.entries()):
                if stored_at < cutoff and digest not in keep and self.backend.delete(digest):
                    gone += 1
            return gone

        try:
            return await asyncio.to_thread(sweep)
        except Exception as exc:
            raise EvidenceError(f"evidence store {self.description}: expiring: {exc!r}") from exc

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


# -- backends ---------------------------------------------------------------------------------


class LocalBackend:
    """A folder. Writes go to a temporary file in the blob's folder, fsynced, then renamed
    into place, so a reader never sees half a blob and a crash leaves none."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = str(self.root)

    def path(self, digest: str) -> Path:
        return self.root / object_key(digest)

    def put(self, digest: str, data: bytes) -> bool:
        path = self.path(digest)
        if path.exists():
            # Seen again (a repost routed anew): its age restarts, so retention keeps it for the
            # new item as long as for a new blob.
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
                return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True

    def get(self, digest: str) -> bytes | None:
        path = self.path(digest)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_BLOB_BYTES + 1)
        except FileNotFoundError:
            return None
        return data  # an oversized file fails the hash check (it was truncated)

    def delete(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    def entries(self) -> Iterator[tuple[str, float]]:
        base = self.root / "sha256"
        if not base.is_dir():
            return
        for sub in base.iterdir():
            if not sub.is_dir():
                continue
            for entry in sub.iterdir():
                if DIGEST.fullmatch(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        yield entry.name, entry.stat().st_mtime


class S3Backend:
    """An S3-compatible bucket through boto3. The bucket must exist (deployments create it and
    its lifecycle rules; `expire` is the fallback for servers without lifecycle support)."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None, **client_options: Any) -> None:
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                s3={"addressing_style": "path"},  # S3-compatible servers rarely do virtual hosts
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            )
            client = boto3.client("s3", config=config, **{k: v for k, v in client_options.items() if v})
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.description = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _key(self, digest: str) -> str:
        return object_key(digest, self.prefix)

    def _missing(self, exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in {"404", "NoSuchKey", "NotFound"}

    def put(self, digest: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        key = self._key(digest)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if not self._missing(exc):
                raise
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
            return True
        # Seen again: copy it onto itself so LastModified (what retention reads) restarts.
        self.client.copy_object(
            Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key}, MetadataDirective="REPLACE"
        )
        return False

    def get(self, digest: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(digest))
        except ClientError as exc:
            if self._missing(exc):
                return None
            raise
        body = response["Body"]
        try:
            return bytes(body.read(MAX_BLOB_BYTES + 1))
        finally:
            body.close()

    def delete(self, digest: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(digest))
        except ClientError as exc:
            if self._missing(exc):
                return False
            raise
        self.client.delete_object(Bucket=self.bucket, Key=self._key(digest))
        return True

    def entries(self) -> Iterator[tuple[str, float]]:
        paginator = self.client.get_paginator("list_objects_v2")
        start = f"{self.prefix}/sha256/" if self.prefix else "sha256/"
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if DIGEST.fullmatch(name):
                    yield name, obj["LastModified"].timestamp()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def open_store(location: str | os.PathLike[str] | None = None) -> EvidenceStore:
    """`s3://bucket/prefix` (endpoint and keys from modstream.settings, else boto3's own
    chain: AWS_* variables, an instance or pod role) or a folder (default var/evidence)."""
    spec = str(location) if location else DEFAULT_LOCATION
    if spec.startswith("s3://"):
        parts = urlsplit(spec)
        if not parts.netloc:
            raise ValueError(f"{spec}: no bucket (expected s3://bucket[/prefix])")
        from modstream.settings import current

        s = current()
        return EvidenceStore(
            S3Backend(
                parts.netloc,
                parts.path,
                endpoint_url=s.s3_endpoint,
                region_name=s.s3_region,
                aws_access_key_id=s.s3_access_key_id,
                aws_secret_access_key=s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None,
            )
        )
    if "://" in spec and not spec.startswith("file://"):
        raise ValueError(f"{spec}: an evidence store is a folder or s3://bucket[/prefix]")
    return EvidenceStore(LocalBackend(Path(spec.removeprefix("file://"))))

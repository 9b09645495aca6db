"""The evidence store's contract, held by both backends: a folder, and an S3-compatible object
store through boto3 against a real S3Proxy server on loopback (tests/s3proxy.py). Blobs are
kept by their sha256 and checked on every read; a hash that is not one never names a path or
a key; expiry spares what is still waited on."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.evidence import (
    MISMATCH,
    MISSING,
    OK,
    UNAVAILABLE,
    EvidenceError,
    EvidenceStore,
    LocalBackend,
    S3Backend,
    object_key,
    open_store,
)
from tests.s3proxy import S3Proxy, running_s3proxy

A, B = b"\x89PNG scored bytes A", b"\x89PNG other bytes B"
HA, HB = hashlib.sha256(A).hexdigest(), hashlib.sha256(B).hexdigest()


@pytest.fixture(scope="module")
def s3proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Proxy]:
    with running_s3proxy(tmp_path_factory.mktemp("s3proxy")) as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EvidenceStore]:
    if request.param == "local":
        yield EvidenceStore(LocalBackend(tmp_path / "evidence"))
        return
    server: S3Proxy = request.getfixturevalue("s3proxy")
    client = server.client()
    bucket = f"evidence-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    client.create_bucket(Bucket=bucket)
    evidence = EvidenceStore(S3Backend(bucket, "modstream/test", client=client))
    yield evidence
    evidence.close()


def _overwrite(store: EvidenceStore, digest: str, data: bytes) -> None:
    """Corrupt a stored blob behind the store's back (a bad disk, a hand edit, an attacker)."""
    backend = store.backend
    if isinstance(backend, LocalBackend):
        backend.path(digest).write_bytes(data)
    else:
        assert isinstance(backend, S3Backend)
        backend.client.put_object(Bucket=backend.bucket, Key=object_key(digest, backend.prefix), Body=data)


@pytest.mark.asyncio
async def test_blobs_round_trip_by_hash_and_are_written_once(store: EvidenceStore) -> None:
    assert await store.put(HA, A) is True
    assert await store.put(HA, A) is False  # content-addressed: same hash, same bytes
    blob = await store.get(HA)
    assert (blob.status, blob.data) == (OK, A)
    assert (await store.get(HB)).status == MISSING
    assert await store.delete(HA) is True and await store.delete(HA) is False
    assert (await store.get(HA)).status == MISSING


@pytest.mark.asyncio
async def test_bytes_that_do_not_hash_to_the_key_are_refused_and_never_served(store: EvidenceStore) -> None:
    with pytest.raises(ValueError, match="do not hash"):
        await store.put(HA, B)
    await store.put(HA, A)
    _overwrite(store, HA, B)
    blob = await store.get(HA)
    assert blob.status == MISMATCH and blob.data is None and HB in blob.reason


@pytest.mark.asyncio
@pytest.mark.parametrize("hostile", ["../../../../etc/passwd", HA.upper(), HA[:-1], "", "a" * 65, f"{HA}/../x"])
async def test_a_hash_that_is_not_one_names_no_path_or_key(store: EvidenceStore, hostile: str) -> None:
    with pytest.raises(ValueError):
        await store.put(hostile, A)
    assert (await store.get(hostile)).status == MISSING
    with pytest.raises(ValueError):
        await store.delete(hostile)


@pytest.mark.asyncio
async def test_expiry_removes_old_blobs_but_spares_kept_ones(store: EvidenceStore) -> None:
    await store.put(HA, A)
    await store.put(HB, B)
    assert await store.expire(3600) == 0  # both are new
    later = time.time() + 7200
    assert await store.expire(3600, now=later, keep=frozenset({HB})) == 1
    assert (await store.get(HA)).status == MISSING and (await store.get(HB)).status == OK


@pytest.mark.asyncio
async def test_storing_a_kept_blob_again_restarts_its_age(store: EvidenceStore) -> None:
    """A repost routed anew needs the blob as long as a new one: retention must not expire it
    by the first copy's age."""
    import asyncio

    await store.put(HA, A)
    await store.put(HB, B)
    await asyncio.sleep(3.2)
    assert await store.put(HA, A) is False  # already there: its age restarts
    assert await store.expire(2.0) == 1
    assert (await store.get(HA)).ok and (await store.get(HB)).status == MISSING


@pytest.mark.asyncio
async def test_an_unreachable_store_reads_as_unavailable_and_fails_writes_loudly(s3proxy: S3Proxy) -> None:
    from tests.integration.stack import free_loopback_ports

    (port,) = free_loopback_ports(1)  # nothing listens there
    client = S3Proxy(f"http://127.0.0.1:{port}", s3proxy.process, s3proxy.log).client()
    store = EvidenceStore(S3Backend("evidence", client=client))
    assert (await store.get(HA)).status == UNAVAILABLE
    with pytest.raises(EvidenceError):
        await store.put(HA, A)


def test_open_store_reads_the_location_and_the_settings(
    tmp_path: Path, s3proxy: S3Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modstream import settings

    local = open_store(tmp_path / "ev")
    assert isinstance(local.backend, LocalBackend) and local.backend.root == tmp_path / "ev"
    for name, value in s3proxy.env().items():
        monkeypatch.setenv(name, value)
    settings.current.cache_clear()
    try:
        s3proxy.client().create_bucket(Bucket="opened")
        remote = open_store("s3://opened/some/prefix")
        assert isinstance(remote.backend, S3Backend) and remote.description == "s3://opened/some/prefix"
        remote.backend.put(HA, A)
        assert remote.backend.get(HA) == A
        with pytest.raises(ValueError):
            open_store("http://example.invalid/x")
        with pytest.raises(ValueError):
            open_store("s3:///no-bucket")
    finally:
        settings.current.cache_clear()

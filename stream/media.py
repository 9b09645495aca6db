"""Media fetching for the stream worker: download an image URL from a post, safely.

Every URL in a post is attacker-controlled, so each fetch is treated as hostile input. The
result is always a `MediaResult` with a stable `status` code (a metric label and a field of
the Label record); `fetch` never raises for bad input.

Defences, and why:

- Scheme allow-list (http, https): `file://`, `ftp://`, `gopher://`, `data:` etc. would reach
  local files or odd protocol handlers.
- SSRF guard at CONNECT time, in `TCPConnector(socket_factory=...)`: the factory sees the
  address that is about to be connected to, after DNS. Checking there (instead of checking
  the hostname up front) also covers IP-literal hosts (aiohttp skips the resolver for those),
  every redirect hop, and DNS rebinding (a name that resolves to a public address when
  checked and to 169.254.169.254 when connected). Loopback, private, link-local, multicast,
  reserved, unspecified, carrier-grade NAT and site-local addresses are refused, and so are
  IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, IPv4-compatible) when the
  embedded address is not public; Teredo is refused outright. Loopback is allowed only with
  `allow_loopback=True` (tests, the demo), and never through an embedded form.
- Manual redirects (at most `max_redirects`): each Location is resolved against the current
  URL and its scheme re-checked; the connect-time guard then applies to the new host.
- No proxies from the environment, no cookies, no transparent decompression: the byte cap
  counts what is on the wire and a gzip bomb stays a few compressed bytes of non-image.
- Byte cap enforced while streaming, and early when Content-Length already exceeds it; the
  cap holds when Content-Length is absent or wrong.
- Timeouts: connect (DNS + TCP + TLS), read (longest gap between chunks, so a slow drip
  cannot hold a worker), and a hard deadline over the whole fetch, redirects and retries
  included (a hung await would stall the partition and its commit).
- Retries with exponential backoff and jitter only for transient failures (connection
  reset/refused, timeouts, HTTP 429/502/503/504), never for 4xx, oversize, bad content or
  blocked targets: retrying those only amplifies an attack or wastes the deadline.
- Content type: image/* is accepted, application/octet-stream only when the magic bytes
  are an allowed image format; anything else (text/html error pages) is refused before the
  body is read.
- Decoding goes through `models.images.decode_image` (format allow-list, pixel budget
  checked from the header, decompression bombs refused, shrunk to `max_side` right after
  decoding so a huge image never outlives its decode) on a small dedicated thread pool:
  it is CPU work and must not block the event loop, and a separate pool keeps it from
  starving the default executor that aiohttp's threaded DNS resolver uses.
- Each bytes decoded once per process: the decode memo (stream/decode_memo.py) answers a repost
  of the same bytes, refusals included, within a byte budget, and posts of the same bytes in
  flight together share one decode, so a raid of one image costs one decode. `fetch(decode=False)`
  stops after the download and its checks, for a caller that may not need the pixels at all
  (the pipeline, when the dedupe cache holds the decode's facts: stream/media_facts.py).
- Concurrency is bounded globally and per host, so one slow or hostile host cannot take
  every download slot of a batch.
- Text inside the image (optional, `ocr=`): read on the same decode pool right after
  decoding, from the image bounded to models.ocr.OCR_MAX_SIDE (the resolution the trainer's
  OCR sees too), then shrunk to `max_side` for the model (a JPEG decoded again at the DCT
  scale, as without OCR, so its PDQ is the bank side's). A failed read leaves `ocr_text`
  None and the post goes on (stream.ocr counts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ipaddress
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

import aiohttp
from aiohttp.abc import AbstractResolver
from PIL import Image
from yarl import URL

from models.images import (
    DECODE_ERROR_REASONS,
    MAX_PIXELS,
    MAX_SIDE,
    MODEL_SIDE,
    ImageError,
    bounded_rgb,
    content_hash,
    decode_image,
    model_input,
)
from models.ocr import OCR_MAX_SIDE
from stream.banks.hashing import PdqHash
from stream.banks.variants import query_hashes
from stream.decode_memo import DecodeMemo

if TYPE_CHECKING:  # imported by the roles that read image text only: it registers the OCR metrics
    from stream.ocr import ImageTextReader

__all__ = [
    "ERROR_CODES",
    "BlockedAddressError",
    "FetchConfig",
    "MediaFetcher",
    "MediaResult",
    "address_block_reason",
    "decode_and_read",
    "sniff_format",
]

OK = "ok"
# Stable error codes (metric labels and the Label record's media status).
ERROR_CODES: tuple[str, ...] = (
    "invalid_url",
    "blocked_scheme",
    "blocked_address",
    "dns_error",
    "connect_error",
    "timeout",
    "http_error",
    "too_many_redirects",
    "too_large",
    "wrong_content_type",
    *DECODE_ERROR_REASONS,  # from models.images.decode_image
)

_ALLOWED_SCHEMES = frozenset({"http", "https"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_URL_LENGTH = 8192
_CHUNK = 64 * 1024


@dataclass
class FetchConfig:
    connect_timeout: float = 2.0  # DNS + TCP + TLS handshake, per hop
    read_timeout: float = 5.0  # longest gap between two chunks
    total_timeout: float = 10.0  # hard deadline for the whole fetch (redirects, retries, backoff)
    max_bytes: int = 10 * 1024 * 1024
    max_redirects: int = 3
    max_pixels: int = MAX_PIXELS
    # Decoded images are shrunk in the decode pool to at most this side (about 2x the model's
    # input): a 40 MP upload must not sit in memory at full size until it is batched.
    max_side: int = MAX_SIDE
    # The model's input side: a JPEG decodes at the smallest DCT scale still covering it and is
    # not resized again until the model's own resize (models.images.decode_image's min_side):
    # one resize per photo instead of two. None decodes JPEGs to the `max_side` bound as other
    # formats. The banks hash what this decode gives, so it is part of `decode_signature`.
    min_side: int | None = MODEL_SIDE
    # The model's input side, opt-in (the worker's --decode-model-input): the decode threads
    # also make each image the model's square input (models.images.model_input) as its post
    # arrives, so the device pool's batch preparation, on the device's critical path, only
    # copies pixels; a repost, which skips the model, pays the resize anyway. None leaves the
    # resize to the predictor (same pixels).
    model_side: int | None = None
    # The decode threads also take each image's PDQ hash (stream/banks/hashing.py), from the
    # bounded image before any model-input resize: the verdict banks match reposts by it.
    pdq: bool = False
    concurrency: int = 64  # downloads in flight, all hosts
    per_host: int = 8  # downloads in flight to one host
    retries: int = 2  # extra attempts after the first, transient failures only
    backoff_base: float = 0.2  # seconds; attempt n waits base * 2**n, jittered 0.5x..1.5x
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    allow_loopback: bool = False
    # "type/*" matches a whole top-level type.
    allowed_content_types: tuple[str, ...] = ("image/*",)
    # Generic types accepted only when the magic bytes sniff as an allowed image format.
    sniffed_content_types: tuple[str, ...] = ("application/octet-stream", "binary/octet-stream")
    decode_workers: int = max(1, min(4, os.cpu_count() or 1))
    # What this process already decoded, by the bytes' sha256 (stream/decode_memo.py): a repost
    # of the same file skips decode, resize, OCR and PDQ. The budget counts decoded pixels
    # (~0.3 MB per JPEG photo at the DCT scale covering 224 px, up to 0.6 MB for other formats
    # bounded to 448 px, ~0.15 MB at the model's 224); 0 turns it off.
    decode_memo_bytes: int = 128 * 1024 * 1024
    user_agent: str = "modstream-media/0.1"


@dataclass
class MediaResult:
    url: str
    status: str  # "ok" or one of ERROR_CODES
    reason: str = ""  # human-readable detail, e.g. "HTTP 404"
    image: Image.Image | None = None  # RGB, only when status == "ok"
    content_hash: str | None = None  # sha256 hex of the body, whenever a whole body was read
    size: int = 0  # bytes of body read
    final_url: str = ""  # last URL requested (after redirects)
    attempts: int = 0
    elapsed_s: float = 0.0
    ocr_text: str | None = None  # text read from the image; None: OCR off or failed
    body: bytes | None = None  # the bytes `content_hash` names, only when status == "ok" (the evidence)
    pdq: PdqHash | None = None  # the image's perceptual hash, when FetchConfig.pdq
    pdq_trimmed: PdqHash | None = None  # ... of the image without its caption bars, when it has any
    decoded_before: bool = False  # the decode came from DecodeMemo: an earlier post of the same bytes
    undecoded: bool = False  # fetch(decode=False): downloaded and checked, `decode` still to run

    @property
    def ok(self) -> bool:
        return self.status == OK


# ---------------------------------------------------------------------------------------
# Address policy


class BlockedAddressError(ConnectionRefusedError):
    """Raised by the socket factory instead of creating a socket for a refused address."""

    def __init__(self, address: str, why: str) -> None:
        super().__init__(f"refusing to connect to {address}: {why}")
        self.address = address
        self.why = why


_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local-use translation


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address | None] | None:
    """(form, embedded IPv4) for IPv6 forms that reach an IPv4 host; None for plain IPv6."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip.teredo is not None:
        return "Teredo", None  # tunnelled, the client address is obfuscated: refuse outright
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d, deprecated IPv4-compatible form (not :: or ::1)
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip))
    return None


def address_block_reason(address: str, *, allow_loopback: bool = False) -> str | None:
    """Why connecting to `address` (an IP literal) is refused, or None when it is allowed.

    Only globally routable unicast addresses pass; with `allow_loopback`, plain loopback
    (127.0.0.0/8, ::1) passes too. Anything unparseable is refused (fail closed).
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            form, v4 = embedded
            if v4 is None:
                return f"{form} address"
            # The kernel or a translator would connect to the IPv4 address: judge that one,
            # never granting the loopback exception through an embedded form.
            inner = address_block_reason(str(v4), allow_loopback=False)
            return None if inner is None else f"{form} address of {v4} ({inner})"
        if ip in _NAT64_LOCAL:
            return "local-use NAT64"
        if ip.is_site_local:  # fec0::/10: deprecated, yet Python counts it as global
            return "site-local"
    elif ip in _CGNAT:
        return "carrier-grade NAT"
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    if ip.is_unspecified:  # 0.0.0.0 and :: reach the local host on Linux
        return "unspecified"
    if ip.is_link_local:  # includes 169.254.169.254, the cloud metadata service
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


# The blocked addresses seen by the socket factory during the current request hop. A
# ContextVar holding a list: aiohappyeyeballs races connection attempts in child tasks,
# which share the list object, and concurrent fetches each set their own.
_BLOCKED: contextvars.ContextVar[list[BlockedAddressError] | None] = contextvars.ContextVar(
    "modstream_media_blocked", default=None
)


# ---------------------------------------------------------------------------------------
# Content checks

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def sniff_format(data: bytes) -> str | None:
    """The allowed image format the magic bytes announce, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def _type_matches(content_type: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern.endswith("/*"):
            if content_type.startswith(pattern[:-1]):
                return True
        elif content_type == pattern:
            return True
    return False


# ---------------------------------------------------------------------------------------
# Fetcher


class _Failure(Exception):
    """Internal: ends an attempt with a result status."""

    def __init__(self, status: str, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.transient = transient


@dataclass
class _Body:
    data: bytes
    content_type: str
    final_url: URL


class MediaFetcher:
    """Downloads and decodes images with one shared `aiohttp.ClientSession`.

    Use as `async with MediaFetcher(config) as fetcher:` or call `start()` / `close()`.
    `resolver` replaces aiohttp's DNS resolver (tests map fake names to addresses); the
    connect-time address guard applies to whatever it returns.
    """

    def __init__(
        self,
        config: FetchConfig | None = None,
        *,
        resolver: AbstractResolver | None = None,
        ocr: ImageTextReader | None = None,
    ) -> None:
        self.config = config or FetchConfig()
        self._resolver = resolver
        self._memo: DecodeMemo[Decoded] = DecodeMemo(
            self.config.decode_memo_bytes, _decoded_bytes, keep_errors=(ImageError,)
        )
        self._ocr = ocr
        self._session: aiohttp.ClientSession | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._global = asyncio.Semaphore(self.config.concurrency)
        # host -> (semaphore, users); entries are dropped when unused so the map stays small.
        self._hosts: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @property
    def ocr(self) -> ImageTextReader | None:
        return self._ocr

    @ocr.setter
    def ocr(self, reader: ImageTextReader | None) -> None:
        """May be set before start or between batches (a model swap that needs OCR); what was
        decoded without that reader lacks the text, so the memo starts over."""
        self._ocr = reader
        self._memo.clear()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        cfg = self.config
        connector = aiohttp.TCPConnector(
            limit=cfg.concurrency,
            limit_per_host=cfg.per_host,
            resolver=self._resolver,
            socket_factory=self._socket_factory,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,  # no proxy settings from the environment
            cookie_jar=aiohttp.DummyCookieJar(),  # nothing carried between hosts
            auto_decompress=False,  # the byte cap counts wire bytes; no gzip bombs
            headers={
                "User-Agent": cfg.user_agent,
                "Accept": "image/*",
                "Accept-Encoding": "identity",
            },
        )
        self._executor = ThreadPoolExecutor(max_workers=cfg.decode_workers, thread_name_prefix="media-decode")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def __aenter__(self) -> MediaFetcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- connect-time guard -----------------------------------------------------------------

    def _socket_factory(self, addr_info: Any) -> socket.socket:
        # aiohappyeyeballs passes one getaddrinfo-style tuple per address it is about to try:
        # (family, type, proto, canonname, sockaddr), sockaddr = (host, port[, flowinfo, scope_id]).
        family, type_, proto, _, sockaddr = addr_info
        host = str(sockaddr[0])
        why = address_block_reason(host, allow_loopback=self.config.allow_loopback)
        if why is not None:
            error = BlockedAddressError(host, why)
            blocked = _BLOCKED.get()
            if blocked is not None:
                blocked.append(error)
            raise error
        return socket.socket(family=family, type=type_, proto=proto)

    # -- public API -------------------------------------------------------------------------

    async def fetch_many(self, urls: Sequence[str], *, decode: bool = True) -> list[MediaResult]:
        """Fetch all URLs concurrently (bounded globally and per host); results in input order."""
        return list(await asyncio.gather(*(self.fetch(url, decode=decode) for url in urls)))

    async def fetch(self, url: str, *, decode: bool = True) -> MediaResult:
        """Download and decode one image. Never raises for bad input or bad servers.

        `decode=False` stops after the download and the checks that need the response (its
        content hash taken): the result is `undecoded` and `decode(result)` finishes it, so a
        caller that finds the bytes' facts elsewhere (the dedupe cache) never decodes them."""
        if self._session is None or self._executor is None:
            raise RuntimeError("MediaFetcher is not started (use `async with` or start())")
        started = time.monotonic()
        result = MediaResult(url=url, status=OK, final_url=url)
        try:
            target = _parse_url(url)
            body = await self._download(target, result)
            result.size = len(body.data)
            result.content_hash = content_hash(body.data)
            self._check_type(body)
            result.body = body.data
            result.undecoded = True
        except _Failure as failure:
            result.status, result.reason = failure.status, failure.reason
        if decode:
            await self.decode(result)
        result.elapsed_s = time.monotonic() - started
        return result

    async def decode(self, result: MediaResult) -> None:
        """Finish a `fetch(decode=False)`: decode the bytes (or take an earlier post's decode of
        them from the memo) into `result`; a refused image sets its status. No-op otherwise."""
        if not result.undecoded or result.body is None or result.content_hash is None:
            return
        result.undecoded = False
        try:
            decoded, result.decoded_before = await self._decode(result.body, result.content_hash)
            result.image, result.ocr_text, result.pdq, result.pdq_trimmed = decoded
        except _Failure as failure:
            result.status, result.reason, result.body = failure.status, failure.reason, None

    async def decode_bytes(self, data: bytes, digest: str) -> Decoded:
        """The decode (on the decode pool, through the memo) of bytes fetched and checked
        already; `digest` is their content hash. Raises ImageError when they are refused."""
        try:
            decoded, _ = await self._decode(data, digest)
        except _Failure as failure:
            raise ImageError(failure.status, failure.reason) from None
        return decoded

    def reconfigure(self, config: FetchConfig) -> None:
        """Another config between batches (a model swap: other sides). The memo's decodes were made
        for the old one: kept only while the decode signature (sides, PDQ, OCR) stays the same."""
        before = self.decode_signature
        self.config = config
        if self.decode_signature != before:
            self._memo.clear()

    @property
    def decode_signature(self) -> str:
        """What the facts a decode yields (PDQ, image text) depend on besides the bytes: facts
        kept under another signature (another bound, PDQ off, another OCR engine) do not hold."""
        cfg = self.config
        engine = getattr(self._ocr, "engine", self._ocr)
        ocr = "-" if self._ocr is None else str(getattr(engine, "identity", type(engine).__name__))
        return f"side={cfg.max_side};min={cfg.min_side or '-'};pdq={int(cfg.pdq)};ocr={ocr}"

    # -- internals --------------------------------------------------------------------------

    async def _download(self, target: URL, result: MediaResult) -> _Body:
        cfg = self.config
        loop = asyncio.get_running_loop()
        host = target.host or ""
        deadline: float | None = None
        attempt = 0
        while True:
            result.attempts = attempt + 1
            async with self._slot(host):
                # The clock starts with the first slot: time queued behind other downloads
                # is bounded by their deadlines and does not count against this one.
                if deadline is None:
                    deadline = loop.time() + cfg.total_timeout
                try:
                    async with asyncio.timeout_at(deadline):
                        return await self._attempt(target, deadline, result)
                except TimeoutError:
                    # The hard deadline fired (aiohttp's own timeouts become _Failure inside).
                    raise _Failure("timeout", f"no complete response within {cfg.total_timeout:g} s") from None
                except _Failure as failure:
                    delay = cfg.backoff_base * 2**attempt * (0.5 + random.random())
                    if not failure.transient or attempt >= cfg.retries or loop.time() + delay >= deadline:
                        if attempt:
                            failure.reason += f" (after {attempt + 1} attempts)"
                        raise
            await asyncio.sleep(delay)  # outside the slot: a backing-off fetch holds no slot
            attempt += 1

    @contextlib.asynccontextmanager
    async def _slot(self, host: str) -> AsyncIterator[None]:
        # Per-host first, then global: a task waiting on a busy host holds no global slot.
        sem, users = self._hosts.get(host) or (asyncio.Semaphore(self.config.per_host), 0)
        self._hosts[host] = (sem, users + 1)
        try:
            async with sem, self._global:
                yield
        finally:
            sem, users = self._hosts[host]
            if users <= 1:
                del self._hosts[host]
            else:
                self._hosts[host] = (sem, users - 1)

    async def _attempt(self, url: URL, deadline: float, result: MediaResult) -> _Body:
        """One pass over the redirect chain starting at `url`."""
        cfg = self.config
        assert self._session is not None
        loop = asyncio.get_running_loop()
        blocked: list[BlockedAddressError] = []
        token = _BLOCKED.set(blocked)
        try:
            for _hop in range(cfg.max_redirects + 1):
                result.final_url = str(url)
                blocked.clear()
                timeout = aiohttp.ClientTimeout(
                    total=max(0.001, deadline - loop.time()),
                    connect=cfg.connect_timeout,
                    sock_connect=cfg.connect_timeout,
                    sock_read=cfg.read_timeout,
                )
                try:
                    async with self._session.get(url, allow_redirects=False, timeout=timeout) as resp:
                        if resp.status in _REDIRECT_STATUSES:
                            url = _redirect_target(url, resp)
                            continue
                        return await self._read_body(resp, url)
                except _Failure:
                    raise
                except Exception as exc:
                    raise _map_error(exc, blocked, cfg) from exc
            raise _Failure("too_many_redirects", f"more than {cfg.max_redirects} redirects")
        finally:
            _BLOCKED.reset(token)

    async def _read_body(self, resp: aiohttp.ClientResponse, url: URL) -> _Body:
        cfg = self.config
        status = resp.status
        if not 200 <= status < 300 or status == 206:
            raise _Failure("http_error", f"HTTP {status}", transient=status in cfg.retry_statuses)
        ctype = resp.content_type.lower()  # application/octet-stream when the header is absent
        if not _type_matches(ctype, cfg.allowed_content_types) and not _type_matches(ctype, cfg.sniffed_content_types):
            raise _Failure("wrong_content_type", f"Content-Type {ctype} is not an image")
        if resp.content_length is not None and resp.content_length > cfg.max_bytes:
            raise _Failure("too_large", f"Content-Length {resp.content_length:,} is over {cfg.max_bytes:,} bytes")
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK):
            buf += chunk
            if len(buf) > cfg.max_bytes:
                # Leaving the `async with` closes the connection, dropping the rest unread.
                raise _Failure("too_large", f"body is over {cfg.max_bytes:,} bytes")
        return _Body(bytes(buf), ctype, url)

    def _check_type(self, body: _Body) -> None:
        """A body under a generic content type must sniff as an allowed image format. Checked on
        every response, never taken from the memo: it depends on the header, not the bytes alone."""
        data = body.data
        if (
            data
            and not _type_matches(body.content_type, self.config.allowed_content_types)
            and sniff_format(data) is None
        ):
            raise _Failure("wrong_content_type", f"Content-Type {body.content_type} and not an allowed image format")

    async def _decode(self, data: bytes, digest: str) -> tuple[Decoded, bool]:
        """(the decoded image and what was read from it, whether an earlier post's decode of the
        same bytes answered)."""
        loop = asyncio.get_running_loop()
        executor = self._executor

        async def decode() -> Decoded:
            return await loop.run_in_executor(executor, functools.partial(self._decode_sync, data, digest))

        try:
            return await self._memo.get_or_decode(digest, decode)
        except ImageError as exc:
            raise _Failure(exc.reason, str(exc)) from None

    def _decode_sync(self, data: bytes, digest: str) -> Decoded:
        return decode_and_read(data, digest, self.config, self.ocr)


class Decoded(NamedTuple):
    image: Image.Image
    text: str | None  # the text OCR read inside the image; None: OCR off or failed
    pdq: PdqHash | None  # with FetchConfig.pdq
    pdq_trimmed: PdqHash | None = None  # with FetchConfig.pdq, when the image has caption bars


def _decoded_bytes(decoded: Decoded) -> int:
    """What a memo entry holds: the pixels, the text and a little for the rest."""
    image = decoded.image
    return image.width * image.height * len(image.getbands()) + 4 * len(decoded.text or "") + 512


def decode_and_read(data: bytes, digest: str | None, cfg: FetchConfig, ocr: ImageTextReader | None) -> Decoded:
    """The decode pool's work for one image: decode it bounded to `cfg.max_side` (a JPEG at the
    DCT scale covering `cfg.min_side`) and, with
    `ocr`, read the text inside from a larger copy first; with `cfg.pdq`, hash it; then, with
    `cfg.model_side`, make it the model's input. Raises ImageError."""
    text = None
    if ocr is None:
        image = decode_image(data, max_pixels=cfg.max_pixels, max_side=cfg.max_side, min_side=cfg.min_side)
    else:
        image = decode_image(data, max_pixels=cfg.max_pixels, max_side=max(cfg.max_side, OCR_MAX_SIDE))
        text = ocr.read(image, digest)
        if sniff_format(data) == "JPEG" and cfg.min_side is not None:
            # A JPEG is decoded again at the DCT scale covering the model's input, so the model and
            # the banks see what a worker without OCR sees (the bank side hashes that decode: shrunk
            # from the OCR copy, PDQ moved up to ~10 bits). ~2 ms, next to OCR's tens.
            image = decode_image(data, max_pixels=cfg.max_pixels, max_side=cfg.max_side, min_side=cfg.min_side)
        else:
            image = bounded_rgb(image, cfg.max_side)  # the size and filter decode_image's own bound gives
    pdq = trimmed = None
    if cfg.pdq:
        pdq, *rest = query_hashes(image)
        trimmed = rest[0] if rest else None
    if cfg.model_side:
        image = model_input(image, cfg.model_side)
    return Decoded(image, text, pdq, trimmed)


def _parse_url(raw: str) -> URL:
    if len(raw) > _MAX_URL_LENGTH:
        raise _Failure("invalid_url", f"URL is longer than {_MAX_URL_LENGTH} characters")
    try:
        url = URL(raw.strip())
    except ValueError as exc:
        raise _Failure("invalid_url", f"cannot parse URL: {exc}") from None
    return _check_url(url)


def _check_url(url: URL) -> URL:
    if not url.scheme:
        raise _Failure("invalid_url", "URL has no scheme")
    if url.scheme.lower() not in _ALLOWED_SCHEMES:
        raise _Failure("blocked_scheme", f"scheme {url.scheme!r} is not http or https")
    if not url.host:
        raise _Failure("invalid_url", "URL has no host")
    return url.with_fragment(None)


def _redirect_target(current: URL, resp: aiohttp.ClientResponse) -> URL:
    location = resp.headers.get("Location")
    if not location:
        raise _Failure("http_error", f"HTTP {resp.status} redirect without Location")
    try:
        target = current.join(URL(location))
    except ValueError as exc:
        raise _Failure("invalid_url", f"bad redirect Location {location[:200]!r}: {exc}") from None
    return _check_url(target)


def _map_error(exc: Exception, blocked: list[BlockedAddressError], cfg: FetchConfig) -> _Failure:
    """Turn an aiohttp/OS exception from one request into a status (and whether to retry)."""
    if blocked and isinstance(exc, OSError):
        # The guard refused at least one address and nothing else connected. aiohappyeyeballs
        # merges several failures into a plain OSError, so the record, not the type, decides.
        return _Failure("blocked_address", "; ".join(str(b) for b in blocked))
    if isinstance(exc, aiohttp.InvalidURL):
        return _Failure("invalid_url", f"invalid URL: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return _Failure("dns_error", f"cannot resolve host: {exc.os_error}")
    if isinstance(exc, TimeoutError):  # includes aiohttp's ConnectionTimeoutError / SocketTimeoutError
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            what = f"connect timed out ({cfg.connect_timeout:g} s)"
        elif isinstance(exc, aiohttp.SocketTimeoutError):
            what = f"read stalled for {cfg.read_timeout:g} s"
        else:
            what = f"no complete response within {cfg.total_timeout:g} s"
        return _Failure("timeout", what, transient=True)
    if isinstance(exc, aiohttp.ClientSSLError):  # certificate or TLS failure: retrying won't help
        return _Failure("connect_error", f"TLS error: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _Failure("connect_error", f"cannot connect: {exc.os_error}", transient=True)
    if isinstance(exc, aiohttp.ClientResponseError):  # malformed status line or headers
        return _Failure("http_error", f"bad HTTP response: {exc.message}")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | aiohttp.ClientPayloadError):
        return _Failure("connect_error", f"connection lost: {exc}", transient=True)
    if isinstance(exc, aiohttp.ClientError):
        return _Failure("connect_error", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError):  # URL forms yarl accepts but aiohttp cannot send
        return _Failure("invalid_url", f"invalid URL: {exc}")
    raise exc  # anything else is a bug: let it surface

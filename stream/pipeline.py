"""The worker's stages as plain async functions over a micro-batch (no Kafka here).

    raw bytes ─► parse ─► fetch media ─► verdict banks ─► dedupe ─► classify (device pool) ─► route ─► Outcome

A violating-bank match ends a post's way at the banks (the banked human verdict, route
bank_match); a benign-bank match lets the model label it but never routes it for uncertainty.
A JPEG decoded on the device (`device_jpegs`) is matched once the PDQ its decode took comes back
with the model's result, by the same rule (only a violating exact match is taken before the
model); a violating match then drops the model's output.

Every input yields exactly one Outcome: a Label (plus one ReviewItem when routed to review or
picked for the blind audit, kind `audit` when both) or a DeadLetter naming the stage and the
reason. Nothing raises out of `process`, so the agent always reaches its sends before the
offsets are committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from PIL import Image

from models.card import ModelCard
from models.device_decode import DEVICE_MAX_PIXELS, EncodedJpeg
from models.images import DECODE_ERROR_REASONS
from models.inference import Prediction
from models.preprocess import PostText
from models.routing.route import RoutingPolicy, route_scores
from modstream.records import DeadLetter, Label, MediaInfo, Post, RecordError, ReviewItem, decode_json
from stream import metrics
from stream.audit_sampling import AuditSampler
from stream.bank_stage import Banks, banked_labels, look_up, match_record
from stream.banks.bank import BankMatch
from stream.banks.device_pdq import DeviceHashes
from stream.banks.hashing import PdqHash
from stream.evidence import EvidenceError, EvidenceStore
from stream.media_facts import FACTS_KEY, MediaFacts

log = logging.getLogger(__name__)


class Classifier(Protocol):
    """What the pipeline needs from the device pool."""

    @property
    def version(self) -> str: ...

    async def predict(
        self, texts: Sequence[str], images: Sequence[Image.Image | EncodedJpeg | None]
    ) -> list[Prediction | BaseException]: ...


class Fetcher(Protocol):
    """stream.media.MediaFetcher. With `decode=False` a result may come back `undecoded`; the
    pipeline then finishes it with `decode(result)` unless the dedupe cache answers for it. A
    fetcher without `decode_signature` is always asked to decode."""

    async def fetch_many(self, urls: Sequence[str], *, decode: bool = True) -> list[Any]: ...

    async def decode(self, result: Any) -> None: ...


class LabelCache(Protocol):
    """Dedupe store: label JSON by (model version, content key)."""

    async def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]: ...

    async def put_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None: ...


@dataclass
class Outcome:
    raw: bytes
    post: Post | None = None
    label: Label | None = None
    review: ReviewItem | None = None
    dead_letter: DeadLetter | None = None


@dataclass
class Pipeline:
    """`card_of(version)` returns the card of a model version the classifier has served.
    A label is routed with the card of the model that produced its scores: replicas swap
    models between device batches, so one micro-batch can hold posts of both versions."""

    classifier: Classifier
    fetcher: Fetcher | None
    card_of: Callable[[str], ModelCard]
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    cache: LabelCache | None = None
    # Where the bytes of routed posts' media are kept for reviewers and training (None: not kept,
    # as in `classify` and benchmarks without review).
    evidence: EvidenceStore | None = None
    # Blind audit sampling of every model-labelled post, routed or not (stream/audit_sampling.py);
    # None: no audit items.
    audit: AuditSampler | None = None
    # The verdict banks (stream/banks) matched before the model; None: no banks.
    banks: Banks | None = None
    # JPEGs the device may decode (models/device_decode.py: header checked, within its pixel
    # budget) go to the classifier undecoded, which decodes them on its GPU and, with the banks
    # on, takes their PDQ there (stream/banks/device_pdq.py); they are matched by it after the
    # model. Not where OCR reads the pixels: the worker's --device-decode decides.
    device_jpegs: bool = False
    _trusted: dict[str, bool] = field(default_factory=dict, init=False, repr=False)
    _namespaces: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _provenance: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)

    def cache_namespace(self, version: str) -> str:
        """The dedupe cache's key prefix for a model: its version plus a digest of its card.
        Version names repeat across registries (a fresh registry starts at v0001 again, and
        `make run` keeps Redis while its registry is new): keyed by the name alone, a new
        v0001 was served the labels another v0001 had cached."""
        if version not in self._namespaces:
            digest = hashlib.sha256(self.card_of(version).to_json().encode()).hexdigest()[:12]
            self._namespaces[version] = f"{version}-{digest}"
        return self._namespaces[version]

    def provenance(self, version: str) -> dict[str, Any]:
        if version not in self._provenance:
            self._provenance[version] = self.policy.provenance(self.card_of(version))
        return self._provenance[version]

    def itm_trusted(self, version: str) -> bool:
        if version not in self._trusted:
            self._trusted[version], _ = self.policy.itm_trusted(self.card_of(version))
        return self._trusted[version]

    async def process(self, raws: Sequence[bytes]) -> list[Outcome]:
        outcomes = [parse(raw) for raw in raws]
        posts = [o for o in outcomes if o.post is not None]
        if posts:
            try:
                await self._label(posts)
            except Exception as exc:  # a bug here must not skip the batch: dead-letter it
                log.exception("labelling failed for a batch of %d posts", len(posts))
                for o in posts:
                    if o.label is None and o.dead_letter is None:
                        o.dead_letter = DeadLetter.from_raw(
                            o.raw, "classify", f"internal error: {exc!r}", o.post.id if o.post else None
                        )
        for o in outcomes:  # the promise of this module, kept even against a bug above
            if o.label is None and o.dead_letter is None:
                post_id = o.post.id if o.post else None
                o.dead_letter = DeadLetter.from_raw(o.raw, "classify", "internal error: no outcome", post_id)
        return outcomes

    async def _label(self, outcomes: list[Outcome]) -> None:
        """Each post flows on its own (fetch -> dedupe -> classify), so posts whose media has
        arrived are classified while others still download; the device pool batches them."""
        # Cached labels are looked up under the version serving now; fresh results are stored
        # under the version that produced them (a swap may land between lookup and compute).
        serving = self.classifier.version
        # Posts of this batch with the same media and text share one computation.
        inflight: dict[str, asyncio.Future[dict[str, Any] | BaseException]] = {}
        fresh: list[tuple[str, dict[str, Any]]] = []

        async def one(outcome: Outcome, post: Post) -> None:
            # The future this post promised to duplicates of its content, until it resolves.
            owned: list[asyncio.Future[dict[str, Any] | BaseException]] = []
            try:
                await label_one(outcome, post, owned)
            except Exception as exc:  # one post's bug dead-letters that post alone
                log.exception("labelling post %s failed", post.id)
                outcome.label = outcome.review = None
                outcome.dead_letter = DeadLetter.from_raw(outcome.raw, "classify", f"internal error: {exc!r}", post.id)
                for future in owned:
                    if not future.done():  # duplicates waiting on this post fail with it
                        future.set_result(exc)
            finally:
                for future in owned:
                    if not future.done():  # cancelled mid-way: never leave a waiter behind
                        future.set_result(RuntimeError(f"labelling post {post.id} was interrupted"))

        async def label_one(
            outcome: Outcome, post: Post, owned: list[asyncio.Future[dict[str, Any] | BaseException]]
        ) -> None:
            started = time.perf_counter()
            media, peeked = await self._fetch_one(post, serving, inflight)
            fetched = time.perf_counter()
            # Only a decoded image is looked up: a failed fetch's hash names no picture anyone judged.
            match = None
            device_decoded = isinstance(media.image, EncodedJpeg) and media.pdq is None
            if device_decoded and self.banks is not None:
                # Its PDQ comes with the model's result: looked up then (_device_match), as a host
                # decode's would be now; only a violating exact match is taken before the model.
                exact = self.banks.match(media.content_hash, None)
                if exact is not None and exact.entry.bank == "violating":
                    match = look_up(self.banks, media.content_hash, None)
            elif media.decoded:
                match = look_up(self.banks, media.content_hash, media.pdq, media.pdq_trimmed)
            if match is not None and match.entry.bank == "violating":
                outcome.label = self._banked(post, media, match, serving, fetched - started)
                metrics.STAGE_SECONDS.labels("fetch").observe(fetched - started)
                return
            key = dedupe_key(post.text, media.content_hash)
            computed = False  # True only for the post that ran the model for this content
            if key not in inflight:
                inflight[key] = asyncio.get_running_loop().create_future()
                owned.append(inflight[key])
                # A post that asked the cache before decoding (_fetch_one) uses that answer.
                cached = peeked[0] if peeked is not None else (await self._cached(serving, [key]))[0]
                if cached is None:
                    computed = True
                    result = await self._classify(post, media)
                    if not isinstance(result, BaseException):
                        fresh.append((f"{self.cache_namespace(result['model_version'])}:{key}", result))
                else:
                    result = cached
                inflight[key].set_result(result)
            else:
                result = await inflight[key]
            metrics.STAGE_SECONDS.labels("fetch").observe(fetched - started)
            metrics.STAGE_SECONDS.labels("classify").observe(time.perf_counter() - fetched)
            if isinstance(result, BaseException):
                outcome.dead_letter = DeadLetter.from_raw(outcome.raw, "classify", repr(result), post.id)
                return
            if device_decoded and self.banks is not None:
                # Decoded on the device: its PDQ came back with the model's result (or the cache's).
                media, match, completed = await self._device_match(media, result)
                if completed and not computed:  # a cache entry without them: kept with them now
                    fresh.append((f"{self.cache_namespace(result['model_version'])}:{key}", result))
                if match is not None and match.entry.bank == "violating":
                    outcome.label = self._banked(post, media, match, serving, fetched - started)
                    return
            hit = not computed
            media_info = _with_media_error(media.info, result.get(MEDIA_ERROR_KEY))
            timings = {"fetch_s": round(fetched - started, 4), "classify_s": round(time.perf_counter() - fetched, 4)}
            version = result["model_version"]
            card = self.card_of(version)
            scores = {t: (v["score"], v["threshold"]) for t, v in result["labels"].items()}
            disagree = {t: v.get("neighbour_disagreement") for t, v in result["labels"].items()}
            decision = route_scores(result["itm_match"], scores, card, self.policy, self.itm_trusted(version), disagree)
            route, reasons = decision.route, decision.reasons
            if match is not None and route == "review":  # benign bank: already looked at, found fine
                metrics.BANK_KEPT_FROM_REVIEW.inc()
                route, reasons = "auto", []
            label = Label(
                post_id=post.id,
                labels=result["labels"],
                itm_match=result["itm_match"],
                route=route,
                reasons=reasons,
                media=media_info,
                model_version=version,
                timings=timings,
                dedupe_hit=hit,
                ocr_text=media.ocr_text,
                routing=self.provenance(version),
                bank=match_record(match) if match is not None else None,
            )
            if hit:
                metrics.DEDUPE_HITS.inc()
            outcome.label = label
            routed = label.route == "review"
            if routed:
                for reason in label.reasons:
                    metrics.REVIEW.labels(reason).inc()
            # The audit sample is drawn from every post the model labelled, before routing, so its
            # verdicts estimate the whole stream (routing takes the hardest posts: an audit of the
            # `auto` ones alone read the F1 of the easier rest). A picked post is reviewed once, as
            # `audit`, whether or not routing picked it too; its Label keeps the route it got.
            audited = self.audit is not None and self.audit.picks(post.id)
            if routed or audited:
                await self._keep_evidence(post, media)
            if audited:
                # The label stands as the model gave it (a routed one waits in review like any
                # routed post); a reviewer checks it blind.
                metrics.AUDIT_SAMPLED.labels(str(routed).lower()).inc()
                outcome.review = ReviewItem(
                    post.id,
                    post.text,
                    post.image_url,
                    ["audit"],
                    label.to_json(),
                    tasks=dict(card.tasks),
                    kind="audit",
                    routed_by_policy=routed,
                )
            elif routed:
                outcome.review = ReviewItem(
                    post.id,
                    post.text,
                    post.image_url,
                    label.reasons,
                    label.to_json(),
                    tasks=dict(card.tasks),
                    routed_by_policy=True,
                )

        pairs = [(o, o.post) for o in outcomes if o.post is not None]
        # one() handles its own errors; return_exceptions is the backstop that keeps every
        # other post running to completion, so no task outlives `process`.
        results = await asyncio.gather(*(one(o, p) for o, p in pairs), return_exceptions=True)
        for (o, p), result in zip(pairs, results, strict=True):
            if isinstance(result, BaseException) and o.dead_letter is None:
                o.label = o.review = None
                o.dead_letter = DeadLetter.from_raw(o.raw, "classify", f"internal error: {result!r}", p.id)
        await self._remember(fresh)

    def _banked(self, post: Post, media: FetchedMedia, match: BankMatch, serving: str, fetch_s: float) -> Label:
        """The Label of a violating-bank match: the banked verdict, no model output."""
        card = self.card_of(serving)
        return Label(
            post_id=post.id,
            labels=banked_labels(match.entry, dict(card.tasks)),
            itm_match=None,
            route="bank_match",
            reasons=["bank_match"],
            media=media.info,
            model_version=serving,
            timings={"fetch_s": round(fetch_s, 4)},
            bank=match_record(match),
        )

    async def _device_match(
        self, media: FetchedMedia, result: dict[str, Any]
    ) -> tuple[FetchedMedia, BankMatch | None, bool]:
        """A device-decoded image's bank match, by the same rule and call as a host-decoded
        image's (stream.bank_stage.look_up: its content hash, its PDQ, its PDQ without caption
        bars), with the PDQ its decode took on the device (stream/banks/device_pdq.py, kept in the
        result's media facts); `media` with them; and whether they had to be added to `result`.
        The model has run by then: a violating match still wins, its output is dropped.

        A result without them (a dedupe entry written by a worker without banks or under another
        signature, a device hash that failed, a forged entry) is not trusted to have no match: the
        JPEG is hashed on the host, as a host decode would have, and the facts put in the result."""
        assert isinstance(media.image, EncodedJpeg)
        facts = MediaFacts.from_cached(result, self._facts_signature())
        completed = False
        if facts is None or facts.pdq is None:
            metrics.DEVICE_PDQ_ON_HOST.inc()
            facts = await self._host_facts(media.image.data, media.content_hash)
            if facts is None:  # the host cannot decode what the device did: nothing to hash
                return media, look_up(self.banks, media.content_hash, None), False
            result[FACTS_KEY] = facts.to_json()
            completed = True
        pdq = facts.pdq
        assert pdq is not None  # both ways above give one
        info = replace(media.info, pdq=pdq.hex, pdq_quality=pdq.quality)
        media = replace(media, info=info, pdq=pdq, pdq_trimmed=facts.pdq_trimmed)
        return media, look_up(self.banks, media.content_hash, pdq, facts.pdq_trimmed), completed

    async def _host_facts(self, data: bytes, content_hash: str | None) -> MediaFacts | None:
        """The PDQ facts of a JPEG as the host's decode takes them, on the fetcher's decode pool
        and through its memo; None when the host cannot decode it."""
        from models.images import ImageError

        decode_bytes = getattr(self.fetcher, "decode_bytes", None)
        if decode_bytes is None or content_hash is None:
            return None
        try:
            decoded = await decode_bytes(data, content_hash)
        except ImageError:
            return None
        if decoded.pdq is None:  # a fetcher that does not hash (banks off): nothing to match
            return None
        return MediaFacts(self._facts_signature(), decoded.pdq, decoded.pdq_trimmed)

    async def _classify(self, post: Post, media: FetchedMedia) -> dict[str, Any] | BaseException:
        """The model's outputs (what the dedupe cache shares between posts), or the error."""
        # The OCR text rides on the text; the predictor feeds it only to a model trained with it.
        text = post.text if media.ocr_text is None else PostText(post.text, media.ocr_text)
        (prediction,) = await self.classifier.predict([text], [media.image])
        if isinstance(prediction, BaseException):
            return prediction
        if prediction.itm_match is not None:
            metrics.ITM_SCORE.observe(prediction.itm_match)
        result: dict[str, Any] = {
            "labels": {t: {k: v for k, v in p.to_dict().items() if k != "probs"} for t, p in prediction.tasks.items()},
            "itm_match": prediction.itm_match,
            "model_version": prediction.model_version,
        }
        if isinstance(media.image, EncodedJpeg):
            failed = prediction.image_error
            metrics.DEVICE_DECODED.labels("ok" if failed is None else "failed").inc()
            if failed is not None:  # scored on its text alone; a repost from the cache says so too
                result[MEDIA_ERROR_KEY] = {"status": failed.reason, "reason": str(failed)}
            found = prediction.image_found
            if isinstance(found, DeviceHashes):
                # The PDQ its decode took on the device, at the host decode's size: a repost from
                # the cache, in any worker, is matched by it. No image text: OCR reads host pixels.
                result[FACTS_KEY] = MediaFacts(self._facts_signature(), found.pdq, found.pdq_trimmed).to_json()
            return result
        if media.info.status in IMAGE_ERROR_CODES:
            # Kept for a worker that decodes on its GPU: a cache hit there never decoded the bytes,
            # and must not call "ok" an image this one could not decode.
            result[MEDIA_ERROR_KEY] = {"status": media.info.status, "reason": media.info.reason or ""}
        signature = self._decode_signature()
        if media.image is not None and signature is not None:
            # for the reposts that will be labelled from the cache without decoding (stream/media_facts.py)
            result[FACTS_KEY] = MediaFacts(signature, media.pdq, media.pdq_trimmed, media.ocr_text).to_json()
        return result

    def _device_max_pixels(self) -> int:
        """The largest JPEG the device decodes: its own budget, or the fetcher's if lower."""
        config = getattr(self.fetcher, "config", None)
        return min(DEVICE_MAX_PIXELS, getattr(config, "max_pixels", DEVICE_MAX_PIXELS))

    def _decode_signature(self) -> str | None:
        signature = getattr(self.fetcher, "decode_signature", None)
        return signature if isinstance(signature, str) else None

    def _facts_signature(self) -> str:
        """The signature a device decode's facts are kept under: the host decode's, whose size it
        hashes at (a fetcher without one: a fixed stand-in, read back only by this pipeline)."""
        return self._decode_signature() or "device"

    async def _fetch_one(
        self, post: Post, serving: str, inflight: dict[str, Any]
    ) -> tuple[FetchedMedia, tuple[dict[str, Any] | None] | None]:
        """The post's media, and the dedupe cache's answer for it when it was asked on the way
        (None when not: the caller asks if it needs to).

        With a dedupe cache, the image is downloaded and hashed first, and the post that would run
        the model for that text and those bytes asks the cache before decoding: an entry that
        carries the decode's facts (PDQ, image text) answers everything a decode would, so the
        bytes are never decoded. Any other post decodes (through the memo, which shares the
        decode of posts of the same bytes)."""
        url = post.image_url
        if not url:
            return FetchedMedia(MediaInfo("none")), None
        if self.fetcher is None:
            return FetchedMedia(MediaInfo("fetch_disabled", url=url)), None
        signature = self._decode_signature() if self.cache is not None else None
        lazy = signature is not None or self.device_jpegs
        (result,) = await (self.fetcher.fetch_many([url], decode=False) if lazy else self.fetcher.fetch_many([url]))
        peeked: tuple[dict[str, Any] | None] | None = None
        facts = None
        encoded: EncodedJpeg | None = None
        if getattr(result, "undecoded", False):
            key = dedupe_key(post.text, result.content_hash)
            if key not in inflight and signature is not None:
                peeked = ((await self._cached(serving, [key]))[0],)
                facts = MediaFacts.from_cached(peeked[0], signature)
            if facts is not None:
                metrics.DECODE_SKIPPED.inc()
            elif self.device_jpegs and result.body is not None:
                encoded = EncodedJpeg.of(result.body, self._device_max_pixels())  # decoded on the GPU with its batch
            if facts is None and encoded is None:
                await self.fetcher.decode(result)
        metrics.MEDIA.labels(result.status).inc()
        if getattr(result, "decoded_before", False):
            metrics.DECODE_MEMO_HITS.inc()
        if facts is not None:
            result.pdq, result.pdq_trimmed, result.ocr_text = facts.pdq, facts.pdq_trimmed, facts.ocr_text
        pdq: PdqHash | None = getattr(result, "pdq", None)
        info = MediaInfo(
            result.status,
            url=url,
            content_hash=result.content_hash,
            reason=result.reason or None,
            pdq=pdq.hex if pdq is not None else None,
            pdq_quality=pdq.quality if pdq is not None else None,
        )
        ok = result.status == "ok"
        if not ok:
            return FetchedMedia(info), peeked
        body = getattr(result, "body", None) if self.evidence is not None else None
        trimmed = getattr(result, "pdq_trimmed", None)
        image = encoded if encoded is not None else result.image
        decoded = image is not None or facts is not None
        return FetchedMedia(info, image, getattr(result, "ocr_text", None), body, pdq, trimmed, decoded), peeked

    async def _keep_evidence(self, post: Post, media: FetchedMedia) -> None:
        """Store the scored bytes before the review item can be sent. A store that fails costs
        the reviewer the image ("media unavailable"), never the post: it is still labelled and
        still reviewed on its text, and the failure is counted (alert WorkerEvidenceFailing)."""
        if self.evidence is None or media.body is None or media.content_hash is None:
            return
        try:
            stored = await self.evidence.put(media.content_hash, media.body)
        except (EvidenceError, ValueError) as exc:
            log.warning("post %s: scored media not kept as evidence: %s", post.id, exc)
            metrics.EVIDENCE.labels("failed").inc()
            return
        metrics.EVIDENCE.labels("stored" if stored else "present").inc()

    async def _cached(self, version: str, keys: list[str]) -> list[dict[str, Any] | None]:
        if self.cache is None:
            return [None] * len(keys)
        try:
            namespace = self.cache_namespace(version)
            return await self.cache.get_many([f"{namespace}:{k}" for k in keys])
        except Exception as exc:  # dedupe is an optimisation: without Redis, classify everything
            log.warning("dedupe lookup failed, classifying without it: %r", exc)
            metrics.DEPENDENCY_ERRORS.labels("redis", "dedupe_get").inc()
            return [None] * len(keys)

    async def _remember(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        """`items`: ("<cache namespace>:<dedupe key>", result)."""
        if self.cache is None or not items:
            return
        try:
            await self.cache.put_many(items)
        except Exception as exc:
            log.warning("dedupe store failed: %r", exc)
            metrics.DEPENDENCY_ERRORS.labels("redis", "dedupe_put").inc()


@dataclass
class FetchedMedia:
    info: MediaInfo
    image: Image.Image | EncodedJpeg | None = None  # EncodedJpeg: decoded by the classifier, on its GPU
    ocr_text: str | None = None
    body: bytes | None = None  # the fetched bytes, kept only while an evidence store wants them
    pdq: PdqHash | None = None  # the image's perceptual hash, when the fetcher takes it
    pdq_trimmed: PdqHash | None = None  # ... without its caption bars, when it has any
    # The image decoded fine, now or before: `image` is None when the dedupe cache's facts
    # answered instead (stream/media_facts.py), and then the post never runs the model.
    decoded: bool = False

    @property
    def content_hash(self) -> str | None:
        return self.info.content_hash


# An image that could not be decoded (on the host, or a device-decoded JPEG neither the GPU nor
# the host could): its status and reason, kept with the model's result, so a repost labelled
# from the dedupe cache says the same whichever worker labels it.
MEDIA_ERROR_KEY = "media_error"
IMAGE_ERROR_CODES = frozenset(DECODE_ERROR_REASONS)


def _with_media_error(info: MediaInfo, error: object) -> MediaInfo:
    """`info` with the decode failure the classifier reported, if any. Read from the dedupe
    cache too, so only a well-formed one of the known codes is taken."""
    if not isinstance(error, dict):
        return info
    status, reason = error.get("status"), error.get("reason")
    if status not in IMAGE_ERROR_CODES or not isinstance(reason, str):
        return info
    return replace(info, status=status, reason=reason[:500])


def parse(raw: bytes) -> Outcome:
    """One Outcome per input whatever its bytes: a Post, or a dead letter at stage parse.
    Anything the parser raises counts (a RecursionError from a nested post once escaped a
    narrower `except` and crashed the agent past its ack, losing the whole micro-batch).
    The bytes are decoded once; a record that fails its schema still names its id."""
    obj: dict[str, Any] | None = None
    try:
        obj = decode_json(raw)
        return Outcome(raw, post=Post.from_json(obj))
    except RecordError as exc:
        reason = str(exc)
    except Exception as exc:
        log.exception("parsing a post failed unexpectedly")
        reason = f"internal error: {exc!r}"
    value = obj.get("id") if obj is not None else None
    post_id = value if isinstance(value, str) and value.strip() else None
    return Outcome(raw, dead_letter=DeadLetter.from_raw(raw, "parse", reason, post_id))


def dedupe_key(text: str, content_hash: str | None) -> str:
    """Same media bytes and same text -> same label. Text-only posts dedupe on text."""
    return hashlib.sha256(f"{content_hash or '-'}\0{text}".encode()).hexdigest()


def count_finished(outcomes: Sequence[Outcome]) -> None:
    """Posts finished, once their outputs are on the broker (a label the broker refused
    becomes a dead letter at stage sink, so counting before the sends would count it twice)."""
    for o in outcomes:
        letter = o.dead_letter
        if letter is not None:
            metrics.POSTS.labels("dead_letter").inc()
            metrics.DLQ.labels(letter.stage, metrics.dead_letter_reason(letter.stage, letter.reason)).inc()
        elif o.label is not None:
            metrics.POSTS.labels(o.label.route).inc()

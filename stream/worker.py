"""The Faust worker: posts in; labels, review items and dead letters out.

One agent at concurrency 1 (faust-streaming #606: higher concurrency can commit past an
unfinished message) takes micro-batches. The body never lets an exception escape, because
faust acks the batch in a `finally` after the body: a crash there would skip posts. Every
send is forced (not attached to the event) and awaited, so outputs are on the broker before
the offsets they answer are acked and committed. Sinks are keyed by post id, so a
redelivered batch (crash, rebalance) rewrites the same keys with the same content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.card import ModelCard
from models.device_decode import self_test
from models.inference import Predictor
from models.registry import ModelRegistry
from models.routing.route import RoutingPolicy
from modstream.kafka_auth import client_options, kafka_auth
from modstream.records import MAX_RECORD_BYTES, ModelUpdate
from stream import first_fetch_grace, metrics
from stream.audit_sampling import AuditSampler
from stream.bank_topic import BankFollower
from stream.banks.bank import VerdictBanks
from stream.banks.device_pdq import DevicePdq
from stream.delivery import dead_letter_batch, write_outcomes
from stream.device_pool import BatcherConfig, DevicePool, visible_devices
from stream.evidence import EvidenceStore, open_store
from stream.lag import LagMonitor
from stream.pipeline import Pipeline
from stream.redis_store import RedisStore

if TYPE_CHECKING:
    from stream.media import FetchConfig

log = logging.getLogger(__name__)


@dataclass
class WorkerSettings:
    bootstrap: str = "127.0.0.1:19092"
    redis_url: str | None = "redis://127.0.0.1:16379/0"
    registry: Path = Path("var/registry")
    model_version: str = "current"
    app_id: str = "modstream-worker"
    web_host: str = "127.0.0.1"  # 0.0.0.0 in a container, so Prometheus and probes can reach it
    web_port: int = 6066
    max_batch: int = 64
    max_wait_s: float = 0.05
    devices: str = "auto"
    allow_loopback_media: bool = False
    # The evidence store (stream/evidence.py: a folder or s3://bucket/prefix) that keeps the
    # bytes of every routed post's image; None keeps nothing (reviewers then see "media unavailable").
    evidence: str | None = None
    # Share of model-labelled posts (routed or not) that go to review, blind, to measure the live model (0: none).
    audit_rate: float = 0.0
    decode_threads: int = 0  # the media fetcher's decode threads; 0 keeps FetchConfig's default
    # Opt-in: the decode threads make each image the model's input (FetchConfig.model_side).
    # Batch preparation then costs 0.2x the CPU per post; a repost of bytes still in the decode
    # memo pays nothing, one that is not pays the resize too (BENCHMARKS). Meant for GPU workers.
    decode_model_input: bool = False
    # JPEGs decoded on the GPU with their batch (models/device_decode.py): "auto" with one GPU
    # per process whose self-test passes, unless OCR needs the pixels on the host (the banks'
    # PDQ is taken on the device too: stream/banks/device_pdq.py);
    # "on" on any one device (on a CPU it only moves the decode into the batch: tests); "off"
    # never. `Resources._device_jpegs` decides.
    device_decode: str = "auto"
    decode_memo_mib: int = 128  # FetchConfig.decode_memo_bytes, in MiB (0: off)
    # Bench only (bench/feed_throughput.py): serve models/stand_in.py's StandInPredictor, which
    # answers without a forward, to measure the feed's CPU per post with the model taken out.
    stand_in_model: bool = False
    # Verdict banks (stream/banks): images hashed and matched before the model; the banks are
    # read from the bank-updates topic (at start, up to `bank_load_timeout_s`, then followed).
    banks: bool = True
    bank_distance: int = 31
    bank_load_timeout_s: float = 120.0
    # Text inside images (stream.ocr): auto = when the model was trained with it, on, off.
    ocr: str = "auto"
    topic_partitions: int = 4
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    send_retry_s: float = 1.0
    # SIGTERM to exit, whatever the worker waits on; under Kubernetes' default grace of 30 s.
    stop_grace_s: float = 20.0
    lag_interval_s: float = 5.0  # how often the group's consumer lag is read from the broker
    topics: dict[str, str] = field(
        default_factory=lambda: {
            "posts": "posts",
            "labels": "labels",
            "review": "review",
            "dlq": "posts.dlq",
            "updates": "model-updates",
            "banks": "bank-updates",
        }
    )


def predictor_factory(
    registry: ModelRegistry, version: str, *, stand_in: bool = False, device_hashes: bool = False
) -> Any:
    """`device_hashes`: each predictor takes the banks' PDQ of the JPEGs it decodes on its device
    (stream/banks/device_pdq.py); only used when the pipeline hands JPEGs over undecoded."""
    loaded_version = registry.resolve(version)
    kind = Predictor
    if stand_in:
        from models.stand_in import StandInPredictor

        kind = StandInPredictor

    def build(device: Any) -> Predictor:
        loaded = registry.load(loaded_version)
        autocast = None
        if device.type == "cuda":
            import torch

            autocast = torch.bfloat16
        hook = DevicePdq() if device_hashes else None
        return kind(loaded.model, loaded.tokenizer, loaded.card, device, autocast, image_hook=hook)

    return build


def _decode_for(card: ModelCard, base: FetchConfig, model_input: bool) -> FetchConfig:
    """`base` with the decode pool's image sizes for this model: bounded to twice its input
    side (memory per post), a JPEG decoded at the DCT scale covering its input and, with
    `model_input`, made its square input by the decode threads, so the device pool's batch
    preparation only copies pixels."""
    side = card.config.image_size
    return replace(base, max_side=2 * side, min_side=side, model_side=side if model_input else None)


class Resources:
    """Everything the agent needs, started once the worker runs (not at import)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.registry)
        self.ready = asyncio.Event()
        self.pool: DevicePool | None = None
        self.redis: RedisStore | None = None
        self.fetcher: Any = None
        self.pipeline: Pipeline | None = None
        self.evidence: EvidenceStore | None = None
        self.banks: VerdictBanks | None = None
        self._bank_task: asyncio.Task[None] | None = None
        self.bank_follower: BankFollower | None = None
        self.card: ModelCard | None = None  # the card of the version being served now
        self.cards: dict[str, ModelCard] = {}  # every version served, for routing its labels

    async def start(self) -> None:
        from stream.media import FetchConfig, MediaFetcher
        from stream.ocr import reader_for

        s = self.settings
        self.card = self.registry.card(s.model_version)
        self.cards[self.card.version] = self.card
        # Before any model loads: a model trained with OCR text and no Tesseract fails here, saying what to install.
        ocr = reader_for(s.ocr, self.card.config)
        self.pool = DevicePool(
            predictor_factory(self.registry, s.model_version, stand_in=s.stand_in_model, device_hashes=s.banks),
            visible_devices(s.devices),
            s.batcher,
            on_batch=self._observe_device_batch,
        )
        await self.pool.start()
        fetch = _decode_for(
            self.card, FetchConfig(allow_loopback=s.allow_loopback_media, pdq=s.banks), s.decode_model_input
        )
        if s.decode_threads > 0:
            fetch = replace(fetch, decode_workers=s.decode_threads)
        fetch = replace(fetch, decode_memo_bytes=s.decode_memo_mib * 1024 * 1024)
        self.fetcher = MediaFetcher(fetch, ocr=ocr)
        await self.fetcher.__aenter__()
        if s.redis_url:
            self.redis = RedisStore(s.redis_url)
        metrics.register_gpu_collector(visible_devices(s.devices))
        classifier = metrics.InstrumentedClassifier(self.pool)
        if s.evidence:
            self.evidence = open_store(s.evidence)
            log.warning("keeping the scored media of routed posts in %s", self.evidence.description)
        audit = None
        if s.audit_rate > 0:
            from modstream.settings import current

            key = current().audit_key
            audit = AuditSampler(s.audit_rate, key.get_secret_value() if key is not None else None)
        if s.banks:
            from stream.banks.hashing import check_host_pdq

            check_host_pdq()
            await self._load_banks()
        else:
            metrics.BANK_LOADED.set(float("nan"))  # not "not loaded": no ModstreamBankNotLoaded
        self.pipeline = Pipeline(
            classifier,
            self.fetcher,
            self.card_of,
            s.policy,
            self.redis,
            self.evidence,
            audit,
            banks=self.banks,
            device_jpegs=self._device_jpegs(),
        )
        self._announce()
        self.ready.set()
        metrics.READY.set(1)

    async def _load_banks(self) -> None:
        """Reads the bank-updates topic to its end before the first post is labelled (a repost of
        a banked image must not reach the model because this worker started a moment ago), then
        keeps following it. A topic that cannot be read in time does not stop the worker: it
        labels with what it has, says so, and /metrics shows modstream_bank_loaded 0."""
        s = self.settings
        self.banks = VerdictBanks(max_distance=s.bank_distance)
        follower = self.bank_follower = BankFollower(s.bootstrap, self.banks, s.topics["banks"])
        self._bank_task = asyncio.create_task(follower.run(), name="bank-updates")
        try:
            await asyncio.wait_for(follower.loaded.wait(), s.bank_load_timeout_s)
        except TimeoutError:
            log.error(
                "the verdict banks did not load within %.0f s (%d entries so far); labelling without the rest",
                s.bank_load_timeout_s,
                len(self.banks),
            )

    @property
    def healthy(self) -> bool:
        """Started, and the device pool serves (a dead or hung replica fails /ready until rebuilt)."""
        return self.ready.is_set() and self.pool is not None and self.pool.healthy

    def _observe_device_batch(self, size: int, seconds: float) -> None:
        # Replicas swap between batches, so a batch right at a swap may count under the old version.
        metrics.observe_device_batch(self.card.version if self.card else "unknown", size, seconds)

    def card_of(self, version: str) -> ModelCard:
        if version not in self.cards:
            self.cards[version] = self.registry.card(version)
        return self.cards[version]

    def _announce(self) -> None:
        assert self.card is not None
        policy = self.settings.policy
        metrics.MODEL.info({"version": self.card.version})
        from stream.media import ERROR_CODES

        metrics.create_version_series(self.card.version, list(self.card.tasks), ("ok", "none", *ERROR_CODES))
        metrics.ITM_ROUTING.set(1 if policy.itm_routes(self.card) else 0)
        for task, f1 in (self.card.metrics.get("macro_f1") or {}).items():
            if isinstance(f1, int | float):
                metrics.CARD_F1.labels(self.card.version, task).set(float(f1))
        log.warning("serving model %s; %s", self.card.version, policy.describe(self.card))

    async def swap(self, version: str) -> None:
        assert self.pool is not None
        card = self.registry.card(version)
        if self.card is not None and card.version == self.card.version:
            return
        if card.config.ocr_segment and self.fetcher is not None and self.fetcher.ocr is None:
            from stream.ocr import reader_for

            # Refuses the swap (OcrUnavailable) when this worker cannot read image text.
            self.fetcher.ocr = reader_for(self.settings.ocr, card.config)
        # Known before the first label of the new version can come back from a replica.
        self.cards[card.version] = card
        if self.pipeline is not None and card.config.ocr_segment:
            # Before the swap: no JPEG may reach a model that reads image text without its text.
            self.pipeline.device_jpegs = False
        s = self.settings
        await self.pool.swap(
            predictor_factory(self.registry, card.version, stand_in=s.stand_in_model, device_hashes=s.banks)
        )
        if self.fetcher is not None:
            # Images decoded from now on fit the new model; the few in flight are resized again
            # by its preprocessor (right shape, a little softer).
            self.fetcher.reconfigure(_decode_for(card, self.fetcher.config, self.settings.decode_model_input))
        self.card = card
        self._announce()

    def _device_jpegs(self, needs_ocr: bool = False) -> bool:
        """Whether JPEGs go to the device pool undecoded (Pipeline.device_jpegs): not where OCR
        reads the pixels on the host (or `needs_ocr`: a model swapping in; the banks' PDQ is taken
        on the device, stream/banks/device_pdq.py), and
        with one device per process only (torchvision keeps one nvJPEG decoder per process and
        rebuilds it, leaking the old one, whenever the device changes). Auto also wants that
        device to be a GPU and its decode to pass `self_test`."""
        s = self.settings
        if s.device_decode == "off":
            return False
        ocr = needs_ocr or (self.fetcher is not None and self.fetcher.ocr is not None)
        devices = visible_devices(s.devices)
        why = None
        if ocr:
            why = "OCR reads the pixels on the host"
        elif len(devices) != 1:
            why = f"{len(devices)} devices in one process (run one process per GPU: --processes, --device)"
        elif s.device_decode == "auto" and devices[0].type != "cuda":
            return False
        else:
            why = self_test(devices[0])
        if why is not None:
            if s.device_decode == "on" or devices[0].type == "cuda":
                log.warning("JPEGs decode on the host, not the device: %s", why)
            return False
        log.warning("JPEGs decode on %s with their batch (--device-decode %s)", devices[0], s.device_decode)
        return True

    async def close(self) -> None:
        if self._bank_task is not None:
            self._bank_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._bank_task
        if self.pool:
            await self.pool.close()
        if self.fetcher:
            await self.fetcher.close()
        if self.redis:
            await self.redis.close()
        if self.evidence:
            self.evidence.close()


async def label_batch(pipeline: Pipeline, topics: dict[str, Any], raws: list[bytes], retry_s: float) -> None:
    """The agent's body. Nothing may escape it: faust acks the batch in a `finally` after the
    body, so an exception here skipped every post of the batch without a trace (a 10,000-deep
    post took 10 valid ones with it). process() turns every failure into a dead letter; this
    catches what a bug would still let through, and as a last resort logs what it cannot write."""
    try:
        outcomes = await pipeline.process(raws)
    except Exception as exc:
        log.exception("processing a batch of %d posts failed; dead-lettering them", len(raws))
        outcomes = dead_letter_batch(raws, exc)
    try:
        await write_outcomes(topics, outcomes, retry_s)
    except Exception as exc:
        log.exception("writing the outcomes of %d posts failed; dead-lettering them", len(raws))
        try:
            await write_outcomes(topics, dead_letter_batch(raws, exc), retry_s)
        except Exception:
            log.critical("%d posts are lost: not even their dead letters could be written", len(raws), exc_info=True)
            metrics.POSTS.labels("lost").inc(len(raws))


def create_app(settings: WorkerSettings) -> tuple[faust.App, Resources]:
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        web_host=settings.web_host,
        web_port=settings.web_port,
        topic_partitions=settings.topic_partitions,
        topic_allow_declare=False,  # the stack script creates topics with their partition counts
        producer_acks=-1,
        broker_commit_every=settings.max_batch,
        broker_commit_interval=1.0,
        # Every record we write is capped under this (modstream.records.MAX_RECORD_BYTES); one
        # over it is refused at once instead of retried.
        producer_max_request_size=MAX_RECORD_BYTES + 64 * 1024,
        broker_credentials=kafka_auth().faust_credentials(),  # None on the plaintext local stack
    )
    resources = Resources(settings)
    names = settings.topics
    topics = {key: app.topic(name, value_serializer="raw", key_serializer="raw") for key, name in names.items()}

    @app.task
    async def start_resources() -> None:
        await resources.start()

    @app.agent(topics["posts"], concurrency=1)
    async def label_posts(stream: Any) -> None:
        async for values in stream.take(settings.max_batch, within=settings.max_wait_s):
            await resources.ready.wait()
            assert resources.pipeline is not None
            started = time.perf_counter()
            metrics.BATCH_SIZE.labels("agent").observe(len(values))
            await label_batch(resources.pipeline, topics, [bytes(v) for v in values], settings.send_retry_s)
            metrics.STAGE_SECONDS.labels("batch").observe(time.perf_counter() - started)

    @app.task
    async def measure_consumer_lag() -> None:
        # The worker's own group on `posts`, from the broker: rises even while agents stall.
        monitor = LagMonitor(
            settings.bootstrap,
            settings.app_id,
            [names["posts"]],
            metrics.CONSUMER_LAG,
            metrics.CONSUMER_TOPIC_LAG,
            metrics.DEPENDENCY_ERRORS,
            interval_s=settings.lag_interval_s,
        )
        await monitor.run()

    @app.task
    async def follow_model_updates() -> None:
        await follow_updates(settings, resources)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside content_type; the exposition format is UTF-8 anyway.
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4")

    @app.page("/ready")
    async def ready_page(web: Any, request: Any) -> Any:
        ok = resources.healthy
        body: dict[str, Any] = {"ready": ok, "model": resources.card.version if resources.card else None}
        if resources.banks is not None:
            body["banks"] = {
                "loaded": resources.bank_follower is not None and resources.bank_follower.loaded.is_set(),
                "entries": resources.banks.sizes(),
                "version": resources.banks.version,
            }
        if resources.pool is not None and not ok:
            body["problem"] = resources.pool.failure
        return web.json(body, status=200 if ok else 503)

    return app, resources


async def follow_current(settings: WorkerSettings, resources: Resources, update: ModelUpdate | None = None) -> None:
    """Serve the registry's CURRENT. An update message only says "look again": the version it
    names may be older than CURRENT (updates from two retrain runs, or a rollback published
    after a newer promotion), so the registry, not the message, decides; an older update
    never replaces a newer model. Called once the subscription's positions are fixed too: an
    update published before this worker subscribed is not delivered to it ("latest"), but
    CURRENT moved before it was published."""
    if settings.model_version != "current":
        if update is not None:
            log.warning("pinned to %s: ignoring the update to %s", settings.model_version, update.version)
        return
    current = resources.registry.current()
    if update is not None and update.version != current:
        log.warning("the update names %s but CURRENT is %s: following CURRENT", update.version, current)
    if current is not None and resources.card is not None and current != resources.card.version:
        log.warning("switching to the registry's CURRENT, %s", current)
        await resources.swap(current)


async def _fix_positions(consumer: Any, timeout_s: float = 30.0) -> None:
    """Waits for the partition assignment and resolves each start position ("latest") now,
    so that every update published from here on is delivered, before CURRENT is re-read."""
    deadline = time.monotonic() + timeout_s
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise TimeoutError("no partitions of the model-updates topic were assigned")
        await asyncio.sleep(0.1)
    for tp in consumer.assignment():
        await consumer.position(tp)


async def follow_updates(settings: WorkerSettings, resources: Resources) -> None:
    """Every worker must see every model update, so this reads `model-updates` with no
    consumer group (a shared group would hand each message to one worker only)."""
    from aiokafka import AIOKafkaConsumer

    await resources.ready.wait()
    while True:  # an app task that raises would crash the whole worker: retry instead
        # Subscribing without a group assigns every partition; "latest": only new updates.
        consumer = AIOKafkaConsumer(
            settings.topics["updates"],
            bootstrap_servers=settings.bootstrap,
            group_id=None,
            auto_offset_reset="latest",
            **client_options(),
        )
        try:
            await consumer.start()
            await _fix_positions(consumer)
            await follow_current(settings, resources)
            async for message in consumer:
                try:
                    await follow_current(settings, resources, ModelUpdate.from_json(message.value or b""))
                except Exception as exc:  # a bad update must not stop the worker
                    log.error("ignoring model update %r: %r", (message.value or b"")[:200], exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("model-updates consumer failed (%r); reconnecting", exc)
            await asyncio.sleep(2)
        finally:
            await consumer.stop()


class _Worker(faust.Worker):
    """faust's worker, with a deadline on shutdown. faust stops gracefully: it waits for the
    agent's current batch, which may be waiting on a broker that never answers; a worker
    stalled that way ignored SIGTERM for about 30 s. After `grace_s` the process exits at
    once. That is safe: offsets are committed only for batches whose outputs the broker
    has acked, so whatever was unfinished is delivered again to the next member."""

    def __init__(self, app: faust.App, *, grace_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.grace_s = grace_s

    def _schedule_shutdown(self, signal: Any) -> None:
        if not self._signal_stop_time and self.grace_s > 0:
            timer = threading.Timer(self.grace_s, self._exit_now, args=(signal,))
            timer.daemon = True
            timer.start()
        super()._schedule_shutdown(signal)

    def _exit_now(self, signal: Any) -> None:
        log.warning("still stopping %.0f s after %s: exiting now", self.grace_s, getattr(signal, "name", signal))
        logging.shutdown()
        os._exit(0)


def run_worker(settings: WorkerSettings, loglevel: str = "warning") -> None:
    app, _ = create_app(settings)
    first_fetch_grace.install()  # a rebalance's harmless "has not sent fetch request" is a WARNING
    # Resources live as long as the process: a worker ends by exiting (or by SIGKILL, which
    # the at-least-once design tolerates), so there is nothing to flush at shutdown.
    _Worker(app, grace_s=settings.stop_grace_s, loglevel=loglevel, quiet=True).execute_from_commandline()

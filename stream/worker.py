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
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.card import ModelCard
from models.inference import Predictor
from models.registry import ModelRegistry
from stream import metrics
from stream.device_pool import BatcherConfig, DevicePool, visible_devices
from stream.lag import LagMonitor
from stream.pipeline import Outcome, Pipeline
from stream.records import encode
from stream.redis_store import RedisStore
from stream.routing import RoutingPolicy

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
    decode_threads: int = 0  # the media fetcher's decode threads; 0 keeps FetchConfig's default
    # Opt-in: the decode threads make each image the model's input (FetchConfig.model_side).
    # Batch preparation then costs 0.2x the CPU per post, but a repost pays the resize too: on
    # the CPU worker it cost 15% of the repost throughput (BENCHMARKS). Meant for GPU workers.
    decode_model_input: bool = False
    # Text inside images (stream.ocr): auto = when the model was trained with it, on, off.
    ocr: str = "auto"
    topic_partitions: int = 4
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    send_retry_s: float = 1.0
    lag_interval_s: float = 5.0  # how often the group's consumer lag is read from the broker
    topics: dict[str, str] = field(
        default_factory=lambda: {
            "posts": "posts",
            "labels": "labels",
            "review": "review",
            "dlq": "posts.dlq",
            "updates": "model-updates",
        }
    )


def predictor_factory(registry: ModelRegistry, version: str) -> Any:
    loaded_version = registry.resolve(version)

    def build(device: Any) -> Predictor:
        loaded = registry.load(loaded_version)
        autocast = None
        if device.type == "cuda":
            import torch

            autocast = torch.bfloat16
        return Predictor(loaded.model, loaded.tokenizer, loaded.card, device, autocast)

    return build


def _decode_for(card: ModelCard, base: FetchConfig, model_input: bool) -> FetchConfig:
    """`base` with the decode pool's image sizes for this model: bounded to twice its input
    side (memory per post) and, with `model_input`, made its square input by the decode
    threads, so the device pool's batch preparation only copies pixels."""
    side = card.config.image_size
    return replace(base, max_side=2 * side, model_side=side if model_input else None)


def _created_at(outcome: Outcome) -> float | None:
    """The post's created_at as a Unix time, for the produce-to-label latency (None: not given)."""
    stamp = outcome.post.created_at if outcome.post is not None else None
    if not stamp:
        return None
    try:
        parsed = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def observe_labels_sent(outcomes: Sequence[Outcome]) -> None:
    """After the broker acked the labels: counts per model version and produce-to-label latency."""
    now = time.time()
    for o in outcomes:
        if o.label is None or o.dead_letter is not None:
            continue
        metrics.LABELS.labels(o.label.model_version, o.label.route).inc()
        for task, value in o.label.labels.items():
            decision = "positive" if value.get("decision") else "negative"
            metrics.TASK_DECISIONS.labels(o.label.model_version, task, decision).inc()
        created = _created_at(o)
        if created is not None:
            metrics.PRODUCE_TO_LABEL.observe(max(0.0, now - created))


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
            predictor_factory(self.registry, s.model_version),
            visible_devices(s.devices),
            s.batcher,
            on_batch=self._observe_device_batch,
        )
        await self.pool.start()
        fetch = _decode_for(self.card, FetchConfig(allow_loopback=s.allow_loopback_media), s.decode_model_input)
        if s.decode_threads > 0:
            fetch = replace(fetch, decode_workers=s.decode_threads)
        self.fetcher = MediaFetcher(fetch, ocr=ocr)
        await self.fetcher.__aenter__()
        if s.redis_url:
            self.redis = RedisStore(s.redis_url)
        metrics.register_gpu_collector(visible_devices(s.devices))
        classifier = metrics.InstrumentedClassifier(self.pool)
        self.pipeline = Pipeline(classifier, self.fetcher, self.card_of, s.policy, self.redis)
        self._announce()
        self.ready.set()
        metrics.READY.set(1)

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
        metrics.ITM_ROUTING.set(1 if policy.itm_routes(self.card) else 0)
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
        await self.pool.swap(predictor_factory(self.registry, card.version))
        if self.fetcher is not None:
            # Images decoded from now on fit the new model; the few in flight are resized again
            # by its preprocessor (right shape, a little softer).
            self.fetcher.config = _decode_for(card, self.fetcher.config, self.settings.decode_model_input)
        self.card = card
        self._announce()

    async def close(self) -> None:
        if self.pool:
            await self.pool.close()
        if self.fetcher:
            await self.fetcher.close()
        if self.redis:
            await self.redis.close()


async def send_all(topic: Any, records: Sequence[tuple[str | None, bytes]], retry_s: float) -> None:
    """Send and wait for the broker's ack; on failure resend until it works (the agent stalls,
    which is the backpressure we want during a broker outage: nothing is acked meanwhile)."""
    pending = list(records)
    while pending:
        results: list[Any] = []
        for key, value in pending:
            try:  # send() itself can raise (buffer full, broker gone), not only its future
                results.append(await topic.send(key=key.encode() if key else None, value=value, force=True))
            except Exception as exc:
                results.append(exc)
        futures = [r for r in results if not isinstance(r, BaseException)]
        acked = iter(await asyncio.gather(*futures, return_exceptions=True))
        outcomes = [r if isinstance(r, BaseException) else next(acked) for r in results]
        failed = [rec for rec, res in zip(pending, outcomes, strict=True) if isinstance(res, BaseException)]
        if failed:
            errors = [res for res in outcomes if isinstance(res, BaseException)]
            metrics.DEPENDENCY_ERRORS.labels("kafka", "send").inc(len(failed))
            log.warning("%d sends failed (%r); retrying in %.1f s", len(failed), errors[0], retry_s)
            await asyncio.sleep(retry_s)
        pending = failed


async def write_outcomes(app_topics: dict[str, Any], outcomes: Sequence[Outcome], resources: Resources) -> None:
    labels, reviews, dead = [], [], []
    for o in outcomes:
        if o.dead_letter is not None:
            dead.append((o.dead_letter.post_id, encode(o.dead_letter)))
        elif o.label is not None:
            labels.append((o.label.post_id, encode(o.label)))
            if o.review is not None:
                reviews.append(o.review)
    retry = resources.settings.send_retry_s
    await send_all(app_topics["dlq"], dead, retry)
    await send_all(app_topics["review"], [(r.post_id, encode(r)) for r in reviews], retry)
    # Labels last: a post with a label has had its review item written too. The review
    # topic is the source of truth; the review sink copies it into Redis.
    await send_all(app_topics["labels"], labels, retry)
    observe_labels_sent(outcomes)


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
            # process() turns every failure into a dead letter; it does not raise.
            outcomes = await resources.pipeline.process([bytes(v) for v in values])
            await write_outcomes(topics, outcomes, resources)
            metrics.STAGE_SECONDS.labels("batch").observe(time.perf_counter() - started)

    @app.task
    async def measure_consumer_lag() -> None:
        # The worker's own group on `posts`, from the broker: rises even while agents stall.
        monitor = LagMonitor(
            settings.bootstrap,
            settings.app_id,
            [names["posts"]],
            metrics.CONSUMER_LAG,
            metrics.CONSUMER_LAG_SUM,
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
        if resources.pool is not None and not ok:
            body["problem"] = resources.pool.failure
        return web.json(body, status=200 if ok else 503)

    return app, resources


async def catch_up_with_registry(settings: WorkerSettings, resources: Resources) -> None:
    """An update published before this worker subscribed is not delivered to it ("latest"),
    but the retrain job moves CURRENT before it publishes: re-reading CURRENT once the
    subscription's positions are fixed closes that gap."""
    if settings.model_version != "current":
        return  # pinned to a version by the operator
    current = resources.registry.current()
    if current is not None and resources.card is not None and current != resources.card.version:
        log.warning("registry moved to %s while this worker started; switching", current)
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
            settings.topics["updates"], bootstrap_servers=settings.bootstrap, group_id=None, auto_offset_reset="latest"
        )
        try:
            await consumer.start()
            await _fix_positions(consumer)
            await catch_up_with_registry(settings, resources)
            async for message in consumer:
                try:
                    update = json.loads(message.value or b"{}")
                    await resources.swap(str(update["version"]))
                except Exception as exc:  # a bad update must not stop the worker
                    log.error("ignoring model update %r: %r", message.value, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("model-updates consumer failed (%r); reconnecting", exc)
            await asyncio.sleep(2)
        finally:
            await consumer.stop()


def run_worker(settings: WorkerSettings, loglevel: str = "warning") -> None:
    app, _ = create_app(settings)
    # Resources live as long as the process: a worker ends by exiting (or by SIGKILL, which
    # the at-least-once design tolerates), so there is nothing to flush at shutdown.
    faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()

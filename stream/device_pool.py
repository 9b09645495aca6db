"""One model replica per device, each behind a dynamic batcher.

Callers submit single posts and await their prediction; each replica's batcher gathers
up to `max_batch` posts or waits at most `max_delay_s`, then runs the model in its own
thread so the event loop keeps downloading the next posts meanwhile. Queues are bounded:
a full queue makes `predict` wait, which pauses the consuming agent instead of growing
memory. A model swap takes effect between two batches of each replica, so every post is
labelled by exactly one model version, which its label names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from PIL import Image

from models.device_decode import EncodedJpeg
from models.devices import visible_devices
from models.inference import Prediction, Predictor, PreparedBatch

log = logging.getLogger(__name__)
__all__ = [
    "BatcherConfig",
    "DevicePool",
    "InferenceTimeout",
    "PredictorFactory",
    "Replica",
    "ReplicaFailed",
    "visible_devices",
]
PredictorFactory = Callable[[torch.device], Predictor]
_T = TypeVar("_T")


# Measured with bench/forward_throughput.py on the 2-core development CPU: default backbones
# peak at batch 4-16 (~40 posts/s) and fall to ~27 posts/s at 64 (cache pressure), so the
# CPU batch stays small; GPUs want large batches.
CPU_MAX_BATCH = 8
GPU_MAX_BATCH = 256


@dataclass
class BatcherConfig:
    max_batch: int = 0  # 0: CPU_MAX_BATCH on a CPU, GPU_MAX_BATCH on a GPU
    max_delay_s: float = 0.005
    max_queue: int = 1024
    timeout_s: float = 60.0  # hard limit per post: a hung model must not stall a partition
    # One device batch taking longer than this means the model hangs: the batch's posts fail
    # at once, the replica is marked unhealthy and rebuilt (the stuck thread is abandoned).
    batch_timeout_s: float = 30.0
    # Threads resizing images (and tokenising) for the next batch: 0 means none on a CPU,
    # where the model needs the cores, and up to 8 on a GPU, where preparation is the bottleneck.
    prepare_threads: int = 0
    check_interval_s: float = 0.5  # how often the supervisor looks at its replicas


class InferenceTimeout(TimeoutError):
    pass


class ReplicaFailed(RuntimeError):
    """The replica serving a post died or hung; the post may be retried."""


@dataclass
class _Item:
    text: str
    image: Image.Image | EncodedJpeg | None  # EncodedJpeg: decoded on the device (models/device_decode.py)
    future: asyncio.Future[Prediction]


class Replica:
    """One model on one device, fed by a two-stage pipeline: the batcher gathers posts and
    prepares batch n+1 (tokenising, resizing to uint8) on its own thread while batch n runs
    on the device thread. At most one prepared batch waits, so preparation never runs far
    ahead of the device (memory stays bounded)."""

    def __init__(
        self,
        predictor: Predictor,
        config: BatcherConfig,
        on_batch: Callable[[int, float], None],
        queue: asyncio.Queue[_Item] | None = None,
    ) -> None:
        self.predictor = predictor
        if not config.max_batch:
            gpu = predictor.device.type == "cuda"
            config = replace(config, max_batch=GPU_MAX_BATCH if gpu else CPU_MAX_BATCH)
        self.config = config
        # A rebuilt replica takes over its predecessor's queue: queued posts and callers
        # blocked on a full queue carry on with the new one.
        self.queue: asyncio.Queue[_Item] = queue or asyncio.Queue(maxsize=config.max_queue)
        self._next: Predictor | None = None
        self._prep_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prep-{predictor.device}")
        threads = config.prepare_threads or (min(8, os.cpu_count() or 1) if predictor.device.type == "cuda" else 0)
        self._resize_pool = (
            ThreadPoolExecutor(threads, thread_name_prefix=f"resize-{predictor.device}") if threads > 1 else None
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{predictor.device}")
        self._ready: asyncio.Queue[tuple[Predictor, list[_Item], PreparedBatch]] = asyncio.Queue(maxsize=1)
        self._tasks: list[asyncio.Task[None]] = []
        self._on_batch = on_batch
        self._busy: dict[str, float] = {}  # stage -> monotonic start of the work in flight
        self._open: dict[int, list[_Item]] = {}  # batches between gathering and delivery
        self.failure: str | None = None  # why this replica stopped serving

    @property
    def load(self) -> int:
        return self.queue.qsize()

    @property
    def stalled(self) -> bool:
        """A batch is past its deadline in either stage."""
        now = time.monotonic()
        return any(now - since > self.config.batch_timeout_s for since in list(self._busy.values()))

    @property
    def healthy(self) -> bool:
        """Serving: both stages run and no batch is past its deadline in either."""
        if self.failure is not None or not self._tasks or any(t.done() for t in self._tasks):
            return False
        return not self.stalled

    def fail_open(self, exc: BaseException) -> None:
        """Fails every batch between gathering and delivery (the replica is being replaced)."""
        for items in list(self._open.values()):
            _fail(items, exc)
        self._open.clear()

    def start(self) -> None:
        device = self.predictor.device
        self._tasks = [
            asyncio.create_task(self._prepare_loop(), name=f"batcher-{device}"),
            asyncio.create_task(self._infer_loop(), name=f"infer-{device}"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self.failure = self.failure or "closed"
        elif (exc := task.exception()) is not None:
            self.failure = self.failure or f"batcher died: {exc!r}"
            log.error("%s on %s died", task.get_name(), self.predictor.device, exc_info=exc)
        # One stage alone cannot serve: stop the other so it takes no more posts from the
        # queue (they wait there for the rebuilt replica).
        for other in self._tasks:
            if other is not task:
                other.cancel()
        # Callers of batches in flight would otherwise wait for results nobody will deliver.
        self.fail_open(ReplicaFailed(f"replica on {self.predictor.device} failed: {self.failure or 'stopped'}"))

    def stage_swap(self, predictor: Predictor) -> None:
        self._next = predictor

    async def _gather(self) -> list[_Item]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.config.max_delay_s
        while len(batch) < self.config.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Take what is already queued without waiting any longer.
                while len(batch) < self.config.max_batch and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _stage(self, stage: str, executor: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        """Runs `fn` on the stage's thread under the batch deadline. A timeout cannot stop the
        thread: the replica stops serving and the pool rebuilds it."""
        self._busy[stage] = time.monotonic()
        try:
            return await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(executor, fn, *args), self.config.batch_timeout_s
            )
        except TimeoutError:
            self.failure = f"{stage} a batch hung for over {self.config.batch_timeout_s:g} s"
            log.error("replica on %s: %s", self.predictor.device, self.failure)
            raise _Hung(self.failure) from None
        finally:
            self._busy.pop(stage, None)

    async def _prepare_loop(self) -> None:
        while True:
            batch = await self._gather()
            if self._next is not None:  # swap between batches, never inside one
                self.predictor, self._next = self._next, None
                log.info("replica on %s now serves model %s", self.predictor.device, self.predictor.version)
            live = [item for item in batch if not item.future.done()]  # skip callers that gave up
            if not live:
                continue
            # The batch keeps the predictor that prepared it: its tokenizer and image size
            # must match the model that runs it, even if a swap lands in between.
            predictor = self.predictor
            self._open[id(live)] = live
            try:
                texts, images = [i.text for i in live], [i.image for i in live]
                prepared = await self._stage(
                    "preparing", self._prep_executor, predictor.prepare, texts, images, self._resize_pool
                )
            except _Hung as hung:
                self._close_batch(live, InferenceTimeout(str(hung)))
                return
            except Exception as exc:  # bad input fails this batch's posts, not the replica
                self._close_batch(live, exc)
                continue
            await self._ready.put((predictor, live, prepared))  # waits while the device is busy

    async def _infer_loop(self) -> None:
        while True:
            predictor, live, prepared = await self._ready.get()
            started = time.perf_counter()
            try:
                predictions = await self._stage("running", self._executor, predictor.run, prepared)
            except _Hung as hung:
                self._close_batch(live, InferenceTimeout(str(hung)))
                return
            except Exception as exc:  # a model error fails this batch's posts, not the replica
                self._close_batch(live, exc)
                continue
            self._on_batch(len(live), time.perf_counter() - started)
            self._open.pop(id(live), None)
            for item, prediction in zip(live, predictions, strict=True):
                if not item.future.done():
                    item.future.set_result(prediction)

    def _close_batch(self, items: list[_Item], exc: BaseException) -> None:
        self._open.pop(id(items), None)
        _fail(items, exc)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._prep_executor.shutdown(wait=False, cancel_futures=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._resize_pool is not None:
            self._resize_pool.shutdown(wait=False, cancel_futures=True)


class _Hung(Exception):
    pass


def _fail(items: Sequence[_Item], exc: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)


class DevicePool:
    """Replicas plus a supervisor: a replica whose batcher died or whose model hung is rebuilt
    from the current factory on the same device, taking over its queue. `healthy` is False
    from the failure until the rebuilt replica serves (the worker's /ready reports it)."""

    def __init__(
        self,
        factory: PredictorFactory,
        devices: Sequence[torch.device],
        config: BatcherConfig | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.factory = factory
        self.devices = list(devices)
        self.config = config or BatcherConfig()
        self.replicas: list[Replica] = []
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0
        self.last_failure: str | None = None

    @property
    def version(self) -> str:
        """The version the next batch is served by: a staged swap counts as done. Callers key
        cached labels by it, so a warm dedupe cache cannot keep answering with the old model
        (every post a cache hit would never reach a replica, and the swap would never land)."""
        if not self.replicas:
            return "unloaded"
        return self.versions[0]

    @property
    def versions(self) -> list[str]:
        """Per replica, the version its next batch is served by. They differ only for the
        moment between a swap's load and its staging; lasting, it is a bug `healthy` reports."""
        return [(r._next or r.predictor).version for r in self.replicas]

    @property
    def healthy(self) -> bool:
        """Every replica serves and the supervisor watches them."""
        supervised = self._supervisor is not None and not self._supervisor.done()
        serving = bool(self.replicas) and all(r.healthy for r in self.replicas)
        return supervised and serving and len(set(self.versions)) == 1

    @property
    def failure(self) -> str | None:
        """Why the pool is unhealthy now, for /ready (None when healthy)."""
        if self.healthy:
            return None
        reasons = [
            f"{r.predictor.device}: {r.failure or 'batch past its deadline'}" for r in self.replicas if not r.healthy
        ]
        if len(set(self.versions)) > 1:
            reasons.append(f"replicas serve different versions: {', '.join(self.versions)}")
        return "; ".join(reasons) or ("not started" if not self.replicas else "supervisor stopped")

    @staticmethod
    def _build(factory: PredictorFactory, device: torch.device) -> Predictor:
        predictor = factory(device)
        predictor.predict(["warm-up"], [Image.new("RGB", (32, 32))])
        return predictor

    async def _load(self, factory: PredictorFactory) -> list[Predictor]:
        """Build and warm one predictor per device off the event loop."""
        return list(await asyncio.gather(*(asyncio.to_thread(self._build, factory, d) for d in self.devices)))

    async def start(self) -> None:
        """Loads and warms every replica; only then is the pool ready."""
        for predictor in await self._load(self.factory):
            replica = Replica(predictor, self.config, self._on_batch)
            replica.start()
            self.replicas.append(replica)
        self._supervisor = asyncio.create_task(self._supervise(), name="device-pool-supervisor")

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            for index, replica in enumerate(list(self.replicas)):
                if replica.healthy:
                    continue
                try:
                    await self._restart(index, replica)
                except Exception:  # stay unhealthy (/ready fails) and try again next round
                    log.exception("rebuilding the replica on %s failed", replica.predictor.device)

    async def _restart(self, index: int, old: Replica) -> None:
        if old.failure is None:  # seen stalled before the stage's own deadline fired
            old.failure = f"a batch hung for over {self.config.batch_timeout_s:g} s"
            old.fail_open(InferenceTimeout(old.failure))
        self.last_failure = old.failure
        log.error("replica on %s is unhealthy (%s); rebuilding it", old.predictor.device, self.last_failure)
        # Stop the old batcher first so it takes nothing more from the queue it hands over.
        await old.close()
        factory = self.factory
        predictor = await asyncio.to_thread(self._build, factory, self.devices[index])
        while self.factory is not factory:
            # A swap finished while this replica was being built from the model it replaced:
            # it staged the new model on the replica being retired, so build the new one here.
            factory = self.factory
            log.warning(
                "a swap happened while the replica on %s was rebuilt; loading the new model", old.predictor.device
            )
            predictor = await asyncio.to_thread(self._build, factory, self.devices[index])
        replica = Replica(predictor, self.config, self._on_batch, queue=old.queue)
        replica.start()
        self.replicas[index] = replica
        self.restarts += 1
        log.warning("replica on %s rebuilt (restart %d)", predictor.device, self.restarts)

    async def swap(self, factory: PredictorFactory) -> str:
        """Load the new model next to the old one, then switch each replica between batches."""
        predictors = await self._load(factory)
        for replica, predictor in zip(self.replicas, predictors, strict=True):
            replica.stage_swap(predictor)
        self.factory = factory
        return predictors[0].version

    async def predict_one(self, text: str, image: Image.Image | EncodedJpeg | None) -> Prediction:
        if not self.replicas:
            raise ReplicaFailed("the device pool is not started")
        # Prefer serving replicas; a failed one's queue is handed to its rebuilt successor.
        candidates = [r for r in self.replicas if r.healthy] or self.replicas
        replica = min(candidates, key=lambda r: r.load)
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                # A full queue blocks here: the caller (the agent) stops consuming meanwhile.
                await replica.queue.put(_Item(text, image, future))
                return await future
        except InferenceTimeout:
            raise  # the replica's own batch deadline
        except TimeoutError as exc:
            future.cancel()  # the batcher skips it if it is still queued
            raise InferenceTimeout(f"inference took longer than {self.config.timeout_s} s") from exc

    async def predict(
        self, texts: Sequence[str], images: Sequence[Image.Image | EncodedJpeg | None]
    ) -> list[Prediction | BaseException]:
        """Per-post results; a failed post yields its exception instead of failing the rest."""
        return await asyncio.gather(
            *(self.predict_one(t, i) for t, i in zip(texts, images, strict=True)), return_exceptions=True
        )

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        for replica in self.replicas:
            await replica.close()
        self.replicas.clear()

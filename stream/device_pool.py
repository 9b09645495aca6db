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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
from PIL import Image

from models.devices import visible_devices
from models.inference import Prediction, Predictor

log = logging.getLogger(__name__)
__all__ = ["BatcherConfig", "DevicePool", "InferenceTimeout", "PredictorFactory", "Replica", "visible_devices"]
PredictorFactory = Callable[[torch.device], Predictor]


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


class InferenceTimeout(TimeoutError):
    pass


@dataclass
class _Item:
    text: str
    image: Image.Image | None
    future: asyncio.Future[Prediction]


class Replica:
    def __init__(self, predictor: Predictor, config: BatcherConfig, on_batch: Callable[[int, float], None]) -> None:
        self.predictor = predictor
        if not config.max_batch:
            gpu = predictor.device.type == "cuda"
            config = replace(config, max_batch=GPU_MAX_BATCH if gpu else CPU_MAX_BATCH)
        self.config = config
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=config.max_queue)
        self._next: Predictor | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{predictor.device}")
        self._task: asyncio.Task[None] | None = None
        self._on_batch = on_batch

    @property
    def load(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.predictor.device}")

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

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if self._next is not None:  # swap between batches, never inside one
                self.predictor, self._next = self._next, None
                log.info("replica on %s now serves model %s", self.predictor.device, self.predictor.version)
            live = [item for item in batch if not item.future.done()]  # skip callers that gave up
            if not live:
                continue
            started = time.perf_counter()
            try:
                predictions = await loop.run_in_executor(
                    self._executor, self.predictor.predict, [i.text for i in live], [i.image for i in live]
                )
            except Exception as exc:  # a model error fails this batch's posts, not the replica
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self._on_batch(len(live), time.perf_counter() - started)
            for item, prediction in zip(live, predictions, strict=True):
                if not item.future.done():
                    item.future.set_result(prediction)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)


class DevicePool:
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

    @property
    def version(self) -> str:
        return self.replicas[0].predictor.version if self.replicas else "unloaded"

    async def _load(self, factory: PredictorFactory) -> list[Predictor]:
        """Build and warm one predictor per device off the event loop."""

        def build(device: torch.device) -> Predictor:
            predictor = factory(device)
            predictor.predict(["warm-up"], [Image.new("RGB", (32, 32))])
            return predictor

        return list(await asyncio.gather(*(asyncio.to_thread(build, d) for d in self.devices)))

    async def start(self) -> None:
        """Loads and warms every replica; only then is the pool ready."""
        for predictor in await self._load(self.factory):
            replica = Replica(predictor, self.config, self._on_batch)
            replica.start()
            self.replicas.append(replica)

    async def swap(self, factory: PredictorFactory) -> str:
        """Load the new model next to the old one, then switch each replica between batches."""
        predictors = await self._load(factory)
        for replica, predictor in zip(self.replicas, predictors, strict=True):
            replica.stage_swap(predictor)
        self.factory = factory
        return predictors[0].version

    async def predict_one(self, text: str, image: Image.Image | None) -> Prediction:
        replica = min(self.replicas, key=lambda r: r.load)
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        # A full queue blocks here: the caller (the agent) stops consuming meanwhile.
        await replica.queue.put(_Item(text, image, future))
        try:
            return await asyncio.wait_for(future, self.config.timeout_s)
        except TimeoutError as exc:
            raise InferenceTimeout(f"inference took longer than {self.config.timeout_s} s") from exc

    async def predict(
        self, texts: Sequence[str], images: Sequence[Image.Image | None]
    ) -> list[Prediction | BaseException]:
        """Per-post results; a failed post yields its exception instead of failing the rest."""
        return await asyncio.gather(
            *(self.predict_one(t, i) for t, i in zip(texts, images, strict=True)), return_exceptions=True
        )

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()
        self.replicas.clear()

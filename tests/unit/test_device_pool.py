import asyncio

import pytest
import torch
from PIL import Image

from models.card import ModelCard
from models.inference import Predictor
from stream.device_pool import BatcherConfig, DevicePool, InferenceTimeout
from tests.tiny import tiny_model


def _factory(version: str, seed: int = 0):
    model, tok = tiny_model(seed=seed)

    def build(device):
        return Predictor(model, tok, ModelCard(config=model.config, version=version), device)

    return build


def test_batches_are_gathered_up_to_max_batch():
    sizes = []

    async def main():
        pool = DevicePool(
            _factory("v1"),
            [torch.device("cpu")],
            BatcherConfig(max_batch=8, max_delay_s=0.05),
            lambda n, s: sizes.append(n),
        )
        await pool.start()
        results = await pool.predict([f"post {i}" for i in range(20)], [Image.new("RGB", (8, 8))] * 10 + [None] * 10)
        await pool.close()
        return results

    results = asyncio.run(main())
    assert len(results) == 20 and all(r.model_version == "v1" for r in results)
    assert sum(sizes) == 20  # the warm-up call is not a served batch
    assert max(sizes) == 8 and len(sizes) <= 4  # gathered, never above max_batch


def test_full_queue_applies_backpressure():
    async def main():
        pool = DevicePool(_factory("v1"), [torch.device("cpu")], BatcherConfig(max_batch=1, max_queue=2))
        await pool.start()
        replica = pool.replicas[0]
        gate = asyncio.Event()
        original = replica.predictor.predict

        def slow(texts, images):
            while not gate.is_set():
                pass
            return original(texts, images)

        replica.predictor.predict = slow  # type: ignore[method-assign]
        tasks = [asyncio.create_task(pool.predict_one(f"p{i}", None)) for i in range(6)]
        await asyncio.sleep(0.2)
        queued = replica.queue.qsize()
        gate.set()
        results = await asyncio.gather(*tasks)
        await pool.close()
        return queued, results

    queued, results = asyncio.run(main())
    assert queued == 2  # the bounded queue never grows past max_queue: the rest wait to enqueue
    assert len(results) == 6


def test_swap_happens_between_batches_and_every_post_gets_one_version():
    async def main():
        pool = DevicePool(_factory("v1"), [torch.device("cpu")], BatcherConfig(max_batch=4, max_delay_s=0.01))
        await pool.start()
        first = await pool.predict(["a", "b"], [None, None])
        new_version = await pool.swap(_factory("v2", seed=1))
        second = await pool.predict(["c", "d", "e"], [None, None, None])
        await pool.close()
        return first, new_version, second

    first, new_version, second = asyncio.run(main())
    assert [p.model_version for p in first] == ["v1", "v1"]
    assert new_version == "v2" and [p.model_version for p in second] == ["v2", "v2", "v2"]


def test_hung_inference_times_out_instead_of_stalling():
    async def main():
        pool = DevicePool(_factory("v1"), [torch.device("cpu")], BatcherConfig(timeout_s=0.2))
        await pool.start()
        release = asyncio.Event()
        replica = pool.replicas[0]
        original = replica.predictor.predict

        def hang(texts, images):
            import time

            time.sleep(0.6)
            return original(texts, images)

        replica.predictor.predict = hang  # type: ignore[method-assign]
        try:
            with pytest.raises(InferenceTimeout):
                await pool.predict_one("stuck", None)
        finally:
            release.set()
            await pool.close()

    asyncio.run(main())

"""The worker is ready only while its device pool serves: /ready reads Resources.healthy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from models.card import ModelCard
from models.inference import Predictor
from stream.device_pool import BatcherConfig, DevicePool
from stream.worker import Resources, WorkerSettings
from tests.tiny import tiny_model


def test_resources_are_healthy_only_while_the_pool_serves(tmp_path: Path) -> None:
    model, tok = tiny_model()

    def factory(device: torch.device) -> Predictor:
        return Predictor(model, tok, ModelCard(config=model.config, version="v1"), device)

    async def main() -> list[bool]:
        resources = Resources(WorkerSettings(registry=tmp_path, redis_url=None))
        states = [resources.healthy]  # nothing started
        pool = DevicePool(factory, [torch.device("cpu")], BatcherConfig(check_interval_s=60))
        await pool.start()
        resources.pool = pool
        states.append(resources.healthy)  # pool up, but start() has not finished
        resources.ready.set()
        states.append(resources.healthy)
        pool.replicas[0].failure = "injected: batcher died"
        states.append(resources.healthy)
        await pool.close()
        return states

    assert asyncio.run(main()) == [False, False, True, False]


def test_the_decode_pool_makes_images_the_served_models_input_and_follows_a_swap(tmp_path: Path) -> None:
    from models.registry import ModelRegistry
    from tests.tiny import tiny_config

    registry = ModelRegistry(tmp_path)
    small, tok = tiny_model(tiny_config(image_size=32))
    v1 = registry.save(small, tok, ModelCard(config=small.config))
    large, tok = tiny_model(tiny_config(image_size=48))
    v2 = registry.save(large, tok, ModelCard(config=large.config), make_current=False)

    async def main() -> list[tuple[int | None, int]]:
        settings = WorkerSettings(registry=tmp_path, redis_url=None, model_version=v1, devices="cpu", decode_threads=3)
        resources = Resources(settings)
        await resources.start()
        try:
            assert resources.fetcher is not None and resources.fetcher.config.decode_workers == 3
            sides = [(resources.fetcher.config.model_side, resources.fetcher.config.max_side)]
            await resources.swap(v2)
            sides.append((resources.fetcher.config.model_side, resources.fetcher.config.max_side))
            return sides
        finally:
            await resources.close()

    assert asyncio.run(main()) == [(32, 64), (48, 96)]

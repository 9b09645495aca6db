"""The worker is ready only while its device pool serves: /ready reads Resources.healthy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import torch

from models.card import ModelCard
from models.inference import Predictor
from stream.device_pool import BatcherConfig, DevicePool
from stream.media import FetchConfig
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


def test_the_decode_bounds_follow_the_served_model_and_a_swap_and_model_input_is_opt_in(tmp_path: Path) -> None:
    from models.registry import ModelRegistry
    from tests.tiny import tiny_config

    registry = ModelRegistry(tmp_path)
    small, tok = tiny_model(tiny_config(image_size=32))
    v1 = registry.save(small, tok, ModelCard(config=small.config))
    large, tok = tiny_model(tiny_config(image_size=48))
    v2 = registry.save(large, tok, ModelCard(config=large.config), make_current=False)

    async def sides(**options: Any) -> list[tuple[int | None, int, int]]:
        # No verdict banks: with them the worker first reads bank-updates from a broker this unit
        # test does not have, waiting bank_load_timeout_s (120 s) for each start.
        settings = WorkerSettings(
            registry=tmp_path, redis_url=None, model_version=v1, devices="cpu", banks=False, **options
        )
        resources = Resources(settings)
        await resources.start()
        try:
            assert resources.fetcher is not None
            seen = []
            for version in (v1, v2):
                await resources.swap(version)
                cfg = resources.fetcher.config
                seen.append((cfg.model_side, cfg.max_side, cfg.decode_workers))
            return seen
        finally:
            await resources.close()

    default_threads = FetchConfig().decode_workers
    # By default the predictor makes the model's input; the bound follows the served model.
    assert asyncio.run(sides()) == [(None, 64, default_threads), (None, 96, default_threads)]
    # Opted in (GPU workers), the decode threads make it, for whichever model is served.
    assert asyncio.run(sides(decode_model_input=True, decode_threads=3)) == [(32, 64, 3), (48, 96, 3)]

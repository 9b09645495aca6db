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

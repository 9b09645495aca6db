import asyncio

import pytest
import torch
from PIL import Image

from models.card import ModelCard
from models.inference import Predictor
from stream.device_pool import BatcherConfig, DevicePool, InferenceTimeout, ReplicaFailed
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
        original = replica.predictor.run

        def slow(batch):
            while not gate.is_set():
                pass
            return original(batch)

        replica.predictor.run = slow  # type: ignore[method-assign]
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
        original = replica.predictor.run

        def hang(batch):
            import time

            time.sleep(0.6)
            return original(batch)

        replica.predictor.run = hang  # type: ignore[method-assign]
        try:
            with pytest.raises(InferenceTimeout):
                await pool.predict_one("stuck", None)
        finally:
            release.set()
            await pool.close()

    asyncio.run(main())


# --- supervision ----------------------------------------------------------------------------


async def _wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_hung_batch_fails_fast_marks_the_pool_unhealthy_and_rebuilds_the_replica():
    import threading

    built: list[str] = []
    base = _factory("v1")

    def factory(device):
        built.append(str(device))
        return base(device)

    async def main():
        config = BatcherConfig(max_batch=4, batch_timeout_s=0.2, timeout_s=30.0, check_interval_s=0.05)
        pool = DevicePool(factory, [torch.device("cpu")], config)
        await pool.start()
        assert pool.healthy
        stuck = pool.replicas[0]
        release = threading.Event()
        stuck.predictor.run = lambda batch: release.wait(10)  # type: ignore[method-assign,assignment,return-value]
        started = asyncio.get_running_loop().time()
        with pytest.raises(InferenceTimeout):
            await pool.predict_one("hangs", None)
        waited = asyncio.get_running_loop().time() - started
        saw_unhealthy = not stuck.healthy
        await _wait_until(lambda: pool.replicas[0] is not stuck and pool.healthy)
        after = await pool.predict_one("served by the new replica", None)
        release.set()
        await pool.close()
        return waited, saw_unhealthy, after, pool.restarts, pool.last_failure

    waited, saw_unhealthy, after, restarts, why = asyncio.run(main())
    assert waited < 2.0  # the batch deadline (0.2 s), not the per-post 30 s
    assert saw_unhealthy and restarts == 1 and "hung" in (why or "")
    assert len(built) == 2  # the original and the rebuilt replica
    assert after.model_version == "v1"


def test_dead_batcher_fails_its_batch_fast_makes_the_pool_unhealthy_and_is_rebuilt():
    calls: list[int] = []

    def on_batch(size, seconds):
        calls.append(size)
        if len(calls) == 1:
            raise RuntimeError("bug in a batch observer")

    async def main():
        config = BatcherConfig(max_batch=2, max_delay_s=0.05, check_interval_s=0.3)
        pool = DevicePool(_factory("v1"), [torch.device("cpu")], config, on_batch=on_batch)
        await pool.start()
        first = pool.replicas[0]
        lost = await asyncio.wait_for(pool.predict(["a", "b"], [None, None]), 5)
        unhealthy = (pool.healthy, pool.failure)
        # Posts submitted while the replica is dead wait in its queue and are served by the rebuilt one.
        served = await asyncio.wait_for(pool.predict(["c", "d", "e"], [None, None, None]), 10)
        healthy_again = pool.healthy and pool.replicas[0] is not first
        await pool.close()
        return lost, unhealthy, served, healthy_again, pool.restarts

    lost, (was_healthy, failure), served, healthy_again, restarts = asyncio.run(main())
    assert all(isinstance(r, ReplicaFailed) for r in lost)  # at once, not after the 60 s post timeout
    assert was_healthy is False and "batcher died" in (failure or "")
    assert all(not isinstance(r, BaseException) and r.model_version == "v1" for r in served)
    assert healthy_again and restarts == 1


def test_failed_rebuild_keeps_the_pool_unhealthy_and_is_retried():
    attempts: list[int] = []
    base = _factory("v1")

    def flaky(device):
        attempts.append(1)
        if 2 <= len(attempts) <= 3:  # the first two rebuilds fail
            raise RuntimeError("device busy")
        return base(device)

    async def main():
        config = BatcherConfig(check_interval_s=0.05)
        pool = DevicePool(flaky, [torch.device("cpu")], config)
        await pool.start()
        pool.replicas[0].failure = "injected"
        await asyncio.sleep(0.03)
        during = pool.healthy
        await _wait_until(lambda: pool.healthy)
        await pool.close()
        return during, pool.restarts

    during, restarts = asyncio.run(main())
    assert during is False
    assert restarts == 1 and len(attempts) == 4


def test_pool_is_not_healthy_before_start_or_after_close():
    async def main():
        pool = DevicePool(_factory("v1"), [torch.device("cpu")])
        before = pool.healthy
        await pool.start()
        running = pool.healthy
        await pool.close()
        return before, running, pool.healthy

    assert asyncio.run(main()) == (False, True, False)


def test_a_replica_rebuilt_while_a_swap_loads_serves_the_new_model():
    """The race: the supervisor starts rebuilding a failed replica from the old factory; a swap
    loads the new model meanwhile and stages it on the replica being retired. Before the fix
    the rebuilt replica came up with the old model and kept serving it."""
    import threading

    release_rebuild = threading.Event()
    old = _factory("v1")
    builds: list[str] = []

    def slow_old(device):
        builds.append("v1")
        if len(builds) > 1:  # the rebuild (not the start): wait until the swap has landed
            release_rebuild.wait(10)
        return old(device)

    new = _factory("v2", seed=1)

    async def main():
        config = BatcherConfig(max_batch=2, max_delay_s=0.01, check_interval_s=0.05)
        pool = DevicePool(slow_old, [torch.device("cpu")], config)
        await pool.start()
        pool.replicas[0].failure = "injected"
        await _wait_until(lambda: len(builds) == 2)  # the rebuild from the old factory is under way
        assert await pool.swap(new) == "v2"
        release_rebuild.set()
        await _wait_until(lambda: pool.healthy and pool.restarts == 1)
        served = await pool.predict(["a", "b", "c"], [None, None, None])
        versions = pool.versions
        await pool.close()
        return served, versions

    served, versions = asyncio.run(main())
    assert versions == ["v2"]
    assert {r.model_version for r in served} == {"v2"}


def test_replicas_on_different_versions_make_the_pool_unhealthy_and_say_so():
    async def main():
        pool = DevicePool(_factory("v1"), [torch.device("cpu"), torch.device("cpu")], BatcherConfig())
        await pool.start()
        assert pool.healthy and pool.versions == ["v1", "v1"]
        pool.replicas[1].stage_swap(_factory("v2", seed=1)(torch.device("cpu")))  # one replica only
        state = (pool.healthy, pool.failure, pool.versions)
        await pool.close()
        return state

    healthy, failure, versions = asyncio.run(main())
    assert healthy is False and versions == ["v1", "v2"]
    assert "different versions: v1, v2" in (failure or "")

"""The worker's metric helpers without a broker: per-version inference counts, GPU gauges
(faked CUDA), and how measured lag becomes gauges."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from stream import metrics
from stream.lag import LagMonitor


class FakePool:
    version = "v0009"

    async def predict(self, texts: Any, images: Any) -> list[Any]:
        ok = type("P", (), {"model_version": "v0008"})()  # scored by the previous version mid-swap
        return [ok, RuntimeError("boom"), ok]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_instrumented_classifier_counts_successes_by_their_version_and_failures_by_the_serving_one() -> None:
    before = (
        value("modstream_inference_request_success_total", model_version="v0008"),
        value("modstream_inference_request_failure_total", model_version="v0009"),
        value("modstream_inference_request_seconds_count", model_version="v0008"),
    )
    results = asyncio.run(metrics.InstrumentedClassifier(FakePool()).predict(["a", "b", "c"], [None] * 3))
    assert isinstance(results[1], RuntimeError)
    after = (
        value("modstream_inference_request_success_total", model_version="v0008"),
        value("modstream_inference_request_failure_total", model_version="v0009"),
        value("modstream_inference_request_seconds_count", model_version="v0008"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 2]


def test_device_batches_give_the_mean_batch_size() -> None:
    count0 = value("modstream_inference_count_total", model_version="vb")
    exec0 = value("modstream_inference_exec_count_total", model_version="vb")
    for size in (8, 24):
        metrics.observe_device_batch("vb", size, 0.01)
    count = value("modstream_inference_count_total", model_version="vb") - count0
    execs = value("modstream_inference_exec_count_total", model_version="vb") - exec0
    assert count / execs == 16


def test_gpu_gauges_read_cuda_and_leave_out_utilisation_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 100 * (i + 1))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 1000 * (i + 1))

    def no_nvml(i: int) -> int:
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    registry = CollectorRegistry()
    registry.register(metrics.GpuCollector())
    assert registry.get_sample_value("modstream_gpu_memory_allocated_bytes", {"device": "cuda:1"}) == 200
    assert registry.get_sample_value("modstream_gpu_memory_reserved_bytes", {"device": "cuda:0"}) == 1000
    assert registry.get_sample_value("modstream_gpu_utilization_ratio", {"device": "cuda:0"}) is None

    monkeypatch.setattr(torch.cuda, "utilization", lambda i: 75)
    assert registry.get_sample_value("modstream_gpu_utilization_ratio", {"device": "cuda:1"}) == 0.75


def test_no_gpu_gauges_on_the_cpu() -> None:
    assert metrics.register_gpu_collector([torch.device("cpu")]) is False
    assert not any(m.name.startswith("modstream_gpu_") for m in REGISTRY.collect())


def test_lag_publish_sets_partitions_and_their_sum() -> None:
    registry = CollectorRegistry()
    lag = Gauge("lag", "", ["group", "topic", "partition"], registry=registry)
    lag_sum = Gauge("lag_sum", "", ["group", "topic"], registry=registry)
    errors = Counter("errors", "", ["dependency", "op"], registry=registry)
    monitor = LagMonitor("127.0.0.1:1", "g", ["posts"], lag, lag_sum, errors)
    monitor.publish({("posts", 0): 5, ("posts", 1): 7})
    assert registry.get_sample_value("lag", {"group": "g", "topic": "posts", "partition": "1"}) == 7
    assert registry.get_sample_value("lag_sum", {"group": "g", "topic": "posts"}) == 12

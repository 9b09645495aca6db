"""Train, ablate, serve and swap on CUDA with tiny random models (correctness, not speed)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch
from PIL import Image

from models.card import ModelCard
from models.inference import Predictor
from stream.device_pool import BatcherConfig, DevicePool
from trainer.train import TrainConfig

CUDA0 = torch.device("cuda:0")


def test_fit_trains_and_calibrates_a_tiny_model_on_cuda(tmp_path: Path, synthetic_small) -> None:
    from tests.tiny import tiny_config, tiny_model
    from trainer.fit import fit

    cfg = tiny_config()
    model, tok = tiny_model(cfg)
    result = fit(
        synthetic_small,
        cfg,
        TrainConfig(epochs=2, itm_finish_epochs=1, amp=True),
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out",
        device="cuda",
        model_and_tokenizer=(model, tok),
    )
    assert next(result.model.parameters()).device.type == "cuda"
    assert set(result.card.thresholds) == {"hate", "sarcasm"}
    assert result.card.itm["trained"]
    # The feature cache written on the GPU is found again (encoder_key hashes on the CPU).
    assert any((tmp_path / "cache").rglob("*.safetensors"))


def test_one_ablation_fold_frozen_and_unfrozen_on_cuda(tmp_path: Path, synthetic_small) -> None:
    from tests.tiny import tiny_config, tiny_model
    from trainer.ablation import AblationConfig, run_ablation

    cfg = tiny_config()
    unfrozen = "task+itc+itm (text top 1 unfrozen)"
    ablation = AblationConfig(
        folds=2,
        seeds=(0,),
        unfreeze_text_layers=1,
        only=("task", "task+itc+itm", unfrozen),
        train=TrainConfig(epochs=1, itm_finish_epochs=1, amp=True),
    )
    summary = run_ablation(
        synthetic_small, cfg, ablation, tmp_path / "abl", device="cuda", model_and_tokenizer=tiny_model(cfg)
    )
    assert {"task", "task+itc+itm", unfrozen} <= set(summary["variants"])
    assert summary["setup"]["device"].startswith("cuda")
    # The linear probe mixes the CPU presence mask with features computed on the GPU.
    assert set(summary["linear_probe"]) == {"hate", "sarcasm"}
    assert (tmp_path / "abl" / "results.json").exists()


def _predictor_factory(model, tok, version: str, dtype: torch.dtype | None):
    def build(device: torch.device) -> Predictor:
        return Predictor(model, tok, ModelCard(config=model.config, version=version), device, autocast_dtype=dtype)

    return build


def test_device_pool_serves_on_cuda_matches_the_cpu_and_swaps_models() -> None:
    import copy

    from tests.tiny import tiny_model

    model, tok = tiny_model(seed=0)
    other, _ = tiny_model(seed=1)
    texts = [f"post {i} with a caption" for i in range(300)]
    images: list[Image.Image | None] = [
        Image.new("RGB", (40 + i % 7, 32), (i % 256, 40, 90)) if i % 4 else None for i in range(300)
    ]
    reference = Predictor(copy.deepcopy(model), tok, ModelCard(config=model.config, version="v1")).predict(
        texts[:16], images[:16]
    )

    async def main():
        pool = DevicePool(
            _predictor_factory(model, tok, "v1", None), [CUDA0], BatcherConfig(max_batch=64, prepare_threads=4)
        )
        await pool.start()
        assert pool.healthy
        prepared = pool.replicas[0].predictor.prepare(texts[:4], images[:4])
        pinned = prepared.pixels.is_pinned() and prepared.input_ids.is_pinned()
        first = await pool.predict(texts, images)
        version = await pool.swap(_predictor_factory(other, tok, "v2", torch.bfloat16))
        second = await pool.predict(texts, images)
        await pool.close()
        return pinned, first, version, second

    pinned, first, version, second = asyncio.run(main())
    assert pinned
    assert all(not isinstance(p, BaseException) and p.model_version == "v1" for p in first)
    for cpu, gpu in zip(reference, first[:16], strict=True):
        assert not isinstance(gpu, BaseException)
        for task, pred in cpu.tasks.items():
            assert abs(pred.score - gpu.tasks[task].score) < 5e-3  # cuDNN convolutions may use TF32
        assert (cpu.itm_match is None) == (gpu.itm_match is None)
    assert version == "v2"
    assert all(not isinstance(p, BaseException) and p.model_version == "v2" for p in second)


def test_classify_runs_on_cuda(tmp_path: Path) -> None:
    from models.registry import ModelRegistry
    from stream.classify import classify_file
    from tests.tiny import tiny_model

    model, tok = tiny_model()
    ModelRegistry(tmp_path / "registry").save(model, tok, ModelCard(config=model.config))
    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(tmp_path / "big.png")
    posts = tmp_path / "posts.jsonl"
    posts.write_text(
        "\n".join(
            json.dumps({"id": f"p{i}", "text": f"t{i}", "image_urls": ["big.png"] if i % 2 else []}) for i in range(6)
        )
        + "\n"
    )
    out = tmp_path / "labels.jsonl"
    assert classify_file(posts, out, tmp_path / "registry", device="cuda") == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and all("labels" in r for r in records)


def test_neighbour_lookup_on_cuda_matches_the_cpu() -> None:
    import numpy as np

    from models.neighbours import NeighbourIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 24 + 20)).astype(np.float32)
    present = rng.random(500) > 0.2
    sarcasm = np.where(rng.random(500) < 0.3, -100, rng.integers(0, 2, 500))  # some unlabelled
    labels = {"hate": rng.integers(0, 2, 500), "sarcasm": sarcasm}
    index = NeighbourIndex.build(x, present, labels, {"hate": 2, "sarcasm": 2}, text_dim=24)
    q = torch.randn(64, 44)
    q_present = torch.rand(64) > 0.3
    on_cpu = index.label_shares(q, q_present)
    on_gpu = index.label_shares(q.to(CUDA0), q_present.to(CUDA0))
    for space in on_cpu:
        for task in on_cpu[space]:
            np.testing.assert_allclose(on_gpu[space][task], on_cpu[space][task], atol=1e-4)

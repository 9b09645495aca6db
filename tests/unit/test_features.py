import torch

from tests.tiny import tiny_model
from trainer.features import FeatureStore, encode_frozen, load_inputs
from trainer.manifest import Example


def test_bad_images_are_counted_and_become_text_only_or_skipped(tmp_path, synthetic_small):
    good = synthetic_small[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.image.read_bytes()[:100])
    examples = [
        good,
        Example("missing", "t", tmp_path / "nope.png", {}),
        Example("broken", "t", broken, {}),
        Example("text", "t", None, {}),
    ]
    kept = load_inputs(examples, "text-only")
    assert [e.id for e in kept.examples] == [good.id, "missing", "broken", "text"]
    assert kept.image_present.tolist() == [True, False, False, False]
    assert kept.image_errors["missing"] == 1 and sum(kept.image_errors.values()) == 2
    skipped = load_inputs(examples, "skip")
    assert [e.id for e in skipped.examples] == [good.id, "text"]


def test_frozen_features_are_cached_by_content_hash(tmp_path, synthetic_small, monkeypatch):
    model, tok = tiny_model()
    inputs = load_inputs(synthetic_small[:10])
    store = FeatureStore(tmp_path / "cache")
    first = encode_frozen(model, tok, inputs, "image", store, torch.device("cpu"))
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 10

    def boom(*args, **kwargs):
        raise AssertionError("the encoder ran although every output was cached")

    monkeypatch.setattr(model.image_encoder, "forward", boom)
    second = encode_frozen(model, tok, inputs, "image", store, torch.device("cpu"))
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.mask, second.mask)


def test_cache_key_changes_with_encoder_weights(tmp_path, synthetic_small):
    from trainer.features import encoder_key

    a, _ = tiny_model(seed=0)
    b, _ = tiny_model(seed=1)
    assert encoder_key(a, "text") != encoder_key(b, "text")
    assert encoder_key(a, "text") == encoder_key(tiny_model(seed=0)[0], "text")


def test_same_content_marks_reposts_as_false_negatives(synthetic_small):
    from dataclasses import replace

    from trainer.features import FeatureStore, build_features

    model, tok = tiny_model()
    a, b, c = synthetic_small[:3]
    repost = replace(c, id="repost", image=a.image)  # a's image under other text
    retext = replace(b, id="retext", text=c.text)  # c's text over b's image
    features = build_features(
        model, tok, load_inputs([a, b, c, repost, retext]), FeatureStore(None), torch.device("cpu")
    )
    same = features.same_content(range(5))
    assert same.diagonal().all()
    assert same[0, 3] and same[3, 0] and same[2, 4] and same[4, 2]
    assert not same[0, 1] and not same[1, 2]


def test_partly_unfrozen_text_runs_only_its_top_layers_on_the_cached_prefix(tmp_path, synthetic_small, monkeypatch):
    from tests.tiny import tiny_config
    from trainer.features import FeatureStore, LiveFeatures, build_features

    model, tok = tiny_model(tiny_config(text_trainable_layers=1))
    model.eval()
    inputs = load_inputs(synthetic_small[:12])
    cpu = torch.device("cpu")
    cached = build_features(model, tok, inputs, FeatureStore(tmp_path / "cache"), cpu)
    assert cached.frozen_text is None and cached.text_prefix is not None and cached.text_prefix.start == 1
    live = LiveFeatures(model, tok, inputs, cpu)
    idx = [0, 3, 5, 11]
    a, b = cached.text(idx), live.text(idx)
    width = a.mask.shape[1]  # the cache trims padding that no row in the batch needs
    assert torch.equal(a.mask, b.mask[:, :width])
    assert torch.allclose(a.tokens[a.mask], b.tokens[:, :width][b.mask[:, :width]], atol=1e-2)  # float16 cache

    # Training touches the unfrozen top layer only, and the bottom layer never runs.
    bottom = model.text_encoder.layers()[0]
    monkeypatch.setattr(bottom, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("bottom ran")))
    cached.text(idx).pooled.sum().backward()
    top = model.text_encoder.layers()[1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in top.parameters() if p.requires_grad)


def test_an_encoder_that_cannot_be_split_runs_live(tmp_path, synthetic_small, monkeypatch):
    from tests.tiny import tiny_config
    from trainer.features import FeatureStore, build_features

    model, tok = tiny_model(tiny_config(text_trainable_layers=1))

    def wrong(hidden, mask, start):  # a layer API forward_from does not know
        raise TypeError("unexpected keyword argument")

    monkeypatch.setattr(model.text_encoder, "forward_from", wrong)
    features = build_features(model, tok, load_inputs(synthetic_small[:4]), FeatureStore(tmp_path), torch.device("cpu"))
    assert features.text_prefix is None and features.frozen_text is None
    assert features.text([0, 1]).tokens.shape[0] == 2

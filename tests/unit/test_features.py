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

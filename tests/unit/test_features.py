import torch

from modstream.manifest import Example
from tests.tiny import tiny_model
from trainer.features import FeatureStore, encode_frozen, load_inputs


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


def test_image_cache_key_changes_with_the_input_size_the_weights_do_not_fix():
    from trainer.features import encoder_key

    a, _ = tiny_model(seed=0)
    b, _ = tiny_model(seed=0)
    assert encoder_key(a, "image") == encoder_key(b, "image")
    b.image_encoder.image_size = 64  # same weights, other preprocessing: other features
    assert encoder_key(a, "image") != encoder_key(b, "image")
    b.image_encoder.image_size = a.image_encoder.image_size
    b.image_encoder.mean = (0.0, 0.0, 0.0)
    assert encoder_key(a, "image") != encoder_key(b, "image")


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


class _FakeOcr:
    identity = "fake-ocr-1"

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.calls = 0
        self.fail_on = fail_on or set()

    def __call__(self, image):
        from models.ocr import OcrError

        self.calls += 1
        if self.calls in self.fail_on:
            raise OcrError("unreadable")
        return f"text {image.getpixel((0, 0))}"


def test_ocr_text_is_cached_next_to_the_features_and_a_failure_costs_one_post(tmp_path, synthetic_small):
    from trainer.features import read_image_texts

    inputs = load_inputs([*synthetic_small[:6], Example("bare", "no image", None, {})])
    store = FeatureStore(tmp_path / "cache")
    engine = _FakeOcr(fail_on={2})
    texts = read_image_texts(inputs, store, engine)
    assert texts[1] is None and texts[6] is None  # OCR failed on the 2nd image; the last post has none
    assert all(t is not None and t.startswith("text") for i, t in enumerate(texts) if i not in (1, 6))
    assert len(list((tmp_path / "cache" / "ocr-fake-1").rglob("*.json"))) == 0
    assert len(list((tmp_path / "cache" / "ocr-fake-ocr-1").rglob("*.json"))) == 5

    again = _FakeOcr()
    second = read_image_texts(inputs, store, again)
    assert again.calls == 1  # only the image that failed before is read again
    assert second[0] == texts[0] and second[1] is not None


def test_a_model_trained_with_ocr_encodes_text_pairs(tmp_path, synthetic_small, monkeypatch):
    from tests.tiny import tiny_config
    from trainer.features import build_features, subset

    monkeypatch.setattr("trainer.features.TesseractOcr", lambda languages: _FakeOcr())
    store = FeatureStore(tmp_path / "cache")
    plain_model, tok = tiny_model()
    ocr_model, _ = tiny_model(tiny_config(ocr_segment=True))
    plain = build_features(plain_model, tok, load_inputs(synthetic_small[:8]), store, torch.device("cpu"))
    paired = build_features(ocr_model, tok, load_inputs(synthetic_small[:8]), store, torch.device("cpu"))
    assert plain.inputs.ocr_texts is None and paired.inputs.ocr_texts is not None
    assert all(t is not None for t in paired.inputs.ocr_texts)
    # Same text weights, other inputs: the second segment changed what the text encoder saw.
    assert plain.frozen_text is not None and paired.frozen_text is not None
    assert paired.frozen_text.tokens.shape[1] > plain.frozen_text.tokens.shape[1]
    assert subset(paired, [3, 1]).inputs.ocr_texts == [paired.inputs.ocr_texts[3], paired.inputs.ocr_texts[1]]

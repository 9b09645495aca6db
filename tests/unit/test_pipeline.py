"""The pipeline's stages with fakes for the model, the media fetcher and the cache."""

import asyncio
import json
from dataclasses import dataclass, replace

from PIL import Image

from models.card import ModelCard
from models.inference import Prediction, TaskPrediction
from models.routing.route import RoutingPolicy
from modstream.records import Post, encode
from stream.pipeline import Pipeline, dedupe_key
from tests.tiny import tiny_config

CARD = ModelCard(
    config=tiny_config(),
    version="v7",
    itm={"trained": True, "auroc": 0.9, "routing_lift": {"hate": 2}, "threshold": 0.3},
)


class FakeClassifier:
    version = "v7"

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    async def predict(self, texts, images):
        self.calls.append(list(texts))
        out = []
        for text, image in zip(texts, images, strict=True):
            if text == self.fail_on:
                out.append(RuntimeError("model exploded"))
                continue
            itm = None if image is None else (0.1 if "weak" in text else 0.9)
            out.append(Prediction({"hate": TaskPrediction("hateful", 0.8, True, 0.5, {})}, itm, "v7"))
        return out


@dataclass
class FakeResult:
    status: str
    image: object = None
    content_hash: str | None = None
    reason: str = ""


class FakeFetcher:
    async def fetch_many(self, urls):
        return [
            FakeResult("http_error", reason="HTTP 404")
            if "404" in u
            else FakeResult("ok", Image.new("RGB", (4, 4)), "h-" + u[-5:])
            for u in urls
        ]


class DictCache:
    def __init__(self):
        self.data = {}

    async def get_many(self, keys):
        return [self.data.get(k) for k in keys]

    async def put_many(self, items):
        self.data.update(items)


def _raw(pid, text, url=None):
    return encode(Post(pid, text, (url,) if url else ()))


def _pipeline(classifier=None, cache=None):
    return Pipeline(classifier or FakeClassifier(), FakeFetcher(), lambda version: CARD, RoutingPolicy(), cache)


def test_every_input_gets_exactly_one_outcome():
    raws = [
        _raw("a", "fine", "http://m/a.png"),
        b"{broken",
        _raw("b", "weak pair", "http://m/b.png"),
        _raw("c", "no image"),
    ]
    outcomes = asyncio.run(_pipeline().process(raws))
    assert len(outcomes) == 4
    a, broken, b, c = outcomes
    assert a.label.route == "auto" and a.label.media.status == "ok" and a.label.model_version == "v7"
    assert broken.label is None and broken.dead_letter.stage == "parse" and "invalid JSON" in broken.dead_letter.reason
    assert b.label.route == "review" and b.review.reasons == ["weak_image_text_match"]
    assert c.label.itm_match is None and c.label.media.status == "none" and c.label.route == "auto"


def test_media_failure_is_labelled_text_only_with_the_error():
    (out,) = asyncio.run(_pipeline().process([_raw("a", "weak but broken", "http://m/404")]))
    assert out.label.media.status == "http_error" and out.label.media.reason == "HTTP 404"
    assert out.label.itm_match is None and out.label.route == "auto"  # never routed by ITM without an image


def test_model_failure_dead_letters_only_that_post():
    outcomes = asyncio.run(_pipeline(FakeClassifier(fail_on="boom")).process([_raw("a", "ok"), _raw("b", "boom")]))
    assert outcomes[0].label is not None
    assert outcomes[1].dead_letter.stage == "classify" and "model exploded" in outcomes[1].dead_letter.reason
    assert outcomes[1].dead_letter.post_id == "b"


def test_reposted_media_and_text_reuse_the_cached_label():
    classifier, cache = FakeClassifier(), DictCache()
    pipeline = _pipeline(classifier, cache)
    asyncio.run(pipeline.process([_raw("a", "same", "http://m/x.png")]))
    (again,) = asyncio.run(pipeline.process([_raw("b", "same", "http://m/x.png")]))
    assert again.label.dedupe_hit and again.label.post_id == "b"
    assert classifier.calls == [["same"]]  # the model ran once
    assert f"{pipeline.cache_namespace('v7')}:{dedupe_key('same', 'h-x.png')}" in cache.data


def test_another_model_under_the_same_version_name_does_not_get_the_cached_label():
    """A fresh registry names its first model v0001 again; Redis may still hold the labels an
    earlier v0001 cached (make run keeps its Redis across homes)."""
    cache = DictCache()
    first = _pipeline(FakeClassifier(), cache)
    asyncio.run(first.process([_raw("a", "same", "http://m/x.png")]))
    retrained = replace(CARD, created_at="2026-11-28T12:00:00+00:00")  # same name "v7", another model
    classifier = FakeClassifier()
    second = Pipeline(classifier, FakeFetcher(), lambda version: retrained, RoutingPolicy(), cache)
    (out,) = asyncio.run(second.process([_raw("b", "same", "http://m/x.png")]))
    assert not out.label.dedupe_hit and classifier.calls == [["same"]]
    # The same model (same card) in a new process still finds its own cached labels.
    again = _pipeline(FakeClassifier(), cache)
    (hit,) = asyncio.run(again.process([_raw("c", "same", "http://m/x.png")]))
    assert hit.label.dedupe_hit


def test_cache_outage_degrades_to_classifying():
    class DownCache:
        async def get_many(self, keys):
            raise ConnectionError("redis down")

        async def put_many(self, items):
            raise ConnectionError("redis down")

    (out,) = asyncio.run(_pipeline(cache=DownCache()).process([_raw("a", "x")]))
    assert out.label is not None and not out.label.dedupe_hit


def test_duplicates_within_one_batch_run_the_model_once():
    classifier = FakeClassifier()
    raws = [_raw("a", "same", "http://m/x.png"), _raw("b", "same", "http://m/x.png"), _raw("c", "other")]
    outcomes = asyncio.run(_pipeline(classifier).process(raws))
    assert sorted(map(tuple, classifier.calls)) == [("other",), ("same",)]
    assert [o.label.dedupe_hit for o in outcomes] == [False, True, False]
    assert outcomes[0].label.labels == outcomes[1].label.labels and outcomes[1].label.post_id == "b"


def test_a_label_is_routed_and_cached_with_the_card_of_the_model_that_scored_it():
    """Replicas swap models between device batches: the pipeline must not route v8's scores
    with v7's ITM threshold, nor cache them under v7."""
    v8 = ModelCard(
        config=tiny_config(),
        version="v8",
        itm={"trained": True, "auroc": 0.9, "routing_lift": {"hate": 2}, "threshold": 0.95},
    )
    cards = {"v7": CARD, "v8": v8}

    class SwappingClassifier(FakeClassifier):
        """Looked up as v7 when the batch starts; the swap lands before the post is scored."""

        version = "v7"

        async def predict(self, texts, images):
            (prediction,) = await super().predict(texts, images)
            self.version = "v8"
            return [Prediction(prediction.tasks, prediction.itm_match, "v8")]

    cache = DictCache()
    pipeline = Pipeline(SwappingClassifier(), FakeFetcher(), cards.__getitem__, RoutingPolicy(), cache)
    (out,) = asyncio.run(pipeline.process([_raw("a", "fine", "http://m/a.png")]))
    # ITM 0.9 clears v7's threshold (0.3) but not v8's (0.95): routed by v8's card.
    assert out.label.model_version == "v8"
    assert out.label.route == "review" and out.label.reasons == ["weak_image_text_match"]
    assert list(cache.data) == [f"{pipeline.cache_namespace('v8')}:{dedupe_key('fine', 'h-a.png')}"]


# --- one post's unexpected error stays with that post ------------------------------------------


class ExplodingClassifier(FakeClassifier):
    """Raises (instead of returning an error per post) for one text: a bug, not a model error."""

    def __init__(self, explode_on: str):
        super().__init__()
        self.explode_on = explode_on

    async def predict(self, texts, images):
        if self.explode_on in texts:
            await asyncio.sleep(0.01)  # duplicates are already waiting on this computation
            raise KeyError("bug in the classifier")
        return await super().predict(texts, images)


class SlowAndBrokenFetcher(FakeFetcher):
    def __init__(self):
        self.finished: list[str] = []

    async def fetch_many(self, urls):
        (url,) = urls
        if "broken" in url:
            raise RuntimeError("bug in the fetcher")
        await asyncio.sleep(0.2)
        self.finished.append(url)
        return await super().fetch_many(urls)


def _run_isolated(pipeline, raws):
    async def main():
        outcomes = await asyncio.wait_for(pipeline.process(raws), 5)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return outcomes, leftover

    return asyncio.run(main())


def test_an_unexpected_error_dead_letters_that_post_alone_and_no_task_outlives_process():
    fetcher = SlowAndBrokenFetcher()
    pipeline = Pipeline(FakeClassifier(), fetcher, lambda version: CARD, RoutingPolicy())
    raws = [_raw("bad", "x", "http://m/broken.png"), _raw("slow", "y", "http://m/s.png"), _raw("txt", "z")]
    outcomes, leftover = _run_isolated(pipeline, raws)
    by_id = {o.post.id: o for o in outcomes}
    assert by_id["bad"].dead_letter is not None and "bug in the fetcher" in by_id["bad"].dead_letter.reason
    assert by_id["bad"].label is None
    # The slow post was not cancelled by its neighbour's failure, and finished before process returned.
    assert by_id["slow"].label is not None and fetcher.finished == ["http://m/s.png"]
    assert by_id["txt"].label is not None
    assert leftover == []


def test_duplicates_waiting_on_a_computation_that_raised_are_dead_lettered_not_left_waiting():
    pipeline = _pipeline(ExplodingClassifier(explode_on="same text"))
    raws = [_raw("p1", "same text"), _raw("p2", "same text"), _raw("p3", "same text"), _raw("ok", "other")]
    outcomes, leftover = _run_isolated(pipeline, raws)  # wait_for: a waiter left behind would time out
    by_id = {o.post.id: o for o in outcomes}
    for pid in ("p1", "p2", "p3"):
        assert by_id[pid].dead_letter is not None and "bug in the classifier" in by_id[pid].dead_letter.reason
        assert by_id[pid].label is None
    assert by_id["ok"].label is not None and by_id["ok"].dead_letter is None
    assert leftover == []


def test_a_bug_after_scoring_dead_letters_only_the_posts_it_hits():
    def card_of(version):
        raise LookupError(f"no card for {version}")

    pipeline = Pipeline(FakeClassifier(), FakeFetcher(), card_of, RoutingPolicy())
    outcomes, _ = _run_isolated(pipeline, [_raw("a", "one"), b"{not json"])
    assert outcomes[0].dead_letter is not None and "no card" in outcomes[0].dead_letter.reason
    assert outcomes[1].dead_letter is not None and outcomes[1].dead_letter.stage == "parse"


@dataclass
class OcrResult(FakeResult):
    ocr_text: str | None = None


class OcrFetcher(FakeFetcher):
    """Media with the text the decode pool read ("fail" in the URL: OCR failed, None)."""

    async def fetch_many(self, urls):
        return [
            OcrResult("ok", Image.new("RGB", (4, 4)), "h-" + u[-8:], "", None if "fail" in u else "IMG TEXT")
            for u in urls
        ]


def test_the_ocr_text_reaches_the_classifier_and_the_label_and_a_failure_loses_nothing():
    seen = []

    class Recording(FakeClassifier):
        async def predict(self, texts, images):
            seen.extend((str(t), getattr(t, "ocr", None)) for t in texts)
            return await super().predict(texts, images)

    pipeline = Pipeline(Recording(), OcrFetcher(), lambda version: CARD, RoutingPolicy())
    raws = [_raw("a", "caption", "http://m/read.png"), _raw("b", "other", "http://m/fail.png"), _raw("c", "bare")]
    a, b, c = asyncio.run(pipeline.process(raws))
    assert a.label.ocr_text == "IMG TEXT" and b.label.ocr_text is None and c.label.ocr_text is None
    assert b.label is not None and b.dead_letter is None  # OCR failed: labelled without OCR text
    assert sorted(seen) == [("bare", None), ("caption", "IMG TEXT"), ("other", None)]
    assert json.loads(encode(a.label))["ocr_text"] == "IMG TEXT"


def test_every_label_records_what_routed_it_and_a_worker_override():
    raws = [_raw("r1", "weak pair", "http://m/a.png"), _raw("r2", "text only")]
    labels = [o.label for o in asyncio.run(_pipeline().process(raws))]
    assert all(label is not None for label in labels)
    assert {json.dumps(label.routing, sort_keys=True) for label in labels if label} == {
        json.dumps({"overrides": {}, "policy": "itm_gate", "source": "card"}, sort_keys=True)
    }
    overridden = Pipeline(
        FakeClassifier(), FakeFetcher(), lambda version: CARD, RoutingPolicy(itm_threshold=0.95, uncertainty_band=0.1)
    )
    (outcome,) = asyncio.run(overridden.process([_raw("r3", "weak pair", "http://m/b.png")]))
    assert outcome.label is not None
    assert outcome.label.routing == {
        "policy": "itm_gate",
        "source": "worker",
        "overrides": {"itm_threshold": 0.95, "uncertainty_band": 0.1},
    }
    assert json.loads(encode(outcome.label))["routing"]["source"] == "worker"


class BodyFetcher:
    """Real bytes per URL (the content hash is their sha256), as MediaFetcher returns them."""

    def __init__(self, bodies):
        self.bodies = bodies

    async def fetch_many(self, urls):
        import hashlib

        out = []
        for u in urls:
            body = self.bodies[u]
            out.append(FakeResult("ok", Image.new("RGB", (4, 4)), hashlib.sha256(body).hexdigest()))
            out[-1].body = body
        return out


def test_the_scored_bytes_of_a_routed_post_are_kept_as_evidence_before_its_review_item(tmp_path):
    import hashlib

    from stream import metrics
    from stream.evidence import EvidenceStore, LocalBackend

    bodies = {"http://m/weak.png": b"weak pair bytes", "http://m/fine.png": b"fine bytes"}
    store = EvidenceStore(LocalBackend(tmp_path / "evidence"))
    pipeline = Pipeline(FakeClassifier(), BodyFetcher(bodies), lambda version: CARD, RoutingPolicy(), evidence=store)
    weak, fine = asyncio.run(
        pipeline.process([_raw("w", "weak pair", "http://m/weak.png"), _raw("f", "fine", "http://m/fine.png")])
    )
    assert weak.review is not None and fine.review is None
    weak_hash = hashlib.sha256(b"weak pair bytes").hexdigest()
    assert weak.review.label["media"]["content_hash"] == weak_hash
    blob = asyncio.run(store.get(weak_hash))
    assert blob.ok and blob.data == b"weak pair bytes"
    assert not asyncio.run(store.get(hashlib.sha256(b"fine bytes").hexdigest())).ok, "an auto post was kept"

    # A store that fails costs the image, never the post: still labelled and routed, and counted.
    class FullDisk(LocalBackend):
        def put(self, digest, data):
            raise OSError(28, "No space left on device")

    failed = metrics.EVIDENCE.labels("failed")._value.get()
    full = EvidenceStore(FullDisk(tmp_path / "full"))
    blocked = Pipeline(
        FakeClassifier(), BodyFetcher({"http://m/x.png": b"x"}), lambda v: CARD, RoutingPolicy(), evidence=full
    )
    (out,) = asyncio.run(blocked.process([_raw("x", "weak pair", "http://m/x.png")]))
    assert out.label.route == "review" and out.review is not None and out.dead_letter is None
    assert metrics.EVIDENCE.labels("failed")._value.get() == failed + 1


def test_the_audit_samples_every_model_labelled_post_one_review_item_each(tmp_path):
    """The audit is drawn from every post the model labels, before routing: a routed post the
    keyed hash picks is reviewed once, blind, as `audit` (never also as `routed`), and the item
    records that routing picked it. (The old worker audited `auto` labels only, which left
    routing's hardest posts out of the live estimate.)"""
    import hashlib

    from stream import metrics
    from stream.audit_sampling import AuditSampler
    from stream.evidence import EvidenceStore, LocalBackend

    bodies = {"http://m/fine.png": b"fine bytes", "http://m/weak.png": b"weak bytes"}
    store = EvidenceStore(LocalBackend(tmp_path / "evidence"))
    sampled = {r: metrics.AUDIT_SAMPLED.labels(r)._value.get() for r in ("true", "false")}
    routed_reasons = metrics.REVIEW.labels("weak_image_text_match")._value.get()
    every = AuditSampler(1.0, "test key")
    pipeline = Pipeline(
        FakeClassifier(), BodyFetcher(bodies), lambda v: CARD, RoutingPolicy(), evidence=store, audit=every
    )
    fine, weak, text = asyncio.run(
        pipeline.process(
            [_raw("f", "fine", "http://m/fine.png"), _raw("w", "weak pair", "http://m/weak.png"), _raw("t", "no image")]
        )
    )
    assert fine.label.route == "auto" and fine.review.kind == "audit" and fine.review.reasons == ["audit"]
    assert fine.review.routed_by_policy is False
    assert text.label.route == "auto" and text.review.kind == "audit"
    # The routed post picked by the hash: one item, an audit one; its Label stays honest (in review).
    assert weak.label.route == "review" and weak.label.reasons == ["weak_image_text_match"]
    assert weak.review.kind == "audit" and weak.review.reasons == ["audit"], "a picked routed post is audited"
    assert weak.review.routed_by_policy is True and weak.review.label["route"] == "review"
    blind = weak.review.blinded()
    assert blind["routed_by_policy"] is None and "labels" not in blind["label"], "the reviewer cannot tell"
    assert metrics.REVIEW.labels("weak_image_text_match")._value.get() == routed_reasons + 1, "still counted routed"
    assert metrics.AUDIT_SAMPLED.labels("false")._value.get() == sampled["false"] + 2
    assert metrics.AUDIT_SAMPLED.labels("true")._value.get() == sampled["true"] + 1
    assert asyncio.run(store.get(hashlib.sha256(b"fine bytes").hexdigest())).ok, "the audited image is kept too"
    assert asyncio.run(store.get(hashlib.sha256(b"weak bytes").hexdigest())).ok

    # Rate 0: routed posts are routed items (routed_by_policy true), auto posts get none.
    none = Pipeline(
        FakeClassifier(), BodyFetcher(bodies), lambda v: CARD, RoutingPolicy(), audit=AuditSampler(0.0, "k")
    )
    plain, routed = asyncio.run(
        none.process([_raw("f2", "fine", "http://m/fine.png"), _raw("w2", "weak pair", "http://m/weak.png")])
    )
    assert plain.review is None
    assert routed.review.kind == "routed" and routed.review.routed_by_policy is True
    assert routed.review.reasons == ["weak_image_text_match"]


def test_the_keyed_share_of_routed_posts_is_audited_the_rest_routed_once():
    """Over many posts: the audit items are exactly the hash's picks among all labelled posts,
    routed ones included, and every post has at most one review item."""
    from stream.audit_sampling import AuditSampler

    sampler = AuditSampler(0.3, "share key")
    pipeline = Pipeline(FakeClassifier(), FakeFetcher(), lambda v: CARD, RoutingPolicy(), audit=sampler)
    raws = [_raw(f"p{i}", "weak pair" if i % 2 else "fine", f"http://m/{i}.png") for i in range(200)]
    outcomes = asyncio.run(pipeline.process(raws))
    ids = [o.label.post_id for o in outcomes]
    routed = {o.label.post_id for o in outcomes if o.label.route == "review"}
    audited = {o.review.post_id for o in outcomes if o.review is not None and o.review.kind == "audit"}
    assert len(routed) == 100
    assert audited == {p for p in ids if sampler.picks(p)}, "the keyed share of every labelled post"
    assert audited & routed, "routed posts are audited at the same rate"
    assert 0.15 < len(audited & routed) / len(routed) < 0.45
    for o in outcomes:
        pid = o.label.post_id
        expected_kind = "audit" if pid in audited else ("routed" if pid in routed else None)
        assert (o.review.kind if o.review is not None else None) == expected_kind
        if o.review is not None:
            assert o.review.routed_by_policy is (pid in routed)


def test_images_the_fetcher_did_not_decode_again_are_counted():
    from prometheus_client import REGISTRY

    @dataclass
    class Reposted(FakeResult):
        decoded_before: bool = False

    class MemoFetcher:
        async def fetch_many(self, urls):
            return [Reposted("ok", Image.new("RGB", (4, 4)), "h-" + u[-5:], decoded_before="again" in u) for u in urls]

    def hits() -> float:
        return REGISTRY.get_sample_value("modstream_media_decode_memo_hits_total") or 0.0

    before = hits()
    pipeline = Pipeline(FakeClassifier(), MemoFetcher(), lambda version: CARD, RoutingPolicy(), None)
    raws = [
        _raw("a", "one", "http://m/first"),
        _raw("b", "two", "http://m/again"),
        _raw("c", "three", "http://m/again"),
    ]
    outcomes = asyncio.run(pipeline.process(raws))
    assert all(o.label is not None for o in outcomes)
    assert hits() - before == 2

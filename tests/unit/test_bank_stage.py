"""The pipeline's verdict-bank stage (stream/bank_stage.py) with the real banks and fakes for
the model and the fetcher: a violating match is labelled from the bank without the model, a
benign match keeps the model's label but not the review route, a miss is untouched, and the
bank topic's records are refused when forged or malformed."""

import asyncio
import hashlib
from dataclasses import dataclass

import pytest
from PIL import Image

from models.routing.route import RoutingPolicy
from modstream.records import Post, RecordError, encode
from stream import metrics
from stream.bank_topic import BankFollower, decode_update
from stream.banks.bank import BankEntry, BankUpdate, VerdictBanks
from stream.banks.hashing import PdqHash
from stream.pipeline import Pipeline
from tests.unit.test_pipeline import CARD, FakeClassifier

PDQ = PdqHash(bytes(range(32)), 90)


def _sha(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


@dataclass
class HashedResult:
    status: str
    image: object = None
    content_hash: str | None = None
    reason: str = ""
    pdq: PdqHash | None = None


class HashingFetcher:
    """Every URL's bytes hash to sha256(url); `near` URLs carry a PDQ 5 bits from PDQ."""

    async def fetch_many(self, urls):
        out = []
        for u in urls:
            if "404" in u:
                out.append(HashedResult("http_error", content_hash=_sha(u), reason="HTTP 404"))
                continue
            pdq = None
            if "near" in u:
                flipped = bytearray(PDQ.bits)
                flipped[0] ^= 0b11111
                pdq = PdqHash(bytes(flipped), 90)
            out.append(HashedResult("ok", Image.new("RGB", (4, 4)), _sha(u), pdq=pdq))
        return out


def _entry(entry_id, bank, *, content_hash=None, pdq=None, verdicts=None):
    verdicts = verdicts or ({"hate": 1, "sarcasm": 0} if bank == "violating" else {"hate": 0, "sarcasm": 0})
    return BankEntry(
        entry_id, bank, "review", content_hash, pdq, 90 if pdq else None, verdicts, "d-" + entry_id, "alice"
    )


def _pipeline(banks):
    classifier = FakeClassifier()
    return classifier, Pipeline(classifier, HashingFetcher(), lambda v: CARD, RoutingPolicy(), banks=banks)


def _raw(pid, text, url):
    return encode(Post(pid, text, (url,)))


def test_a_violating_match_gives_the_banked_verdict_without_the_model():
    banks = VerdictBanks()
    banks.apply(BankUpdate.add(_entry("e1", "violating", content_hash=_sha("http://m/meme.jpg"))))
    banks.apply(BankUpdate.add(_entry("e2", "violating", pdq=PDQ.hex)))
    classifier, pipeline = _pipeline(banks)
    before = metrics.BANK_MATCHES.labels("violating", "pdq")._value.get()
    exact, near = asyncio.run(
        pipeline.process([_raw("a", "anything", "http://m/meme.jpg"), _raw("b", "other text", "http://m/near.jpg")])
    )
    assert classifier.calls == []  # the model never ran
    for out, entry_id, kind, distance in ((exact, "e1", "exact", 0), (near, "e2", "pdq", 5)):
        label = out.label
        assert label.route == "bank_match" and out.review is None and out.dead_letter is None
        assert label.bank["entry_id"] == entry_id and label.bank["match"] == kind
        assert label.bank["distance"] == distance and label.bank["decision_id"] == "d-" + entry_id
        assert label.labels["hate"]["label"] == "hateful" and label.labels["hate"]["source"] == "bank"
        assert label.labels["sarcasm"]["label"] == "not_sarcastic" and label.labels["sarcasm"]["score"] is None
    assert metrics.BANK_MATCHES.labels("violating", "pdq")._value.get() == before + 1


def test_a_benign_match_keeps_the_models_label_but_not_the_review_route():
    banks = VerdictBanks()
    banks.apply(BankUpdate.add(_entry("b1", "benign", content_hash=_sha("http://m/cat.jpg"))))
    classifier, pipeline = _pipeline(banks)
    # "weak" makes the fake model's ITM low: routed to review without the bank (the control below).
    (benign, control) = asyncio.run(
        pipeline.process([_raw("a", "weak pair", "http://m/cat.jpg"), _raw("b", "weak pair", "http://m/dog.jpg")])
    )
    assert classifier.calls  # the model labelled both
    assert benign.label.route == "auto" and benign.review is None and benign.label.bank["bank"] == "benign"
    assert benign.label.labels["hate"]["score"] == 0.8  # the model's own output stands
    assert control.label.route == "review" and control.label.bank is None


def test_misses_text_only_posts_and_failed_fetches_go_to_the_model():
    banks = VerdictBanks()
    # A banked hash equal to a failed fetch's body hash must not match: nobody judged that picture.
    banks.apply(BankUpdate.add(_entry("e1", "violating", content_hash=_sha("http://m/404"))))
    classifier, pipeline = _pipeline(banks)
    outs = asyncio.run(
        pipeline.process(
            [_raw("a", "t", "http://m/new.jpg"), encode(Post("b", "text only", ())), _raw("c", "t", "http://m/404")]
        )
    )
    assert [o.label.route for o in outs] == ["auto", "auto", "auto"]
    assert all(o.label.bank is None for o in outs) and len(classifier.calls) >= 1


def test_removing_the_entry_sends_the_next_repost_to_the_model():
    banks = VerdictBanks()
    banks.apply(BankUpdate.add(_entry("e1", "violating", content_hash=_sha("http://m/meme.jpg"))))
    classifier, pipeline = _pipeline(banks)
    (first,) = asyncio.run(pipeline.process([_raw("a", "t", "http://m/meme.jpg")]))
    banks.apply(BankUpdate.remove("e1"))
    (second,) = asyncio.run(pipeline.process([_raw("b", "t", "http://m/meme.jpg")]))
    assert first.label.route == "bank_match" and second.label.route == "auto" and classifier.calls


def test_bank_topic_records_are_refused_when_malformed_or_forged():
    banks = VerdictBanks()
    follower = BankFollower("unused:1", banks)
    good = _entry("e1", "violating", pdq=PDQ.hex)
    records = [
        (b"e1", encode_update(BankUpdate.add(good))),
        (b"other-id", encode_update(BankUpdate.add(_entry("e2", "violating", pdq=PDQ.hex)))),  # key != entry
        (b"e3", b'{"op": "add", "entry": {"entry_id": "e3", "bank": "violating", "verdicts": {"hate": 1}}}'),
        (b"e4", b"[" * 5000),  # nested beyond the record limit
        (
            b"e5",
            b'{"op": "add", "entry": {"entry_id": "e5", "bank": "violating", "source": "x", "pdq": "'
            + b"g" * 64
            + b'", "verdicts": {"hate": 1}}}',
        ),
        (
            b"e6",
            b'{"op": "add", "entry": {"entry_id": "e6", "bank": "benign", "source": "x", "pdq": "'
            + PDQ.hex.encode()
            + b'", "verdicts": {"hate": 1}}}',
        ),  # a "benign" entry saying hateful
        (b"e1", None),  # a tombstone removes its key
    ]
    before = metrics.BANK_UPDATES.labels("refused")._value.get()
    refused = follower.apply_records(records)
    assert refused == 5 and metrics.BANK_UPDATES.labels("refused")._value.get() == before + 5
    assert len(banks) == 0 and banks.version == 2  # e1 added, then removed; nothing else applied
    with pytest.raises(RecordError):
        decode_update(None, None)


def encode_update(update: BankUpdate) -> bytes:
    import orjson

    return orjson.dumps(update.to_json())


def test_an_entrys_variants_match_for_it_and_leave_with_it():
    variant = PdqHash(bytes(reversed(range(32))), 90)
    banks = VerdictBanks()
    banks.apply(BankUpdate.add(_entry("e1", "violating", pdq=PDQ.hex)))
    assert banks.match(None, variant) is None
    with_variant = BankEntry(
        "e1", "violating", "review", None, PDQ.hex, 90, {"hate": 1}, "d-e1", "alice", pdq_variants=(variant.hex,)
    )
    banks.apply(BankUpdate.add(with_variant))  # the same id again: replaces the entry, variants included
    found = banks.match(None, variant)
    assert found is not None and found.entry.entry_id == "e1" and found.distance == 0
    assert [m.entry.entry_id for m in banks.nearest(variant, k=5)] == ["e1"]  # one row per entry, not per hash
    banks.apply(BankUpdate.remove("e1"))
    assert banks.match(None, variant) is None and banks.match(None, PDQ) is None


@pytest.mark.parametrize(
    ("variants", "pdq", "why"),
    [
        (["g" * 64], PDQ.hex, "64 lowercase hex"),
        ([PDQ.hex] * 49, PDQ.hex, "at most"),
        ([PDQ.hex], None, "without the image's own"),
        ("not a list", PDQ.hex, "list of PDQ hashes"),
        ([{"nested": PDQ.hex}], PDQ.hex, "64 lowercase hex"),
    ],
)
def test_hostile_variants_are_refused_naming_the_field(variants, pdq, why):
    record = {
        "entry_id": "e1",
        "bank": "violating",
        "source": "review",
        "content_hash": _sha("x"),
        "pdq": pdq,
        "pdq_quality": 90 if pdq else None,
        "verdicts": {"hate": 1},
        "pdq_variants": variants,
    }
    with pytest.raises(RecordError, match=why) as caught:
        BankEntry.from_json(record)
    assert "pdq_variants" in str(caught.value)


def test_caption_bars_are_trimmed_and_a_picture_without_them_is_left_alone():
    from models.images import MAX_SIDE, decode_image
    from stream.banks.variants import trim_bars
    from tests.reposts import captioned, photo_like

    picture = photo_like(3)
    bounded = decode_image(encode_image(picture), max_side=MAX_SIDE)
    with_bar = decode_image(captioned(picture, "a caption over the picture"), max_side=MAX_SIDE)
    trimmed = trim_bars(with_bar)
    assert trimmed is not None and abs(trimmed.size[1] - bounded.size[1]) <= 2 and trimmed.size[0] == bounded.size[0]
    rng = __import__("numpy").random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype="uint8"))
    assert trim_bars(noise) is None


def encode_image(image):
    from tests.reposts import encode

    return encode(image)


def test_the_audit_never_samples_a_violating_match_but_does_a_benign_one():
    """A violating match's label is a person's banked verdict, not the model's: nothing for the
    audit to measure. A benign match keeps the model's label, so it is in the audit's population."""
    from stream.audit_sampling import AuditSampler

    banks = VerdictBanks()
    banks.apply(BankUpdate.add(_entry("e1", "violating", content_hash=_sha("http://m/meme.jpg"))))
    banks.apply(BankUpdate.add(_entry("b1", "benign", content_hash=_sha("http://m/cat.jpg"))))
    pipeline = Pipeline(
        FakeClassifier(), HashingFetcher(), lambda v: CARD, RoutingPolicy(), banks=banks, audit=AuditSampler(1.0, "k")
    )
    violating, benign = asyncio.run(
        pipeline.process([_raw("a", "anything", "http://m/meme.jpg"), _raw("b", "weak pair", "http://m/cat.jpg")])
    )
    assert violating.label.route == "bank_match" and violating.review is None
    assert benign.label.route == "auto" and benign.review.kind == "audit" and benign.review.routed_by_policy is False

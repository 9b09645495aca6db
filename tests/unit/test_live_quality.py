"""Blind audit sampling and live quality from verdicts: which posts are audited, what an
audit reviewer's labels mean, and how each verdict counts against the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from modstream.records import RecordError, ReviewDecision, ReviewItem, TaskDecision, encode
from review.decisions import audit_choices, build_decision
from review.live_quality import live_kind, task_outcomes
from stream.audit_sampling import AuditSampler

TASKS = {"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]}


def test_the_audit_sample_is_keyed_stable_and_near_its_rate() -> None:
    ids = [f"post-{i}" for i in range(20_000)]
    sampler = AuditSampler(0.05, "a production audit key")
    picked = {i for i in ids if sampler.picks(i)}
    assert 800 <= len(picked) <= 1200  # 5% of 20,000 = 1,000
    assert picked == {i for i in ids if AuditSampler(0.05, "a production audit key").picks(i)}, "replays agree"
    other = {i for i in ids if AuditSampler(0.05, "another key").picks(i)}
    assert len(picked & other) < 150, "without the key the sample cannot be predicted"
    assert not any(AuditSampler(0.0, "k").picks(i) for i in ids[:500])
    assert all(AuditSampler(1.0, "k").picks(i) for i in ids[:500])
    with pytest.raises(ValueError):
        AuditSampler(1.5, "k")


def _item(kind: str = "audit") -> ReviewItem:
    labels = {
        "hate": {"label": "hateful", "score": 0.8, "decision": True, "threshold": 0.5},
        "sarcasm": {"label": "not_sarcastic", "score": 0.2, "decision": False, "threshold": 0.5},
    }
    label = {"labels": labels, "itm_match": 0.9, "media": {"status": "none"}, "model_version": "v3"}
    return ReviewItem("p1", "text", None, ["audit"], label, tasks=TASKS, kind=kind)


def _values(obj: object) -> list[object]:
    """Every leaf value of nested dicts and lists."""
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in _values(value)]
    if isinstance(obj, list):
        return [v for value in obj for v in _values(value)]
    return [obj]


def test_an_audit_item_is_blind_and_takes_labels_not_confirmations() -> None:
    item = _item()
    blinded = item.blinded()
    assert "labels" not in blinded["label"] and "itm_match" not in blinded["label"]
    # No score anywhere in it (searched by value: the queued_at time may contain "0.8" as text).
    assert 0.8 not in _values(blinded) and "score" not in str(blinded) and "hateful" not in str(blinded["label"])
    assert _item("routed").blinded()["label"]["labels"]["hate"]["score"] == 0.8  # routed items keep the view
    choices = audit_choices(item, {"hate": ("label:not_hateful", None), "sarcasm": ("label", "not_sarcastic")})
    assert choices == {"hate": ("correct", "not_hateful"), "sarcasm": ("confirm", None)}
    decision = build_decision(item, "alice", choices)
    assert decision.kind == "audit" and decision.training_labels() == {
        "hate": "not_hateful",
        "sarcasm": "not_sarcastic",
    }
    for seen in ({"hate": ("confirm", None)}, {"hate": ("correct", "not_hateful")}, {"hate": ("label", None)}):
        with pytest.raises(RecordError):
            audit_choices(item, seen)
    assert audit_choices(item, {"hate": ("skip", None)}) == {"hate": ("skip", None)}
    with pytest.raises(RecordError, match="kind"):
        ReviewItem.from_json({**item.to_json(), "kind": "anything"})


def test_an_audit_item_of_a_routed_post_keeps_routing_hidden_and_carries_it_to_the_decision() -> None:
    item = dataclasses.replace(_item(), routed_by_policy=True)
    assert item.blinded()["routed_by_policy"] is None, "being routed says the model was unsure"
    assert ReviewItem.from_json(item.to_json()).routed_by_policy is True
    decision = build_decision(
        item, "alice", audit_choices(item, {"hate": ("label:hateful", None), "sarcasm": ("skip", None)})
    )
    assert decision.kind == "audit" and decision.routed_by_policy is True
    assert ReviewDecision.from_json(decision.to_json()).routed_by_policy is True
    old = {k: v for k, v in item.to_json().items() if k != "routed_by_policy"}  # written before the field
    assert ReviewItem.from_json(old).routed_by_policy is None
    assert live_kind(decision) == "audit"
    assert live_kind(dataclasses.replace(decision, kind="routed", routed_by_policy=True)) == "routed"
    assert live_kind(dataclasses.replace(decision, kind="routed", routed_by_policy=None)) == "routed"
    # An escalated audit item of an unrouted post, settled by an admin as `routed`: neither population.
    assert live_kind(dataclasses.replace(decision, kind="routed", routed_by_policy=False)) is None


def _decision(actions: dict[str, tuple[str, str | None]], kind: str = "audit") -> ReviewDecision:
    model = {
        "hate": {"label": "hateful", "decision": True},
        "sarcasm": {"label": "not_sarcastic", "decision": False},
    }
    return ReviewDecision("d", "p", "r", {t: TaskDecision(*a) for t, a in actions.items()}, "v3", model, "t", kind=kind)


def test_each_verdict_counts_against_the_model() -> None:
    cases = [
        ({"hate": ("confirm", "hateful"), "sarcasm": ("confirm", "not_sarcastic")}, {"hate": "tp", "sarcasm": "tn"}),
        (
            {"hate": ("not_violating", "not_hateful"), "sarcasm": ("correct", "sarcastic")},
            {"hate": "fp", "sarcasm": "fn"},
        ),
        (
            {"hate": ("correct", "not_hateful"), "sarcasm": ("not_violating", "not_sarcastic")},
            {"hate": "fp", "sarcasm": "tn"},
        ),
        ({"hate": ("skip", None), "sarcasm": ("escalate", None)}, {}),
    ]
    for actions, expected in cases:
        assert dict(task_outcomes(_decision(actions))) == expected, actions


@pytest.mark.asyncio
async def test_the_dataset_sink_counts_a_posts_first_verdict_once(tmp_path: Path) -> None:
    from review import sink_metrics
    from review.dataset import ReviewedDataset
    from review.dataset_sink import DatasetSink
    from review.kafka_sink import SinkRecord
    from stream.evidence import EvidenceStore, LocalBackend

    class NoDeadLetters:
        async def send(self, letters, reasons) -> None:  # type: ignore[no-untyped-def]
            assert not letters

    counter = sink_metrics.LIVE.labels("audit", "hate", "v3", "fp")
    before = counter._value.get()
    ds = ReviewedDataset(tmp_path / "reviewed")
    sink = DatasetSink(ds, EvidenceStore(LocalBackend(tmp_path / "ev")), NoDeadLetters())
    verdict = _decision({"hate": ("not_violating", "not_hateful"), "sarcasm": ("confirm", "not_sarcastic")})
    record = SinkRecord("reviewed", 0, 1, b"p", encode(verdict))
    await sink.apply([record])
    await sink.apply([record])  # a replay
    assert counter._value.get() == before + 1
    # A `routed` decision on a post routing did not pick (an escalated audit item an admin settled
    # in view of the model) is in neither population: on disk, not counted.
    routed_fp = sink_metrics.LIVE.labels("routed", "hate", "v3", "fp")
    routed_before = routed_fp._value.get()
    settled = dataclasses.replace(verdict, decision_id="d3", post_id="p3", kind="routed", routed_by_policy=False)
    await sink.apply([SinkRecord("reviewed", 0, 3, b"p3", encode(settled))])
    assert routed_fp._value.get() == routed_before and "p3" in ds.index
    hostile = ReviewDecision.from_json({**verdict.to_json(), "decision_id": "d2", "kind": "x" * 300})
    dead: list = []

    class Collect:
        async def send(self, letters, reasons) -> None:  # type: ignore[no-untyped-def]
            dead.extend(letters)

    sink.dead_letters = Collect()
    await sink.apply([SinkRecord("reviewed", 0, 2, b"p", encode(hostile))])
    assert len(dead) == 1 and "kind" in dead[0].reason, "an unknown kind never becomes a metric label"
    ds.close()

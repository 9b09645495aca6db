"""Holdout selection, reading the reviewed dataset and counting new decisions (no training)."""

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from models.registry import ModelRegistry
from modstream.manifest import Example
from trainer.holdout import (
    ids_digest,
    in_base_holdout,
    in_reviewed_holdout,
    resolvable_drop,
    split_base,
    split_reviewed,
)
from trainer.reviewed import last_seen, new_decisions, read_reviewed, write_seen

TASKS = {"hate": ["not_hateful", "hateful"], "sarcasm": ["not_sarcastic", "sarcastic"]}
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _ex(i: int, minutes: int | None = None, **meta) -> Example:
    m = {"decision_id": f"d{i}", "decided_at": (T0 + timedelta(minutes=i if minutes is None else minutes)).isoformat()}
    m.update(meta)
    return Example(f"p{i}", f"text {i}", None, {"hate": "hateful", "sarcasm": None}, m)


def test_base_holdout_is_fixed_by_id_whatever_the_order_or_size():
    examples = [Example(f"syn-{i}", "t", None) for i in range(3000)]
    train, holdout = split_base(examples)
    assert 0.08 < len(holdout) / len(examples) < 0.12
    assert not {e.id for e in train} & {e.id for e in holdout}
    assert len(train) + len(holdout) == len(examples)
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    assert {e.id for e in split_base(shuffled)[1]} == {e.id for e in holdout}
    # Growing the data never moves an example in or out of the holdout.
    assert {e.id for e in split_base(examples[:1000])[1]} == {e.id for e in holdout if int(e.id[4:]) < 1000}
    assert all(in_base_holdout(e.id) for e in holdout)


def test_reviewed_holdout_is_a_stable_hash_share_that_growth_never_moves():
    examples = [_ex(i) for i in range(2000)]
    train, holdout = split_reviewed(examples)
    assert 300 <= len(holdout) <= 500 and len(train) + len(holdout) == 2000  # about a fifth
    assert not {e.id for e in train} & {e.id for e in holdout}
    shuffled = examples[:]
    random.Random(2).shuffle(shuffled)
    assert {e.id for e in split_reviewed(shuffled)[1]} == {e.id for e in holdout}
    # A post held out stays held out as decisions arrive (the newest-fifth rule let last
    # round's holdout become this round's training data).
    assert {e.id for e in split_reviewed(examples[:500])[1]} == {e.id for e in holdout if int(e.id[1:]) < 500}
    assert all(in_reviewed_holdout(e.id) for e in holdout)
    # Not the base holdout's choice (another salt): a post in both data sets is not held out twice alike.
    assert {e.id for e in holdout} != {e.id for e in examples if in_base_holdout(e.id, 0.2)}


def test_resolvable_drop_shrinks_with_the_holdout():
    assert resolvable_drop(0) is None
    assert resolvable_drop(38) == 0.225 and resolvable_drop(2400) == 0.028
    assert resolvable_drop(9604) == 0.014


def test_missing_decision_time_is_an_error_naming_the_example():
    bad = Example("p-x", "t", None, {"hate": "hateful"}, {"decision_id": "d"})
    with pytest.raises(ValueError, match=r"'p-x' has no meta.decided_at"):
        split_reviewed([bad])
    worse = Example("p-y", "t", None, {"hate": "hateful"}, {"decided_at": "yesterday"})
    with pytest.raises(ValueError, match=r"'p-y'.*'yesterday'"):
        split_reviewed([worse])


def test_ids_digest_ignores_order():
    assert ids_digest(["a", "b"]) == ids_digest(["b", "a"]) != ids_digest(["a"])


def _write_lines(folder, lines: list[dict], tail: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line) + "\n" for line in lines) + tail
    (folder / "manifest.jsonl").write_text(text, encoding="utf-8")


def _line(i: int, labels: dict, image: str | None = None) -> dict:
    meta = {"decision_id": f"d{i}", "decided_at": (T0 + timedelta(minutes=i)).isoformat(), "reviewer": "r"}
    return {"id": f"p{i}", "text": f"t{i}", "image": image, "labels": labels, "meta": meta}


def test_read_reviewed_keeps_labelled_lines_for_the_models_tasks(tmp_path):
    folder = tmp_path / "reviewed"
    _write_lines(
        folder,
        [
            _line(1, {"hate": "hateful", "sarcasm": None}, image="media/abc.png"),
            _line(2, {"hate": None, "sarcasm": None}),  # labels nothing: left out
            _line(3, {"nudity": "yes", "sarcasm": "sarcastic"}),  # a task the model lacks is dropped
        ],
        # A line the dataset sink is still appending is not read (and not an error).
        tail='{"id": "p4", "text": "half',
    )
    examples = read_reviewed(folder, TASKS)
    assert [e.id for e in examples] == ["p1", "p3"]
    assert examples[0].image == folder / "media" / "abc.png"
    assert examples[1].labels == {"sarcasm": "sarcastic"}
    assert read_reviewed(tmp_path / "nothing-yet", TASKS) == []


def test_read_reviewed_refuses_a_label_the_model_does_not_know(tmp_path):
    _write_lines(tmp_path, [_line(1, {"hate": "very_hateful"})])
    with pytest.raises(ValueError, match=r"'p1'.*'very_hateful'.*'hate'"):
        read_reviewed(tmp_path, TASKS)


def test_new_decisions_count_what_the_newest_retrained_version_did_not_see(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    examples = [_ex(i) for i in range(10)]
    assert last_seen(registry).version is None
    assert len(new_decisions(examples, last_seen(registry))) == 10
    for version in ("v0001", "v0002", "v0003"):
        (registry.root / version).mkdir(parents=True)
        (registry.root / version / "card.json").write_text("{}")
    # v0001 was not retrained (no record); v0002 looked at 6 (4 trained on, 2 held out).
    write_seen(registry.root / "v0002", ["d0", "d1", "d2", "d3"], ["d4", "d5"])
    seen = last_seen(registry)
    assert seen.version == "v0002"
    assert new_decisions(examples, seen) == ["d6", "d7", "d8", "d9"]
    # A re-decision of a post seen before carries a new decision id: it counts.
    redecided = Example("p0", "text 0", None, {"hate": "not_hateful"}, {"decision_id": "d0-b", "decided_at": "x"})
    assert new_decisions([*examples, redecided], seen)[-1] == "d0-b"
    # The newest retrained version wins, refused or not.
    write_seen(registry.root / "v0003", [f"d{i}" for i in range(9)], [])
    assert new_decisions(examples, last_seen(registry)) == ["d9"]


def test_a_first_training_reserves_the_base_holdout_and_retrains_know_no_version_saw_it(tmp_path):
    """`modstream train` and the demo model set the base holdout aside from the first training
    and record it; the retrain job then finds no ancestor that trained on it."""
    from models.card import ModelCard
    from tests.tiny import tiny_model
    from trainer.holdout import reserve_base_holdout
    from trainer.retrain import lineage_saw_base_holdout

    source = {"preset": "synthetic", "n": 1000, "seed": 0}
    examples = [Example(f"syn-{i}", "t", None) for i in range(1000)]
    train, recorded = reserve_base_holdout(examples, source)
    _, holdout = split_base(examples)
    assert {e.id for e in train}.isdisjoint(e.id for e in holdout) and len(train) + len(holdout) == 1000
    assert recorded["holdouts"]["base"]["digest"] == ids_digest(e.id for e in holdout)
    assert recorded["holdouts"]["base"]["n"] == len(holdout) and recorded["data_source"] == source

    registry = ModelRegistry(tmp_path / "registry")
    model, tokenizer = tiny_model()
    reserved = registry.save(model, tokenizer, ModelCard(config=model.config, training=dict(recorded)))
    assert lineage_saw_base_holdout(registry, reserved, source, 0.1) is None
    # A first model trained on everything (no holdout recorded) is named as having seen it,
    # and so is one whose data source differs from the one the retrain reloads.
    everything = registry.save(model, tokenizer, ModelCard(config=model.config, training={"data_source": source}))
    assert lineage_saw_base_holdout(registry, everything, source, 0.1) == everything
    assert lineage_saw_base_holdout(registry, reserved, {**source, "n": 2000}, 0.1) == reserved


def test_train_records_where_its_base_data_comes_from(tmp_path):
    import argparse

    from trainer.commands import _data_source, _holdout_fraction

    manifest = tmp_path / "m.jsonl"
    args = argparse.Namespace(preset=None, manifest=str(manifest), with_text_only=False, synthetic_n=1200)
    assert _data_source(args) == {"manifest": str(manifest.resolve())}
    args.preset = "synthetic"
    assert _data_source(args) == {"preset": "synthetic", "n": 1200, "seed": 0}
    with pytest.raises(argparse.ArgumentTypeError):
        _holdout_fraction("1.0")
    assert _holdout_fraction("0") == 0.0

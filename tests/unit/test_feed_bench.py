"""The feed benchmark's parts that decide what it reports (bench/feed_throughput.py): the stand-in
model the worker serves there, and how a py-spy sample is put under a stage."""

from __future__ import annotations

from PIL import Image

from bench.feed_throughput import breakdown, feed_posts, stage_of
from models.card import ModelCard
from models.routing.route import RoutingPolicy, route
from models.stand_in import STAND_IN_ITM, StandInPredictor
from tests.tiny import tiny_config, tiny_model


def test_the_stand_in_answers_every_task_confidently_negative_without_a_forward() -> None:
    model, tokenizer = tiny_model(tiny_config())
    card = ModelCard(config=model.config)
    predictor = StandInPredictor(model, tokenizer, card)

    def no_forward(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stand-in ran the model")

    model.forward = no_forward  # type: ignore[method-assign]
    preds = predictor.predict(["with a picture", "text only"], [Image.new("RGB", (40, 30)), None])
    assert [p.itm_match for p in preds] == [STAND_IN_ITM, None]
    for p in preds:
        assert set(p.tasks) == set(card.tasks)
        for task, t in p.tasks.items():
            assert t.label == card.tasks[task][0] and not t.decision
            assert t.score < t.threshold
            assert abs(sum(t.probs.values()) - 1) < 1e-9


def test_a_sample_goes_to_the_innermost_frame_that_names_a_stage() -> None:
    loop = "run_forever (/usr/lib/python3.11/asyncio/base_events.py:608)"
    decode = "decode_image (/w/models/images.py:114)"
    pil_load = "load (/v/site-packages/PIL/ImageFile.py:291)"
    thumb = "thumbnail (/v/site-packages/PIL/Image.py:2700)"
    assert stage_of([loop, "_decode_sync (/w/stream/media.py:526)", decode, pil_load]) == "decode"
    assert stage_of([loop, decode, thumb]) == "resize"
    assert stage_of([loop, "fetch (/w/stream/media.py:400)", "read (/v/site-packages/aiohttp/streams.py:1)"]) == "fetch"
    # PIL's work for PDQ is the banks' cost; a resize inside the decode is the resize's.
    assert stage_of([loop, "query_hashes (/w/stream/banks/variants.py:111)", pil_load]) == "banks (PDQ, lookup)"
    assert stage_of([loop, "look_up (/w/stream/bank_stage.py:40)"]) == "banks (PDQ, lookup)"
    assert stage_of([loop, "send (/v/site-packages/aiokafka/producer/producer.py:1)"]) == "produce"
    assert stage_of([loop, "_run_once (/usr/lib/python3.11/asyncio/base_events.py:1900)"]) == "other"
    assert stage_of([loop, "select (/usr/lib/python3.11/selectors.py:468)"]) == "idle"
    assert stage_of(["_worker (/usr/lib/python3.11/concurrent/futures/thread.py:81)"]) == "idle"


def test_breakdown_counts_py_spy_raw_lines_by_stage() -> None:
    raw = (
        "thread (0x1);main (/w/x.py:1);decode_image (/w/models/images.py:9) 7\n"
        "thread (0x2);main (/w/x.py:1);content_hash (/w/models/images.py:40) 3\n"
        "garbage line without a count\n"
    )
    assert breakdown(raw) == {"decode": 7, "hash + dedupe": 3}


def test_reposts_repeat_an_earlier_post_and_every_other_post_has_its_own_image() -> None:
    names = [f"photo-{i}.jpg" for i in range(100)]
    posts = feed_posts(list(names), "http://127.0.0.1:1", 100, 0.3, "p", seed=0)
    images = [p.image_urls[0] for p in posts]
    fresh = len(set(images))
    assert 55 <= fresh <= 85  # about 70 fresh at a 30% repost share
    assert len({(p.text, p.image_urls) for p in posts}) == fresh  # a repost repeats text and image
    assert len({p.id for p in posts}) == 100


def test_routing_sends_no_stand_in_answer_to_review() -> None:
    model, tokenizer = tiny_model(tiny_config())
    card = ModelCard(config=model.config)
    pred = StandInPredictor(model, tokenizer, card).predict(["x"], [Image.new("RGB", (40, 30))])[0]
    assert route(pred, card, RoutingPolicy(), itm_trusted=True).route == "auto"

"""The reviewer's image-text answer: one key on the page (m / u), a field in the API; it is the
only thing that makes a reviewed pair an ITM target, and a changed answer is a new decision."""

from __future__ import annotations

import re
from typing import Any

from tests.e2e.conftest import Console, read_decision
from tests.e2e.test_review_console import login, shown_post_id


def test_the_page_records_unrelated_with_one_key(browser: Any, start_console: Any) -> None:
    console: Console = start_console()
    post_id = console.enqueue("a caption that has nothing to do with its picture")
    page = login(browser, console, "alice")
    assert shown_post_id(page) == post_id
    assert page.is_checked("#pair input[value='']"), "unanswered by default"
    page.keyboard.press("u")
    assert page.is_checked("#pair input[value=mismatch]")
    page.keyboard.press("m")
    page.keyboard.press("m")  # the same key again clears the answer
    assert page.is_checked("#pair input[value='']")
    page.keyboard.press("u")
    page.keyboard.press("a")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/review\?done="))
    assert read_decision(console.bootstrap, post_id).image_text_match is False
    page.context.close()


def test_the_api_takes_true_false_or_null_and_refuses_anything_else(start_console: Any) -> None:
    console: Console = start_console()
    post_id = console.enqueue("pair via the API")
    status, claim = console.api("POST", "/api/v1/claim")
    assert status == 200
    path = f"/api/v1/items/{claim['entry_id']}/decision"
    body: dict[str, Any] = {"decisions": {"hate": "confirm", "sarcasm": "confirm"}}
    for hostile in ("yes", 1, {"a": 1}, [True]):
        status, answer = console.api("POST", path, {**body, "image_text_match": hostile})
        assert status == 400 and "image_text_match" in answer["error"], (hostile, answer)
    status, first = console.api("POST", path, {**body, "image_text_match": True})
    assert status == 201 and first["decision"]["image_text_match"] is True
    assert read_decision(console.bootstrap, post_id).image_text_match is True


def test_a_post_without_an_image_records_no_answer(start_console: Any) -> None:
    console: Console = start_console()
    post_id = console.enqueue("text only", image=None)
    status, claim = console.api("POST", "/api/v1/claim")
    body = {"decisions": {"hate": "confirm", "sarcasm": "confirm"}, "image_text_match": False}
    status, created = console.api("POST", f"/api/v1/items/{claim['entry_id']}/decision", body)
    assert status == 201 and created["decision"]["image_text_match"] is None
    assert read_decision(console.bootstrap, post_id).image_text_match is None

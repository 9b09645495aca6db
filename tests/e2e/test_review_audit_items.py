"""Blind audit items in the console: the reviewer sees the post but nothing of the model's
output (no label, score, threshold, ITM match, routing reason), gives each task a label, and
the decision is recorded as an audit verdict. The API is as blind."""

from __future__ import annotations

import re
from typing import Any

from tests.e2e.conftest import Console, read_decision
from tests.e2e.test_review_console import login, shown_post_id


def test_an_audit_item_is_reviewed_blind_and_recorded_as_an_audit_verdict(browser: Any, start_console: Any) -> None:
    console: Console = start_console()
    post_id = console.enqueue("an audited post", kind="audit")
    page = login(browser, console, "alice")
    assert shown_post_id(page) == post_id
    assert page.locator("#audit-chip").is_visible()
    html = page.content()
    for model_output in ("0.734", "0.183", "0.520", "flagged", "weak image text match", "v0004"):
        assert model_output not in html, f"the audit page shows the model's {model_output!r}"
    assert page.locator(".model-view").count() == 0
    page.check("input[name='action.hate'][value='label:hateful']")
    page.keyboard.press("j")  # to the sarcasm task
    page.keyboard.press("n")  # its negative label
    assert page.is_checked("input[name='action.sarcasm'][value=not_violating]")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/review\?done="))
    decision = read_decision(console.bootstrap, post_id)
    assert decision.kind == "audit"
    assert {t: d.action for t, d in decision.decisions.items()} == {"hate": "confirm", "sarcasm": "not_violating"}
    assert decision.training_labels() == {"hate": "hateful", "sarcasm": "not_sarcastic"}
    page.context.close()


def test_the_api_is_blind_too_and_refuses_confirmations_on_audit_items(start_console: Any) -> None:
    console: Console = start_console()
    post_id = console.enqueue("audited through the API", kind="audit")
    status, claim = console.api("POST", "/api/v1/claim")
    assert status == 200 and claim["item"]["kind"] == "audit"
    assert "labels" not in claim["item"]["label"] and "itm_match" not in claim["item"]["label"]
    assert console.api("GET", f"/api/v1/items/{claim['entry_id']}")[1]["item"]["label"] == claim["item"]["label"]
    path = f"/api/v1/items/{claim['entry_id']}/decision"
    status, answer = console.api("POST", path, {"decisions": {"hate": "confirm", "sarcasm": "confirm"}})
    assert status == 400 and "audit item takes a label" in answer["error"], answer
    body = {"decisions": {"hate": {"action": "label", "label": "not_hateful"}, "sarcasm": {"action": "not_violating"}}}
    status, created = console.api("POST", path, body)
    assert status == 201, created
    decision = read_decision(console.bootstrap, post_id)
    assert decision.kind == "audit" and decision.training_labels()["hate"] == "not_hateful"
    assert decision.decisions["hate"].action == "correct"  # against the model's hidden "hateful"

"""Escalated items on the admin page, in real headless Chromium against real Kafka + Redis:
an admin sees what the reviewer escalated and why, and settles it with final labels (a
ReviewDecision on `reviewed` by the admin, the item gone from the page) or dismisses it
(nothing produced). Reviewers are refused, and so is a form without its CSRF token."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from modstream.records import ReviewDecision
from tests.e2e.conftest import Console, audit_records, escalate_behind_the_console, run_async
from tests.e2e.test_review_console import login
from tests.integration.stack import free_loopback_ports


def decisions_for(bootstrap: str, post_id: str) -> list[ReviewDecision]:
    """Every decision keyed `post_id` on `reviewed`, read from the start to the current end
    (the console awaits its produce, so whatever it wrote before answering is there)."""
    from aiokafka import AIOKafkaConsumer

    async def consume() -> list[ReviewDecision]:
        consumer = AIOKafkaConsumer(
            "reviewed", bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + 60
            while not consumer.assignment():  # without a group, every partition once metadata is in
                assert time.monotonic() < deadline, "no partitions of `reviewed` assigned within 60 s"
                await asyncio.sleep(0.1)
            partitions = sorted(consumer.assignment())
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            found: dict[tuple[int, int], ReviewDecision] = {}  # by (partition, offset): a re-read counts once
            while any([await consumer.position(tp) < end[tp] for tp in partitions]):
                assert time.monotonic() < deadline, "could not read `reviewed` to its end within 60 s"
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for r in records:
                        if r.key == post_id.encode():
                            found[(r.partition, r.offset)] = ReviewDecision.from_json(r.value)
            return [found[k] for k in sorted(found, key=lambda k: k[1])]
        finally:
            await consumer.stop()

    return run_async(consume())


def escalate(console: Console, text: str, note: str) -> str:
    """alice claims a fresh post and escalates its hate task through the API; returns the post id."""
    post_id = console.enqueue(text, image=None)
    status, claim = console.api("POST", "/api/v1/claim", token=console.reviewer_token)
    assert status == 200 and claim["item"]["post_id"] == post_id
    body = {"decisions": {"hate": {"action": "escalate"}, "sarcasm": {"action": "skip"}}, "note": note}
    path = f"/api/v1/items/{claim['entry_id']}/decision"
    assert console.api("POST", path, body, token=console.reviewer_token)[0] == 201
    return post_id


def rows(page: Any) -> Any:
    return page.locator("table.escalations tbody tr")


def test_admin_sees_an_escalation_and_decides_it_with_final_labels(browser: Any, start_console: Any) -> None:
    console = start_console()
    post_id = escalate(console, "<b>not bold</b> & a meme caption", "<i>ask legal</i> about this one")
    alice = login(browser, console, "alice")
    response = alice.goto("/admin/escalated")
    assert response is not None and response.status == 403
    assert console.api("GET", "/api/v1/admin/escalated", token=console.reviewer_token)[0] == 403
    escalation_id = console.api("GET", "/api/v1/admin/escalated")[1]["escalated"][0]["id"]
    path = f"/api/v1/admin/escalated/{escalation_id}/decide"
    assert console.api("POST", path, {"labels": {"hate": "hateful"}}, token=console.reviewer_token)[0] == 403

    root = login(browser, console, "root")
    root.click("#escalated-link")  # linked from the admin's top bar, next to dead letters
    root.wait_for_url("**/admin/escalated")
    row = rows(root)
    assert row.count() == 1 and row.get_attribute("data-post") == post_id
    text = row.inner_text()
    # Escaped, not rendered: the markup shows as text, and no element was made from it.
    assert "<b>not bold</b> & a meme caption" in text and "<i>ask legal</i> about this one" in text
    assert row.locator("b:has-text('not bold'), i:has-text('ask legal')").count() == 0
    assert row.locator(".escalated-by").inner_text() == "alice"
    assert "hateful 0.734" in text and "not_sarcastic 0.410" in text  # the model's labels and scores
    before = decisions_for(console.bootstrap, post_id)
    assert [(d.reviewer, d.escalated) for d in before] == [("alice", True)]

    row.locator("select[name='label.hate']").select_option("not_hateful")
    row.locator("select[name='label.sarcasm']").select_option("sarcastic")
    row.locator("input[name=note]").fill("final call")
    with root.expect_navigation():
        row.locator("button:has-text('Decide')").click()
    assert rows(root).count() == 0 and root.locator("#no-escalations").is_visible()
    assert post_id in root.locator(".alert-ok").inner_text()

    after = decisions_for(console.bootstrap, post_id)
    assert len(after) == 2 and after[0].decision_id == before[0].decision_id
    final = after[1]
    assert final.reviewer == "root" and final.note == "final call" and not final.escalated
    assert final.training_labels() == {"hate": "not_hateful", "sarcasm": "sarcastic"}
    assert {t: d.action for t, d in final.decisions.items()} == {"hate": "not_violating", "sarcasm": "correct"}
    assert console.api("GET", "/api/v1/admin/escalated")[1] == {"escalated": []}
    # Settled means gone: deciding it again is refused and produces nothing more.
    assert console.api("POST", path, {"labels": {"hate": "hateful"}})[0] == 404
    assert len(decisions_for(console.bootstrap, post_id)) == 2
    alice.context.close()
    root.context.close()


def test_dismiss_drops_an_escalation_without_a_decision_and_needs_the_csrf_token(
    browser: Any, start_console: Any, tmp_path: Path
) -> None:
    console = start_console()
    post_id = escalate(console, "dismiss me", "probably spam")
    root = login(browser, console, "root")
    root.goto("/admin/escalated")
    assert rows(root).count() == 1

    # Without the form's token: refused, nothing dropped, nothing produced.
    root.eval_on_selector_all("input[name=csrf_token]", "els => els.forEach(e => e.remove())")
    with root.expect_navigation() as nav:
        rows(root).locator("button:has-text('Dismiss')").click()
    assert nav.value is not None and nav.value.status == 403
    assert len(console.api("GET", "/api/v1/admin/escalated")[1]["escalated"]) == 1
    root.goto("/admin/escalated")
    root.eval_on_selector_all("input[name=csrf_token]", "els => els.forEach(e => e.remove())")
    with root.expect_navigation() as nav:
        rows(root).locator("button:has-text('Decide')").click()
    assert nav.value is not None and nav.value.status == 403
    assert [d.reviewer for d in decisions_for(console.bootstrap, post_id)] == ["alice"]

    root.goto("/admin/escalated")
    with root.expect_navigation():
        rows(root).locator("button:has-text('Dismiss')").click()
    assert rows(root).count() == 0
    assert console.api("GET", "/api/v1/admin/escalated")[1] == {"escalated": []}
    assert [d.reviewer for d in decisions_for(console.bootstrap, post_id)] == ["alice"], "dismiss produces nothing"
    assert console.api("POST", "/api/v1/claim")[1] == {"item": None}, "a dismissed post does not come back"
    (record,) = audit_records(console.bootstrap, post_id, 1)  # the dismissal's only record
    assert (record["action"], record["actor"], record["detail"]["escalated_by"]) == (
        "escalation_dismissed",
        "root",
        "alice",
    )
    root.context.close()


def test_a_decide_while_kafka_is_down_changes_nothing(start_console: Any) -> None:
    (nothing_there,) = free_loopback_ports(1)
    console = start_console(bootstrap=f"127.0.0.1:{nothing_there}")
    post_id = console.enqueue("escalated before Kafka went away", image=None)

    escalate_behind_the_console(console, post_id)  # while Kafka was up
    (entry,) = console.api("GET", "/api/v1/admin/escalated")[1]["escalated"]
    status, answer = console.api(
        "POST", f"/api/v1/admin/escalated/{entry['id']}/decide", {"labels": {"hate": "hateful"}}
    )
    assert status == 503 and answer["retry"] is True and "Kafka" in answer["error"]
    assert console.api("GET", "/api/v1/admin/escalated")[1]["escalated"] == [entry]
    # Bad choices are refused before anything is produced.
    for labels, why in (({"hate": "nope"}, "not one of"), ({"spam": "x"}, "unknown task"), ({}, "at least one")):
        status, answer = console.api("POST", f"/api/v1/admin/escalated/{entry['id']}/decide", {"labels": labels})
        assert status == 400 and why in answer["error"], (labels, answer)

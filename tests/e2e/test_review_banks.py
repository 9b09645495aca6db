"""Verdict banks in the console, in Chromium: the review page shows the images people already
decided that are nearest to the one under review (distance, bank, verdict, who decided); an
audit item stays blind to that precedent as to the model's output; an admin lists the banks and
removes an entry on /admin/banks, and a reviewer cannot open that page."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from tests.e2e.conftest import Console, run_async
from tests.e2e.test_review_console import login, shown_post_id


async def _create_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()


def _until(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out")


def test_precedent_on_the_review_page_blind_on_audit_items_and_removal_by_an_admin(
    browser: Any, start_console: Any, stack: Any
) -> None:
    topic = f"bank-updates-e2e-{uuid.uuid4().hex[:8]}"
    run_async(_create_topic(stack.bootstrap, topic))
    console: Console = start_console(extra_args=("--bank-topic", topic))

    # alice decides a post with synthetic-1.png hateful (through the API: she saw the kept bytes).
    first = console.enqueue("the first post with this picture", image="synthetic-1.png")
    status, claim = console.api("POST", "/api/v1/claim", token=console.reviewer_token)
    assert status == 200 and claim["item"]["post_id"] == first
    body = {"decisions": {"hate": {"action": "confirm"}, "sarcasm": {"action": "not_violating"}}}
    assert console.api("POST", f"/api/v1/items/{claim['entry_id']}/decision", body, console.reviewer_token)[0] == 201

    # The same picture posted again: its page shows that decision as precedent.
    again = console.enqueue("the same picture, other words", image="synthetic-1.png")
    _until(lambda: console.api("GET", "/api/v1/admin/banks")[1]["entries"])
    page = login(browser, console, "alice")
    assert shown_post_id(page) == again
    rows = page.locator("#precedent .precedent-row")
    assert rows.count() == 1
    text = rows.first.inner_text()
    assert "same bytes" in text and "violating" in text and "hate: hateful" in text and "alice" in text
    entry_id = page.locator("#decision-form").get_attribute("action").split("/")[2]
    page.context.close()
    assert console.api("POST", f"/api/v1/items/{entry_id}/decision", body, console.reviewer_token)[0] == 201

    # An audit item of the same picture: no precedent (a verdict would anchor the blind reviewer).
    audit = console.enqueue("an audited post with this picture", image="synthetic-1.png", kind="audit")
    page = login(browser, console, "alice")
    assert shown_post_id(page) == audit
    assert page.locator("#precedent").count() == 0 and "same bytes" not in page.content()
    page.goto("/admin/banks")
    assert "admin role required" in page.content()  # a reviewer cannot curate
    page.context.close()

    # root removes the entry on /admin/banks.
    admin = login(browser, console, "root")
    admin.goto("/admin/banks")
    assert admin.locator(".bank-row").count() == 1 and "alice" in admin.locator(".bank-row").inner_text()
    admin.click(".bank-row button.btn-danger")
    admin.wait_for_url(re.compile(r"/admin/banks\?done=removed"))

    def emptied() -> bool:
        admin.goto("/admin/banks")
        return admin.locator("#banks-empty").count() == 1

    _until(emptied)
    admin.context.close()

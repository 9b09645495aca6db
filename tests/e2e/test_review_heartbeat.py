"""The claim heartbeat in real headless Chromium against real Kafka + Redis: an item page that
stays open keeps its claim past the claim timeout, and a page whose claim was taken over
says so and locks its form. Claim timeout 2 s (heartbeat every 667 ms), so these add seconds.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Console, read_decision
from tests.e2e.test_review_console import login, shown_post_id

CLAIM_TIMEOUT = 2.0


def metrics(console: Console) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{console.port}/metrics")
    req.add_header("Authorization", f"Bearer {console.token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


def renewals(text: str) -> float:
    found = re.search(r"^modstream_review_renewals_total (\S+)$", text, re.M)
    assert found, "modstream_review_renewals_total is not exported"
    return float(found.group(1))


def test_an_open_item_page_keeps_its_claim_past_the_timeout(browser: Any, start_console: Any) -> None:
    console = start_console(claim_timeout=CLAIM_TIMEOUT)
    first = console.enqueue("kept while the page is open", image=None)
    second = console.enqueue("the other item", image=None)
    alice = login(browser, console, "alice")
    assert shown_post_id(alice) == first
    beats: list[int] = []
    alice.on("response", lambda r: beats.append(r.status) if r.url.endswith("/renew") else None)
    alice.wait_for_timeout(CLAIM_TIMEOUT * 1000 * 1.75)  # well past the timeout, page open
    assert len(beats) >= 3 and set(beats) == {200}, beats
    bob = login(browser, console, "bob")
    assert shown_post_id(bob) == second, "bob must get the other item, not alice's open one"
    assert "taken over" not in bob.locator(".meta").inner_text()
    carol = login(browser, console, "carol")
    assert carol.locator("#queue-empty").is_visible(), "both items are held by reviewers whose pages are open"
    # Alice, still past the timeout, decides: the submit goes through and is hers.
    alice.wait_for_timeout(CLAIM_TIMEOUT * 1000 * 0.75)
    assert alice.locator("#claim-lost").is_hidden()
    alice.keyboard.press("a")
    alice.keyboard.press("Enter")
    alice.wait_for_url(re.compile(r"/review\?done="))
    assert first in alice.locator(".alert-ok").inner_text()
    decision = read_decision(console.bootstrap, first)
    assert decision.reviewer == "alice"
    assert {d.action for d in decision.decisions.values()} == {"confirm"}
    text = metrics(console)
    assert renewals(text) >= 3
    assert "modstream_review_reclaims_total 0.0" in text
    for page in (alice, bob, carol):
        page.context.close()


def test_a_page_whose_claim_was_taken_over_says_so_and_locks_the_form(
    browser: Any, start_console: Any, tmp_path: Path
) -> None:
    console = start_console(claim_timeout=CLAIM_TIMEOUT)
    post_id = console.enqueue("lost while offline", image=None)
    alice = login(browser, console, "alice")
    assert shown_post_id(alice) == post_id
    assert alice.locator("#claim-lost").is_hidden()
    token = alice.get_attribute("#decision-form input[name=csrf_token]", "value") or ""
    action = alice.get_attribute("#decision-form", "action") or ""
    # Alice's network drops: her heartbeats fail (the page warns and keeps trying) and the
    # claim lapses; bob's claim takes it over.
    alice.context.set_offline(True)
    alice.locator("#renew-warning").wait_for(state="visible", timeout=5000)
    time.sleep(CLAIM_TIMEOUT + 0.5)
    bob = login(browser, console, "bob")
    assert shown_post_id(bob) == post_id
    assert "taken over" in bob.locator(".meta").inner_text()
    # Back online, alice's next heartbeat hears that the item is gone: message, form locked.
    alice.keyboard.press("c")  # a choice made before the page knows
    alice.context.set_offline(False)
    lost = alice.locator("#claim-lost")
    lost.wait_for(state="visible", timeout=5000)
    assert "reassigned to another reviewer" in lost.inner_text()
    assert alice.locator("#renew-warning").is_hidden()
    assert alice.get_attribute("#next-item", "href") == "/review"
    alice.screenshot(path=str(tmp_path / "claim-lost.png"))  # for a look; kept with pytest's tmp files
    controls = alice.locator("#decision-form input, #decision-form textarea, #decision-form button")
    assert controls.count() >= 11  # 2 tasks x 5 actions, the note, the submit button, the token
    assert all(controls.nth(i).is_disabled() for i in range(controls.count()))
    alice.keyboard.press("n")  # shortcuts do nothing on a dead item
    assert not alice.is_checked("input[name='action.sarcasm'][value=not_violating]")
    alice.evaluate("document.getElementById('decision-form').requestSubmit()")  # a script cannot submit it
    alice.wait_for_timeout(300)
    assert shown_post_id(alice) == post_id  # still on the dead page, nothing submitted
    assert alice.evaluate("document.activeElement.id") == "next-item"  # Enter leads on
    # A forced submit of the old form is refused with the clear page, and records nothing.
    form = {"action.hate": "confirm", "action.sarcasm": "confirm", "csrf_token": token}
    stale = alice.request.post(console.url + action, form=form, max_redirects=0)
    assert stale.status == 409
    assert "Item reassigned" in stale.text() and "Nothing was recorded" in stale.text()
    # Bob's claim is intact and his decision is the one on record.
    bob.keyboard.press("n")
    bob.keyboard.press("n")
    bob.keyboard.press("Enter")
    bob.wait_for_url(re.compile(r"/review\?done="))
    decision = read_decision(console.bootstrap, post_id)
    assert decision.reviewer == "bob"
    text = metrics(console)
    assert 'modstream_review_claims_lost_total{stage="renew"} 1.0' in text
    assert 'modstream_review_claims_lost_total{stage="submit"} 1.0' in text
    # The link leads on: the queue is empty now, alice does not get bob's decided item back.
    with alice.expect_navigation():
        alice.keyboard.press("Enter")
    assert alice.locator("#queue-empty").is_visible()
    alice.context.close()
    bob.context.close()

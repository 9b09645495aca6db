"""Double review in real Chromium (review/agreement.py, console at --second-review-rate 1): the
second reviewer's page carries nothing of the first decision (not the first reviewer's name,
labels, note or decision id: neither in the text nor in any attribute or form value), and the
first reviewer never gets the item back, not even after their parked entry outlived the claim
timeout and their claim took it over.

The scan is shown to work in the test itself: run on the first reviewer's filled-in page, it
finds each of the values it then fails to find on the second reviewer's."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from review.auth import UserStore
from tests.e2e.conftest import PASSWORD, Console, read_decision
from tests.e2e.test_review_console import login, shown_post_id

# Distinctive enough that no page can hold them by coincidence, and no substring of each other.
FIRST = "wrenfield-first-q7"
SECOND = "ottoline-second-k2"
NOTE = "first opinion marker zq4-vx8: image looks staged to me"
NOTE_TOKEN = "zq4-vx8"
CLAIM_TIMEOUT_S = 3.0

# Everything a page holds, as strings: the serialised DOM (text, attributes, inline scripts),
# every attribute of every element, the live state of form controls (a value or check set by
# script shows in neither), and the page's storage.
_DUMP_JS = """() => {
  const out = [document.documentElement.outerHTML, document.title, location.href];
  for (const el of document.querySelectorAll('*')) {
    for (const attr of el.attributes) out.push(attr.name + '=' + attr.value);
    if ('value' in el && typeof el.value === 'string') out.push('value=' + el.value);
  }
  for (const store of [localStorage, sessionStorage]) {
    for (let i = 0; i < store.length; i++) out.push(store.key(i) + '=' + store.getItem(store.key(i)));
  }
  return out.join('\\n');
}"""

# The form's state: checked radios and checkboxes, selected options, text values.
_FORM_JS = """() => {
  const state = [];
  for (const el of document.querySelectorAll('input, select, textarea')) {
    if (el.type === 'hidden' || !el.name) continue;
    if (el.type === 'radio' || el.type === 'checkbox') { if (el.checked) state.push(el.name + '=' + el.value); }
    else state.push(el.name + '=' + el.value);
  }
  return state.sort();
}"""


def dump(page: Any) -> str:
    text: str = page.evaluate(_DUMP_JS)
    return text


def form_state(page: Any) -> list[str]:
    state: list[str] = page.evaluate(_FORM_JS)
    return state


def showing(page: Any) -> str | None:
    """The post id of the item the page shows for review, None on the "nothing to review" page."""
    shown = page.locator(".meta dd code")
    return shown.first.inner_text() if shown.count() else None


def nothing_for(page: Any) -> bool:
    """Loads /review: True when it answers "nothing to review" (200, no item)."""
    response = page.goto("/review")
    return bool(response.status == 200 and showing(page) is None and page.locator("#queue-empty").count() == 1)


def leaks(page: Any, secrets: dict[str, str]) -> list[str]:
    """Which of `secrets` (what -> value) the page holds anywhere."""
    everything = dump(page)
    return [what for what, value in secrets.items() if value in everything]


def test_the_second_reviewer_sees_nothing_of_the_first_decision(
    browser: Any, start_console: Any, tmp_path: Path
) -> None:
    users = tmp_path / "users.json"
    store = UserStore(users)
    for name in (FIRST, SECOND):
        store.add(name, "reviewer", PASSWORD)
    console: Console = start_console(
        claim_timeout=CLAIM_TIMEOUT_S, extra_args=("--second-review-rate", "1", "--users", str(users))
    )
    post_id = console.enqueue("a post both reviewers decide, one after the other")

    first = login(browser, console, FIRST)
    assert shown_post_id(first) == post_id
    untouched = form_state(first)
    first.check("input[name='action.hate'][value='correct']")  # against the model's "hateful"
    first.check("input[name='action.sarcasm'][value='correct']")  # against its "not_sarcastic"
    first.check("input[name='pair'][value='mismatch']")
    first.fill("#note", NOTE)
    chosen = form_state(first)
    picked = sorted(set(chosen) - set(untouched))
    assert len(picked) == 4, picked  # the two tasks, the image-text answer, the note
    # The scan finds a reviewer's name, note and choices where they are: it can fail.
    assert leaks(first, {"name": FIRST, "note": NOTE, "token": NOTE_TOKEN}) == ["name", "note", "token"]
    first.click("#submit")
    first.wait_for_url(re.compile(r"/review\?done="))
    assert showing(first) is None and first.locator("#queue-empty").count() == 1, "handed their own item again"

    decision = read_decision(console.bootstrap, post_id)
    assert decision.review_stage == "first" and decision.reviewer == FIRST and decision.note == NOTE
    assert decision.training_labels() == {"hate": "not_hateful", "sarcasm": "sarcastic"}
    assert decision.image_text_match is False
    secrets = {"first reviewer": FIRST, "note": NOTE, "note token": NOTE_TOKEN, "decision id": decision.decision_id}

    # The parked entry outlives the claim timeout: the first reviewer's next claim takes it over
    # (XAUTOCLAIM) and must park it again rather than show it.
    time.sleep(CLAIM_TIMEOUT_S + 0.5)
    assert nothing_for(first), "the first reviewer got their first review back after the timeout"

    second = login(browser, console, SECOND)
    assert shown_post_id(second) == post_id, "the parked item goes to a different reviewer"
    assert "a post both reviewers decide" in second.content()
    assert leaks(second, secrets) == [], "the second reviewer's page shows the first decision"
    assert form_state(second) == untouched, "the second reviewer's form starts as the first one's did"
    assert not set(picked) & set(form_state(second))
    second.reload()  # the same claim again, as a reload shows it
    assert shown_post_id(second) == post_id and leaks(second, secrets) == []
    assert form_state(second) == untouched

    # While the second reviewer holds it, and again after, the first reviewer gets nothing.
    assert nothing_for(first)
    second.context.close()
    first.context.close()

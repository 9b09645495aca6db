"""Cloaking, in real headless Chromium: the post's host serves other bytes than the worker
scored. The reviewer must see the scored image (from the evidence store), the decision must
record its hash, and the host must never be asked. A blob gone from the store shows "media
unavailable" and the decision records that no image was seen (so no training image)."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageStat

from tests.e2e.conftest import Console, read_decision
from tests.e2e.test_review_console import login, shown_post_id


def _solid(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (480, 320), color).save(buf, format="PNG")
    return buf.getvalue()


SCORED = (210, 40, 40)  # what the worker fetched and scored: red
CLOAK = (40, 60, 220)  # what the host serves to everyone after: blue


def _mean_colour(png: bytes) -> tuple[float, ...]:
    with Image.open(io.BytesIO(png)) as img:
        return tuple(ImageStat.Stat(img.convert("RGB")).mean)


def _submit_confirm(page: Any) -> None:
    page.keyboard.press("c")  # each key decides the next undecided task
    page.keyboard.press("c")
    assert page.is_checked("input[name='action.sarcasm'][value=confirm]")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/review\?done="))


def test_the_reviewer_sees_the_scored_bytes_not_what_the_host_serves_now(
    browser: Any, start_console: Any, tmp_path: Path
) -> None:
    console: Console = start_console()
    scored = _solid(SCORED)
    name = f"cloaked-{tmp_path.name[-8:]}.png"
    (console.media.root / name).write_bytes(_solid(CLOAK))  # the URL now serves the other image
    hits = console.media.server.server.hits
    post_id = console.enqueue("a cloaked post", image=name, scored=scored)

    page = login(browser, console, "alice")
    assert shown_post_id(page) == post_id
    page.wait_for_function("document.getElementById('post-image').naturalWidth > 0")
    page.keyboard.press("v")  # reveal: no blur, no greyscale
    shot = page.locator("#post-image").screenshot(path=str(tmp_path / "cloaked-post.png"))
    r, g, b = _mean_colour(shot)
    assert r > 150 and g < 90 and b < 90, f"the reviewer was shown {r:.0f},{g:.0f},{b:.0f}, not the scored red image"
    assert console.media.server.server.hits == hits, "the console fetched the post's URL"

    _submit_confirm(page)
    decision = read_decision(console.bootstrap, post_id)
    digest = hashlib.sha256(scored).hexdigest()
    assert decision.media_hash == digest and decision.seen_media_hash == digest
    page.context.close()


def test_a_blob_gone_from_the_store_shows_media_unavailable_and_is_recorded_as_unseen(
    browser: Any, start_console: Any, tmp_path: Path
) -> None:
    from stream.evidence import LocalBackend

    console: Console = start_console()
    scored = _solid((20, 160, 60))
    post_id = console.enqueue("its evidence expired", image="synthetic-2.png", scored=scored)
    assert LocalBackend(console.media.evidence).delete(hashlib.sha256(scored).hexdigest())

    page = login(browser, console, "bob")
    assert shown_post_id(page) == post_id
    unavailable = page.locator("#media-unavailable")
    assert unavailable.is_visible() and "Media unavailable" in unavailable.inner_text()
    assert page.locator("#post-image").count() == 0
    page.screenshot(path=str(tmp_path / "media-unavailable.png"))
    entry_id = page.get_attribute("#decision-form", "action").split("/")[-2]
    status, body = console.api("GET", f"/media/{entry_id}")  # as an admin: the route itself has nothing
    assert status == 404 and body["error"].startswith("media unavailable: missing"), body

    _submit_confirm(page)
    decision = read_decision(console.bootstrap, post_id)
    assert decision.media_hash == hashlib.sha256(scored).hexdigest() and decision.seen_media_hash is None
    page.context.close()

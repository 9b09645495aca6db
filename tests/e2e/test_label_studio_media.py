"""Label Studio's images from the project, not the post's host: the export's signed links to
the console's copy of the scored bytes load in a browser on another origin (CORS), without a
console session; a tampered, expired or foreign link, or a console without the key, serves
nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Console
from tests.integration.stack import REPO_ROOT

KEY = "e2e media link key, long enough"


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _export(console: Console, out: Path, *extra: str, key: str | None = KEY) -> list[dict[str, Any]]:
    env = {k: v for k, v in __import__("os").environ.items() if k != "MODSTREAM_MEDIA_LINK_KEY"}
    if key:
        env["MODSTREAM_MEDIA_LINK_KEY"] = key
    done = subprocess.run(
        [sys.executable, "-m", "modstream.cli", "review", "export-label-studio", "--out", str(out),
         "--redis", console.redis_url, *extra],
        cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_exported_images_are_signed_links_that_load_cross_origin_and_nothing_else_does(
    browser: Any, start_console: Any, tmp_path: Path
) -> None:
    console: Console = start_console(env={"MODSTREAM_MEDIA_LINK_KEY": KEY})
    post_id = console.enqueue("an image for Label Studio", image="synthetic-1.png")
    text_only = console.enqueue("no image here", image=None)
    exported = _export(console, tmp_path / "tasks.json", "--media-base-url", console.url)
    tasks = {t["data"]["post_id"]: t for t in exported}
    link = tasks[post_id]["data"]["image"]
    assert link.startswith(f"{console.url}/ls-media/") and "sig=" in link and "expires=" in link
    placeholder = tasks[text_only]["data"]["image"]
    assert placeholder == f"{console.url}/ls-media/none.png"
    status, headers, body = _get(placeholder.replace("localhost", "127.0.0.1"))
    assert status == 200 and body.startswith(b"\x89PNG") and headers["Access-Control-Allow-Origin"] == "*"
    shown = json.dumps([t["data"] for t in exported])  # what Label Studio loads (meta is only kept)
    assert console.media_url not in shown, "the post's own host is not what the annotator's browser loads"

    status, headers, body = _get(link.replace("localhost", "127.0.0.1"))
    assert status == 200 and headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG")
    assert headers["Access-Control-Allow-Origin"] == "*" and headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    digest = link.split("/ls-media/")[1].split("?")[0]
    other = console.media.keep(b"\x89PNG other bytes")  # another kept blob: the link cannot reach it
    tampered = [
        link.replace(digest, other),
        link.replace("sig=", "sig=0"),
        link.split("&sig=")[0] + "&sig=" + "0" * 64,
        link.replace("expires=", "expires=9"),
        link.split("?")[0],
    ]
    for bad in tampered:
        assert _get(bad.replace("localhost", "127.0.0.1"))[0] == 403, bad
    assert _get(f"{console.url}/ls-media/..%2F..%2Fetc%2Fpasswd?expires=1&sig=x".replace("localhost", "127.0.0.1"))[
        0
    ] in (
        403,
        404,
    )
    foreign = _export(console, tmp_path / "foreign.json", "--media-base-url", console.url, key="another deployment key")
    foreign_link = next(t for t in foreign if t["data"]["post_id"] == post_id)["data"]["image"]
    assert _get(foreign_link.replace("localhost", "127.0.0.1"))[0] == 403

    # The annotator's browser, on Label Studio's origin (here: the media server's), loads it by
    # XHR as Label Studio does, with no console session.
    page_dir = console.media.root
    (page_dir / "annotator.html").write_text("<!doctype html><title>annotator</title>")
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{console.media_url}/annotator.html")
    loaded = page.evaluate(
        """async (url) => {
            const resp = await fetch(url);
            const blob = await resp.blob();
            const bitmap = await createImageBitmap(blob);
            return [resp.status, blob.type, bitmap.width];
        }""",
        link,
    )
    assert loaded[0] == 200 and loaded[1] == "image/png" and loaded[2] > 0, loaded
    page.screenshot(path=str(tmp_path / "annotator-origin.png"))
    context.close()


def test_a_console_without_the_key_serves_no_links_and_the_export_needs_the_key(
    start_console: Any, tmp_path: Path
) -> None:
    console: Console = start_console()
    post_id = console.enqueue("a post", image="synthetic-2.png")
    digest = "ab" * 32
    assert _get(f"http://127.0.0.1:{console.port}/ls-media/{digest}?expires=9999999999&sig={'0' * 64}")[0] == 404
    env = {k: v for k, v in __import__("os").environ.items() if k != "MODSTREAM_MEDIA_LINK_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "modstream.cli", "review", "export-label-studio", "--out", str(tmp_path / "t.json"),
         "--redis", console.redis_url, "--media-base-url", console.url],
        cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "MODSTREAM_MEDIA_LINK_KEY" in done.stderr
    plain = _export(console, tmp_path / "plain.json", key=None)
    assert next(t for t in plain if t["data"]["post_id"] == post_id)["data"]["image"].startswith(console.media_url)

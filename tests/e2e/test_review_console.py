"""The review console in real headless Chromium against real Kafka + Redis.

Each test starts its own console subprocess on a flushed Redis database, so claims never
leak between tests; decisions are found on the shared `reviewed` topic by post id.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.conftest import PASSWORD, Console, read_decision
from tests.integration.stack import REPO_ROOT

SCREENSHOT = REPO_ROOT / "docs" / "review-console.png"


# -- helpers ----------------------------------------------------------------------------------


def login(browser: Any, console: Console, user: str) -> Any:
    context = browser.new_context(base_url=console.url, viewport={"width": 1440, "height": 960})
    page = context.new_page()
    page.goto("/review")
    assert "/login" in page.url, "an anonymous reviewer must land on the login page"
    page.fill("#username", user)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/review"))
    return page


def shown_post_id(page: Any) -> str:
    return page.locator(".meta dd code").first.inner_text()


def image_filter(page: Any) -> str:
    return page.eval_on_selector("#post-image", "el => getComputedStyle(el).filter")


def raw_request(console: Console, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """One request without cookies and without following redirects: (status, Location)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    data = b"" if method in ("POST", "PUT", "PATCH") else None
    req = urllib.request.Request(f"http://127.0.0.1:{console.port}{path}", data=data, method=method)
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Location", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", "")


# -- tests ------------------------------------------------------------------------------------


def test_every_route_refuses_anonymous_requests(start_console: Any, tmp_path: Path) -> None:
    from review.console import ConsoleConfig, create_app

    console = start_console()
    post_id = console.enqueue("anonymous probe")
    status, claimed = console.api("POST", "/api/v1/claim")
    entry_id = claimed["entry_id"]
    assert status == 200 and claimed["item"]["post_id"] == post_id
    app = create_app(ConsoleConfig(users_path=tmp_path / "none.json"))  # the route table, not a server
    checked = 0
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if route.method == "HEAD" or path is None:
            continue
        if path == "/login" or path.startswith("/static"):
            continue  # the only public routes
        if path.startswith("/ls-media/"):
            # Label Studio's images: no session, a signed link is the credential. Without one
            # (this console has no link key; test_label_studio_media.py covers forged links):
            # nothing but the public "no image" placeholder.
            if path == "/ls-media/none.png":
                continue
            status, _ = raw_request(console, route.method, path.replace("{digest}", "ab" * 32), {})
            assert status in (403, 404), (path, status)
            continue
        path = path.replace("{entry_id}", entry_id).replace("{dead_id}", "0-1").replace("{action}", "delete")
        forged = (
            {},
            {"Authorization": "Bearer mst_000000000000_forged"},
            {"Authorization": "Basic cm9vdDpwYXNz"},
            {"Cookie": "__Host-modstream_session=forged; modstream_session=forged"},
        )
        for headers in forged:
            status, location = raw_request(console, route.method, path, headers)
            machine = path.startswith(("/api/", "/media/")) or path in ("/metrics", "/healthz")
            if route.method == "GET" and not machine:
                assert status == 302 and location.startswith("/login"), (route.method, path, headers, status)
            else:
                assert status == 401, (route.method, path, headers, status)
            checked += 1
    assert checked >= len(forged) * 15
    # The item is still pending for root (nothing above touched it) and the token still works.
    assert console.api("GET", f"/api/v1/items/{entry_id}")[0] == 200
    # Public routes answer, with the security headers.
    req = urllib.request.Request(f"http://127.0.0.1:{console.port}/static/console.js")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["Referrer-Policy"] == "same-origin"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_review_an_item_with_the_keyboard_and_find_the_decision_on_kafka(
    browser: Any, start_console: Any, tmp_path: Path
) -> None:
    console = start_console()
    post_id = console.enqueue(
        "When the group chat says the meetup is 'casual' and you show up in a suit.\n#mondays #dresscode",
        image="synthetic-1.png",
    )
    page = login(browser, console, "alice")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.reload()
    assert shown_post_id(page) == post_id
    page.wait_for_function("document.getElementById('post-image').naturalWidth > 0")

    # Blurred and greyscale until revealed (computed style), then shown as is.
    before = image_filter(page)
    assert "blur(" in before and "grayscale(1)" in before
    assert page.get_attribute("#reveal", "aria-pressed") == "false"
    page.keyboard.press("v")
    assert image_filter(page) == "none"
    assert page.get_attribute("#reveal", "aria-pressed") == "true"

    # The browser only ever talked to the console: never to the post's image host.
    assert requests and all(url.startswith(console.url) for url in requests), requests
    assert console.media_url not in page.content()

    # Keyboard: correct hate (binary: -> not_hateful), confirm sarcasm.
    page.keyboard.press("x")
    page.keyboard.press("c")
    assert page.is_checked("input[name='action.hate'][value=correct]")
    assert page.is_checked("input[name='action.sarcasm'][value=confirm]")
    shot = tmp_path / "review-console.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 20_000
    if os.environ.get("MODSTREAM_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/review\?done="))
    assert page.locator("#queue-empty").is_visible()
    assert post_id in page.locator(".alert-ok").inner_text()

    decision = read_decision(console.bootstrap, post_id)
    assert decision.reviewer == "alice"
    assert {t: (d.action, d.label) for t, d in decision.decisions.items()} == {
        "hate": ("correct", "not_hateful"),
        "sarcasm": ("confirm", "not_sarcastic"),
    }
    assert decision.model_version == "v0004" and decision.itm_match == 0.183
    assert decision.reasons == ["weak_image_text_match", "uncertain_sarcasm"]
    # Acked only now: the queue is empty and the decision is counted.
    status, stats = console.api("GET", "/api/v1/stats")
    assert status == 200 and stats["depth"] == 0 and stats["per_reviewer_last_hour"] == {"alice": 1}
    page.context.close()


def test_post_text_with_markup_renders_inert(browser: Any, start_console: Any) -> None:
    console = start_console()
    hostile = (
        "<script>window.__pwned = 1; alert('script')</script>"
        "<img src=x onerror=\"window.__pwned = 2; alert('img')\">"
        "<a href=\"javascript:alert('a')\">click</a> &amp; {{ 7*7 }}"
    )
    console.enqueue(hostile, image=None)
    dialogs: list[str] = []
    page = login(browser, console, "bob")
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.reload()
    page.wait_for_load_state("networkidle")
    assert page.locator("#post-text").inner_text() == hostile  # shown literally, markup and all
    assert page.locator("#post-text script, #post-text img, #post-text a").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
    page.context.close()


def test_form_post_without_the_csrf_token_is_refused(browser: Any, start_console: Any) -> None:
    console = start_console()
    post_id = console.enqueue("csrf probe")
    page = login(browser, console, "carol")
    action = page.get_attribute("#decision-form", "action")
    assert action and action.startswith("/review/")
    form = {"action.hate": "confirm", "action.sarcasm": "confirm"}
    # page.request shares the logged-in context's cookies: only the token is missing or wrong.
    missing = page.request.post(console.url + action, form=form, max_redirects=0)
    assert missing.status == 403
    wrong = page.request.post(console.url + action, form={**form, "csrf_token": "x" * 43}, max_redirects=0)
    assert wrong.status == 403
    logout = page.request.post(console.url + "/logout", form={}, max_redirects=0)
    assert logout.status == 403
    # Nothing was decided: the item is still carol's, and the real form still works.
    page.reload()
    assert shown_post_id(page) == post_id
    token = page.get_attribute("#decision-form input[name=csrf_token]", "value")
    ok = page.request.post(console.url + action, form={**form, "csrf_token": token or ""}, max_redirects=0)
    assert ok.status == 303
    assert read_decision(console.bootstrap, post_id).reviewer == "carol"
    page.context.close()


def test_two_reviewers_never_receive_the_same_item(browser: Any, start_console: Any) -> None:
    console = start_console()
    posts = {console.enqueue(f"item {i}") for i in range(3)}
    alice = login(browser, console, "alice")
    bob = login(browser, console, "bob")
    first_a, first_b = shown_post_id(alice), shown_post_id(bob)
    assert first_a != first_b and {first_a, first_b} <= posts
    # Reloading gives each reviewer their own pending item back, not a new one.
    alice.reload()
    bob.reload()
    assert (shown_post_id(alice), shown_post_id(bob)) == (first_a, first_b)
    # Alice decides; her next item is the third one, never bob's.
    alice.keyboard.press("a")  # confirm every task
    alice.keyboard.press("Enter")
    alice.wait_for_url(re.compile(r"/review\?done="))
    third = shown_post_id(alice)
    assert third not in (first_a, first_b) and third in posts
    alice.context.close()
    bob.context.close()


def test_abandoned_claim_goes_to_another_reviewer_after_the_timeout(browser: Any, start_console: Any) -> None:
    console = start_console(claim_timeout=2)
    post_id = console.enqueue("abandoned item")
    alice = login(browser, console, "alice")
    assert shown_post_id(alice) == post_id
    bob = login(browser, console, "bob")
    assert bob.locator("#queue-empty").is_visible(), "a fresh claim must not go to another reviewer"
    token = alice.get_attribute("#decision-form input[name=csrf_token]", "value")
    action = alice.get_attribute("#decision-form", "action")
    alice.goto("about:blank")  # she leaves the page: its heartbeat stops, the claim is abandoned
    time.sleep(2.5)
    bob.reload()
    assert shown_post_id(bob) == post_id
    assert "taken over" in bob.locator(".meta").inner_text()
    # Alice's stale form is refused (409) and records nothing; bob's decision goes through.
    form = {"action.hate": "skip", "action.sarcasm": "skip", "csrf_token": token or ""}
    stale = alice.request.post(console.url + (action or ""), form=form, max_redirects=0)
    assert stale.status == 409
    bob.keyboard.press("n")
    bob.keyboard.press("n")
    bob.keyboard.press("Enter")
    bob.wait_for_url(re.compile(r"/review\?done="))
    decision = read_decision(console.bootstrap, post_id)
    assert decision.reviewer == "bob"
    assert {d.action for d in decision.decisions.values()} == {"not_violating"}
    status, metrics_text = 0, ""
    req = urllib.request.Request(f"http://127.0.0.1:{console.port}/metrics")
    req.add_header("Authorization", f"Bearer {console.token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        status, metrics_text = resp.status, resp.read().decode()
    assert status == 200
    assert "modstream_review_reclaims_total 1.0" in metrics_text
    assert 'modstream_review_decisions_total{action="not_violating"} 2.0' in metrics_text
    alice.context.close()
    bob.context.close()


def test_api_claim_decide_and_dead_letters(start_console: Any) -> None:
    console = start_console(claim_timeout=1, max_deliveries=1)
    post_id = console.enqueue("api item", image=None)
    status, claim = console.api("POST", "/api/v1/claim")
    assert status == 200 and claim["item"]["post_id"] == post_id and claim["deliveries"] == 1
    bad = console.api("POST", f"/api/v1/items/{claim['entry_id']}/decision", {"decisions": {"hate": "confirm"}})
    assert bad[0] == 400 and "sarcasm" in bad[1]["error"]
    # Abandon it: past the timeout, another reviewer's claim would be its second delivery > max 1.
    time.sleep(1.3)
    status, none = console.api("POST", "/api/v1/claim", token=console.reviewer_token)
    assert status == 200 and none == {"item": None}
    status, dead = console.api("GET", "/api/v1/admin/dead")
    assert status == 200 and [d["post_id"] for d in dead["dead_letters"]] == [post_id]
    status, requeued = console.api("POST", f"/api/v1/admin/dead/{dead['dead_letters'][0]['id']}/requeue")
    assert status == 200
    status, claim = console.api("POST", "/api/v1/claim")
    assert claim["entry_id"] == requeued["entry_id"]
    body = {"decisions": {"hate": {"action": "confirm"}, "sarcasm": {"action": "escalate"}}, "note": "api"}
    status, created = console.api("POST", f"/api/v1/items/{claim['entry_id']}/decision", body)
    assert status == 201, created
    decision = read_decision(console.bootstrap, post_id)
    assert decision.decision_id == created["decision"]["decision_id"] and decision.note == "api"
    assert decision.escalated
    assert console.api("GET", "/api/v1/stats")[1]["depth"] == 0
    # Reviewers do not get the admin endpoints, nor other reviewers' items.
    assert console.api("GET", "/api/v1/admin/dead", token=console.reviewer_token)[0] == 403
    assert console.api("DELETE", "/api/v1/admin/dead/0-1", token=console.reviewer_token)[0] == 403
    other = console.enqueue("someone else's", image=None)
    status, held = console.api("POST", "/api/v1/claim")
    assert held["item"]["post_id"] == other
    assert console.api("GET", f"/api/v1/items/{held['entry_id']}", token=console.reviewer_token)[0] == 404
    assert console.api("GET", f"/api/v1/items/{held['entry_id']}")[0] == 200


def test_admin_requeues_a_dead_letter_from_the_page(browser: Any, start_console: Any) -> None:
    console = start_console(claim_timeout=1, max_deliveries=1)
    post_id = console.enqueue("<b>dead</b> letter", image=None)
    assert console.api("POST", "/api/v1/claim")[1]["item"]["post_id"] == post_id
    time.sleep(1.3)
    assert console.api("POST", "/api/v1/claim", token=console.reviewer_token)[1] == {"item": None}  # dead-lettered
    alice = login(browser, console, "alice")
    response = alice.goto("/admin/dead")
    assert response is not None and response.status == 403
    root = login(browser, console, "root")
    root.goto("/admin/dead")
    row = root.locator("table.table tbody tr")
    assert row.count() == 1 and post_id in row.inner_text() and "<b>dead</b> letter" in row.inner_text()
    with root.expect_navigation():
        root.click("button:has-text('Requeue')")
    assert root.locator("table.table tbody tr").count() == 0
    alice.goto("/review")
    assert shown_post_id(alice) == post_id
    alice.context.close()
    root.context.close()


def test_a_page_on_another_port_cannot_log_the_browser_in_as_its_account(browser: Any, start_console: Any) -> None:
    """Login CSRF by cookie tossing: cookies do not separate ports, so a page on another port
    of the same host sets the login form's CSRF cookie to a token of its own and auto-submits
    the login form with it and the attacker's credentials. The console refuses the cross-origin
    POST (its Origin names the other port): the victim's browser stays logged out."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    console = start_console()
    token = "attacker-chosen-token-0123456789abcdef"
    page = f"""<!doctype html><form id=f method=post action="{console.url}/login">
<input name=csrf_token value="{token}"><input name=username value=bob>
<input name=password value="{PASSWORD}"></form><script>document.getElementById('f').submit()</script>"""

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Set-Cookie", f"modstream_login_csrf={token}; Path=/login")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    context = browser.new_context()
    try:
        victim = context.new_page()
        statuses: list[int] = []
        victim.on("response", lambda r: statuses.append(r.status) if r.url.endswith("/login") else None)
        victim.goto(f"http://localhost:{server.server_address[1]}/")
        victim.wait_for_load_state("networkidle")
        assert 403 in statuses, statuses
        assert "Refused" in victim.content()
        victim.goto(f"{console.url}/review")
        assert "/login" in victim.url, "the browser was logged in as the attacker's account"
        assert not [c for c in context.cookies() if "modstream_session" in c["name"]]
    finally:
        context.close()
        server.shutdown()
        server.server_close()

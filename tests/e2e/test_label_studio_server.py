"""The Label Studio round trip against a real Label Studio 1.23.2 server (PyPI, installed by
deploy/test-tools.sh in a venv of its own; its update check off, loopback only; the browser
may reach loopback only). Export open items with signed media links, create the project with
the exported labeling config, import the tasks, check the annotator's browser loads the image
(from the console, cross-origin), annotate through Label Studio's API (confirm, correct,
escalate, an empty answer), export, import back; then edit an annotation and import again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Console, read_decision
from tests.e2e.test_review_escalations import decisions_for
from tests.integration.stack import REPO_ROOT, free_loopback_ports

VERSION = "1.23.2"
VENV = Path(
    os.environ.get("MODSTREAM_LABEL_STUDIO_VENV", Path.home() / ".cache" / "modstream" / f"label-studio-{VERSION}")
)
USER, PASSWORD, TOKEN = "annotator@example.invalid", "annotator password 1", "5" * 40
KEY = "label studio round trip link key"


class LabelStudio:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Token {TOKEN}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Label Studio {method} {path}: {exc.code} {exc.read()[:500]!r}") from exc
        return json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    if not (VENV / ".complete").is_file():
        pytest.skip(f"Label Studio {VERSION} is not installed in {VENV} (deploy/test-tools.sh; log: {VENV}.log)")
    data = tmp_path_factory.mktemp("label-studio")
    (port,) = free_loopback_ports(1)
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "SENTRY_DSN", "FRONTEND_SENTRY_DSN")}
    env.update(LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false", LABEL_STUDIO_BASE_DATA_DIR=str(data),
               DJANGO_DB="sqlite")  # fmt: skip
    log = (data / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
         "--port", str(port), "--data-dir", str(data), "--username", USER, "--password", PASSWORD,
         "--user-token", TOKEN],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Label Studio did not start:\n{(data / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        # 1.23 turns legacy API tokens off for new organisations; this test drives it by token.
        manage = VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        manage = next((VENV / "lib").glob("python3*/site-packages/label_studio/manage.py"), manage)
        done = subprocess.run(
            [str(VENV / "bin" / "python"), str(manage), "shell", "-c",
             "from jwt_auth.models import JWTSettings; JWTSettings.objects.update(legacy_api_tokens_enabled=True)"],
            env={**env, "DJANGO_SETTINGS_MODULE": "label_studio.core.settings.label_studio"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        yield LabelStudio(url)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODSTREAM_MEDIA_LINK_KEY": KEY}
    return subprocess.run([sys.executable, "-m", "modstream.cli", "review", *args], cwd=REPO_ROOT, env=env,
                          text=True, capture_output=True, timeout=180)  # fmt: skip


def _choice(task: str, label: str) -> dict[str, Any]:
    return {"from_name": task, "to_name": "text", "type": "choices", "value": {"choices": [label]}}


def test_round_trip_through_a_real_label_studio(
    label_studio: LabelStudio, browser: Any, start_console: Any, tmp_path: Path
) -> None:
    console: Console = start_console(env={"MODSTREAM_MEDIA_LINK_KEY": KEY})
    posts = [console.enqueue(f"post {i} for label studio", image=f"synthetic-{i}.png") for i in range(4)]
    text_only = console.enqueue("a text-only post", image=None)
    out = tmp_path / "tasks.json"
    done = _cli("export-label-studio", "--out", str(out), "--redis", console.redis_url, "--media-base-url", console.url)
    assert done.returncode == 0, done.stderr
    tasks = json.loads(out.read_text())
    config = (tmp_path / "tasks.labeling-config.xml").read_text()

    project = label_studio.api("POST", "/api/projects", {"title": "modstream review", "label_config": config})
    label_studio.api("POST", f"/api/projects/{project['id']}/import", tasks)
    listed = label_studio.api("GET", f"/api/tasks?project={project['id']}&page_size=100")
    ls_tasks = {t["data"]["post_id"]: t for t in (listed["tasks"] if isinstance(listed, dict) else listed)}
    assert set(ls_tasks) == {*posts, text_only}

    # The annotator's browser, logged in to Label Studio on its origin, loads the scored image
    # from the console (another origin) by the signed link; nothing beyond loopback is reached.
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith(("http://127.0.0.1", "http://localhost", "data:", "blob:"))
            else route.abort()
        ),
    )
    page = context.new_page()
    media: list[tuple[str, int]] = []
    page.on("response", lambda r: media.append((r.url, r.status)) if "/ls-media/" in r.url else None)
    page.goto(label_studio.url + "/user/login/")
    page.fill("input[name=email]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
    first = ls_tasks[posts[0]]
    page.goto(f"{label_studio.url}/projects/{project['id']}/data?task={first['id']}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(status == 200 for _, status in media):
        page.wait_for_timeout(500)
    assert any(status == 200 for _, status in media), f"the annotator's browser never loaded the image: {media}"
    page.wait_for_timeout(1500)
    page.screenshot(path=str(tmp_path / "label-studio-task.png"))
    if os.environ.get("MODSTREAM_UPDATE_SCREENSHOT"):
        (REPO_ROOT / "docs" / "label-studio-task.png").write_bytes((tmp_path / "label-studio-task.png").read_bytes())
    context.close()

    # Annotations through Label Studio's API: confirm, correct, escalate, nothing chosen.
    answers = {
        posts[0]: [_choice("hate", "hateful"), _choice("sarcasm", "not_sarcastic")],  # the model's labels
        posts[1]: [_choice("hate", "not_hateful"), _choice("sarcasm", "sarcastic")],  # corrections
        posts[2]: [_choice("review_flag", "escalate")],
        posts[3]: [],
    }
    annotation_ids = {}
    for post_id, result in answers.items():
        created = label_studio.api("POST", f"/api/tasks/{ls_tasks[post_id]['id']}/annotations", {"result": result})
        annotation_ids[post_id] = created["id"]

    def export_and_import() -> str:
        exported = label_studio.api("GET", f"/api/projects/{project['id']}/export?exportType=JSON")
        path = tmp_path / "export.json"
        path.write_text(json.dumps(exported))
        result = _cli("import-label-studio", str(path), "--reviewer", "ls-team", "--bootstrap", console.bootstrap,
                      "--redis", console.redis_url, "--second-review-rate", "0")  # fmt: skip
        return result.stdout + result.stderr

    report = export_and_import()
    assert "imported 3" in report and f"post {posts[3]}: the annotation chooses nothing" in report, report
    confirm, correct = read_decision(console.bootstrap, posts[0]), read_decision(console.bootstrap, posts[1])
    assert {t: d.action for t, d in confirm.decisions.items()} == {"hate": "confirm", "sarcasm": "confirm"}
    assert correct.training_labels() == {"hate": "not_hateful", "sarcasm": "sarcastic"}
    assert {d.action for d in read_decision(console.bootstrap, posts[2]).decisions.values()} == {"escalate"}
    _, escalated = console.api("GET", "/api/v1/admin/escalated")
    assert [e["post_id"] for e in escalated["escalated"]] == [posts[2]]
    _, claim = console.api("POST", "/api/v1/claim")
    left = {claim["item"]["post_id"]} if claim.get("item") else set()
    assert left <= {posts[3], text_only} and left, "the unanswered posts stay in the queue"

    # An edit in Label Studio after the import: a new decision, whose labels win downstream.
    label_studio.api("PATCH", f"/api/annotations/{annotation_ids[posts[1]]}",
                     {"result": [_choice("hate", "hateful"), _choice("sarcasm", "sarcastic")]})  # fmt: skip
    report = export_and_import()
    assert f"post {posts[1]} (an edit of an earlier import" in report, report
    decisions = decisions_for(console.bootstrap, posts[1])
    assert len(decisions) == 2 and decisions[-1].training_labels()["hate"] == "hateful"
    assert decisions[-1].decided_at > decisions[0].decided_at
    report = export_and_import()
    assert "imported 0" in report, report

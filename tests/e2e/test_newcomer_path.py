"""The newcomer path, followed as a new user would: `modstream run --review` (what `make review`
runs) labels its sample posts on its own stack, then serves the review console with a demo
reviewer whose password it prints; in Chromium we log in with it, see one of the run's routed
posts with its image, decide it, and find the decision on `reviewed`. Ctrl-C (SIGTERM here)
stops the console, the worker and the stack.

The run gets its own ports and stack folder (a developer's `make run` may be up), and a tiny
model in its registry (the default model's first training would take minutes)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import read_decision
from tests.integration.stack import REPO_ROOT, free_loopback_ports, port_open
from tests.integration.worker_harness import register_tiny_model

READY = re.compile(r"review console: (http://localhost:(\d+))/review\s+user (\S+)\s+password (\S+)")


def test_from_the_end_of_make_run_to_a_decision_on_one_of_its_posts(browser: Any, tmp_path: Path) -> None:
    register_tiny_model(tmp_path / "registry")
    kafka, controller, redis_port, web, review, exporter, sink = free_loopback_ports(7)
    env = {
        **os.environ,
        "MODSTREAM_HOME": str(tmp_path / "home"),
        "MODSTREAM_STACK_DIR": str(tmp_path / "stack"),
        "KAFKA_CONTROLLER_PORT": str(controller),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    argv = [sys.executable, "-m", "modstream", "run", "--review", "--posts", "40", "--device", "cpu",
            "--registry", str(tmp_path / "registry"), "--kafka-port", str(kafka), "--redis-port", str(redis_port),
            "--web-port", str(web), "--review-port", str(review), "--exporter-port", str(exporter),
            "--sink-port", str(sink)]  # fmt: skip
    out = tmp_path / "run.out"
    with out.open("wb") as fh:
        run = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 420
        found = None
        while time.monotonic() < deadline and found is None:
            assert run.poll() is None, f"`modstream run --review` exited with {run.returncode}:\n{out.read_text()}"
            found = READY.search(out.read_text(errors="replace"))
            time.sleep(1)
        assert found is not None, f"no console line within the deadline:\n{out.read_text()}"
        url, port, user, password = found.group(1), int(found.group(2)), found.group(3), found.group(4)
        assert port == review and user == "demo"
        routed = re.search(r"review: (\d+)", out.read_text())
        assert routed is not None and int(routed.group(1)) > 0, out.read_text()

        context = browser.new_context(base_url=url, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto("/review")
        page.fill("#username", user)
        page.fill("#password", password)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/review"))
        post_id = page.locator(".meta dd code").first.inner_text()
        assert post_id.startswith("run"), post_id  # one of the run's own posts
        # The image is the bytes the worker scored, kept in the run's evidence folder.
        page.wait_for_function("document.getElementById('post-image').naturalWidth > 0", timeout=30_000)
        page.keyboard.press("a")  # confirm every task
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r"/review\?done="))
        assert post_id in page.locator(".alert-ok").inner_text()
        context.close()

        decision = read_decision(f"127.0.0.1:{kafka}", post_id)
        assert decision.reviewer == "demo"
        assert {d.action for d in decision.decisions.values()} == {"confirm"}
        assert decision.media_hash and decision.seen_media_hash == decision.media_hash, "reviewer saw other bytes"
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(timeout=90)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait(timeout=10)
                subprocess.run(["bash", str(REPO_ROOT / "deploy" / "local-stack.sh"), "stop"], env=env, check=False)
    assert run.returncode == 0, out.read_text()[-3000:]
    assert not port_open(review) and not port_open(kafka) and not port_open(redis_port), "Ctrl-C left a server up"

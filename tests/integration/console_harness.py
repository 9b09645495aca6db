"""`modstream review serve` as a real subprocess with a scripted reviewer on its JSON API,
and the `modstream` CLI run the way a user runs it (for the loop tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.stack import REPO_ROOT, free_loopback_ports

PASSWORD = "loop test password 42"


def json_api(port: int, token: str, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """One call of the console's JSON API on loopback with a bearer token: (status, body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    """`modstream ARGS` as a user runs it; `env` adds to the environment (a role's credentials)."""
    done = subprocess.run(
        [sys.executable, "-m", "modstream.cli", *args],
        cwd=REPO_ROOT, input=stdin, text=True, capture_output=True, timeout=600, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 0, f"modstream {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


class Console:
    """`modstream review serve` as a subprocess, and a JSON API client with a bearer token."""

    def __init__(self, args: list[str], log: Path, users: Path, env: dict[str, str] | None = None) -> None:
        bootstrap = args[args.index("--bootstrap") + 1]  # user changes are recorded on its audit topic
        cli("review", "add-user", "scripted", "--role", "reviewer", "--password-stdin", "--users", str(users),
             "--bootstrap", bootstrap, stdin=PASSWORD + "\n", env=env)  # fmt: skip
        self.token = cli("review", "token", "scripted", "--users", str(users), "--bootstrap", bootstrap,
                         env=env).strip()  # fmt: skip
        (self.port,) = free_loopback_ports(1)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modstream.cli", "review", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--users", str(users), "--insecure-cookies", "--second-review-rate", "0", *args],
            cwd=REPO_ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/login", timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("the console did not start")

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return json_api(self.port, self.token, method, path, body)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()

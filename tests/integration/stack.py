"""Drives deploy/local-stack.sh for the integration tests: real Kafka 4.x (KRaft) and redis-server.

Each test session gets its own loopback ports and state folder, so it never touches a developer's
running stack (var/stack, ports 19092/19093/16379). The Kafka jars come from the shared cache
(~/.cache/modstream/kafka-VERSION/libs), downloaded once by `local-stack.sh fetch`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "deploy" / "local-stack.sh"
TOPICS = ("posts", "labels", "review", "posts.dlq", "model-updates", "reviewed", "audit", "bank-updates")

FETCH_TIMEOUT_S = 900  # first download of the jars from Maven Central
START_TIMEOUT_S = 180  # the script itself waits at most MODSTREAM_STACK_START_TIMEOUT per component
STOP_TIMEOUT_S = 60


class StackError(RuntimeError):
    """The local stack could not be fetched, started or stopped."""


def free_loopback_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return f"\n----- last {lines} lines of {path} -----\n" + "\n".join(text[-lines:])


@dataclass
class LocalStack:
    """One Kafka broker + one redis-server on loopback ports, started by deploy/local-stack.sh."""

    state_dir: Path
    kafka_port: int
    controller_port: int
    redis_port: int
    partitions: int = 4
    topics: tuple[str, ...] = TOPICS
    extra_env: dict[str, str] = field(default_factory=dict)
    # Kafka SASL_SSL with an ACL per role (MODSTREAM_STACK_SECURE=1): every client then needs
    # a role's credentials (role_env for processes, client_options in the test's own clients).
    secure: bool = False

    @classmethod
    def with_free_ports(cls, state_dir: Path, **kwargs) -> LocalStack:
        kafka_port, controller_port, redis_port = free_loopback_ports(3)
        return cls(state_dir, kafka_port, controller_port, redis_port, **kwargs)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MODSTREAM_STACK_DIR=str(self.state_dir),
            KAFKA_PORT=str(self.kafka_port),
            KAFKA_CONTROLLER_PORT=str(self.controller_port),
            REDIS_PORT=str(self.redis_port),
            TOPIC_PARTITIONS=str(self.partitions),
            TOPICS=" ".join(self.topics),
            MODSTREAM_PYTHON=sys.executable,
            MODSTREAM_STACK_SECURE="1" if self.secure else "0",
        )
        env.update(self.extra_env)
        return env

    def credentials(self, role: str) -> Path:
        """The role's credentials folder (a MODSTREAM_SECRETS_DIR) on a secured stack."""
        return self.state_dir / "credentials" / role

    def role_env(self, role: str) -> dict[str, str]:
        """Environment that makes a modstream process run as `role` (nothing on a plain stack)."""
        return {"MODSTREAM_SECRETS_DIR": str(self.credentials(role))} if self.secure else {}

    def redis_url_for(self, role: str = "admin") -> str:
        """The Redis URL a role connects with: on a secured stack its ACL user's (with its
        password: never pass it as a flag), else the plain one."""
        if not self.secure:
            return self.redis_url
        return (self.credentials(role) / "MODSTREAM_REDIS_URL").read_text()

    def redis_flags(self, url: str) -> list[str]:
        """`--redis URL` on a plain stack; nothing on a secured one, where each role's settings
        hold its own URL (a flag would put the password in the process table)."""
        return [] if self.secure else ["--redis", url]

    def client_options(self, role: str = "admin") -> dict[str, Any]:
        """aiokafka options for the test's own clients, as `role` (admin: the super user)."""
        if not self.secure:
            return {}
        from modstream.kafka_auth import KafkaAuth
        from modstream.settings import Settings

        # As a role process reads its folder (MODSTREAM_SECRETS_DIR), through the settings.
        return KafkaAuth.from_settings(Settings(_secrets_dir=str(self.credentials(role)))).client_options()

    def run(self, command: str, timeout: float = START_TIMEOUT_S) -> str:
        """Runs `local-stack.sh COMMAND` with this stack's settings; raises StackError with the logs on failure."""
        try:
            proc = subprocess.run(
                ["bash", str(SCRIPT), command],
                env=self.env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"local-stack.sh {command} did not finish within {timeout:.0f}s{self._logs()}") from exc
        except OSError as exc:
            raise StackError(f"could not run {SCRIPT}: {exc}") from exc
        if proc.returncode != 0:
            raise StackError(
                f"local-stack.sh {command} failed (exit {proc.returncode})\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}{self._logs()}"
            )
        return proc.stdout

    def _logs(self) -> str:
        return _tail(self.state_dir / "kafka.log") + _tail(self.state_dir / "redis.log", 15)

    def fetch(self) -> str:
        return self.run("fetch", timeout=FETCH_TIMEOUT_S)

    def start(self) -> str:
        return self.fetch() + self.run("start")

    def stop(self) -> str:
        return self.run("stop", timeout=STOP_TIMEOUT_S)

    def start_kafka(self) -> str:
        return self.run("start-kafka")

    def stop_kafka(self) -> str:
        return self.run("stop-kafka", timeout=STOP_TIMEOUT_S)

    def start_redis(self) -> str:
        return self.run("start-redis")

    def stop_redis(self) -> str:
        return self.run("stop-redis", timeout=STOP_TIMEOUT_S)

    def status(self) -> str:
        return self.run("status", timeout=30)

    def pids(self) -> dict[str, int]:
        """Live processes this stack started (pid files checked against /proc cmdline)."""
        markers = {"kafka": "kafka.Kafka", "redis": "redis-server"}
        found = {}
        for name, marker in markers.items():
            try:
                pid = int((self.state_dir / f"{name}.pid").read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
            if marker in cmdline:
                found[name] = pid
        return found

    def kill_leftovers(self) -> dict[str, int]:
        """Last resort when `stop` failed: SIGKILL whatever this stack's pid files still point at."""
        leftovers = self.pids()
        for pid in leftovers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        return leftovers

    @contextlib.contextmanager
    def started(self, what: str = "start") -> Iterator[LocalStack]:
        """For a fixture: runs `local-stack.sh WHAT` (start, start-redis), yields the stack and
        shuts it down; a stack that cannot start fails the test with the script's story, never
        skips it (CI must run these tests)."""
        try:
            error = None
            try:
                self.start() if what == "start" else self.run(what)
            except StackError as exc:
                error = str(exc)
            if error is not None:  # outside the except block: no chained traceback
                import pytest

                pytest.fail(f"could not {what} the local stack ({self.state_dir}): {error}", pytrace=False)
            yield self
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """`stop`, and if that fails or leaves a process behind, kill it; raises StackError in that case."""
        error: StackError | None = None
        try:
            self.stop()
        except StackError as exc:
            error = exc
        leftovers = self.kill_leftovers()
        if error is not None:
            raise error
        if leftovers:
            raise StackError(f"local-stack.sh stop left processes running; killed {leftovers}")

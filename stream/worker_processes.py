"""`modstream worker --processes N`: N worker processes on one host, one consumer group.

Why: one worker is one interpreter, and the host CPU around the model (fetch, decode, hash,
resize, produce) is what starves a GPU (issue 22: the device pool ran at 10-25% of the bare
forward). N processes scale that CPU with the host's cores; on a GPU host they share the card.

How: each child is a whole `modstream worker` started with the parent's own arguments (so its own
Faust consumer in the group, its own device pool replica, decode threads and dedupe client),
except `--processes`, and its web server on a free loopback port of its own. The parent
is the host's one scrape target and probe, on the port the operator gave (`--web-port`):
`/metrics` is every child's, each series labelled `worker_process="i"` (plus the parent's own
`modstream_worker_processes` and `modstream_worker_process_restarts_total`), and `/ready` answers
200 only when every child is ready. A child that exits on its own is restarted, at most
MAX_RESTARTS in RESTART_WINDOW_S; past that the parent stops the others and exits 1, for the
orchestrator to restart the pod. SIGTERM or SIGINT reach every child (each has its own stop
grace); the parent exits when they have. Nothing is lost when a child dies: its partitions are
rebalanced to the others and its unacknowledged batches are delivered again (at-least-once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
RESTART_DELAY_S = 1.0
CHILD_TIMEOUT_S = 5.0  # a child's /metrics or /ready slower than this counts as down
MAX_CHILD_BODY = 16 * 1024 * 1024


def child_argv(argv: Sequence[str], web_port: int) -> list[str]:
    """The parent's arguments (after the program name) for one child: without `--processes`
    and `--web-host`/`--web-port`, then the child's own loopback port."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--processes", "--web-port", "--web-host"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return [*out, "--web-host", "127.0.0.1", "--web-port", str(web_port)]


def _free_loopback_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 now (the OS picks; bound together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class _Families:
    """A collector of parsed families, so prometheus_client's own writer renders them."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_metrics(pages: dict[int, str]) -> str:
    """One exposition of every child's metrics, each sample labelled worker_process="i"."""
    merged: dict[str, Metric] = {}
    for process, text in sorted(pages.items()):
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                target.samples.append(sample._replace(labels={**sample.labels, "worker_process": str(process)}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry).decode()


class Supervisor:
    def __init__(self, argv: Sequence[str], processes: int, web_host: str, web_port: int) -> None:
        if processes < 2:
            raise ValueError("a supervisor runs 2 or more worker processes")
        self.argv = list(argv)
        self.processes = processes
        self.web_host, self.web_port = web_host, web_port
        self.ports = _free_loopback_ports(processes)
        self.children: list[asyncio.subprocess.Process | None] = [None] * processes
        self.restarts: list[float] = []
        self.restarts_total = 0
        self.stopping = asyncio.Event()
        self.exit_code = 0

    async def _spawn(self, i: int) -> None:
        cmd = [sys.executable, "-m", "modstream.cli", *child_argv(self.argv, self.ports[i])]
        child = await asyncio.create_subprocess_exec(*cmd)
        self.children[i] = child
        log.warning("worker process %d started (pid %d, web port %d)", i, child.pid, self.ports[i])

    async def _watch(self, i: int) -> None:
        while not self.stopping.is_set():
            child = self.children[i]
            assert child is not None
            code = await child.wait()
            if self.stopping.is_set():
                return
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(self.restarts) > MAX_RESTARTS:
                log.error(
                    "worker process %d exited (%s): %d restarts in %.0f s, stopping",
                    i,
                    code,
                    MAX_RESTARTS,
                    RESTART_WINDOW_S,
                )
                self.exit_code = 1
                self.stopping.set()
                return
            log.error("worker process %d exited (%s); restarting it", i, code)
            self.restarts_total += 1
            await asyncio.sleep(RESTART_DELAY_S)
            if not self.stopping.is_set():
                await self._spawn(i)

    async def _get(self, session: aiohttp.ClientSession, port: int, path: str) -> tuple[int, bytes]:
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            body = await resp.content.read(MAX_CHILD_BODY + 1)
            if len(body) > MAX_CHILD_BODY:
                raise ValueError("child answer too large")
            return resp.status, body

    async def metrics(self, request: web.Request) -> web.Response:
        session: aiohttp.ClientSession = request.app["session"]
        answers = await asyncio.gather(*(self._get(session, p, "/metrics") for p in self.ports), return_exceptions=True)
        pages = {i: a[1].decode() for i, a in enumerate(answers) if not isinstance(a, BaseException) and a[0] == 200}
        own = (
            "# HELP modstream_worker_processes Worker processes this supervisor runs, and how many answer.\n"
            "# TYPE modstream_worker_processes gauge\n"
            f'modstream_worker_processes{{state="configured"}} {self.processes}\n'
            f'modstream_worker_processes{{state="answering"}} {len(pages)}\n'
            "# HELP modstream_worker_process_restarts_total Worker processes restarted after exiting on their own.\n"
            "# TYPE modstream_worker_process_restarts_total counter\n"
            f"modstream_worker_process_restarts_total {self.restarts_total}\n"
        )
        return web.Response(body=(own + merge_metrics(pages)).encode(), content_type="text/plain", charset="utf-8")

    async def ready(self, request: web.Request) -> web.Response:
        session: aiohttp.ClientSession = request.app["session"]
        answers = await asyncio.gather(*(self._get(session, p, "/ready") for p in self.ports), return_exceptions=True)
        bodies: list[Any] = []
        ok = True
        for a in answers:
            if isinstance(a, BaseException):
                ok = False
                bodies.append({"ready": False, "problem": f"not answering: {type(a).__name__}"})
                continue
            ok = ok and a[0] == 200
            try:
                bodies.append(json.loads(a[1]))
            except ValueError:
                bodies.append({"ready": False, "problem": "unreadable /ready"})
        body = {"ready": ok, "processes": bodies}
        return web.json_response(body, status=200 if ok else 503)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        app = web.Application()
        app["session"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CHILD_TIMEOUT_S))
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/ready", self.ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.web_host, self.web_port).start()
        try:
            for i in range(self.processes):
                await self._spawn(i)
            watchers = [asyncio.create_task(self._watch(i)) for i in range(self.processes)]
            await self.stopping.wait()
            for child in self.children:
                if child is not None and child.returncode is None:
                    child.send_signal(signal.SIGTERM)
            await asyncio.gather(*(c.wait() for c in self.children if c is not None))
            for w in watchers:
                w.cancel()
        finally:
            await app["session"].close()
            await runner.cleanup()
        return self.exit_code


def run_supervisor(argv: Sequence[str], processes: int, web_host: str, web_port: int) -> int:
    return asyncio.run(Supervisor(argv, processes, web_host, web_port).run())

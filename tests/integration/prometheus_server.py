"""A real Prometheus (Debian's /usr/bin/prometheus) on a loopback port, with history backfilled by
`promtool tsdb create-blocks-from openmetrics`, for tests of what reads Prometheus.

The server is this test's own process: started on a port the OS just handed out (retried on
another port if something took it in between), stopped (terminate, then kill) however the test
ends. Nothing here touches a developer's Prometheus."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.integration.stack import REPO_ROOT, free_loopback_ports

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules" / "modstream.rules.yml"

Series = tuple[str, Mapping[str, str], Iterable[tuple[float, float]]]  # name, labels, (unix time, value)


def require_prometheus() -> None:
    if not (PROMETHEUS.exists() and PROMTOOL.exists()):
        pytest.skip("prometheus / promtool are missing (apt-get install prometheus; make test installs them)")


def openmetrics(series: Iterable[Series]) -> str:
    """Counters in the OpenMetrics text format promtool backfills (one family per name)."""
    families: dict[str, list[str]] = {}
    for name, labels, points in series:
        label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        family = families.setdefault(name.removesuffix("_total"), [])
        family.extend(f"{name}{{{label_text}}} {value:g} {t:.3f}" for t, value in sorted(points))
    lines = []
    for family, samples in families.items():
        lines.append(f"# TYPE {family} counter")
        lines.extend(samples)
    return "\n".join([*lines, "# EOF"]) + "\n"


def backfill(series: Iterable[Series], data_dir: Path) -> None:
    source = data_dir.parent / f"{data_dir.name}.om"
    source.write_text(openmetrics(series))
    data_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(PROMTOOL), "tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=24h", str(source),
         str(data_dir)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


@contextlib.contextmanager
def running_prometheus(data_dir: Path, *, rules: bool = False, log: Path | None = None) -> Iterator[str]:
    """Prometheus on 127.0.0.1 over `data_dir`, evaluating the repo's rules every second when
    `rules`; yields its base URL and stops it on the way out."""
    config = data_dir.parent / f"{data_dir.name}-prometheus.yml"
    rule_files = f"rule_files: ['{RULES}']\n" if rules else ""
    config.write_text(f"global:\n  evaluation_interval: 1s\n{rule_files}")
    log = log or data_dir.parent / f"{data_dir.name}-prometheus.log"
    for _attempt in range(3):
        (port,) = free_loopback_ports(1)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=60d"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
                time.sleep(0.2)
            else:
                if proc.poll() is not None:
                    continue  # the port was taken in between, or another start failure: try again
                raise RuntimeError(f"prometheus not ready within 60 s:\n{log.read_text()[-3000:]}")
            yield url
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
    raise RuntimeError(f"prometheus did not start:\n{log.read_text()[-3000:]}")


def cleanup(data_dir: Path) -> None:
    shutil.rmtree(data_dir, ignore_errors=True)

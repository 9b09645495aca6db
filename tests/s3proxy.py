"""A real S3-compatible server for tests: S3Proxy (Apache-2.0, one jar from Maven Central,
fetched and checked by deploy/test-tools.sh) on a free loopback port, storing in a temporary
folder. Started and stopped by the fixture that uses it; never a mock."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.stack import free_loopback_ports, port_open

VERSION = "4.1.0"
JAR = Path(os.environ.get("MODSTREAM_S3PROXY_JAR", Path.home() / ".cache" / "modstream" / f"s3proxy-{VERSION}.jar"))
IDENTITY, CREDENTIAL = "modstream-test", "modstream-test-secret"


@dataclass
class S3Proxy:
    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=IDENTITY,
            aws_secret_access_key=CREDENTIAL,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def env(self) -> dict[str, str]:
        """What a modstream process needs to reach this server (modstream.settings)."""
        return {
            "MODSTREAM_S3_ENDPOINT": self.endpoint,
            "MODSTREAM_S3_REGION": "us-east-1",
            "MODSTREAM_S3_ACCESS_KEY_ID": IDENTITY,
            "MODSTREAM_S3_SECRET_ACCESS_KEY": CREDENTIAL,
        }


@contextmanager
def running_s3proxy(folder: Path, *, timeout_s: float = 60.0) -> Iterator[S3Proxy]:
    if not JAR.is_file():
        raise RuntimeError(f"{JAR} is missing: run `bash deploy/test-tools.sh` (make test does)")
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("java is missing (the Kafka broker needs it too)")
    (port,) = free_loopback_ports(1)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    conf = folder / "s3proxy.conf"
    conf.write_text(
        f"s3proxy.endpoint=http://127.0.0.1:{port}\n"
        "s3proxy.authorization=aws-v2-or-v4\n"
        f"s3proxy.identity={IDENTITY}\n"
        f"s3proxy.credential={CREDENTIAL}\n"
        "jclouds.provider=filesystem-nio2\n"
        f"jclouds.filesystem.basedir={data}\n"
    )
    log = folder / "s3proxy.log"
    process = subprocess.Popen(
        [java, "-Xmx256m", "-jar", str(JAR), "--properties", str(conf)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not port_open(port, timeout=0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"S3Proxy did not start on port {port}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield S3Proxy(f"http://127.0.0.1:{port}", process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

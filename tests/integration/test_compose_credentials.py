"""compose's secured transport, run here without a container engine: deploy/compose/credentials-init.sh
makes the credentials volume exactly as compose would (into a temporary folder), redis-server
starts with compose's own command line (paths and port mapped to the folder and a free loopback
port), and each role connects with the URL and CA from its own folder. The broker's properties
come from deploy/compose/kafka-secure.sh, checked against the folder it reads.

What stays unchecked here: the container plumbing itself (volume subpaths, image users), which
needs Docker Compose (docs/operations.md says so).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from redis.exceptions import AuthenticationError, NoPermissionError

from modstream.kafka_acls import ROLES
from tests.integration.stack import free_loopback_ports

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose"


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("credentials-volume")
    env = {
        **os.environ,
        "CREDENTIALS_ROOT": str(root),
        "CREDENTIALS_NO_CHOWN": "1",
        "MODSTREAM_PYTHON": str(REPO / ".venv/bin/python"),
    }
    done = subprocess.run(
        ["bash", str(COMPOSE / "credentials-init.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return root


def _role_url(volume: Path, role: str, port: int) -> str:
    """The role's Redis URL as compose hands it over, pointed at this test's server and folder."""
    url = (volume / "roles" / role / "MODSTREAM_REDIS_URL").read_text()
    assert url.startswith("rediss://") and "@redis:6379/0?ssl_ca_certs=/run/secrets/modstream/ca.pem" in url
    return url.replace("@redis:6379", f"@localhost:{port}").replace(
        "/run/secrets/modstream/ca.pem", str(volume / "roles" / role / "ca.pem")
    )


@pytest.fixture(scope="module")
def compose_redis(volume: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """redis-server with the compose service's arguments; /credentials is the `redis` folder."""
    (port,) = free_loopback_ports(1)
    command = yaml.safe_load((COMPOSE / "compose.yaml").read_text())["services"]["redis"]["command"]
    argv = [a.replace("/credentials", str(volume / "redis")) for a in command]
    argv[argv.index("--tls-port") + 1] = str(port)
    data = tmp_path_factory.mktemp("redis-data")
    argv += ["--bind", "127.0.0.1", "--dir", str(data), "--daemonize", "no"]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None, "redis-server exited at start"
                assert time.monotonic() < deadline, "redis-server did not listen"
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_each_container_gets_only_its_own_part(volume: Path) -> None:
    principals = {p.name for p in (volume / "roles").iterdir()}
    assert principals == {"admin", *ROLES}
    for role in principals:
        files = {p.name for p in (volume / "roles" / role).iterdir()}
        assert {"MODSTREAM_KAFKA_USERNAME", "MODSTREAM_KAFKA_PASSWORD", "ca.pem"} <= files
        assert "ca.key" not in files and not any(f.endswith(".key") for f in files)
        ca_file = (volume / "roles" / role / "MODSTREAM_KAFKA_CA_FILE").read_text()
        assert ca_file == "/run/secrets/modstream/ca.pem"
    kafka = {str(p.relative_to(volume / "kafka")) for p in (volume / "kafka").rglob("*") if p.is_file()}
    assert kafka == {"broker-keystore.pem", "ca.pem"} | {f"principals/{r}/MODSTREAM_KAFKA_PASSWORD" for r in principals}
    assert {p.name for p in (volume / "redis").iterdir()} == {"redis.crt", "redis.key", "ca.pem", "redis-users.acl"}
    acl = (volume / "redis" / "redis-users.acl").read_text()
    for role in ("worker", "review-sink", "console"):
        assert (volume / "roles" / role / "redis.password").read_text() not in acl  # hashes only


def test_the_servers_certificates_name_the_compose_hosts(volume: Path) -> None:
    for name in ("broker", "redis"):
        text = subprocess.run(
            ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(volume / "ca" / f"{name}.crt")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "DNS:kafka" in text and "DNS:redis" in text, text
    # Each server has its own key: Redis's certificate is not the broker's (a Kafka super user).
    assert (volume / "redis" / "redis.key").read_bytes() not in (volume / "kafka" / "broker-keystore.pem").read_bytes()


def test_the_broker_properties_use_the_volume_and_every_principal_can_log_in(volume: Path) -> None:
    env = {**os.environ, "CREDENTIALS_ROOT": str(volume / "kafka")}
    script = str(COMPOSE / "kafka-secure.sh")
    props = subprocess.run(["bash", script, "server-properties"], env=env, capture_output=True, text=True, check=True)
    text = props.stdout
    assert "listeners=SASL_SSL://:9092,CONTROLLER://:9093" in text
    assert "advertised.listeners=SASL_SSL://kafka:9092" in text
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer" in text
    assert "allow.everyone.if.no.acl.found=false" in text
    assert f"ssl.keystore.location={volume / 'kafka' / 'broker-keystore.pem'}" in text
    admin_password = (volume / "roles" / "admin" / "MODSTREAM_KAFKA_PASSWORD").read_text()
    assert f'username="admin" password="{admin_password}"' in text
    client = subprocess.run(["bash", script, "client-config"], env=env, capture_output=True, text=True, check=True)
    assert "security.protocol=SASL_SSL" in client.stdout and admin_password in client.stdout


def test_roles_reach_compose_redis_over_tls_as_their_own_users(volume: Path, compose_redis: int) -> None:
    port = compose_redis
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port).ping()  # no plaintext port
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate"):
        redis.Redis(host="localhost", port=port, ssl=True, ssl_cert_reqs=ssl.CERT_REQUIRED).ping()
    with pytest.raises(AuthenticationError):
        redis.Redis(
            host="localhost",
            port=port,
            ssl=True,
            ssl_ca_certs=str(volume / "redis" / "ca.pem"),
            username="console",
            password="guess",
        ).ping()
    sink = redis.Redis.from_url(_role_url(volume, "review-sink", port))
    sink.xadd("modstream:review", {"post_id": "compose-probe"})
    with pytest.raises(NoPermissionError):
        sink.delete("modstream:review")
    worker = redis.Redis.from_url(_role_url(volume, "worker", port))
    with pytest.raises(NoPermissionError):
        worker.xadd("modstream:review", {"post_id": "forged"})
    operator = redis.Redis.from_url(_role_url(volume, "admin", port))
    assert operator.xlen("modstream:review") == 1

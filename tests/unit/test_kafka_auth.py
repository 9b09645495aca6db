"""Kafka credentials from the settings, and the per-role ACL table (pure logic; the broker's
enforcement is tested in tests/integration/test_secure_transport.py)."""

from __future__ import annotations

import ssl

import pytest

from modstream.kafka_acls import GROUP, LITERAL, PREFIXED, READ, ROLES, TOPIC, WRITE, allowed, plan
from modstream.kafka_auth import KafkaAuth
from modstream.settings import Settings, SettingsError, load


def test_plaintext_adds_nothing_to_a_client():
    auth = KafkaAuth()
    assert auth.client_options() == {} and auth.faust_credentials() is None


def test_sasl_ssl_needs_a_user_and_a_password_and_an_existing_ca(tmp_path):
    with pytest.raises(SettingsError, match="MODSTREAM_KAFKA_USERNAME"):
        KafkaAuth("SASL_SSL", username="worker")
    with pytest.raises(SettingsError, match="no such file"):
        KafkaAuth("SASL_SSL", username="worker", password="pw", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match="PLAINTEXT or SASL_SSL"):
        KafkaAuth("SASL_PLAINTEXT", username="worker", password="pw")


def test_sasl_ssl_options_verify_the_broker_and_never_show_the_password():
    auth = KafkaAuth("SASL_SSL", username="worker", password="s3cret-pw")
    options = auth.client_options()
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "worker" and options["sasl_plain_password"] == "s3cret-pw"
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert "s3cret-pw" not in repr(auth)
    credentials = auth.faust_credentials()
    assert credentials.mechanism.value == "SCRAM-SHA-512" and credentials.protocol.value == "SASL_SSL"


def test_credentials_come_from_a_secrets_folder_not_a_flag(tmp_path, monkeypatch):
    folder = tmp_path / "worker"
    folder.mkdir()
    for name, value in {
        "MODSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "MODSTREAM_KAFKA_USERNAME": "worker",
        "MODSTREAM_KAFKA_PASSWORD": "from-a-file",
    }.items():
        (folder / name).write_text(value)
    for name in ("MODSTREAM_KAFKA_SECURITY_PROTOCOL", "MODSTREAM_KAFKA_USERNAME", "MODSTREAM_KAFKA_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODSTREAM_SECRETS_DIR", str(folder))
    settings = load()
    assert "from-a-file" not in repr(settings)
    auth = KafkaAuth.from_settings(settings)
    assert auth.secured and auth.username == "worker" and auth.password == "from-a-file"
    assert KafkaAuth.from_settings(Settings()).secured is False


def test_the_worker_cannot_write_decisions_or_model_updates():
    bindings = plan()
    for topic in ("labels", "review", "posts.dlq"):
        assert allowed(bindings, "worker", TOPIC, topic, WRITE)
    for topic in ("reviewed", "model-updates", "audit", "posts"):
        assert not allowed(bindings, "worker", TOPIC, topic, WRITE), topic
    assert allowed(bindings, "console", TOPIC, "reviewed", WRITE)
    assert not allowed(bindings, "console", TOPIC, "reviewed", READ), "the console writes decisions, nothing more"
    assert allowed(bindings, "retrain", TOPIC, "model-updates", WRITE)
    assert not any(allowed(bindings, "mallory", TOPIC, t, op) for t in ("posts", "reviewed") for op in (READ, WRITE))


def test_topics_are_literal_and_groups_prefixes():
    bindings = plan()
    # A prefix "posts" would let the worker read the dead letters; a literal grant does not.
    assert allowed(bindings, "worker", TOPIC, "posts", READ)
    assert not allowed(bindings, "worker", TOPIC, "posts.dlq", READ)
    assert all(b.pattern == LITERAL for b in bindings if b.resource_type == TOPIC and b.name in ROLES["worker"].reads)
    assert allowed(bindings, "worker", GROUP, "modstream-worker-eu", READ)
    assert not allowed(bindings, "worker", GROUP, "modstream-dataset-sink", READ)
    assert {b.pattern for b in bindings if b.resource_type == GROUP and b.principal != "User:lag-exporter"} == {
        PREFIXED
    }


def test_the_lag_exporter_describes_everything_and_reads_nothing():
    from modstream.kafka_acls import DESCRIBE

    bindings = plan()
    assert allowed(bindings, "lag-exporter", TOPIC, "posts", DESCRIBE)
    assert allowed(bindings, "lag-exporter", GROUP, "modstream-worker", DESCRIBE)
    for topic in ("posts", "reviewed", "labels"):
        assert not allowed(bindings, "lag-exporter", TOPIC, topic, READ)
        assert not allowed(bindings, "lag-exporter", TOPIC, topic, WRITE)
    assert allowed(bindings, "retention", TOPIC, "reviewed", WRITE)
    assert allowed(bindings, "retention", TOPIC, "audit", WRITE)
    assert not allowed(bindings, "retention", TOPIC, "model-updates", WRITE)


def test_a_deployment_can_rename_topics():
    bindings = plan(topics={"reviewed": "prod.reviewed"})
    assert allowed(bindings, "console", TOPIC, "prod.reviewed", WRITE)
    assert not allowed(bindings, "console", TOPIC, "reviewed", WRITE)


def test_the_redis_acl_file_holds_password_hashes_and_one_rule_per_role(tmp_path):
    import hashlib

    from modstream.redis_acls import aclfile_lines, credentials_from_url

    lines = aclfile_lines({"worker": "w-secret", "review-sink": "s-secret"}, "operator-secret")
    text = "\n".join(lines)
    assert "secret" not in text, "only hashes in the file"
    assert lines[0].startswith("user default on #" + hashlib.sha256(b"operator-secret").hexdigest())
    worker = next(line for line in lines if line.startswith("user worker "))
    assert "~modstream:dedupe:*" in worker and "+xadd" not in worker and "~modstream:review" not in worker
    sink = next(line for line in lines if line.startswith("user review-sink "))
    assert "+xack" not in sink and "+xdel" not in sink and "+xtrim" not in sink and "+del" not in sink
    with pytest.raises(ValueError, match="no Redis ACL rule"):
        aclfile_lines({"mallory": "x"}, "operator")
    assert credentials_from_url("redis://review-sink:p%40ss@127.0.0.1:1/0") == ("review-sink", "p%40ss")
    with pytest.raises(ValueError, match="no password"):
        credentials_from_url("redis://127.0.0.1:1/0")


def test_the_console_deletes_only_from_the_escalation_and_dead_streams():
    from modstream.redis_acls import REVIEW, RULES

    selectors = [part.strip("( ") for part in RULES["console"].split(")") if "+xdel" in part]
    assert len(selectors) == 1
    keys = {token for token in selectors[0].split() if token.startswith("~")}
    assert keys == {f"~{REVIEW}:dead", f"~{REVIEW}:escalated"}

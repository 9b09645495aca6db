"""Offline checks of deploy/: nothing here starts a container or talks to a cluster.

- every Kubernetes manifest in deploy/k8s/ against the API schemas kubernetes-validate bundles
  (strict: unknown fields fail), for the Kubernetes version pinned below;
- the KEDA ScaledObject against the openAPIV3Schema of KEDA's CRD, stored in
  deploy/k8s/schemas/keda.sh_scaledobject_v1alpha1.json (extracted from kedacore/keda
  config/crd/bases/keda.sh_scaledobjects.yaml at commit 8b4f083ca8c8, see its $comment), with
  unknown fields refused as `kubectl apply --validate=strict` would;
- deploy/compose/compose.yaml against the compose-spec JSON Schema, stored verbatim in
  deploy/compose/compose-spec.json (compose-spec/compose-spec schema/compose-spec.json at commit
  170098ba07d9);
- yamllint on every YAML file under deploy/;
- consistency: the worker count KEDA may reach against the partitions of `posts`, every
  `modstream` command line against the real CLI parser, the kustomization against the files,
  the compose Prometheus jobs against deploy/prometheus/prometheus.yml.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from modstream.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
KUBERNETES_VERSION = "1.33.0"  # bundled by kubernetes-validate 1.37.0 (pinned in pyproject.toml)
NOT_CORE = {"Kustomization", "ScaledObject", "TriggerAuthentication"}  # no schema in kubernetes-validate: below

LINT_RULES = """
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
  comments: {min-spaces-from-content: 1}
  truthy: {allowed-values: ["true", "false"], check-keys: false}
  braces: {max-spaces-inside: 1}
  brackets: {max-spaces-inside: 1}
"""
YAMLLINT = YamlLintConfig(LINT_RULES)
# PromQL expressions and promtool test series do not wrap: no line length for deploy/prometheus.
YAMLLINT_PROMQL = YamlLintConfig(LINT_RULES.replace("line-length: {max: 120}", "line-length: disable"))


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in k8s_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


CORE_DOCS = [(f, d) for f, d in k8s_documents() if d["kind"] not in NOT_CORE]


@pytest.mark.parametrize(
    ("path", "doc"), CORE_DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in CORE_DOCS]
)
def test_kubernetes_manifest_is_valid_in_strict_mode(path, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_catches_a_misspelt_field():
    """The check above can fail: a typo kubectl would reject is rejected here too."""
    doc = copy.deepcopy(by_kind("Deployment", "modstream-worker"))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _closed(schema: Any) -> Any:
    """The CRD schema with unknown fields refused (structural schemas prune them silently;
    `kubectl apply --validate=strict` refuses them, which is what catches typos)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def keda_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((K8S / "schemas" / "keda.sh_scaledobject_v1alpha1.json").read_text())
    schema.pop("$comment", None)
    # metadata is `type: object` in every CRD (the API server checks it); keep it open.
    closed = _closed(schema)
    closed["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(closed)


def test_scaledobject_matches_kedas_crd_schema():
    scaled = by_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in keda_validator().iter_errors(scaled)]
    assert errors == []


def test_keda_schema_check_catches_a_misspelt_field():
    scaled = copy.deepcopy(by_kind("ScaledObject"))
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    assert not keda_validator().is_valid(scaled)
    scaled = copy.deepcopy(by_kind("ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 5000  # metadata values are strings
    assert not keda_validator().is_valid(scaled)


def test_scaledobject_scales_the_worker_on_its_consumer_lag():
    scaled = by_kind("ScaledObject")
    worker = by_kind("Deployment", "modstream-worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = build_parser().parse_args(args)
    assert meta["consumerGroup"] == parsed.app_id  # the faust app id is the consumer group
    assert meta["topic"] == "posts"
    assert int(meta["lagThreshold"]) > 0
    assert meta["bootstrapServers"] == by_kind("ConfigMap", "modstream-config")["data"]["KAFKA_BOOTSTRAP"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_scaledobject_is_capped_at_the_partition_count():
    """More workers than partitions of `posts` would sit idle (and hold a GPU each)."""
    cap = by_kind("ScaledObject")["spec"]["maxReplicaCount"]
    k8s_partitions = int(by_kind("ConfigMap", "modstream-config")["data"]["TOPIC_PARTITIONS"])
    topic_job = by_kind("Job", "modstream-topics")["spec"]["template"]["spec"]["containers"][0]
    assert "--partitions" in topic_job["args"][0] and "TOPIC_PARTITIONS" in topic_job["args"][0]
    compose_default = compose()["services"]["topic-init"]["environment"]["TOPIC_PARTITIONS"]
    compose_partitions = int(compose_default.removeprefix("${TOPIC_PARTITIONS:-").removesuffix("}"))
    assert by_kind("ScaledObject")["spec"]["minReplicaCount"] <= cap <= k8s_partitions
    assert compose()["services"]["worker"]["deploy"]["replicas"] <= compose_partitions
    assert compose_partitions == k8s_partitions


def test_worker_pods_take_one_gpu_each_and_are_ready_only_after_warm_up():
    pod = by_kind("Deployment", "modstream-worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert build_parser().parse_args(container["args"]).device == "cuda"
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/ready"
    assert "livenessProbe" in container


def modstream_commands() -> list[tuple[str, list[str]]]:
    """Every `modstream` command line in the manifests and the compose file."""
    out = []
    for name, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "CronJob"):
            spec = doc["spec"]
            template = spec["jobTemplate"]["spec"]["template"] if doc["kind"] == "CronJob" else spec["template"]
            for c in template["spec"]["containers"]:
                if "modstream" in c["image"]:
                    out.append((f"{name}:{doc['metadata']['name']}", c["args"]))
    for service, body in compose()["services"].items():
        if str(body.get("image", "")).startswith("modstream:") and "entrypoint" not in body:
            out.append((f"compose:{service}", body["command"]))
    return out


def test_images_have_modstream_as_entrypoint():
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / dockerfile).read_text()
        assert 'ENTRYPOINT ["modstream"]' in text
        cmd = [line for line in text.splitlines() if line.startswith("CMD ")]
        assert len(cmd) == 1
        argv = json.loads(cmd[0].removeprefix("CMD "))
        if argv != ["--help"]:
            assert build_parser().parse_args(argv).command in ROLES
    assert "FROM ${PYTHON_IMAGE}" in (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda:" in (DEPLOY / "docker" / "Dockerfile.gpu").read_text()


ROLES = {
    "worker",
    "review-sink",
    "dataset-sink",
    "review",
    "retrain",
    "demo",
    "lag-exporter",
    "retention",
    "kafka-acls",
}


@pytest.mark.parametrize(("where", "argv"), modstream_commands(), ids=[w for w, _ in modstream_commands()])
def test_every_command_is_a_real_modstream_subcommand(where, argv):
    args = build_parser().parse_args(argv)  # SystemExit(2) on an unknown command or option
    assert args.command in ROLES
    assert callable(args.func)


def test_every_role_is_deployed():
    compose_roles = {argv[0] for where, argv in modstream_commands() if where.startswith("compose:")}
    k8s_roles = {argv[0] for where, argv in modstream_commands() if not where.startswith("compose:")}
    roles = {"worker", "review-sink", "dataset-sink", "review", "retrain", "lag-exporter"}
    assert roles <= compose_roles
    assert roles <= k8s_roles
    retrain = next(argv for where, argv in modstream_commands() if where.startswith("compose:retrain"))
    assert build_parser().parse_args(retrain).watch
    cron = by_kind("CronJob", "modstream-retrain")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert not build_parser().parse_args(cron["containers"][0]["args"]).watch  # one-shot under cron
    retention = by_kind("CronJob", "modstream-retention")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert build_parser().parse_args(retention["containers"][0]["args"]).command == "retention"


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_compose_file_matches_the_compose_spec():
    schema = json.loads((DEPLOY / "compose" / "compose-spec.json").read_text())
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(compose())
    ]
    assert errors == []


def test_compose_spec_check_catches_a_misspelt_field():
    schema = json.loads((DEPLOY / "compose" / "compose-spec.json").read_text())
    broken = compose()
    broken["services"]["redis"]["healtcheck"] = broken["services"]["redis"].pop("healthcheck")
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_compose_runs_every_service_the_issue_names():
    services = compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:4")
    assert services["kafka"]["entrypoint"][-1].endswith("kafka-secure.sh")  # KRaft: deploy/compose/kafka-secure.sh
    assert "--appendonly" in services["redis"]["command"]
    for name in ("topic-init", "worker", "review-sink", "dataset-sink", "review-console", "retrain"):
        assert name in services
    assert "prom/prometheus" in services["prometheus"]["image"]
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    assert "../prometheus/rules:" in mounts and "../grafana/modstream.json:" in mounts
    assert {"registry", "reviewed"} <= set(compose()["volumes"])


def test_compose_prometheus_scrapes_the_jobs_the_rules_expect():
    ours = yaml.safe_load((DEPLOY / "compose" / "prometheus.compose.yml").read_text())
    upstream_path = DEPLOY / "prometheus" / "prometheus.yml"
    if not upstream_path.exists():
        pytest.fail("deploy/prometheus/prometheus.yml is missing")
    upstream = yaml.safe_load(upstream_path.read_text())
    assert [j["job_name"] for j in ours["scrape_configs"]] == [j["job_name"] for j in upstream["scrape_configs"]]
    assert ours["rule_files"] == upstream["rule_files"]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yamllint(path):
    config = YAMLLINT_PROMQL if (DEPLOY / "prometheus") in path.parents else YAMLLINT
    problems = [f"{path.name}:{p.line}:{p.column} {p.rule} {p.desc}" for p in linter.run(path.read_text(), config)]
    assert problems == []


def test_compose_commands_quote_cleanly():
    """Compose passes `command` lists verbatim; a shell string would be split differently."""
    for service, body in compose()["services"].items():
        command = body.get("command")
        if command is not None:
            assert isinstance(command, list), f"{service}: use a list, not {shlex.quote(str(command))}"


def test_images_copy_every_product_package_and_the_worker_target_drops_the_trainer():
    import tomllib

    include = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [p.rstrip("*") for p in include["include"]]
    assert "modstream" in packages
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / dockerfile).read_text()
        ignore = (DEPLOY / "docker" / f"{dockerfile}.dockerignore").read_text().splitlines()
        for package in packages:
            assert f"COPY {package} {package}" in text, (dockerfile, package)
            assert f"!{package}/" in ignore, (dockerfile, package)
        worker = text[text.index("AS worker") : text.index("AS full")]
        assert "site-packages/trainer" in worker and "rm -rf" in worker
        assert text.rstrip().endswith("FROM runtime AS full")  # the default target keeps every role
    worker_image = by_kind("Deployment", "modstream-worker")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert worker_image.endswith("modstream-gpu-worker:0.1.0")


def test_no_address_or_secret_rides_on_a_command_line():
    """Kafka and Redis come from the settings' environment (modstream/settings.py): a Redis URL
    with a password in args would sit in the process table and in `kubectl describe`."""
    for where, argv in modstream_commands():
        assert "--redis" not in argv and "--bootstrap" not in argv, where
    config = by_kind("ConfigMap", "modstream-config")["data"]
    assert config["MODSTREAM_KAFKA_BOOTSTRAP"]
    redis = by_kind("Secret", "modstream-redis")["stringData"]
    assert redis["MODSTREAM_REDIS_URL"].startswith("redis")
    env = compose()["x-modstream"]["environment"]
    assert "MODSTREAM_KAFKA_BOOTSTRAP" in env
    # The environment wins over files: a shared Redis URL would replace each role's own user.
    assert "MODSTREAM_REDIS_URL" not in env and env["MODSTREAM_SECRETS_DIR"] == "/run/secrets/modstream"


# The Kafka principal each compose role runs as (modstream/kafka_acls.py; admin: the tooling).
COMPOSE_PRINCIPALS = {
    "worker": "worker",
    "lag-exporter": "lag-exporter",
    "review-sink": "review-sink",
    "dataset-sink": "dataset-sink",
    "review": "console",
    "retrain": "retrain",
    "kafka-acls": "admin",
}


def test_compose_runs_every_role_as_its_own_principal_from_its_own_folder():
    """Each modstream service that talks to Kafka or Redis mounts only its own credentials
    folder, read-only, where its settings look (MODSTREAM_SECRETS_DIR); the broker and Redis
    mount only theirs; nothing in the file holds a secret."""
    services = compose()["services"]
    seen = set()
    for service, body in services.items():
        mounts = [v for v in body.get("volumes", []) if isinstance(v, dict) and v.get("source") == "credentials"]
        if service == "credentials-init":
            continue
        if body["image"].startswith("modstream:") and body["command"][0] in COMPOSE_PRINCIPALS:
            (mount,) = mounts
            principal = COMPOSE_PRINCIPALS[body["command"][0]]
            assert mount["volume"]["subpath"] == f"roles/{principal}", service
            assert mount["target"] == "/run/secrets/modstream" and mount["read_only"], service
            seen.add(principal)
        elif service in ("kafka", "topic-init", "redis"):
            (mount,) = mounts
            assert mount["volume"]["subpath"] == ("redis" if service == "redis" else "kafka") and mount["read_only"]
        else:
            assert not mounts, f"{service} needs no credentials"
    assert seen == set(COMPOSE_PRINCIPALS.values())
    text = COMPOSE.read_text()
    assert "replace-me" not in text and not re.search(r"(?i)password[ \t]*[:=][ \t]*\S", text)
    redis = services["redis"]["command"]
    assert redis[redis.index("--port") + 1] == "0" and "--tls-port" in redis and "--aclfile" in redis


def test_every_role_runs_as_its_own_principal_from_files():
    """Each modstream pod reads its Kafka principal (and Redis user) from its own Secret mounted
    as files (MODSTREAM_SECRETS_DIR), never from args or a shared env Secret; the brokers are
    reached over SASL_SSL and verified against the CA; KEDA authenticates the same way."""
    config = by_kind("ConfigMap", "modstream-config")["data"]
    assert config["MODSTREAM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert config["MODSTREAM_KAFKA_CA_FILE"].startswith("/run/secrets/modstream/")
    principals = set()
    for where, doc in k8s_documents():
        spec = doc.get("spec", {})
        pod = spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec")
        if not pod:
            continue
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("MODSTREAM_SECRETS_DIR") == "/run/secrets/modstream", (where, container["name"])
            mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
            assert mounts["credentials"]["mountPath"] == "/run/secrets/modstream" and mounts["credentials"]["readOnly"]
            sources = volumes["credentials"]["projected"]["sources"]
            secret = next(s["secret"]["name"] for s in sources if "secret" in s)
            assert any(s.get("configMap", {}).get("name") == "modstream-kafka-ca" for s in sources)
            role = secret.removeprefix("modstream-credentials-")
            credentials = by_kind("Secret", secret)["stringData"]
            assert credentials["MODSTREAM_KAFKA_USERNAME"] == role
            principals.add(role)
            shared = [r.get("secretRef", {}).get("name") for r in container.get("envFrom", [])]
            # The environment wins over files: a shared Redis URL would replace the role's own.
            if "MODSTREAM_REDIS_URL" in credentials:
                assert "modstream-redis" not in shared, (where, container["name"])
    from modstream.kafka_acls import ROLES

    assert set(ROLES) | {"admin"} <= principals
    trigger = by_kind("ScaledObject")["spec"]["triggers"][0]
    auth = by_kind("TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]
    params = {r["parameter"] for r in auth["secretTargetRef"]} | {r["parameter"] for r in auth["configMapTargetRef"]}
    assert {"sasl", "tls", "username", "password", "ca"} <= params

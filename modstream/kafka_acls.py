"""Who may do what on Kafka: one principal per role, with only the topics and consumer groups
its work needs (issue: authenticated transport). The table is the contract; `apply` writes it
to a cluster through the admin API (as a super user), and `modstream kafka-acls` runs it.

    worker        reads posts, model-updates, bank-updates; writes labels, review, posts.dlq
    review-sink   reads review; writes posts.dlq (malformed items)
    dataset-sink  reads reviewed; writes posts.dlq
    console       writes reviewed and the audit topic (decisions, user and queue changes); reads
                  and writes bank-updates (verdicts banked, bank curation and imports)
    retrain       reads reviewed; writes model-updates
    retention     writes the audit topic and tombstones on reviewed (`retention`, `purge`)
    lag-exporter  describes every topic and consumer group (offsets and lag), reads nothing

Topics are literal names (a prefix "posts" would also match "posts.dlq"); consumer groups are
prefixes (`modstream-worker` covers `modstream-worker` and `modstream-worker-eu`), and so are a
worker's own faust topics (named after its app id). Nothing is granted to anyone else: the
brokers run with `allow.everyone.if.no.acl.found=false`, so a principal without a grant, or a
client without credentials, gets nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Kafka's wire codes (org.apache.kafka.common.resource / acl).
TOPIC, GROUP = 2, 3
LITERAL, PREFIXED = 3, 4
READ, WRITE, CREATE, DESCRIBE = 3, 4, 5, 8
ALLOW = 3
OPERATION_NAMES = {READ: "Read", WRITE: "Write", CREATE: "Create", DESCRIBE: "Describe"}


@dataclass(frozen=True)
class Grants:
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # consumer group prefixes
    own_topics: tuple[str, ...] = ()  # topic prefixes the role may create, read and write (faust's own)
    describe_all: bool = False  # Describe on every topic and group (the lag exporter)


@dataclass(frozen=True)
class Binding:
    resource_type: int
    name: str
    pattern: int
    principal: str
    operation: int

    def describe(self) -> str:
        kind = "topic" if self.resource_type == TOPIC else "group"
        how = "prefix" if self.pattern == PREFIXED else "name"
        return f"{self.principal}: {OPERATION_NAMES[self.operation]} on {kind} {how} {self.name!r}"


ROLES: dict[str, Grants] = {
    "worker": Grants(
        reads=("posts", "model-updates", "bank-updates"),
        writes=("labels", "review", "posts.dlq"),
        groups=("modstream-worker",),
        own_topics=("modstream-worker",),
    ),
    "review-sink": Grants(reads=("review",), writes=("posts.dlq",), groups=("modstream-review-sink",)),
    "dataset-sink": Grants(reads=("reviewed",), writes=("posts.dlq",), groups=("modstream-dataset-sink",)),
    "console": Grants(reads=("bank-updates",), writes=("reviewed", "audit", "bank-updates")),
    "retrain": Grants(reads=("reviewed",), writes=("model-updates",)),
    "retention": Grants(writes=("audit", "reviewed")),
    "lag-exporter": Grants(describe_all=True),
}
ANY = "*"  # Kafka's wildcard resource name (a literal pattern that matches every name)


@dataclass
class Plan:
    bindings: list[Binding] = field(default_factory=list)

    def add(self, resource_type: int, name: str, pattern: int, principal: str, *operations: int) -> None:
        for op in operations:
            self.bindings.append(Binding(resource_type, name, pattern, principal, op))


def plan(roles: Mapping[str, Grants] = ROLES, topics: Mapping[str, str] | None = None) -> list[Binding]:
    """The bindings for `roles`; `topics` renames the default topic names (a deployment's own)."""
    rename = dict(topics or {})
    out = Plan()
    for role, grants in roles.items():
        principal = f"User:{role}"
        for topic in grants.reads:
            out.add(TOPIC, rename.get(topic, topic), LITERAL, principal, READ, DESCRIBE)
        for topic in grants.writes:
            out.add(TOPIC, rename.get(topic, topic), LITERAL, principal, WRITE, DESCRIBE)
        for prefix in grants.groups:
            out.add(GROUP, prefix, PREFIXED, principal, READ, DESCRIBE)
        for prefix in grants.own_topics:
            out.add(TOPIC, prefix, PREFIXED, principal, READ, WRITE, CREATE, DESCRIBE)
        if grants.describe_all:
            out.add(TOPIC, ANY, LITERAL, principal, DESCRIBE)
            out.add(GROUP, ANY, LITERAL, principal, DESCRIBE)
    return out.bindings


def allowed(bindings: Iterable[Binding], role: str, resource_type: int, name: str, operation: int) -> bool:
    """Whether `bindings` let `role` do `operation` on a resource, as the broker's authorizer
    decides it (literal names match exactly, prefixes by prefix; no grant: no access)."""
    principal = f"User:{role}"
    for b in bindings:
        if b.principal != principal or b.resource_type != resource_type or b.operation != operation:
            continue
        literal = b.pattern == LITERAL and b.name in (name, ANY)
        if literal or (b.pattern == PREFIXED and name.startswith(b.name)):
            return True
    return False


async def apply(bootstrap: str, bindings: Iterable[Binding], options: Mapping[str, Any]) -> int:
    """Create every binding on the cluster (creating an existing one is a no-op); the number
    created. `options`: a super user's client options (modstream.kafka_auth)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.protocol.admin import CreateAclsRequest

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000, **options)
    await admin.start()
    count = 0
    try:
        for b in bindings:
            request = CreateAclsRequest(b.resource_type, b.name, b.pattern, b.principal, "*", b.operation, ALLOW)
            response = await admin._send_request(request)  # aiokafka has the request, not a helper
            for code, message in response.creation_responses:
                if code:
                    raise RuntimeError(f"creating ACL ({b.describe()}) failed: error {code} {message}")
            count += 1
    finally:
        await admin.close()
    return count


def add_parsers(sub: Any) -> None:
    from modstream.options import add_kafka

    p = sub.add_parser("kafka-acls", help="grant each role's Kafka principal its topics and groups (as a super user)")
    add_kafka(p)
    p.add_argument("--dry-run", action="store_true", help="print the grants, change nothing")
    p.set_defaults(func=cmd_kafka_acls)


def cmd_kafka_acls(args: argparse.Namespace) -> int:
    from modstream.kafka_auth import client_options

    bindings = plan()
    if args.dry_run:
        for b in bindings:
            print(b.describe())
        return 0
    count = asyncio.run(apply(args.bootstrap, bindings, client_options()))
    print(f"{count} ACL bindings in place for roles {', '.join(ROLES)}", file=sys.stderr)
    return 0

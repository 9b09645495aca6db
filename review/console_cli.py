"""Subcommands of `modstream` for this role (argparse only here; heavy imports inside handlers).

`modstream review serve|add-user|remove-user|set-password|token|export-label-studio|import-label-studio`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from modstream.options import add_evidence, add_kafka, add_redis

DEFAULT_USERS = "var/review-users.json"


def _read_password(args: argparse.Namespace, *, confirm: bool = True) -> str:
    import getpass

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Repeat: ") != password:
            raise SystemExit("the passwords differ; nothing changed")
    return password


def _users(args: argparse.Namespace) -> Any:
    from review.auth import UserStore

    return UserStore(Path(args.users))


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _audit(args: argparse.Namespace, action: str, subject: str, **detail: Any) -> None:
    """Write the audit record before the change (review/audit.py); AuditUnavailable stops it."""
    if args.no_audit:
        print(f"warning: --no-audit: {action} on {subject} leaves no record on the audit topic", file=sys.stderr)
        return
    from review.audit import record_from_cli

    record_from_cli(args.bootstrap, action, subject, topic=args.audit_topic, timeout_s=args.audit_timeout, **detail)


def _media_link_key() -> str | None:
    """MODSTREAM_MEDIA_LINK_KEY (a secret: environment, secrets folder or config file, never a flag)."""
    from modstream.settings import current

    key = current().media_link_key
    return key.get_secret_value() if key is not None else None


def _prometheus_url() -> str:
    from modstream.settings import current

    return current().prometheus_url or ""


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from review.auth import AuthError, UserStore
    from review.console import ConsoleConfig, serve

    if args.claim_timeout <= 0:
        return _fail(ValueError(f"--claim-timeout must be positive, not {args.claim_timeout:g}"))
    if args.max_deliveries < 1:
        return _fail(ValueError(f"--max-deliveries must be at least 1, not {args.max_deliveries}"))
    if not 0.0 <= args.second_review_rate <= 1.0:
        return _fail(ValueError(f"--second-review-rate is a share between 0 and 1, not {args.second_review_rate:g}"))
    users_path = Path(args.users)
    try:
        names = UserStore(users_path).names()
    except AuthError as exc:
        return _fail(exc)
    if not names:
        print(
            f"warning: no users in {users_path}; add one with `modstream review add-user NAME --role admin`",
            file=sys.stderr,
        )
    link_key = _media_link_key()
    if link_key is not None:
        from review.media_links import check_key

        try:
            check_key(link_key)
        except ValueError as exc:
            return _fail(ValueError(f"MODSTREAM_MEDIA_LINK_KEY: {exc}"))
    config = ConsoleConfig(
        bootstrap=args.bootstrap,
        redis_url=args.redis,
        users_path=users_path,
        claim_timeout_s=args.claim_timeout,
        max_deliveries=args.max_deliveries,
        second_review_rate=args.second_review_rate,
        evidence=args.evidence,
        secure_cookies=not args.insecure_cookies,
        topic=args.topic,
        audit_topic=args.audit_topic,
        bank_topic=args.bank_topic,
        media_link_key=link_key,
        media_link_origin=args.media_link_origin,
        prometheus_url=args.prometheus_url or None,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.host, args.port, args.ops_port or None))
    return 0


def cmd_add_user(args: argparse.Namespace) -> int:
    from review.audit import AuditUnavailable
    from review.auth import AuthError, check_name, check_password, check_role

    try:
        check_name(args.name)
        check_role(args.role)
        store = _users(args)
        if store.get(args.name) is not None:
            raise AuthError(f"user {args.name!r} exists already")
        password = check_password(_read_password(args))
        _audit(args, "user_added", args.name, role=args.role)
        store.add(args.name, args.role, password)
    except (AuthError, AuditUnavailable) as exc:
        return _fail(exc)
    print(f"added {args.role} {args.name} to {args.users}")
    return 0


def cmd_remove_user(args: argparse.Namespace) -> int:
    from review.audit import AuditUnavailable
    from review.auth import AuthError

    try:
        store = _users(args)
        if store.get(args.name) is None:
            raise AuthError(f"no user {args.name!r}")
        _audit(args, "user_removed", args.name)
        store.remove(args.name)
    except (AuthError, AuditUnavailable) as exc:
        return _fail(exc)
    print(f"removed {args.name}; their sessions end on their next request")
    return 0


def cmd_set_password(args: argparse.Namespace) -> int:
    from review.audit import AuditUnavailable
    from review.auth import AuthError, check_password

    try:
        store = _users(args)
        if store.get(args.name) is None:
            raise AuthError(f"no user {args.name!r}")
        password = check_password(_read_password(args))
        _audit(args, "password_set", args.name)
        revoked = store.set_password(args.name, password)
    except (AuthError, AuditUnavailable) as exc:
        return _fail(exc)
    print(f"password of {args.name} changed; sessions ended, {revoked} API token(s) revoked (issue new ones)")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from review.audit import AuditUnavailable
    from review.auth import AuthError

    try:
        store = _users(args)
        if store.get(args.name) is None:
            raise AuthError(f"no user {args.name!r}")
        if args.revoke:
            _audit(args, "token_revoked", args.name, token_id=args.revoke)
            store.revoke_token(args.name, args.revoke)
            print(f"token {args.revoke} of {args.name} revoked")
            return 0
        _audit(args, "token_issued", args.name, label=args.label or "")
        token = store.issue_token(args.name, args.label or "")
    except (AuthError, AuditUnavailable) as exc:
        return _fail(exc)
    print(token)
    print("(shown once; only its hash is stored)", file=sys.stderr)
    return 0


def cmd_export_label_studio(args: argparse.Namespace) -> int:
    import asyncio

    from review.label_studio import export_open_items

    links = None
    if args.media_base_url:
        from review.label_studio import MediaLinks

        key = _media_link_key()
        if not key:
            return _fail(ValueError("--media-base-url needs MODSTREAM_MEDIA_LINK_KEY (the console must have the same)"))
        links = MediaLinks(key, args.media_base_url, args.media_ttl)
    count, config_path = asyncio.run(
        export_open_items(
            args.redis, Path(args.out), Path(args.config) if args.config else None, limit=args.limit, links=links
        )
    )
    print(f"wrote {count} Label Studio tasks to {args.out} and the labeling config to {config_path}")
    return 0


def cmd_import_label_studio(args: argparse.Namespace) -> int:
    import asyncio

    from review.agreement import second_review_sampler
    from review.label_studio import import_export_file
    from stream.evidence import open_store

    if not 0.0 <= args.second_review_rate <= 1.0:
        return _fail(ValueError(f"--second-review-rate is a share between 0 and 1, not {args.second_review_rate:g}"))
    try:
        evidence = open_store(args.evidence)
        report = asyncio.run(
            import_export_file(
                Path(args.source),
                args.reviewer,
                bootstrap=args.bootstrap,
                redis_url=args.redis,
                evidence=evidence,
                second_reviews=second_review_sampler(args.second_review_rate),
            )
        )
    except (OSError, ValueError, RuntimeError) as exc:  # bad file, bad name, Kafka/Redis down
        return _fail(exc)
    print(report.summary())
    return 0 if not report.errors else 1


def add_parsers(sub: Any) -> None:
    """Register this role's subcommands on the `modstream` parser."""
    review = sub.add_parser("review", help="the human review console and its tools")
    actions = review.add_subparsers(dest="review_action", required=True)

    def users_opt(p: argparse.ArgumentParser, *, audited: bool = True) -> None:
        p.add_argument("--users", default=DEFAULT_USERS, help=f"users file (default {DEFAULT_USERS})")
        if audited:  # a user change is recorded on the audit topic first (review/audit.py)
            add_kafka(p, "Kafka bootstrap servers of the audit topic")
            audit_topic_opt(p)
            p.add_argument("--audit-timeout", type=float, default=15.0, help="seconds to wait for the audit record")
            p.add_argument(
                "--no-audit",
                action="store_true",
                help="change users without an audit record (first set-up before Kafka runs); says so on stderr",
            )

    def audit_topic_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--audit-topic", default="audit", help="append-only topic of people's acts (default audit)")

    p = actions.add_parser("serve", help="run the review console (web pages + JSON API)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--ops-port", type=int, default=0, help="also serve /healthz and /metrics without auth here")
    add_kafka(p)
    add_redis(p, "Redis URL of the review queue")
    p.add_argument("--topic", default="reviewed", help="Kafka topic for decisions")
    audit_topic_opt(p)
    p.add_argument(
        "--bank-topic",
        default="bank-updates",
        help="the verdict banks' topic: decided images are banked there and read back ('' : no banks)",
    )
    users_opt(p, audited=False)
    p.add_argument("--claim-timeout", type=float, default=300.0, help="seconds before an abandoned claim is reclaimed")
    p.add_argument("--max-deliveries", type=int, default=5, help="deliveries before an item is dead-lettered")
    p.add_argument(
        "--second-review-rate",
        type=float,
        default=0.05,
        help="share of review items a second reviewer also decides, blind (keyed by MODSTREAM_AUDIT_KEY; 0: none)",
    )
    add_evidence(p, "where the worker keeps the media it scored (the console shows only those bytes)")
    p.add_argument(
        "--media-link-origin",
        default="*",
        help="Access-Control-Allow-Origin of /ls-media/ images (Label Studio's origin); links need "
        "MODSTREAM_MEDIA_LINK_KEY",
    )
    p.add_argument(
        "--prometheus-url",
        default=_prometheus_url(),
        help="the Prometheus the live-quality admin page reads, e.g. http://prometheus:9090 "
        "(env MODSTREAM_PROMETHEUS_URL; unset: the page says none is configured)",
    )
    p.add_argument("--insecure-cookies", action="store_true", help="drop the Secure cookie flag (plain-http use)")
    p.set_defaults(func=cmd_serve)

    p = actions.add_parser("add-user", help="add a reviewer or admin")
    p.add_argument("name")
    p.add_argument("--role", choices=["reviewer", "admin"], default="reviewer")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    users_opt(p)
    p.set_defaults(func=cmd_add_user)

    p = actions.add_parser("remove-user", help="remove a user (their sessions and tokens stop working)")
    p.add_argument("name")
    users_opt(p)
    p.set_defaults(func=cmd_remove_user)

    p = actions.add_parser("set-password", help="change a user's password")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true")
    users_opt(p)
    p.set_defaults(func=cmd_set_password)

    p = actions.add_parser("token", help="issue (or revoke) an API bearer token for a user")
    p.add_argument("name")
    p.add_argument("--label", help="what the token is for")
    p.add_argument("--revoke", metavar="TOKEN_ID", help="revoke the token with this id instead")
    users_opt(p)
    p.set_defaults(func=cmd_token)

    p = actions.add_parser("export-label-studio", help="write open review items as Label Studio tasks")
    p.add_argument("--out", required=True, help="tasks JSON file")
    p.add_argument("--config", help="labeling config XML (default: next to --out)")
    add_redis(p, "Redis URL of the review queue")
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument(
        "--media-base-url",
        help="the review console's URL: images become signed links to the scored bytes it serves (needs "
        "MODSTREAM_MEDIA_LINK_KEY); without it, tasks carry the post's own image URL",
    )
    p.add_argument("--media-ttl", type=float, default=7 * 86400, help="seconds a media link stays valid")
    p.set_defaults(func=cmd_export_label_studio)

    p = actions.add_parser("import-label-studio", help="read a Label Studio JSON export back as decisions")
    p.add_argument("source", help="Label Studio JSON export")
    p.add_argument("--reviewer", required=True, help="who annotated (recorded on the decisions)")
    p.add_argument(
        "--second-review-rate",
        type=float,
        default=0.05,
        help="the console's --second-review-rate (with the same MODSTREAM_AUDIT_KEY it picks the same posts): "
        "a picked post's annotation is a first review, waiting for a second reviewer (0: none)",
    )
    add_kafka(p)
    add_redis(p, "Redis URL of the review queue")
    add_evidence(p, "where the scored media are kept (the verdict banks hash the images annotators saw)")
    p.set_defaults(func=cmd_import_label_studio)

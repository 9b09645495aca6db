"""`modstream retrain`: gated retraining on reviewers' decisions (argparse only here; heavy
imports inside the handler)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from modstream.options import DEFAULT_HOME as HOME
from modstream.options import add_common, add_kafka


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_parsers(sub: Any) -> None:
    """Register this role's subcommands on the `modstream` parser."""
    p = sub.add_parser(
        "retrain",
        help="train a candidate on base + reviewed data, gate it against the current model, promote if not worse",
    )
    add_common(p)
    p.add_argument("--reviewed", default=str(HOME / "reviewed"), help="reviewed dataset folder (manifest.jsonl)")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--base-manifest", help="base training data (default: what the current card records)")
    base.add_argument("--base-preset", choices=["synthetic"], help="base training data preset")
    p.add_argument("--synthetic-n", type=_positive_int, default=1200, help="posts of --base-preset synthetic")
    p.add_argument("--work", default=str(HOME / "retrain"), help="folder for generated base data")
    p.add_argument("--min-new", type=int, default=50, help="new labelled decisions needed to train")
    p.add_argument("--margin", type=_non_negative_float, default=0.02, help="largest macro-F1 drop allowed")
    p.add_argument(
        "--itm-margin",
        type=_non_negative_float,
        default=0.02,
        help="largest ITM AUROC drop allowed on a holdout (routing rests on it) (default 0.02)",
    )
    p.add_argument(
        "--lift-margin",
        type=_non_negative_float,
        default=0.1,
        help="largest drop allowed in the card policy's routing lift on a holdout (lift 1 = chance)",
    )
    p.add_argument(
        "--min-holdout", type=_positive_int, default=20, help="labelled examples a holdout needs to gate a task"
    )
    p.add_argument("--force", action="store_true", help="train even with fewer than --min-new new decisions")
    p.add_argument("--epochs", type=_positive_int, help="override the recipe's epochs")
    p.add_argument("--watch", action="store_true", help="keep checking every --interval seconds")
    p.add_argument("--interval", type=_non_negative_float, default=3600.0, help="seconds between checks (--watch)")
    add_kafka(p, "Kafka for the model-updates message")
    p.add_argument("--no-publish", action="store_true", help="promote without publishing on model-updates")
    p.add_argument(
        "--publish-current", action="store_true", help="only re-send the current version on model-updates, then exit"
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics server")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_retrain)


def cmd_retrain(args: argparse.Namespace) -> int:
    import logging

    from models.registry import ModelRegistry
    from modstream.records import ModelUpdate
    from modstream.updates import kafka_publisher
    from trainer.retrain import (
        RetrainError,
        RetrainOptions,
        describe,
        run_retrain,
        watch,
    )

    registry = Path(args.registry) if args.registry else HOME / "registry"
    if args.publish_current:
        reg = ModelRegistry(registry)
        try:
            version = reg.resolve("current")
            parent = reg.card(version).training.get("parent_version")
            kafka_publisher(args.bootstrap)(ModelUpdate(version, parent, "republish").to_json())
        except Exception as exc:  # no model, unreadable card, Kafka down: say which, exit 1
            print(f"could not publish the current model: {exc!r}", file=sys.stderr)
            return 1
        print(f"published {version} on model-updates")
        return 0
    source: dict[str, Any] | None = None
    if args.base_manifest:
        source = {"manifest": args.base_manifest}
    elif args.base_preset == "synthetic":
        source = {"preset": "synthetic", "n": args.synthetic_n, "seed": 0}
    opts = RetrainOptions(
        registry=registry,
        reviewed=Path(args.reviewed),
        work_dir=Path(args.work),
        cache_dir=Path(args.cache) if args.cache else HOME / "cache",
        device=args.device,
        base_source=source,
        min_new=args.min_new,
        margin=args.margin,
        itm_margin=args.itm_margin,
        lift_margin=args.lift_margin,
        min_holdout=args.min_holdout,
        force=args.force,
        epochs=args.epochs,
        progress=not args.quiet,
        publisher=None if args.no_publish else kafka_publisher(args.bootstrap),
    )
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host)
        print(f"metrics on http://{args.metrics_host}:{args.metrics_port}/metrics", file=sys.stderr)
    if args.watch:
        if logging.getLogger().level > logging.INFO:
            logging.getLogger("trainer.retrain").setLevel(logging.INFO)

        def show(outcome: Any) -> None:
            print(describe(outcome) if outcome else "run failed (see the log); next check in the interval", flush=True)

        try:
            watch(opts, args.interval, on_outcome=show)
        except KeyboardInterrupt:
            return 0
        return 0
    try:
        outcome = run_retrain(opts)
    except (RetrainError, ValueError, OSError) as exc:
        print(f"retrain failed: {exc}", file=sys.stderr)
        return 1
    print(describe(outcome))
    return 3 if outcome.publish_error else 0

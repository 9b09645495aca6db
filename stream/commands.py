"""The serving side's commands: `modstream worker`, `produce`, `run`, `demo`, `classify`,
`models`, plus `dlq` and `lag-exporter` (argparse only at module level; each command imports
what it runs, and none of the worker's imports reaches `trainer/`)."""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from modstream.options import (
    DEFAULT_HOME,
    UsageError,
    add_common,
    add_evidence,
    add_kafka,
    add_redis,
    cache_root,
    registry_root,
)


def _bank_distance(value: str) -> int:
    """A PDQ distance a bank may match at: beyond 64 of 256 bits unrelated images match
    (bench/bank_lookup.py measures the false-match rate by distance)."""
    distance = int(value)
    if not 0 <= distance <= 64:
        raise argparse.ArgumentTypeError(f"must be from 0 to 64 bits, not {distance}")
    return distance


def _processes(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError("must be from 1 to 64")
    return n


def _decode_memo_mib(value: str) -> int:
    n = int(value)
    if not 0 <= n <= 65536:
        raise argparse.ArgumentTypeError("must be from 0 to 65536 MiB")
    return n


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import ModelRegistry

    registry = ModelRegistry(registry_root(args))
    if args.set_current:
        # Roll forward or back: CURRENT moves, then running workers are told on model-updates
        # (they follow CURRENT, so this update cannot be overtaken by an older one).
        from modstream.records import ModelUpdate
        from modstream.updates import kafka_publisher

        previous = registry.current()
        registry.set_current(args.set_current)  # RegistryError (one line, exit 1) for an unknown version
        print(f"CURRENT: {previous} -> {args.set_current}")
        if args.no_publish:
            print("not published: running workers switch on their next start or update")
            return 0
        reason = "rollback" if previous is not None and args.set_current < previous else "set-current"
        try:
            kafka_publisher(args.bootstrap, timeout_s=args.publish_timeout)(
                ModelUpdate(args.set_current, previous, reason).to_json()
            )
        except Exception as exc:  # CURRENT has moved: say what is left to do, exit 1
            print(
                f"CURRENT moved, but the update was not published ({exc!r}); running workers keep their model "
                "until `modstream retrain --publish-current` reaches Kafka",
                file=sys.stderr,
            )
            return 1
        print(f"published on model-updates: running workers switch to {args.set_current}")
        return 0
    current = registry.current()
    for version in registry.versions():
        card = registry.card(version)
        marker = "*" if version == current else " "
        print(
            f"{marker} {version}  {card.created_at}  macro-F1 {card.metrics.get('macro_f1')}  "
            f"itm_auroc {card.metrics.get('itm_auroc')}"
        )
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from stream.classify import classify_file

    output = Path(args.output) if args.output else None
    registry = registry_root(args)
    Path(args.input).open("rb").close()  # a missing or unreadable input fails before the model loads
    return classify_file(
        Path(args.input), output, registry, args.model, args.device, args.allow_loopback_media, args.ocr
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from stream.demo import run_demo

    return run_demo(registry_root(args), cache_root(args), DEFAULT_HOME)


def cmd_worker(args: argparse.Namespace) -> int:
    if args.processes > 1:  # a supervisor of N workers, each started with these same arguments
        from stream.worker_processes import run_supervisor

        return run_supervisor(sys.argv[1:], args.processes, args.web_host, args.web_port)
    from models.routing.route import RoutingPolicy
    from stream.device_pool import BatcherConfig
    from stream.worker import WorkerSettings, run_worker

    settings = WorkerSettings(
        bootstrap=args.bootstrap,
        redis_url=args.redis or None,
        registry=registry_root(args),
        model_version=args.model,
        app_id=args.app_id,
        web_host=args.web_host,
        web_port=args.web_port,
        max_batch=args.max_batch,
        max_wait_s=args.max_wait,
        devices=args.device,
        allow_loopback_media=args.allow_loopback_media,
        evidence=args.evidence,
        audit_rate=args.audit_rate,
        decode_threads=args.decode_threads,
        decode_model_input=args.decode_model_input,
        device_decode=args.device_decode,
        decode_memo_mib=args.decode_memo_mib,
        stand_in_model=args.stand_in_model,
        banks=args.banks,
        bank_distance=args.bank_distance,
        bank_load_timeout_s=args.bank_load_timeout,
        ocr=args.ocr,
        policy=RoutingPolicy(
            itm_threshold=args.itm_threshold,
            min_itm_auroc=args.min_itm_auroc,
            min_routing_lift=args.min_routing_lift,
            min_itm_errors=args.min_itm_errors,
            uncertainty_band=args.uncertainty_band,
            use_card_policy=not args.no_card_policy,
            review_cut=args.review_cut,
        ),
        batcher=BatcherConfig(max_batch=args.device_batch, max_delay_s=args.device_delay),
        stop_grace_s=args.stop_grace,
    )
    settings.topics["banks"] = args.bank_topic
    # faust's Worker reads sys.argv; give it only the program name.
    sys.argv = sys.argv[:1]
    run_worker(settings, loglevel="info" if args.verbose else "warning")
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    import asyncio

    from modstream.manifest import read_manifest
    from stream.producer import encode_posts, posts_from_jsonl, produce, synthetic_posts
    from trainer.synthetic import write_synthetic

    if args.input:
        values = posts_from_jsonl(Path(args.input))
    else:
        if not args.media_url:
            raise UsageError(
                "synthetic posts need --media-url URL (where their images are served; `modstream serve-media` "
                "serves them) or --input FILE"
            )
        examples = read_manifest(write_synthetic(DEFAULT_HOME / "firehose", n=min(args.n, 2000), seed=7))
        prefix = args.id_prefix or f"post-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(2)}"
        values = encode_posts(
            synthetic_posts(examples, args.media_url, args.n, repost_rate=args.repost_rate, prefix=prefix)
        )
        print(f"post ids: {prefix}-0000000 ...", file=sys.stderr)
    sent = asyncio.run(produce(args.bootstrap, args.topic, values, rate=args.rate))
    print(f"produced {sent} posts to {args.topic}")
    return 0


def cmd_serve_media(args: argparse.Namespace) -> int:
    """The synthetic firehose's images on a loopback port, until Ctrl-C: what `produce
    --media-url` points posts at when running the loop by hand."""
    import asyncio
    import contextlib
    import signal

    from stream.media_server import MediaServer

    root = Path(args.root)
    if not root.is_dir():
        if args.root != str(DEFAULT_HOME / "firehose" / "images"):
            raise UsageError(f"--root {root}: no such folder")
        from trainer.synthetic import write_synthetic

        write_synthetic(DEFAULT_HOME / "firehose", n=2000, seed=7)  # what `produce` sends

    async def serve() -> None:
        server = MediaServer(root, host="127.0.0.1", port=args.port)
        url = await server.start()
        print(f"serving {root} at {url} (workers need --allow-loopback-media); Ctrl-C to stop", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(serve())
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from stream.labels_reader import cmd_labels as run

    return run(args)


def cmd_run(args: argparse.Namespace) -> int:
    from stream.local_run import RunOptions, run_local

    opts = RunOptions(
        posts=args.posts,
        keep_stack=args.keep_stack,
        repost_rate=args.repost_rate,
        review=args.review,
        bootstrap_port=args.kafka_port,
        redis_port=args.redis_port,
        web_port=args.web_port,
        review_port=args.review_port,
        exporter_port=args.exporter_port,
        sink_port=args.sink_port,
    )
    return run_local(registry_root(args), cache_root(args), DEFAULT_HOME, opts)


def _add_ocr(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ocr",
        choices=["auto", "on", "off"],
        default="auto",
        help="read text inside images with Tesseract: auto = when the model was trained with it (its card says); "
        "on = also for other models (the text then only goes to the Label record's ocr_text); off",
    )


def add_parsers(sub: Any) -> None:
    """Register this role's subcommands on the `modstream` parser."""
    p = sub.add_parser("models", help="list registered model versions (or move CURRENT)")
    add_common(p)
    p.add_argument(
        "--set-current",
        metavar="VERSION",
        help="make VERSION the current model (roll forward or back) and tell running workers on model-updates",
    )
    add_kafka(p, "Kafka for the model-updates message (--set-current)")
    p.add_argument("--no-publish", action="store_true", help="with --set-current: move CURRENT only")
    p.add_argument("--publish-timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("classify", help="classify posts from a JSONL file (no Kafka)")
    add_common(p)
    p.add_argument("input")
    p.add_argument("--output", help="JSONL of labels and dead letters (default: stdout)")
    p.add_argument("--allow-loopback-media", action="store_true", help="fetch image URLs on 127.0.0.1 too")
    _add_ocr(p)
    p.add_argument("--model", default="current")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("worker", help="run a stream worker (Faust) on the posts topic")
    add_common(p, cache=False)
    add_kafka(p)
    add_redis(p, "Redis URL of the dedupe cache ('' to run without Redis)")
    add_evidence(p, "where the scored media of routed posts are kept for reviewers and training")
    p.add_argument(
        "--audit-rate",
        type=float,
        default=0.01,
        help="share of model-labelled posts (routed or not, drawn before routing) that go to review "
        "as blind audit items, to measure the live model (keyed by MODSTREAM_AUDIT_KEY; 0: none)",
    )
    p.add_argument("--model", default="current")
    p.add_argument("--app-id", default="modstream-worker", help="consumer group / Faust app id")
    p.add_argument("--web-host", default="127.0.0.1", help="address of /metrics and /ready (0.0.0.0 in a container)")
    p.add_argument("--web-port", type=int, default=6066, help="port of /metrics and /ready")
    p.add_argument("--max-batch", type=int, default=64, help="posts per agent micro-batch")
    p.add_argument("--max-wait", type=float, default=0.05, help="seconds to fill a micro-batch")
    p.add_argument("--device-batch", type=int, default=0, help="model batch per device (0: 8 on CPU, 256 on GPU)")
    p.add_argument("--device-delay", type=float, default=0.005)
    p.add_argument(
        "--stop-grace",
        type=float,
        default=20.0,
        help="seconds from SIGTERM to exit whatever the worker waits on (0: wait for faust's own stop)",
    )
    p.add_argument("--allow-loopback-media", action="store_true", help="demo/tests: fetch media from 127.0.0.1")
    p.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="image decode threads (0: min(4, cores)); about 5 ms of CPU per photo, so raise it on a GPU host",
    )
    p.add_argument(
        "--decode-model-input",
        action="store_true",
        help="GPU workers: the decode threads make each image the model's input, so batch preparation only "
        "copies pixels (0.2x its CPU)",
    )
    p.add_argument(
        "--device-decode",
        choices=("auto", "on", "off"),
        default="auto",
        help="JPEGs decoded, resized and hashed for the banks on the GPU with their batch instead of by the decode "
        "threads; auto: with one GPU per process whose self-test passes, unless OCR needs the pixels on the host",
    )
    p.add_argument(
        "--decode-memo-mib",
        type=_decode_memo_mib,
        default=128,
        help="MiB of decoded images kept by content hash, so a repost of the same file skips decode, resize, "
        "OCR and PDQ (per process; 0: off)",
    )
    p.add_argument(
        "--processes",
        type=_processes,
        default=1,
        help="worker processes on this host, one consumer group (default 1); the host's /metrics (every "
        "process's, labelled worker_process) and /ready stay on --web-port",
    )
    # Bench only (bench/feed_throughput.py): no forward, a fixed answer; hidden from --help.
    p.add_argument("--stand-in-model", action="store_true", help=argparse.SUPPRESS)
    _add_ocr(p)
    p.add_argument(
        "--no-banks",
        dest="banks",
        action="store_false",
        help="do not hash images or match them against the verdict banks (bank-updates topic) before the model",
    )
    p.add_argument("--bank-topic", default="bank-updates", help="the verdict banks' topic (default bank-updates)")
    p.add_argument(
        "--bank-distance",
        type=_bank_distance,
        default=31,
        help="PDQ match distance in bits, 0-64 (default 31, Meta's threshold; exact bytes always match)",
    )
    p.add_argument(
        "--bank-load-timeout",
        type=float,
        default=120.0,
        help="seconds to wait at start for the banks to load before labelling without their unread part",
    )
    p.add_argument("--itm-threshold", type=float, help="override the card's ITM review threshold")
    p.add_argument("--min-itm-auroc", type=float, default=0.6)
    p.add_argument("--min-routing-lift", type=float, default=1.0)
    p.add_argument(
        "--min-itm-errors",
        type=int,
        default=20,
        help="validation errors a routing-lift estimate needs before it may switch ITM routing off",
    )
    p.add_argument("--uncertainty-band", type=float, default=0.0)
    p.add_argument(
        "--review-cut",
        type=float,
        default=None,
        help="replace the card's review policy cut (higher: fewer posts reviewed)",
    )
    p.add_argument(
        "--no-card-policy",
        action="store_true",
        help="route by the ITM gate even when the card carries a review policy",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("run", help="the whole pipeline locally: stack, model, media, producer, worker, summary")
    add_common(p)
    p.add_argument("--posts", type=int, default=500)
    p.add_argument("--repost-rate", type=float, default=0.2)
    p.add_argument("--keep-stack", action="store_true", help="leave Kafka and Redis running afterwards")
    p.add_argument(
        "--review",
        action="store_true",
        help="then serve the review console on this run's stack with a demo reviewer (password printed once), "
        "images shown, until Ctrl-C",
    )
    p.add_argument("--kafka-port", type=int, default=19092, help="the local stack's Kafka port")
    p.add_argument("--redis-port", type=int, default=16379, help="the local stack's Redis port")
    p.add_argument("--web-port", type=int, default=6066, help="the worker's /metrics port")
    p.add_argument("--review-port", type=int, default=8080, help="the review console's port (--review)")
    p.add_argument("--exporter-port", type=int, default=6070, help="the lag exporter's /metrics port")
    p.add_argument("--sink-port", type=int, default=6067, help="the review sink's /metrics port")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("produce", help="send sample posts to the posts topic")
    add_kafka(p)
    p.add_argument("--topic", default="posts")
    p.add_argument("--input", help="JSONL of posts to send as they are")
    p.add_argument("--media-url", help="base URL serving the synthetic images")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.0, help="posts per second (0: unlimited)")
    p.add_argument("--repost-rate", type=float, default=0.0, help="share of posts that repeat an earlier one")
    p.add_argument(
        "--id-prefix",
        help="synthetic post ids are PREFIX-0000000...; default: post-<time>-<random>, new every run, so a second "
        "run's posts are new posts (the review sink queues a post id once)",
    )
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser(
        "serve-media", help="serve the synthetic firehose's images on loopback (for produce --media-url)"
    )
    p.add_argument("--root", default=str(DEFAULT_HOME / "firehose" / "images"), help="folder of images")
    p.add_argument("--port", type=int, default=18080, help="loopback port (0: any free one)")
    p.set_defaults(func=cmd_serve_media)

    p = sub.add_parser("labels", help="print labels from the labels topic (filter by route, version, post id)")
    add_kafka(p)
    p.add_argument("--topic", default="labels")
    p.add_argument("--route", choices=["auto", "review", "bank_match"], help="only labels with this route")
    p.add_argument("--version", help="only labels of this model version")
    p.add_argument("--post-prefix", help="only posts whose id starts with this")
    p.add_argument("--new", action="store_true", help="only labels written from now on (default: from the start)")
    p.add_argument("-f", "--follow", action="store_true", help="keep reading new labels until Ctrl-C")
    p.add_argument("-n", "--limit", type=int, help="stop after this many")
    p.add_argument("--json", action="store_true", help="the records as they are, one per line")
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser(
        "demo",
        help="train the default model on synthetic data if needed, then classify the bundled sample",
    )
    add_common(p)
    p.set_defaults(func=cmd_demo)

    from stream.dlq import add_parsers as add_dlq_parsers
    from stream.lag_exporter import add_parsers as add_lag_exporter_parsers

    add_dlq_parsers(sub)
    add_lag_exporter_parsers(sub)

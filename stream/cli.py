"""`modstream` — one command, several roles (HMA style): training and evaluation, the stream
worker, the review sink and console, the dataset sink and the retraining job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

DEFAULT_HOME = Path(os.environ.get("MODSTREAM_HOME", "var"))


# Commands that talk to Kafka once and exit (a long-running role keeps aiokafka's own logs).
ONE_SHOT_KAFKA = {"produce", "dlq"}


class UsageError(Exception):
    """A combination of options argparse cannot check; main() prints it and exits 2."""


def _registry_root(args: argparse.Namespace) -> Path:
    return Path(args.registry) if args.registry else DEFAULT_HOME / "registry"


def _cache_root(args: argparse.Namespace) -> Path:
    return Path(args.cache) if args.cache else DEFAULT_HOME / "cache"


def _load_examples(args: argparse.Namespace) -> list[Any]:
    from trainer.importers import import_cm_off_meme
    from trainer.manifest import read_manifest
    from trainer.synthetic import write_synthetic

    if args.preset == "cm-off-meme":
        result = import_cm_off_meme(with_text_only=args.with_text_only, on_bad_image=args.on_bad_image)
        print(result.summary(), file=sys.stderr)
        return result.examples
    if args.preset == "synthetic":
        manifest = write_synthetic(DEFAULT_HOME / "synthetic", n=args.synthetic_n, seed=0)
        return read_manifest(manifest)
    if not args.manifest:
        raise UsageError("give --manifest FILE.jsonl or --preset cm-off-meme|synthetic")
    return read_manifest(Path(args.manifest))


def _model_config(args: argparse.Namespace) -> Any:
    from models.config import ModelConfig

    return ModelConfig(
        text_backbone=args.text_backbone,
        image_backbone=args.image_backbone,
        fusion=args.fusion,
        text_trainable_layers=args.text_trainable_layers,
        image_trainable_blocks=args.image_trainable_blocks,
        ocr_segment=args.ocr_segment,
        neighbour_vote=getattr(args, "neighbour_vote", 0.0),  # train only: ablate's runs have no index
    )


def _train_config(args: argparse.Namespace, objective: Any = None) -> Any:
    from models.objectives import ObjectiveConfig
    from trainer.train import TrainConfig

    weights = {"task_loss": args.task_weight}
    if args.itc_weight:
        weights["itc_loss"] = args.itc_weight
    if args.itm_weight:
        weights["itm_loss"] = args.itm_weight
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        patience=args.patience,
        select_on=args.select_on,
        objective=objective or ObjectiveConfig(weights=weights, negatives=args.negatives),
        progress=not args.quiet,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from models.registry import ModelRegistry
    from trainer.fit import fit

    examples = _load_examples(args)
    fitted = fit(
        examples,
        _model_config(args),
        _train_config(args),
        cache_dir=_cache_root(args),
        out_dir=Path(args.out) if args.out else None,
        device=args.device,
        on_bad_image=args.on_bad_image,
    )
    version = ModelRegistry(_registry_root(args)).save(fitted.model, fitted.tokenizer, fitted.card)
    print(
        json.dumps(
            {
                "version": version,
                "metrics": fitted.card.metrics["macro_f1"],
                "itm": fitted.card.itm,
            },
            indent=1,
            default=str,
        )
    )
    return 0


def _default_jobs(device: str) -> int:
    from models.devices import pick_device

    return 1 if pick_device(device).type != "cpu" else max(1, len(os.sched_getaffinity(0)))


def _ablation_config(args: argparse.Namespace) -> Any:
    """The grid `ablate` runs. Options of the shared training flags that the grid sets
    itself per variant are refused rather than silently ignored."""
    from trainer.ablation import AblationConfig, AblationSetupError, select_variants

    if args.negatives != "hard":
        raise UsageError(
            "ablate sets negatives per variant ('task+itc+itm' hard, 'task+itc+itm (random neg)' and 'task+itm' "
            "random); drop --negatives and pick variants with --only"
        )
    if args.text_trainable_layers or args.image_trainable_blocks:
        raise UsageError(
            "ablate fine-tunes encoders per variant: use --unfreeze-text-layers N|all / --unfreeze-image-blocks N "
            "instead of --text-trainable-layers / --image-trainable-blocks"
        )
    if args.seed != 0:
        raise UsageError("ablate runs seeds 0..N-1: use --seeds N instead of --seed")
    cfg = AblationConfig(
        folds=args.folds,
        seeds=tuple(range(args.seeds)),
        task_weight=args.task_weight,
        itc_weight=args.itc_weight,
        itm_weight=args.itm_weight,
        unfreeze_text_layers=args.unfreeze_text_layers,
        unfreeze_image_blocks=args.unfreeze_image_blocks,
        aux_weights=tuple(args.aux_weights),
        only=tuple(args.only or ()),
        jobs=args.jobs if args.jobs > 0 else _default_jobs(args.device),
        train=_train_config(args),
    )
    try:
        select_variants(cfg)  # before loading any data: a bad combination fails at once
    except AblationSetupError as exc:
        raise UsageError(str(exc)) from None
    return cfg


def cmd_ablate(args: argparse.Namespace) -> int:
    from trainer.ablation import AblationSetupError, markdown, run_ablation

    cfg = _ablation_config(args)
    examples = _load_examples(args)
    try:
        summary = run_ablation(
            examples,
            _model_config(args),
            cfg,
            Path(args.out),
            cache_dir=_cache_root(args),
            device=args.device,
        )
    except AblationSetupError as exc:  # e.g. --out holds another grid's runs
        print(f"modstream ablate: error: {exc}", file=sys.stderr)
        return 1
    print(markdown(summary))
    print(f"written: {args.out}/results.md, results.json, results.png", file=sys.stderr)
    return 0


def _vote_weight(value: str) -> float:
    """A neighbour-vote weight in [0, 1) (models.config.ModelConfig.neighbour_vote)."""
    try:
        w = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a weight in [0, 1), got {value!r}") from None
    if not 0.0 <= w < 1.0:
        raise argparse.ArgumentTypeError(f"expected a weight in [0, 1), got {w}")
    return w


def _layers_or_all(value: str) -> int:
    """`all` (or -1): the whole encoder; N >= 0: its top N layers / last N blocks."""
    if value.strip().lower() == "all":
        return -1
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'all', got {value!r}") from None
    if n < -1:
        raise argparse.ArgumentTypeError(f"expected N >= 0 or 'all', got {n}")
    return n


def _weight_list(value: str) -> list[float]:
    """Comma-separated positive loss weights, e.g. 0.05,0.1,0.2,0.3."""
    import math

    try:
        weights = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not weights or any(not math.isfinite(w) or w <= 0 for w in weights):
        raise argparse.ArgumentTypeError(f"expected comma-separated weights > 0, got {value!r}")
    return weights


def cmd_import(args: argparse.Namespace) -> int:
    from trainer.importers import import_csv, import_hateful_memes, write_import

    if args.format == "hateful-memes":
        result = import_hateful_memes(Path(args.source))
    else:

        def pairs(items: list[str]) -> dict[str, str]:
            out = {}
            for item in items:
                key, _, value = item.partition("=")
                if not value:
                    raise UsageError(f"--label expects TASK=COLUMN, got {item!r}")
                out[key] = value
            return out

        value_maps: dict[str, dict[str, str | None]] = {}
        for item in args.map or []:
            task_raw, _, label = item.partition("=")
            task, _, raw = task_raw.partition(":")
            value_maps.setdefault(task, {})[raw] = label or None
        result = import_csv(
            Path(args.source),
            id_column=args.id_column,
            text_column=args.text_column,
            image_column=args.image_column,
            image_dir=Path(args.image_dir) if args.image_dir else None,
            label_columns=pairs(args.label or []),
            value_maps=value_maps,
            on_bad_image=args.on_bad_image,
        )
    count = write_import(result, Path(args.out))
    print(result.summary())
    print(f"wrote {count} examples to {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import ModelRegistry

    registry = ModelRegistry(_registry_root(args))
    if args.set_current:
        # Roll forward or back: workers on `--model current` load it on their next start;
        # `modstream retrain --publish-current` tells running workers now.
        previous = registry.current()
        registry.set_current(args.set_current)  # RegistryError (one line, exit 1) for an unknown version
        print(f"CURRENT: {previous} -> {args.set_current}; announce it with `modstream retrain --publish-current`")
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
    registry = _registry_root(args)
    Path(args.input).open("rb").close()  # a missing or unreadable input fails before the model loads
    return classify_file(
        Path(args.input), output, registry, args.model, args.device, args.allow_loopback_media, args.ocr
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from stream.demo import run_demo

    return run_demo(_registry_root(args), _cache_root(args), DEFAULT_HOME)


def cmd_worker(args: argparse.Namespace) -> int:
    from stream.device_pool import BatcherConfig
    from stream.routing import RoutingPolicy
    from stream.worker import WorkerSettings, run_worker

    settings = WorkerSettings(
        bootstrap=args.bootstrap,
        redis_url=args.redis or None,
        registry=_registry_root(args),
        model_version=args.model,
        app_id=args.app_id,
        web_host=args.web_host,
        web_port=args.web_port,
        max_batch=args.max_batch,
        max_wait_s=args.max_wait,
        devices=args.device,
        allow_loopback_media=args.allow_loopback_media,
        decode_threads=args.decode_threads,
        decode_model_input=args.decode_model_input,
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
    # faust's Worker reads sys.argv; give it only the program name.
    sys.argv = sys.argv[:1]
    run_worker(settings, loglevel="info" if args.verbose else "warning")
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    import asyncio

    from stream.producer import encode_posts, posts_from_jsonl, produce, synthetic_posts
    from trainer.manifest import read_manifest
    from trainer.synthetic import write_synthetic

    if args.input:
        values = posts_from_jsonl(Path(args.input))
    else:
        if not args.media_url:
            raise UsageError("synthetic posts need --media-url URL (where their images are served) or --input FILE")
        examples = read_manifest(write_synthetic(DEFAULT_HOME / "firehose", n=min(args.n, 2000), seed=7))
        values = encode_posts(synthetic_posts(examples, args.media_url, args.n, repost_rate=args.repost_rate))
    sent = asyncio.run(produce(args.bootstrap, args.topic, values, rate=args.rate))
    print(f"produced {sent} posts to {args.topic}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from stream.local_run import RunOptions, run_local

    opts = RunOptions(posts=args.posts, keep_stack=args.keep_stack, repost_rate=args.repost_rate)
    return run_local(_registry_root(args), _cache_root(args), DEFAULT_HOME, opts)


def cmd_schemas(args: argparse.Namespace) -> int:
    from stream.schemas import check_schemas, write_schemas

    out = Path(args.out)
    if args.check:
        stale = check_schemas(out)
        for name in stale:
            print(f"{out / name}: differs from the record types; run `modstream schemas --out {out}`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_schemas(out):
        print(f"wrote {path}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", help="model registry folder (default var/registry)")
    p.add_argument("--cache", help="feature cache folder (default var/cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", help="JSONL manifest (id, text, image, labels)")
    p.add_argument("--preset", choices=["cm-off-meme", "synthetic"])
    p.add_argument(
        "--with-text-only",
        action="store_true",
        help="cm-off-meme: keep rows without an image as text-only posts",
    )
    p.add_argument("--on-bad-image", choices=["text-only", "skip"], default="text-only")
    p.add_argument("--synthetic-n", type=int, default=1200)


def _add_ocr(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ocr",
        choices=["auto", "on", "off"],
        default="auto",
        help="read text inside images with Tesseract: auto = when the model was trained with it (its card says); "
        "on = also for other models (the text then only goes to the Label record's ocr_text); off",
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-backbone", default="default")
    p.add_argument("--image-backbone", default="efficientnet_lite0")
    p.add_argument("--fusion", choices=["cross_attention", "concat"], default="cross_attention")
    p.add_argument(
        "--text-trainable-layers", type=_layers_or_all, default=0, help="top N layers fine-tuned; 'all': all of it"
    )
    p.add_argument(
        "--image-trainable-blocks", type=_layers_or_all, default=0, help="last N blocks fine-tuned; 'all': all of it"
    )
    p.add_argument(
        "--ocr-segment",
        action="store_true",
        help="feed the text Tesseract reads from each image (eng+hin) as a second text segment; "
        "cached next to the features; the worker then reads image text too",
    )


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-weight", type=float, default=0.8)
    p.add_argument("--itc-weight", type=float, default=0.1)
    p.add_argument("--itm-weight", type=float, default=0.1)
    p.add_argument("--negatives", choices=["hard", "random"], default="hard")
    p.add_argument(
        "--select-on",
        choices=["auto", "task", "task>itm", "task+itm", "loss", "auroc"],
        default="auto",
        help="checkpoint selection; auto: validation macro-F1, ties broken by ITM AUROC when ITM is trained",
    )
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modstream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train, calibrate and register a model")
    _add_common(p)
    _add_data(p)
    _add_model(p)
    _add_train(p)
    p.add_argument("--out", help="folder for curves.json / curves.png")
    p.add_argument(
        "--neighbour-vote",
        type=_vote_weight,
        default=0.0,
        metavar="W",
        help="mix the labelled neighbours' vote into the served probabilities with weight W in [0, 1) "
        "(e.g. 0.33; default 0: the neighbours only inform review routing; BENCHMARKS.md)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ablate", help="task vs +ITC vs +ITM vs +ITC+ITM over k folds x seeds")
    _add_common(p)
    _add_data(p)
    _add_model(p)
    _add_train(p)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--unfreeze-text-layers",
        type=_layers_or_all,
        default=0,
        help="also run variants with the text encoder's top N layers fine-tuned ('all': the whole text encoder)",
    )
    p.add_argument(
        "--unfreeze-image-blocks",
        type=_layers_or_all,
        default=0,
        help="also run variants with the image encoder's last N blocks fine-tuned (images run live)",
    )
    p.add_argument(
        "--aux-weights",
        type=_weight_list,
        default=[],
        help="loss-weight sweep: one task+itc+itm variant per weight (ITC = ITM = w), e.g. 0.05,0.1,0.2,0.3",
    )
    p.add_argument("--only", action="append", help="run only this variant (repeatable)")
    p.add_argument("--jobs", type=int, default=0, help="parallel runs (default: one per CPU core on CPU, 1 on GPU)")
    p.add_argument("--out", default=str(DEFAULT_HOME / "ablation"))
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("import", help="convert a dataset to a JSONL manifest")
    p.add_argument("format", choices=["csv", "hateful-memes"])
    p.add_argument("source")
    p.add_argument("--out", required=True)
    p.add_argument("--id-column")
    p.add_argument("--text-column", default="text")
    p.add_argument("--image-column")
    p.add_argument("--image-dir")
    p.add_argument("--label", action="append", help="TASK=COLUMN, e.g. hate=Level1")
    p.add_argument(
        "--map",
        action="append",
        help="TASK:RAW=LABEL, e.g. hate:off=hateful (empty LABEL = unknown)",
    )
    p.add_argument("--on-bad-image", choices=["text-only", "skip"], default="text-only")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("models", help="list registered model versions (or move CURRENT)")
    _add_common(p)
    p.add_argument("--set-current", metavar="VERSION", help="make VERSION the current model (roll forward or back)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("classify", help="classify posts from a JSONL file (no Kafka)")
    _add_common(p)
    p.add_argument("input")
    p.add_argument("--output", help="JSONL of labels and dead letters (default: stdout)")
    p.add_argument("--allow-loopback-media", action="store_true", help="fetch image URLs on 127.0.0.1 too")
    _add_ocr(p)
    p.add_argument("--model", default="current")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("worker", help="run a stream worker (Faust) on the posts topic")
    _add_common(p)
    p.add_argument("--bootstrap", default="127.0.0.1:19092")
    p.add_argument("--redis", default="redis://127.0.0.1:16379/0", help="Redis URL ('' to run without Redis)")
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
        "copies pixels (0.2x its CPU; reposts pay the resize)",
    )
    _add_ocr(p)
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
    _add_common(p)
    p.add_argument("--posts", type=int, default=500)
    p.add_argument("--repost-rate", type=float, default=0.2)
    p.add_argument("--keep-stack", action="store_true", help="leave Kafka and Redis running afterwards")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("produce", help="send sample posts to the posts topic")
    p.add_argument("--bootstrap", default="127.0.0.1:19092")
    p.add_argument("--topic", default="posts")
    p.add_argument("--input", help="JSONL of posts to send as they are")
    p.add_argument("--media-url", help="base URL serving the synthetic images")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.0, help="posts per second (0: unlimited)")
    p.add_argument("--repost-rate", type=float, default=0.0)
    p.set_defaults(func=cmd_produce)

    # The other roles register their own subcommands (one module each, argparse only).
    from review import console_cli, sinks_cli
    from trainer import retrain_cli

    sinks_cli.add_parsers(sub, _add_common)
    console_cli.add_parsers(sub, _add_common)
    retrain_cli.add_parsers(sub, _add_common)

    p = sub.add_parser(
        "demo",
        help="train the default model on synthetic data if needed, then classify the bundled sample",
    )
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    from stream.dlq import add_parsers as add_dlq_parsers
    from stream.lag_exporter import add_parsers as add_lag_exporter_parsers

    add_lag_exporter_parsers(sub)

    add_dlq_parsers(sub)
    p = sub.add_parser("schemas", help="write the JSON Schemas of the topic records (schemas/*.schema.json)")
    p.add_argument("--out", default="schemas", help="folder to write into (default schemas/)")
    p.add_argument("--check", action="store_true", help="only compare with the files there; exit 1 if they differ")
    p.set_defaults(func=cmd_schemas)

    # -v works after the command too (`modstream classify -v ...`); SUPPRESS keeps the top-level value.
    for subparser in sub.choices.values():
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    return parser


def describe_error(exc: BaseException, args: argparse.Namespace) -> str | None:
    """One line for an error a user can fix (naming the input and what to do), or None for a
    bug, which keeps its traceback. Imports are lazy: most roles never load these modules."""
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from models.images import ImageError
    from models.registry import RegistryError
    from trainer.importers import DatasetImportError
    from trainer.manifest import ManifestError

    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or exc}: no such file or folder; check the path"
    if isinstance(exc, IsADirectoryError | NotADirectoryError | PermissionError):
        return f"{exc.filename or exc}: {exc.strerror or exc}; check the path and its permissions"
    if isinstance(exc, ManifestError):
        return f"bad manifest: {exc}; fix that line (one JSON object per line: id, text, image, labels)"
    if isinstance(exc, DatasetImportError | ImageError):
        return f"{exc}; fix the input and run again"
    if isinstance(exc, RegistryError):
        registry = getattr(args, "registry", None) or DEFAULT_HOME / "registry"
        return (
            f"{exc.args[0] if exc.args else exc}; `modstream models --registry {registry}` lists the versions "
            "(`modstream train` registers one)"
        )
    bootstrap = getattr(args, "bootstrap", None)
    if isinstance(exc, KafkaConnectionError) or (isinstance(exc, KafkaError) and bootstrap):
        return (
            f"cannot reach Kafka at {bootstrap} ({type(exc).__name__}); start it (`make stack-up`) "
            "or pass --bootstrap HOST:PORT of a running broker"
        )
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError:  # pragma: no cover - redis is a runtime dependency
        return None
    if isinstance(exc, RedisConnectionError):
        return f"cannot reach Redis at {_redacted(getattr(args, 'redis', '?'))} ({exc}); start it or pass --redis URL"
    return None


def _redacted(url: str) -> str:
    """A URL without its password (redis://:secret@host -> redis://:***@host), fit for logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def main(argv: list[str] | None = None) -> int:
    """Usage errors exit 2 (argparse's own and UsageError), user errors 1 with one line on
    stderr (the traceback only with -v); anything unexpected keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prog = f"modstream {args.command}"
    if args.command in ONE_SHOT_KAFKA and not args.verbose:
        # aiokafka logs each failed connection itself; the one line from describe_error says it all.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = describe_error(exc, args)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        else:
            message += " (add -v for the traceback)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The offline side's commands: `modstream train`, `ablate` and `import` (argparse only at
module level; each command imports what it runs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from modstream.options import DEFAULT_HOME, UsageError, add_common, cache_root, registry_root


def _load_examples(args: argparse.Namespace) -> list[Any]:
    from modstream.manifest import read_manifest
    from trainer.importers import import_cm_off_meme
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


def _data_source(args: argparse.Namespace) -> dict[str, Any]:
    """What `modstream retrain` reloads as this model's base data (card training.data_source)."""
    if args.preset == "cm-off-meme":
        return {"preset": "cm-off-meme", "with_text_only": bool(args.with_text_only)}
    if args.preset == "synthetic":
        return {"preset": "synthetic", "n": args.synthetic_n, "seed": 0}
    return {"manifest": str(Path(args.manifest).resolve())}


def cmd_train(args: argparse.Namespace) -> int:
    from models.registry import ModelRegistry
    from trainer.fit import fit
    from trainer.holdout import reserve_base_holdout

    examples = _load_examples(args)
    recorded: dict[str, Any] = {"data_source": _data_source(args)}
    if args.base_holdout > 0:
        # Set aside for good: retrained versions are gated on it and no version trains on it.
        examples, recorded = reserve_base_holdout(examples, recorded["data_source"], args.base_holdout)
    fitted = fit(
        examples,
        _model_config(args),
        _train_config(args),
        cache_dir=cache_root(args),
        out_dir=Path(args.out) if args.out else None,
        device=args.device,
        on_bad_image=args.on_bad_image,
    )
    fitted.card.training.update(recorded)
    version = ModelRegistry(registry_root(args)).save(fitted.model, fitted.tokenizer, fitted.card)
    print(
        json.dumps(
            {
                "version": version,
                "base_holdout": recorded.get("holdouts", {}).get("base"),
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
            cache_dir=cache_root(args),
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


def _holdout_fraction(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a holdout fraction is in [0, 1), got {raw}")
    return value


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


def add_parsers(sub: Any) -> None:
    """Register this role's subcommands on the `modstream` parser."""
    p = sub.add_parser("train", help="train, calibrate and register a model")
    add_common(p)
    _add_data(p)
    _add_model(p)
    _add_train(p)
    p.add_argument("--out", help="folder for curves.json / curves.png")
    p.add_argument(
        "--base-holdout",
        type=_holdout_fraction,
        default=0.1,
        metavar="FRACTION",
        help="share of the data set aside (chosen by a hash of each id) and never trained on by this or any "
        "retrained version: the retrain gate judges candidates on it; 0 trains on everything",
    )
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
    add_common(p)
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

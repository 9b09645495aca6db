"""`modstream` — one command, several roles (HMA style): training and evaluation, the stream
worker, the review sink and console, the dataset sink, the retraining job, the lag exporter.

This is the composition root, and it wires nothing by itself: each command belongs to one
role's command module (`COMMANDS`), which is imported only when that command runs. So a
started `modstream worker` has loaded the worker's modules and no others (no `trainer.*`),
and the worker image can leave `trainer/` out."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from modstream.options import DEFAULT_HOME, UsageError

# Command -> (the module whose add_parsers(sub) registers it, the one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "worker": ("stream.commands", "run a stream worker (Faust) on the posts topic"),
    "produce": ("stream.commands", "send sample posts to the posts topic"),
    "run": ("stream.commands", "the whole pipeline locally: stack, model, media, producer, worker, summary"),
    "demo": (
        "stream.commands",
        "train the default model on synthetic data if needed, then classify the bundled samples",
    ),
    "classify": ("stream.commands", "classify posts from a JSONL file (no Kafka)"),
    "models": ("stream.commands", "list registered model versions (or move CURRENT)"),
    "dlq": ("stream.commands", "inspect and replay the dead-letter topic"),
    "serve-media": ("stream.commands", "serve the synthetic firehose's images on loopback (for produce --media-url)"),
    "labels": ("stream.commands", "print labels from the labels topic (filter by route, version, post id)"),
    "lag-exporter": ("stream.commands", "export every consumer group's lag from the broker"),
    "review-sink": ("review.sinks_cli", "copy the review topic into the Redis review stream"),
    "dataset-sink": ("review.sinks_cli", "append reviewers' decisions to the reviewed dataset"),
    "review": ("review.console_cli", "the human review console and its tools"),
    "purge": ("review.retention_cli", "erase one post's text and media from Redis, the evidence store and the dataset"),
    "retention": ("review.retention_cli", "trim the review streams and expire evidence by age"),
    "banks": ("review.banks_cli", "import, export, list and remove verdict-bank entries"),
    "train": ("trainer.commands", "train, calibrate and register a model"),
    "ablate": ("trainer.commands", "task vs +ITC vs +ITM vs +ITC+ITM over k folds x seeds"),
    "import": ("trainer.commands", "convert a dataset to a JSONL manifest"),
    "retrain": ("trainer.retrain_cli", "retrain on reviewers' decisions, gate, promote and announce"),
    "schemas": ("modstream.cli", "write the JSON Schemas of the topic records (schemas/*.schema.json)"),
    "kafka-acls": ("modstream.kafka_acls", "grant each role's Kafka principal its topics and groups (as a super user)"),
    "redis-acls": ("modstream.redis_acls", "write the review Redis's ACL file from the roles' credentials folders"),
}

# Commands that talk to Kafka once and exit (a long-running role keeps aiokafka's own logs).
ONE_SHOT_KAFKA = {"produce", "dlq", "labels", "purge", "retention", "kafka-acls"}


def add_parsers(sub: Any) -> None:
    """The contract's own command."""
    p = sub.add_parser("schemas", help=COMMANDS["schemas"][1])
    p.add_argument("--out", default="schemas", help="folder to write into (default schemas/)")
    p.add_argument("--check", action="store_true", help="only compare with the files there; exit 1 if they differ")
    p.set_defaults(func=cmd_schemas)


def _command_in(argv: list[str]) -> str | None:
    """The command named in `argv` (the first word that is not an option), if known."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


# Options whose default is a secret (a Redis URL may carry a password): --help never shows it.
SECRET_DESTS = frozenset({"redis"})


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except secrets, flags and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.dest in SECRET_DESTS
            or action.default is None
            or action.default is False  # identity: a default of 0 or 0.0 is shown
            or action.default is argparse.SUPPRESS
            or "default" in text
            or not action.option_strings
        ):
            return action.help
        return super()._get_help_string(action)


def _with_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command's (and sub-command's) --help shows defaults."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        shown = action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS
        if action.help is None and action.option_strings and shown and action.dest not in SECRET_DESTS:
            action.help = "default: %(default)s"  # argparse prints no help line at all for help=None
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _with_defaults(child)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: only the named command's module is imported and registers its
    options; the others appear with their help line. Without `argv`, every module registers
    (the full parser, for tests and tools that check every command line)."""
    parser = argparse.ArgumentParser(prog="modstream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = _command_in(argv) if argv is not None else None
    modules = list(dict.fromkeys(m for m, _ in COMMANDS.values()))
    if argv is not None:
        modules = [COMMANDS[wanted][0]] if wanted else []
    for module in modules:
        importlib.import_module(module).add_parsers(sub)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:  # listed in `modstream --help`, registered when it runs
            sub.add_parser(name, help=help_text)
    # -v works after the command too (`modstream classify -v ...`); SUPPRESS keeps the top-level value.
    for subparser in sub.choices.values():
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    _with_defaults(parser)
    return parser


def cmd_schemas(args: argparse.Namespace) -> int:
    from modstream.schemas import check_schemas, write_schemas

    out = Path(args.out)
    if args.check:
        stale = check_schemas(out)
        for name in stale:
            print(f"{out / name}: differs from the record types; run `modstream schemas --out {out}`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_schemas(out):
        print(f"wrote {path}")
    return 0


def describe_error(exc: BaseException, args: argparse.Namespace) -> str | None:
    """One line for an error a user can fix (naming the input and what to do), or None for a
    bug, which keeps its traceback. Imports are lazy: most roles never load these modules."""
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from models.images import ImageError
    from models.registry import RegistryError
    from modstream.manifest import ManifestError

    # An importer's error exists only where the trainer ran: never import trainer/ for it.
    importers = sys.modules.get("trainer.importers")
    user_errors: tuple[type[BaseException], ...] = (ImageError,)
    if importers is not None:
        user_errors += (importers.DatasetImportError,)

    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or exc}: no such file or folder; check the path"
    if isinstance(exc, IsADirectoryError | NotADirectoryError | PermissionError):
        return f"{exc.filename or exc}: {exc.strerror or exc}; check the path and its permissions"
    if isinstance(exc, ManifestError):
        return f"bad manifest: {exc}; fix that line (one JSON object per line: id, text, image, labels)"
    if isinstance(exc, user_errors):
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
    argv = sys.argv[1:] if argv is None else argv
    from modstream.settings import SettingsError

    try:  # the options' defaults come from the settings (environment, secrets, config file)
        parser = build_parser(argv)
    except SettingsError as exc:
        print(f"modstream: error: {exc}", file=sys.stderr)
        return 2
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

"""What every role's command shares: the home folder, the usage error main() prints, and the
model/registry options. argparse only: importing this loads no role."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_HOME = Path(os.environ.get("MODSTREAM_HOME", "var"))


class UsageError(Exception):
    """A combination of options argparse cannot check; main() prints it and exits 2."""


def registry_root(args: argparse.Namespace) -> Path:
    return Path(args.registry) if args.registry else DEFAULT_HOME / "registry"


def cache_root(args: argparse.Namespace) -> Path:
    return Path(args.cache) if args.cache else DEFAULT_HOME / "cache"


def add_kafka(p: argparse.ArgumentParser, help: str = "Kafka bootstrap servers") -> None:
    """--bootstrap, defaulting to MODSTREAM_KAFKA_BOOTSTRAP (modstream.settings)."""
    from modstream.settings import current

    p.add_argument("--bootstrap", default=current().kafka_bootstrap, help=f"{help} (env MODSTREAM_KAFKA_BOOTSTRAP)")


def add_redis(p: argparse.ArgumentParser, help: str = "Redis URL") -> None:
    """--redis, defaulting to MODSTREAM_REDIS_URL (or the secrets folder, or the config file).
    Pass a password through those, never as a flag: flags are visible in the process table."""
    from modstream.settings import current

    p.add_argument(
        "--redis",
        default=current().redis_url.get_secret_value(),
        help=f"{help} (env MODSTREAM_REDIS_URL or a file of that name in MODSTREAM_SECRETS_DIR; not as a flag "
        "when it holds a password)",
    )


def add_evidence(p: argparse.ArgumentParser, help: str = "evidence store: the media bytes the model scored") -> None:
    """--evidence, defaulting to MODSTREAM_EVIDENCE, else <home>/evidence (stream/evidence.py)."""
    from modstream.settings import current

    p.add_argument(
        "--evidence",
        default=current().evidence or str(DEFAULT_HOME / "evidence"),
        help=f"{help}: a folder or s3://bucket/prefix (env MODSTREAM_EVIDENCE; default var/evidence)",
    )


def add_common(p: argparse.ArgumentParser, *, cache: bool = True) -> None:
    """`cache`: the command reads or writes the feature cache (serving commands do not)."""
    p.add_argument("--registry", help="model registry folder (default var/registry)")
    if cache:
        p.add_argument("--cache", help="feature cache folder (default var/cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")

"""`modstream banks`: the verdict banks from a shell, for lists too large for the console's
upload (its requests are capped at 1 MiB) and for scripts.

    modstream banks import list.csv --source partner [--bank violating]   a ThreatExchange PDQ CSV
    modstream banks export [--bank B] [--source S] --out list.csv         the banks as that CSV
    modstream banks list [--bank B] [--source S] [--search Q]             entries as JSON lines
    modstream banks remove ENTRY_ID

Changes are recorded on the audit topic first (as `cli:<os user>`), then written to the bank
topic, which every worker reads; on a secured cluster run them with the console's credentials
(only its principal may write either topic). Reading waits until the topic is read to its end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

from modstream.options import add_kafka

BANK_TOPIC = "bank-updates"


async def _load(bootstrap: str, topic: str, timeout_s: float) -> Any:
    from stream.bank_topic import BankFollower
    from stream.banks.bank import VerdictBanks

    banks = VerdictBanks()
    follower = BankFollower(bootstrap, banks, topic)
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.loaded.wait(), timeout_s)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return banks


def _entries(args: argparse.Namespace) -> list[Any]:
    banks = asyncio.run(_load(args.bootstrap, args.topic, args.timeout))
    found = banks.search(args.search, limit=1000) if getattr(args, "search", None) else list(banks.entries())
    return [
        e
        for e in found
        if (args.bank is None or e.bank == args.bank) and (args.source is None or e.source == args.source)
    ]


def cmd_banks(args: argparse.Namespace) -> int:
    from review.audit import AuditUnavailable, record_from_cli
    from stream.bank_topic import publish
    from stream.banks.bank import BankUpdate
    from stream.banks.te_csv import TeCsvError, read_te_csv, write_te_csv

    try:
        if args.banks_action == "import":
            with Path(args.file).open(encoding="utf-8", newline="") as fh:
                entries = read_te_csv(fh, source=args.source, bank=args.bank or "violating")
            record_from_cli(args.bootstrap, "bank_list_imported", args.source[:256], bank=args.bank or "violating",
                            entries=len(entries))  # fmt: skip
            asyncio.run(publish(args.bootstrap, [BankUpdate.add(e) for e in entries], args.topic, args.timeout))
            print(f"imported {len(entries)} entries into {args.bank or 'violating'} from {args.file}", file=sys.stderr)
        elif args.banks_action == "export":
            entries = _entries(args)
            with Path(args.out).open("w", encoding="utf-8", newline="") as fh:
                report = write_te_csv(entries, fh)
            print(f"exported {report.written} entries to {args.out}; not exported: {report.without_pdq} without a "
                  f"PDQ hash, {report.low_quality} of quality < 50", file=sys.stderr)  # fmt: skip
        elif args.banks_action == "list":
            import orjson

            for entry in _entries(args):
                sys.stdout.write(orjson.dumps(entry.to_json()).decode() + "\n")
        elif args.banks_action == "remove":
            banks = asyncio.run(_load(args.bootstrap, args.topic, args.timeout))
            entry = banks.get(args.entry_id)
            if entry is None:
                print(f"modstream banks: no entry {args.entry_id!r}", file=sys.stderr)
                return 1
            record_from_cli(args.bootstrap, "bank_entry_removed", args.entry_id[:256], bank=entry.bank,
                            source=entry.source)  # fmt: skip
            asyncio.run(publish(args.bootstrap, [BankUpdate.remove(args.entry_id)], args.topic, args.timeout))
            print(f"removed {args.entry_id}; every worker drops it within seconds", file=sys.stderr)
    except (TeCsvError, ValueError, OSError, AuditUnavailable, TimeoutError) as exc:
        print(f"modstream banks: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, TeCsvError | ValueError) else 1
    return 0


def add_parsers(sub: Any) -> None:
    banks = sub.add_parser("banks", help="import, export, list and remove verdict-bank entries")
    actions = banks.add_subparsers(dest="banks_action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_kafka(p)
        p.add_argument("--topic", default=BANK_TOPIC, help=f"the banks' topic (default {BANK_TOPIC})")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for Kafka")

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bank", choices=["violating", "benign"], help="only this bank")
        p.add_argument("--source", help="only entries of this source (a list's name, or review)")

    p = actions.add_parser("import", help="add a ThreatExchange PDQ CSV (HMA) hash list to a bank")
    p.add_argument("file")
    p.add_argument("--source", required=True, help="the list's name (entries are <source>:<hash>)")
    p.add_argument("--bank", choices=["violating", "benign"], help="the bank it goes to (default violating)")
    common(p)
    p.set_defaults(func=cmd_banks)

    p = actions.add_parser("export", help="write the banks as a ThreatExchange PDQ CSV")
    p.add_argument("--out", required=True)
    filters(p)
    common(p)
    p.set_defaults(func=cmd_banks)

    p = actions.add_parser("list", help="print entries as JSON lines")
    p.add_argument("--search", help="an entry id, hash or decision id prefix, or part of a source or name")
    filters(p)
    common(p)
    p.set_defaults(func=cmd_banks)

    p = actions.add_parser("remove", help="remove one entry from the banks")
    p.add_argument("entry_id")
    common(p)
    p.set_defaults(func=cmd_banks)

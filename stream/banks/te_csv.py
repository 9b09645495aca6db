"""Hash lists in ThreatExchange's PDQ CSV format: import into a bank, export a bank.

Why this format: it is what python-threatexchange writes when a list leaves it,
`threatexchange dataset -P --csv` (facebook/ThreatExchange,
python-threatexchange/threatexchange/cli/dataset_cmd.py, `execute_print_signals` and
`_print_csv`; the expected output is in cli/tests/dataset_cmd_test.py), and HMA
(hasher-matcher-actioner, OpenMediaMatch) is built on the same library, its signal type names
and hash forms. One header line, then one row per signal, written by `csv.DictWriter` (so
"\\r\\n" line ends and quoting as needed):

    signal_type,signal_str,collab,category,tags
    pdq,f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22,Sample Signals,POSITIVE_CLASS,hate=1 sarcasm=0

- signal_type: `pdq` (PdqSignal.get_name()). Only PDQ lists are banks here; any other type is
  refused, not skipped.
- signal_str: 64 lowercase hex digits, most significant bit first (PdqSignal.validate_signal_str,
  `^[0-9a-f]{64}$`); the order of stream.banks.hashing.PdqHash.hex.
- collab: the collaboration (list) the signal came from: our `source`.
- category: the aggregate opinion (fetch_state.AggregateSignalOpinionCategory): POSITIVE_CLASS,
  NEGATIVE_CLASS, INVESTIGATION_SEED or DISPUTED.
- tags: the opinion's tags, space-separated.

How it maps to a bank. Export: violating -> POSITIVE_CLASS, benign -> NEGATIVE_CLASS; the
verdicts go into the tags as `task=0|1` (tags are free-form strings in ThreatExchange, and this
keeps a re-import exact), after the entry's own tags. Import: the caller names the list (source)
and the bank it goes to (violating by default). A row must agree with that bank
(POSITIVE_CLASS only into violating, NEGATIVE_CLASS only into benign; INVESTIGATION_SEED,
ThreatExchange's "needs verifying", into either: importing it is the admin's verification);
DISPUTED is refused. Verdicts come from the row's `task=0|1` tags, else from the caller's
`verdicts` (a foreign list does not know our tasks), and other tags are kept on the entry. The
entry id is `<source>:<hash>`, so importing a list again replaces its entries instead of
doubling them, and an export of a list re-imports to the same entries.

What does not travel: the exact content hash, the decision id and who decided. The format has
no place for them, and a list shared outside the organisation should not name its reviewers.
Entries without a PDQ hash (or with one of quality < 50, which ThreatExchange never shares) are
not exported, and the export says how many.

Hostile input: every line is bounded (MAX_LINE_CHARS, read with a limit, so one endless line
never sits in memory), so is the number of lines, and any malformed line, duplicate hash or
conflicting row is a `TeCsvError` naming its line: nothing is skipped silently.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TextIO

from modstream.records import RecordError, now_iso
from stream.banks.bank import BankEntry
from stream.banks.hashing import MIN_QUALITY, is_pdq_hex

HEADER: tuple[str, ...] = ("signal_type", "signal_str", "collab", "category", "tags")
SIGNAL_TYPE = "pdq"
CATEGORIES: tuple[str, ...] = ("NEGATIVE_CLASS", "INVESTIGATION_SEED", "POSITIVE_CLASS", "DISPUTED")
# Which categories may go into which bank (see the module docstring).
_ALLOWED = {
    "violating": frozenset({"POSITIVE_CLASS", "INVESTIGATION_SEED"}),
    "benign": frozenset({"NEGATIVE_CLASS", "INVESTIGATION_SEED"}),
}
_EXPORT_CATEGORY = {"violating": "POSITIVE_CLASS", "benign": "NEGATIVE_CLASS"}
# The longest valid row is ~2.6k characters (a 128-character collab, 32 tags of 64); 8 KiB
# leaves room for quoting and refuses anything that is not a row.
MAX_LINE_CHARS = 8192
# Above the 1M-hash bank the issue sizes for, with room; a caller may lower it.
MAX_LINES = 2_000_000
_VERDICT_TAG = re.compile(r"([A-Za-z][A-Za-z0-9_]{0,63})=([01])")


class TeCsvError(ValueError):
    """A list that cannot be imported; `line` is the 1-based line number (0: the whole input)."""

    def __init__(self, line: int, why: str) -> None:
        super().__init__(f"line {line}: {why}" if line else why)
        self.line = line
        self.why = why


@dataclass(frozen=True)
class ExportReport:
    written: int
    without_pdq: int  # entries named only by content hash: nothing to share in this format
    low_quality: int  # PDQ below MIN_QUALITY: ThreatExchange never shares those


def entry_id_for(source: str, pdq_hex: str) -> str:
    return f"{source}:{pdq_hex}"


def _lines(data: str | TextIO, max_lines: int) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) for each line, each read with a bound."""
    stream = io.StringIO(data) if isinstance(data, str) else data
    number = 0
    while True:
        line = stream.readline(MAX_LINE_CHARS + 3)  # + room for "\r\n" and one more to notice
        if not line:
            return
        number += 1
        if number > max_lines:
            raise TeCsvError(number, f"more than {max_lines:,} lines")
        text = line.removesuffix("\n").removesuffix("\r")
        if len(text) > MAX_LINE_CHARS:  # also where readline stopped at its bound mid-line
            raise TeCsvError(number, f"longer than {MAX_LINE_CHARS:,} characters")
        yield number, text


def _row(number: int, text: str) -> list[str]:
    if "\r" in text or "\x00" in text:
        raise TeCsvError(number, "carriage return or NUL inside a line")
    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise TeCsvError(number, f"not a CSV row ({exc})") from None
    if len(rows) != 1 or len(rows[0]) != len(HEADER):
        got = len(rows[0]) if rows else 0
        raise TeCsvError(number, f"expected {len(HEADER)} fields ({','.join(HEADER)}), got {got}")
    return rows[0]


def read_te_csv(
    data: str | TextIO,
    *,
    source: str,
    bank: str = "violating",
    verdicts: Mapping[str, int] | None = None,
    imported_by: str | None = None,
    imported_at: str | None = None,
    max_lines: int = MAX_LINES,
) -> list[BankEntry]:
    """The entries of one list (source = the list's name), in file order, or TeCsvError.

    `verdicts`: task -> 0/1 for rows whose tags carry none; `imported_by` / `imported_at`
    become each entry's decided_by / decided_at (default: now)."""
    if bank not in _ALLOWED:
        raise ValueError(f"bank must be one of {', '.join(_ALLOWED)}")
    when = imported_at or now_iso()
    entries: list[BankEntry] = []
    first_line: dict[str, int] = {}
    lines = _lines(data, max_lines)
    header = next(lines, None)
    if header is None:
        raise TeCsvError(0, "empty input: expected the header " + ",".join(HEADER))
    try:
        fields = tuple(_row(1, header[1]))
    except TeCsvError:
        fields = ()
    if fields != HEADER:
        raise TeCsvError(1, "expected the header " + ",".join(HEADER))
    for number, text in lines:
        if not text.strip():
            raise TeCsvError(number, "empty line")
        signal_type, signal, collab, category, tags = _row(number, text)
        if signal_type != SIGNAL_TYPE:
            raise TeCsvError(number, f"signal type {signal_type[:40]!r} is not {SIGNAL_TYPE!r}")
        if not is_pdq_hex(signal):
            raise TeCsvError(number, "signal_str is not a PDQ hash (64 lowercase hex digits)")
        if collab and collab != source:
            raise TeCsvError(number, f"collab {collab[:80]!r} is not the list being imported ({source!r})")
        if category not in CATEGORIES:
            raise TeCsvError(number, f"category must be one of {', '.join(CATEGORIES)}")
        if category not in _ALLOWED[bank]:
            raise TeCsvError(number, f"a {category} row cannot go into the {bank} bank")
        if signal in first_line:
            raise TeCsvError(number, f"the same hash as line {first_line[signal]}")
        first_line[signal] = number
        row_verdicts, own_tags = _split_tags(tags)
        try:
            entries.append(
                BankEntry(
                    entry_id=entry_id_for(source, signal),
                    bank=bank,
                    source=source,
                    content_hash=None,
                    pdq=signal,
                    pdq_quality=None,
                    verdicts=row_verdicts or dict(verdicts or {}),
                    decided_by=imported_by,
                    decided_at=when,
                    tags=tuple(own_tags),
                )
            )
        except RecordError as exc:
            hint = " (pass verdicts= for a list whose tags carry none)" if exc.field == "verdicts" else ""
            raise TeCsvError(number, f"{exc}{hint}") from None
    return entries


def _split_tags(tags: str) -> tuple[dict[str, int], list[str]]:
    verdicts: dict[str, int] = {}
    own: list[str] = []
    for tag in tags.split():
        found = _VERDICT_TAG.fullmatch(tag)
        if found:
            verdicts[found.group(1)] = int(found.group(2))
        else:
            own.append(tag)
    return verdicts, own


def write_te_csv(entries: Iterable[BankEntry], out: TextIO) -> ExportReport:
    """Write `entries` as a ThreatExchange PDQ CSV (header included)."""
    writer = csv.DictWriter(out, HEADER)  # as threatexchange writes it: "\r\n" line ends
    writer.writeheader()
    written = without_pdq = low_quality = 0
    for entry in entries:
        if entry.pdq is None:
            without_pdq += 1
            continue
        if entry.pdq_quality is not None and entry.pdq_quality < MIN_QUALITY:
            low_quality += 1
            continue
        verdict_tags = [f"{task}={label}" for task, label in entry.verdicts.items()]
        writer.writerow(
            {
                "signal_type": SIGNAL_TYPE,
                "signal_str": entry.pdq,
                "collab": entry.source,
                "category": _EXPORT_CATEGORY[entry.bank],
                "tags": " ".join([*entry.tags, *verdict_tags]),
            }
        )
        written += 1
    return ExportReport(written, without_pdq, low_quality)

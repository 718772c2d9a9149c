"""`edgefilter import`, `export` and `remove-source`: lists somebody else keeps, in and out.

An import reads the whole file (feeds.py says what every line became; a big file is parsed by
one process per CPU, feedworkers.py, in the same order), stages the good entries in a TEMP table
while the rest is parsed, and applies them in ONE transaction: a crash or a kill at any point
leaves the previous lists, and re-running the same import changes nothing. Refused lines are printed as
``FILE:LINE: reason`` on stderr (escaped: the file is hostile), totals on stdout.

Exit status: 0 imported (refused lines, if any, were reported and skipped); 1 the file or the
database could not be used; 2 usage mistake; 3 nothing written because lines were refused
(``--strict``, or no line was usable at all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TextIO

from edgefilter.core.config import Settings
from edgefilter.core.durations import parse_offset_or_date
from edgefilter.core.errors import EdgefilterError
from edgefilter.lists.feeds import Chunk, FeedError, FeedOptions, Seen, count_lines, decode, detect_format
from edgefilter.lists.feedworkers import default_jobs, parse_chunks
from edgefilter.outputs.decisionlog import escape_text
from edgefilter.store.open import open_store, store_exists
from edgefilter.store.sqlite import StagedRow

EXIT_REFUSED = 3
#: Refused lines printed one by one; past this only the count is kept (a garbage file has millions).
MAX_SHOWN = 1000


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal (scripts stay quiet)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, *, enabled: bool | None = None,
                 clock=time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.label = escape_text(label, 60)
        self.total = max(total, 1)
        self.clock = clock
        self._last = float("-inf")
        self._shown = False

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {done}/{self.total} lines")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the bar (before a message, and at the end)."""
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def parse_expires(text: str | None, now: float) -> float | None:
    """``--expires 30d`` (from now) or ``--expires 2026-12-31`` (a date, local midnight)."""
    if not text:
        return None
    try:
        return parse_offset_or_date(text, now, sign=+1)
    except ValueError:
        raise EdgefilterError(f"--expires {text!r}: use a duration such as 30d or a date YYYY-MM-DD") from None


async def cmd_import(args, settings: Settings, *, now: float | None = None) -> int:
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgefilterError(f"{args.file}: cannot read: {e.strerror or e}") from None
    shown_name = escape_text(str(args.file), 200)
    text, encoding_note = decode(data)
    del data
    fmt = args.format if args.format != "auto" else detect_format(path.name, text)
    if args.category and args.category not in settings.categories:
        raise EdgefilterError(f"unknown category {args.category!r}; configured: {', '.join(sorted(settings.categories))}")
    now = time.time() if now is None else now
    source = args.source or _default_source(path)
    opts = FeedOptions(
        list_name=args.list,
        region=args.region or settings.default_region,
        category=args.category or "",
        source=source,
        created_at=now,
        expires_at=parse_expires(args.expires, now),
        column=args.column,
        categories=frozenset(settings.categories),
    )
    out, err = sys.stdout, sys.stderr
    if encoding_note:
        print(f"{shown_name}: {encoding_note}", file=err)
    progress = Progress(f"importing {path.name}", count_lines(text), err)
    refused = duplicates = good = 0
    seen = Seen()

    def report(line_no: int, reason: str) -> None:
        nonlocal refused
        refused += 1
        if refused <= MAX_SHOWN:
            progress.clear()
            print(f"{shown_name}:{line_no}: {escape_text(reason, 300)}", file=err)

    def duplicate(line_no: int, first: int, text: str) -> None:
        nonlocal duplicates
        duplicates += 1
        if duplicates <= MAX_SHOWN:
            progress.clear()
            print(f"{shown_name}:{line_no}: duplicate of line {first} ({text}); counted once", file=err)

    try:
        # the workers (feedworkers) start before the database is opened; chunks come in file order
        chunks = parse_chunks(text, fmt, opts, getattr(args, "jobs", None) or default_jobs())
        del text
        metas: dict[tuple, tuple] = {}  # one meta object per distinct meta: staging compares identity
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(_stop, chunks)  # workers stop on any exit
            store = await stack.enter_async_context(open_store(settings))
            await store.begin_import()
            staging: asyncio.Task | None = None  # SQLite stages one chunk while the next is handled
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                shared = [metas.setdefault(m, m) for m in chunk.metas]
                repeats = seen.repeats(chunk, [m[0] for m in shared])
                if not repeats and not chunk.refused:  # most chunks of a clean feed
                    rows = [(t, n, shared[m]) for t, n, m in zip(chunk.patterns, chunk.nums, chunk.meta_ids, strict=True)]
                else:
                    rows = _rows_reporting(chunk, shared, repeats, report, duplicate)
                good += len(rows)
                if staging is not None:
                    await staging
                staging = asyncio.ensure_future(store.stage_rows(rows))
                await asyncio.sleep(0)  # let the staging task hand its rows to SQLite's thread
                progress.update(chunk.last_line)
            if staging is not None:
                await staging
            del seen
            progress.clear()
            if refused > MAX_SHOWN:
                print(f"{shown_name}: ... and {refused - MAX_SHOWN} more refused lines", file=err)
            if refused and (args.strict or good == 0):
                why = "--strict" if args.strict else "no line of the file was usable"
                print(f"{shown_name}: {refused} lines refused; nothing written ({why})", file=err)
                _totals(out, fmt, good, duplicates, refused, None, args.dry_run)
                return EXIT_REFUSED
            if args.replace_source and good == 0:
                print(f"{shown_name}: no entries: --replace-source would delete every entry of {source!r}; nothing written", file=err)
                return EXIT_REFUSED
            if args.dry_run:
                print("(dry run: staged and rolled back, the database is unchanged)", file=out)
            result = await store.apply_import(
                replace_source=source if args.replace_source else None, lists=(args.list,), dry_run=args.dry_run
            )
    except FeedError as e:
        progress.clear()
        raise EdgefilterError(f"{shown_name}: {e}") from None
    _totals(out, fmt, good, duplicates, refused, result, args.dry_run)
    return 0


def _stop(chunks) -> None:
    """Stop the parse: the workers, or the generator (unless a thread is inside it right now, as
    on Ctrl-C: it then ends with its file)."""
    with contextlib.suppress(ValueError):  # "generator already executing"
        chunks.close()


def _rows_reporting(chunk: Chunk, shared: list[tuple], repeats: dict[int, int], report, duplicate) -> list[StagedRow]:
    """A chunk's rows to stage, its refusals and repeats reported in line order on the way."""
    refusals, r = chunk.refused, 0
    rows: list[StagedRow] = []
    for i, (line_no, text, num, mid) in enumerate(zip(chunk.lines, chunk.patterns, chunk.nums, chunk.meta_ids, strict=True)):
        while r < len(refusals) and refusals[r][0] < line_no:
            report(*refusals[r])
            r += 1
        first = repeats.get(i)
        if first is not None:
            duplicate(line_no, first, text)
        else:
            rows.append((text, num, shared[mid]))
    for item in refusals[r:]:
        report(*item)
    return rows


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of processes, 1 or more")
    return n


def _default_source(path: Path) -> str:
    """A feed is tagged with its file name unless --source says otherwise."""
    return "import:" + path.name[:64]


def _totals(out: TextIO, fmt: str, good: int, duplicates: int, refused: int, result, dry_run: bool) -> None:
    parts = [f"format {fmt}", f"{good} entries read"]
    if result is not None:
        parts += [f"added {result.added}", f"updated {result.updated}", f"unchanged {result.unchanged}"]
        if result.removed:
            parts.append(f"removed {result.removed} (not in the new file)")
    parts += [f"duplicates {duplicates}", f"rejected {refused}"]
    print(("would be: " if dry_run else "") + ", ".join(parts), file=out)


async def cmd_export(args, settings: Settings) -> int:
    if not store_exists(settings):
        raise EdgefilterError(f"{settings.store.path}: database does not exist yet (nothing to export)")
    stream = sys.stdout if not args.output or args.output == "-" else open(args.output, "w", encoding="utf-8", newline="")
    n = 0
    try:
        async with open_store(settings, create=False) as store:
            if args.format == "csv":
                w = csv.writer(stream, lineterminator="\n")
                w.writerow(["list", "number", "category", "note", "source", "expires"])
            else:
                stream.write(f"# edgefilter export{' list=' + args.list if args.list else ''}"
                             f"{' source=' + escape_text(args.source) if args.source else ''}\n")
            async for batch in store.export_entries(args.list, args.source):
                for e in batch:
                    n += 1
                    note = _one_line(e.note)
                    if args.format == "csv":
                        exp = datetime.fromtimestamp(e.expires_at).strftime("%Y-%m-%d %H:%M") if e.expires_at else ""
                        w.writerow([e.list, e.pattern.text, e.category, note, e.source, exp])
                    else:
                        stream.write(e.pattern.text + (f"  # {note}" if note else "") + "\n")
    finally:
        if stream is not sys.stdout:
            stream.close()
    if stream is not sys.stdout:
        print(f"exported {n} entries to {escape_text(args.output, 200)}")
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def cmd_remove_source(args, settings: Settings) -> int:
    if not store_exists(settings):
        print(f"{escape_text(args.name)}: no such source (the database does not exist yet)", file=sys.stderr)
        return 1
    async with open_store(settings, create=False) as store:
        n = await store.remove_source(args.name, args.list)
    if not n:
        print(f"{escape_text(args.name)}: no entries with this source", file=sys.stderr)
        return 1
    print(f"removed {n} entries of source {escape_text(args.name)}")
    return 0


def add_parsers(sub, common, lists: tuple[str, ...]) -> None:
    """Register import, export and remove-source on the main parser."""
    p = sub.add_parser("import", parents=[common], help="import a list file (text, CSV or vCard) in one transaction")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--list", choices=lists, default="block", help="list to import into (default: block)")
    p.add_argument("--category", help="category for entries whose line gives none")
    p.add_argument("--source", metavar="NAME", help="source tag (default: import:<file name>)")
    p.add_argument("--region", metavar="CC", help="ISO region for national forms (default: [numbers] default_region)")
    p.add_argument("--format", choices=("auto", "text", "csv", "vcf"), default="auto")
    p.add_argument("--column", metavar="N|NAME", help="CSV column holding the number (1-based or header name)")
    p.add_argument("--strict", action="store_true", help="any refused line fails the import; nothing is written")
    p.add_argument("--replace-source", action="store_true",
                   help="also delete this source's entries (on --list) that are not in the file")
    p.add_argument("--expires", metavar="WHEN", help="entries expire: duration from now (30d) or a date (YYYY-MM-DD)")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    p.add_argument("--jobs", "-j", type=_jobs, metavar="N",
                   help="processes parsing a big file (default: one per CPU; 1: this process only)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", parents=[common], help="write list entries as text or CSV (re-importable)")
    p.add_argument("--list", choices=lists)
    p.add_argument("--source", metavar="NAME")
    p.add_argument("--format", choices=("text", "csv"), default="text")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("remove-source", parents=[common], help="delete every entry a source brought in")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--list", choices=lists)
    p.set_defaults(func=cmd_remove_source)

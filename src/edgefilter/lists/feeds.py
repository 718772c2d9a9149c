"""Reading the lists other people keep: plain text, CSV and vCard files -> list entries.

Pure (no I/O, no clock): the CLI reads the bytes, this module decodes them, detects the format
and yields ``(line_no, Entry)`` for every usable line or ``(line_no, reason)`` for every line it
refuses, so the admin sees exactly which lines were dropped and why. Files are hostile: a BOM,
CRLF, separators of every kind, quotes, an unterminated quote, a 1 MB line, binary junk or a
non-UTF-8 encoding must cost at most one refused line each, never the import or the process.
Numbers without a country code are read with the import's region (``0301234*`` in DE is
``+49301234*``); patterns go through lists.parse_pattern like everything an admin types.

One cell (limits, options, read_value) is feedcells.py; the CSV and vCard formats are
feedformats.py; this module decodes, detects the format, reads text files, cuts files into
chunks and slices, and re-exports the public names of both.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from edgefilter.core.errors import PatternError
from edgefilter.lists.feedcells import (
    _COMMENT,
    DELIMITERS,
    MAX_CATEGORY,
    MAX_LINE,
    MAX_ROW_LINES,
    FeedError,
    FeedOptions,
    Item,
    _sniff_delimiter,
    _too_long,
    fast_pattern,
    read_value,
    split_lines,
)
from edgefilter.lists.feedformats import (
    CATEGORY_HEADERS,
    LABEL_HEADERS,
    NAME_HEADERS,
    NUMBER_HEADERS,
    CsvLayout,
    _csv_start,
    _csv_values,
    _one_row_a_line,
    _vcf_values,
)
from edgefilter.lists.index import MAX_NOTE, Entry, exact_num, make_entry

__all__ = [
    "CATEGORY_HEADERS", "DELIMITERS", "FORMATS", "LABEL_HEADERS", "MAX_CATEGORY", "MAX_LINE", "MAX_ROW_LINES", "NAME_HEADERS",
    "NUMBER_HEADERS", "Chunk", "CsvLayout", "FeedError", "FeedOptions", "Item", "Seen", "Slices", "chunked", "count_lines",
    "decode", "detect_format", "fast_pattern", "feed_values", "parse_feed", "parse_slice", "plan_slices", "read_value",
    "split_lines",
]

FORMATS = ("auto", "text", "csv", "vcf")


# ------------------------------------------------------------------------------ decoding
def decode(data: bytes) -> tuple[str, str]:
    """Text of a file and a note on its encoding ('' for UTF-8, with or without BOM).

    UTF-16 with a BOM (Excel's "Unicode text") is read as such; otherwise UTF-8, then GB18030
    (a superset of GBK: Chinese exports), then latin-1, which accepts any byte so that a
    stray binary line is refused as a line instead of failing the whole file.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), "read as UTF-16 (byte order mark)"
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig"), ""
    except UnicodeDecodeError as e:
        first_bad = e.start
    try:
        return data.decode("gb18030"), f"not UTF-8 (first bad byte at offset {first_bad}); read as GBK/GB18030"
    except UnicodeDecodeError:
        pass
    return data.decode("latin-1"), f"not UTF-8 (first bad byte at offset {first_bad}); read as latin-1"


# ------------------------------------------------------------------------------ formats
def detect_format(name: str, text: str) -> str:
    """'vcf', 'csv' or 'text' from the file name, else from the first lines."""
    low = name.lower()
    if low.endswith((".vcf", ".vcard")):
        return "vcf"
    if low.endswith((".csv", ".tsv")):
        return "csv"
    head = [ln.strip() for ln in split_lines(text[:65536])[:200]]
    head = [ln for ln in head if ln and not ln.startswith("#")]
    if any(ln.upper().startswith("BEGIN:VCARD") for ln in head[:5]):
        return "vcf"
    sample = head[:50]
    if sample and _sniff_delimiter(sample) is not None:
        return "csv"
    return "text"


def parse_feed(text: str, fmt: str, opts: FeedOptions) -> Iterator[Item]:
    """Every line's outcome in file order: ``(line_no, Entry)`` or ``(line_no, reason)``."""
    return _entries(feed_values(text, fmt, opts), opts)


def feed_values(text: str, fmt: str, opts: FeedOptions) -> Iterator[tuple]:
    """parse_feed without an Entry per line: ``(line_no, reason)`` or ``(line_no, pattern,
    category, note)``; the list, source and dates of every entry are the options'."""
    if fmt == "text":
        return _text_values(split_lines(text), opts, 1)
    if fmt == "csv":
        layout, data_rows = _csv_start(split_lines(text), opts)
        return _csv_values(data_rows, layout, opts)
    if fmt == "vcf":
        return _vcf_values(split_lines(text), opts)
    raise FeedError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")


def count_lines(text: str) -> int:
    return text.count("\n") + (0 if text.endswith("\n") else 1) if "\n" in text else text.count("\r") + 1


# ------------------------------------------------------------------------------ text
def _entries(values: Iterable[tuple], opts: FeedOptions) -> Iterator[Item]:
    """(line, reason) as it is; (line, pattern, category, note) as (line, Entry)."""
    list_name, default_cat, source, created_at, expires_at = (
        opts.list_name, opts.category, opts.source, opts.created_at, opts.expires_at
    )
    for item in values:
        if len(item) == 2:
            yield item
        else:
            no, pattern, category, note = item
            yield no, make_entry(list_name, pattern, category or default_cat, note[:MAX_NOTE], source, created_at, expires_at)


def _text_values(lines: list[str], opts: FeedOptions, first: int) -> Iterator[tuple]:
    """Each line's outcome, (line, reason) or (line, pattern, category, note); ``first`` is the
    line number of ``lines[0]`` (a worker parses a slice of the file)."""
    for no, line in enumerate(lines, first):
        if len(line) > MAX_LINE:
            yield no, _too_long(line) or ""
            continue
        s = line.strip().lstrip("\ufeff")
        if not s or s.startswith("#"):
            continue
        note = ""
        m = _COMMENT.search(s) if "#" in s else None
        if m:
            s, note = s[: m.start()].strip(), s[m.end():].strip()
        try:
            yield no, read_value(s, opts.region), "", note
        except PatternError as e:
            yield no, str(e)

# ------------------------------------------------------------------------------ chunks
@dataclass
class Chunk:
    """What a run of a file's lines became, in a form that is cheap to send between processes
    (a million Entry objects are not): the refusals, and for the usable lines parallel lists of
    line number, canonical pattern text, compact key (lists.exact_num, None for a pattern) and
    an index into ``metas``, the distinct (list, category, note, source, created_at, expires_at)
    of the chunk. ``last_line`` is the last line the chunk covers (progress)."""

    refused: list[tuple[int, str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    nums: list[int | None] = field(default_factory=list)
    meta_ids: list[int] = field(default_factory=list)
    metas: list[tuple] = field(default_factory=list)
    last_line: int = 0

    def __len__(self) -> int:
        return len(self.lines) + len(self.refused)


def chunked(values: Iterable[tuple], opts: FeedOptions, size: int = 20000) -> Iterator[Chunk]:
    """feed_values grouped into Chunks of ``size`` outcomes, in file order."""
    values = iter(values)
    while len(chunk := _fill(Chunk(), islice(values, size), opts)):
        yield chunk


def _fill(chunk: Chunk, values: Iterable[tuple], opts: FeedOptions) -> Chunk:
    """Append feed_values outcomes to ``chunk`` (no Entry per line: a fifth less work than
    building them); ``last_line`` becomes the last outcome's line."""
    refused, lines, patterns, nums, meta_ids = chunk.refused, chunk.lines, chunk.patterns, chunk.nums, chunk.meta_ids
    ids: dict[tuple[str, str], int] = {}
    no = chunk.last_line
    for item in values:
        no = item[0]
        if len(item) == 2:
            refused.append(item)
            continue
        _, pattern, category, note = item
        mid = ids.get((category, note))
        if mid is None:
            mid = ids[(category, note)] = len(chunk.metas)
            chunk.metas.append((opts.list_name, category or opts.category, note[:MAX_NOTE], opts.source,
                                opts.created_at, opts.expires_at))
        lines.append(no)
        patterns.append(pattern.text)
        nums.append(exact_num(pattern))
        meta_ids.append(mid)
    chunk.last_line = no
    return chunk


@dataclass(frozen=True)
class Slices:
    """A file cut into slices of lines that parse independently, to the same items as the
    whole file in one go: text files (a line is a line), and CSV files where every line is
    one row (no quotes, no monster line) once the layout is read from the first rows."""

    fmt: str
    lines: list[str]
    layout: CsvLayout | None
    ranges: list[tuple[int, int]]  # [start, end) indexes into lines


def plan_slices(text: str, fmt: str, opts: FeedOptions, size: int) -> Slices | None:
    """Slices of ``size`` lines, or None when the file cannot be cut (vCard, quoted CSV).
    Raises FeedError as parse_feed would (e.g. --column names no column)."""
    if fmt not in ("text", "csv"):
        return None
    lines = split_lines(text)
    layout, start = None, 0
    if fmt == "csv":
        if not _one_row_a_line(lines):
            return None
        layout, _ = _csv_start(lines, opts)
        start = layout.header_line  # lines before the header are blank or comments: no items
    return Slices(fmt, lines, layout, [(a, min(a + size, len(lines))) for a in range(start, len(lines), size)])


def parse_slice(slices: Slices, i: int, opts: FeedOptions) -> Chunk:
    """Slice ``i`` parsed into one Chunk (what a worker process runs)."""
    a, b = slices.ranges[i]
    part = slices.lines[a:b]
    if slices.layout is None:
        values = _text_values(part, opts, a + 1)
    else:
        rows = enumerate(csv.reader(part, delimiter=slices.layout.delimiter, skipinitialspace=True), a + 1)
        values = _csv_values(rows, slices.layout, opts)
    chunk = _fill(Chunk(), values, opts)
    chunk.last_line = b
    return chunk


# ------------------------------------------------------------------------------ duplicates
class Seen:
    """First line of every (list, pattern) in one import: a repeated number counts once.

    Keyed on the compact int64 key where there is one (a 10-million-line feed keeps ints, not
    tuples of strings), else on (list, pattern text).
    """

    def __init__(self) -> None:
        self._first: dict[object, int] = {}

    def first_line(self, line_no: int, e: Entry) -> int | None:
        """None the first time an entry's pattern appears, else the line it first appeared on."""
        num = exact_num(e.pattern)
        key: object = (num if e.list == "block" else -num) if num is not None else (e.list, e.pattern.text)
        first = self._first.setdefault(key, line_no)
        return None if first == line_no else first

    def repeats(self, chunk: Chunk, lists: list[str]) -> dict[int, int]:
        """{index in chunk: first line} for the chunk's entries seen before (``lists``: the list
        of each of the chunk's metas). One call a chunk: this runs once a line of big files."""
        out: dict[int, int] = {}
        first = self._first.setdefault
        for i, (line_no, num, mid) in enumerate(zip(chunk.lines, chunk.nums, chunk.meta_ids, strict=True)):  # appended together (_fill)
            name = lists[mid]
            if num is None:
                f = first((name, chunk.patterns[i]), line_no)
            else:
                f = first(num if name == "block" else -num, line_no)
            if f != line_no:
                out[i] = f
        return out

"""The CSV and vCard formats of a feed file: the layout of a CSV file (delimiter, header, which
column holds the number) and every row's outcome; vCard cards and their TEL lines.

Split out of feeds.py (issue 18); ``edgefilter.lists.feeds`` re-exports the public names.
"""

from __future__ import annotations

import csv
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from edgefilter.core.errors import PatternError
from edgefilter.lists.feedcells import (
    MAX_LINE,
    MAX_ROW_LINES,
    FeedError,
    FeedOptions,
    _category,
    _show,
    _sniff_delimiter,
    _too_long,
    read_value,
)
from edgefilter.lists.index import MAX_NOTE

NUMBER_HEADERS = (
    "number", "phone", "phone number", "phone_number", "phonenumber", "tel", "telephone", "msisdn", "e164",
    "caller", "callerid", "caller id", "caller_id", "cli", "mobile", "cell", "pattern", "prefix", "numero", "nummer",
)
NAME_HEADERS = ("name", "full name", "fullname", "display name", "contact", "company", "fn")
LABEL_HEADERS = ("label", "note", "notes", "comment", "comments", "description", "reason")
CATEGORY_HEADERS = ("category", "type", "cat", "kind")


# ------------------------------------------------------------------------------ CSV
class _RowTooTall(Exception):
    pass


class _LineFeed:
    """Feeds physical lines to csv.reader and remembers where each row started."""

    def __init__(self, lines: list[str], start: int) -> None:
        self.lines = lines
        self.pos = start  # index of the next line to hand out
        self.row_start = start
        self.too_long: list[tuple[int, str]] = []

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        if self.pos - self.row_start >= MAX_ROW_LINES:
            raise _RowTooTall("row runs on too many lines")
        line = self.lines[self.pos]
        self.pos += 1
        bad = _too_long(line)
        if bad:
            self.too_long.append((self.pos, bad))
            return "\n"  # an empty row; the refusal is reported in order by the reader loop
        return line + "\n"


def _one_row_a_line(lines: list[str]) -> bool:
    """No quote, no stray carriage return inside a line (csv refuses it) and no monster line:
    every physical line is exactly one CSV row (most feeds)."""
    return (bool(lines) and not any('"' in ln or "\r" in ln for ln in lines)
            and max(map(len, lines)) <= MAX_LINE)


def _csv_rows(lines: list[str], delimiter: str) -> Iterator[tuple[int, list[str] | str]]:
    """(first line of the row, cells) or (line, reason); survives unterminated quotes."""
    if _one_row_a_line(lines):
        # no quotes and no monster line (most feeds): one row a line, no bookkeeping per line
        yield from enumerate(csv.reader(lines, delimiter=delimiter, skipinitialspace=True), 1)
        return
    start = 0
    while start < len(lines):
        feed = _LineFeed(lines, start)
        reader = csv.reader(feed, delimiter=delimiter, skipinitialspace=True, strict=True)
        try:
            while True:
                feed.row_start = feed.pos
                try:
                    row = next(reader)
                except StopIteration:
                    for item in feed.too_long:
                        yield item
                    return
                for item in feed.too_long:
                    yield item
                feed.too_long.clear()
                yield feed.row_start + 1, row
        except (csv.Error, _RowTooTall) as e:
            yield feed.row_start + 1, f"badly quoted field ({e}; a quote must close within {MAX_ROW_LINES} lines)"
            start = feed.row_start + 1  # resume with the next physical line
            continue


def _norm_header(cell: str) -> str:
    return re.sub(r"\s+", " ", cell.strip().strip("\ufeff").strip('"').lower().replace("-", " ").replace("_", " "))


def _header_index(headers: list[str], names: tuple[str, ...]) -> int | None:
    wanted = {_norm_header(n) for n in names}
    for i, h in enumerate(headers):
        if h in wanted:
            return i
    return None


def _looks_like_value(cell: str, region: str) -> bool:
    try:
        read_value(cell, region)
        return True
    except PatternError:
        return False


@dataclass(frozen=True)
class CsvLayout:
    """What the first rows of a CSV file say about all of them: the delimiter and which column
    holds the number, the name, the label and the category; ``header_line`` is the header row's
    line number (0: no header)."""

    delimiter: str
    num_col: int
    name_col: int | None
    label_col: int | None
    cat_col: int | None
    header_line: int


def _csv_start(lines: list[str], opts: FeedOptions) -> tuple[CsvLayout, Iterator[tuple[int, list[str] | str]]]:
    """The layout (from the first rows only) and the data rows, header left out."""
    sample = [ln for ln in lines[:200] if ln.strip() and not ln.lstrip().startswith("#") and len(ln) <= MAX_LINE][:50]
    delimiter = _sniff_delimiter(sample) or ","
    rows: Iterator[tuple[int, list[str] | str]] = _csv_rows(lines, delimiter)

    # first real row: header or data?
    pending: list[tuple[int, list[str] | str]] = []
    header: list[str] | None = None
    header_line = 0
    for no, row in rows:
        if isinstance(row, str) or not any(c.strip() for c in row) or row[0].lstrip().startswith("#"):
            pending.append((no, row))
            continue
        normed = [_norm_header(c) for c in row]
        known = set(NUMBER_HEADERS + NAME_HEADERS + LABEL_HEADERS + CATEGORY_HEADERS)
        if any(h in {_norm_header(k) for k in known} for h in normed) or (
            not any(_looks_like_value(c, opts.region) for c in row) and any(re.search(r"[A-Za-z]", c) for c in row)
        ):
            header, header_line = normed, no
        else:
            pending.append((no, row))
        break

    data_rows = _chain(pending, rows)
    num_col = _number_column(header, opts, pending)
    if num_col is None:
        # no header naming the column: the column whose cells read as numbers most often
        buffered = []
        for item in data_rows:
            buffered.append(item)
            if len(buffered) >= 200:
                break
        num_col = _detect_column([r for _, r in buffered if not isinstance(r, str)], opts.region)
        data_rows = _chain(buffered, data_rows)
    layout = CsvLayout(
        delimiter, num_col,
        _header_index(header, NAME_HEADERS) if header else None,
        _header_index(header, LABEL_HEADERS) if header else None,
        _header_index(header, CATEGORY_HEADERS) if header else None,
        header_line,
    )
    return layout, data_rows


def _csv_values(data_rows: Iterable[tuple[int, list[str] | str]], layout: CsvLayout, opts: FeedOptions) -> Iterator[tuple]:
    """Every data row's outcome, (line, reason) or (line, pattern, category, note): the loop a
    worker runs on its slice of a file."""
    num_col, name_col, label_col, cat_col = layout.num_col, layout.name_col, layout.label_col, layout.cat_col
    # the loop below runs once a line of files with millions: option lookups hoisted, category
    # verdicts remembered per distinct cell (bounded: a hostile file may make every cell differ)
    region = opts.region
    cat_seen: dict[str, tuple[str, str | None]] = {}
    for no, row in data_rows:
        if isinstance(row, str):
            yield no, row
            continue
        if not row or row[0].lstrip().startswith("#"):
            continue
        cell = row[num_col] if num_col < len(row) else ""
        if not cell.strip():  # a blank number cell: is the whole row blank (skipped) or a mistake?
            if not "".join(row).strip():
                continue
            if num_col >= len(row):
                yield no, f"no column {num_col + 1} (the row has {len(row)})"
            else:
                yield no, f"column {num_col + 1} is empty"
            continue
        category = ""
        if cat_col is not None and cat_col < len(row):
            raw_cat = row[cat_col]
            verdict = cat_seen.get(raw_cat)
            if verdict is None:
                verdict = _category(raw_cat, opts)
                if len(cat_seen) < 4096:
                    cat_seen[raw_cat] = verdict
            category, err = verdict
            if err:
                yield no, err
                continue
        note = row[name_col].strip() if name_col is not None and name_col < len(row) else ""
        if label_col is not None and label_col < len(row) and row[label_col].strip():
            note = f"{note} / {row[label_col].strip()}" if note else row[label_col].strip()
        try:
            pattern = read_value(cell, region)
        except PatternError as e:
            yield no, str(e)
            continue
        yield no, pattern, category, note


def _chain(first: list, rest: Iterable) -> Iterator:
    yield from first
    yield from rest


def _number_column(header: list[str] | None, opts: FeedOptions, pending: list) -> int | None:
    col = opts.column
    if col is not None:
        if isinstance(col, int) or (isinstance(col, str) and col.isdigit()):
            n = int(col)
            if n < 1:
                raise FeedError(f"--column {col}: columns are numbered from 1")
            return n - 1
        if header is None:
            raise FeedError(f"--column {col!r}: the file has no header row to find that name in")
        want = _norm_header(col)
        if want not in header:
            raise FeedError(f"--column {col!r}: no such column; the header has: {', '.join(h for h in header if h)}")
        return header.index(want)
    if header is not None:
        return _header_index(header, NUMBER_HEADERS)
    return None


def _detect_column(rows: list[list[str]], region: str) -> int:
    width = max((len(r) for r in rows), default=1)
    scores = [sum(1 for r in rows if i < len(r) and r[i].strip() and _looks_like_value(r[i], region)) for i in range(width)]
    return max(range(width), key=lambda i: (scores[i], -i)) if scores else 0


# ------------------------------------------------------------------------------ vCard
_PROP = re.compile(r"^(?:[A-Za-z0-9-]+\.)?([A-Za-z-]+)((?:;.*)?)$")


def _split_prop(line: str) -> tuple[str, str, str] | None:
    """(NAME, params, value) of a content line; the ':' inside quoted parameters is not the split."""
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == ":" and not quoted:
            m = _PROP.match(line[:i])
            if not m:
                return None
            return m.group(1).upper(), m.group(2).upper(), line[i + 1:]
    return None


def _unfold(lines: list[str]) -> Iterator[tuple[int, str]]:
    """Logical content lines with the physical line they start on (RFC 6350 folding, and the
    quoted-printable soft breaks of vCard 2.1)."""
    cur_no, cur = 0, None
    for no, line in enumerate(lines, 1):
        if cur is not None and line[:1] in (" ", "\t"):
            if len(cur) <= MAX_LINE:
                cur += line[1:]
            continue
        if cur is not None and "QUOTED-PRINTABLE" in cur.split(":", 1)[0].upper() and cur.endswith("="):
            if len(cur) <= MAX_LINE:
                cur = cur[:-1] + line
            continue
        if cur is not None:
            yield cur_no, cur
        cur_no, cur = no, line
    if cur is not None:
        yield cur_no, cur


def _vcard_text(params: str, value: str) -> str:
    if "QUOTED-PRINTABLE" in params:
        m = re.search(r"CHARSET=([A-Za-z0-9_-]+)", params)
        try:
            return quopri.decodestring(value.encode("latin-1", "replace")).decode(m.group(1) if m else "utf-8", "replace")
        except LookupError:
            return quopri.decodestring(value.encode("latin-1", "replace")).decode("utf-8", "replace")
    return value.replace("\\,", ",").replace("\\;", ";").replace("\\n", " ").replace("\\\\", "\\")


def _vcf_values(lines: list[str], opts: FeedOptions) -> Iterator[tuple]:
    in_card = False
    name = ""
    tels: list[tuple[int, str]] = []

    def flush() -> Iterator[tuple]:
        for no, value in tels:
            try:
                yield no, read_value(value, opts.region), "", name
            except PatternError as e:
                yield no, str(e)

    for no, line in _unfold(lines):
        bad = _too_long(line)
        if bad:
            yield no, bad
            continue
        if not line.strip():
            continue
        prop = _split_prop(line.strip().lstrip("\ufeff"))
        if prop is None:
            yield no, f"not a vCard content line: {_show(line)}"
            continue
        pname, params, value = prop
        if pname == "BEGIN" and value.strip().upper() == "VCARD":
            if in_card:
                yield no, "BEGIN:VCARD inside a card (previous card not ended); its numbers are kept"
                yield from flush()
            in_card, name, tels = True, "", []
        elif pname == "END" and value.strip().upper() == "VCARD":
            if not in_card:
                yield no, "END:VCARD without BEGIN:VCARD"
                continue
            yield from flush()
            in_card, name, tels = False, "", []
        elif not in_card:
            yield no, f"outside BEGIN:VCARD ... END:VCARD: {_show(line)}"
        elif pname == "FN" or (pname == "N" and not name):
            text = _vcard_text(params, value)
            name = " ".join(p for p in text.split(";") if p.strip()) if pname == "N" else text.strip()
            name = name[:MAX_NOTE]
        elif pname == "TEL":
            tels.append((no, value.strip()))
    if in_card:
        yield len(lines), "file ends inside a card (no END:VCARD); its numbers are kept"
        yield from flush()


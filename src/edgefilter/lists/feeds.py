"""Reading the lists other people keep: plain text, CSV and vCard files -> list entries.

Pure (no I/O, no clock): the CLI reads the bytes, this module decodes them, detects the format
and yields ``(line_no, Entry)`` for every usable line or ``(line_no, reason)`` for every line it
refuses, so the admin sees exactly which lines were dropped and why. Files are hostile: a BOM,
CRLF, separators of every kind, quotes, an unterminated quote, a 1 MB line, binary junk or a
non-UTF-8 encoding must cost at most one refused line each, never the import or the process.
Numbers without a country code are read with the import's region (``0301234*`` in DE is
``+49301234*``); patterns go through lists.parse_pattern like everything an admin types.
"""

from __future__ import annotations

import csv
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice

import phonenumbers

from edgefilter.core.errors import PatternError
from edgefilter.core.numbers import national_prefix, strip_visual
from edgefilter.lists.index import MAX_NOTE, Entry, Pattern, exact_num, make_entry, make_pattern, parse_pattern

FORMATS = ("auto", "text", "csv", "vcf")
#: Longest line read; anything longer is refused as a line (not a number, and a memory hazard).
MAX_LINE = 4096
#: A quoted CSV field may span lines (address fields in contact exports), but not the whole file.
MAX_ROW_LINES = 50
MAX_CATEGORY = 64
DELIMITERS = ",;\t|"

NUMBER_HEADERS = (
    "number", "phone", "phone number", "phone_number", "phonenumber", "tel", "telephone", "msisdn", "e164",
    "caller", "callerid", "caller id", "caller_id", "cli", "mobile", "cell", "pattern", "prefix", "numero", "nummer",
)
NAME_HEADERS = ("name", "full name", "fullname", "display name", "contact", "company", "fn")
LABEL_HEADERS = ("label", "note", "notes", "comment", "comments", "description", "reason")
CATEGORY_HEADERS = ("category", "type", "cat", "kind")

Item = tuple[int, "Entry | str"]


@dataclass(frozen=True)
class FeedOptions:
    """How to turn a file's lines into entries (the import command line, as data)."""

    list_name: str = "block"
    region: str = "CN"
    category: str = ""
    source: str = "import"
    created_at: float = 0.0
    expires_at: float | None = None
    column: str | int | None = None  # CSV number column: 1-based index or header name
    categories: frozenset[str] | None = None  # known categories; None accepts any


class FeedError(ValueError):
    """The file as a whole cannot be read (not one bad line): e.g. --column names no column."""


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


def split_lines(text: str) -> list[str]:
    """Physical lines without their ending; LF, CRLF and old-Mac CR files alike.

    Only CR/LF end a line (not the Unicode separators str.splitlines also honours), so line
    numbers agree with what an editor shows.
    """
    if "\n" not in text and "\r" in text:
        lines = text.split("\r")
    else:
        lines = text.split("\n")
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


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


def _sniff_delimiter(sample: list[str]) -> str | None:
    """The delimiter most sample lines share (outside quotes), or None for one-column data."""
    best, best_n = None, 0
    bodies = [_COMMENT.split(_unquoted(ln), 1)[0] for ln in sample]  # "+86170*  # a, b": text
    for d in DELIMITERS:
        n = sum(1 for ln in bodies if d in ln)
        if n > best_n:
            best, best_n = d, n
    if best is None or best_n * 10 < len(sample) * 6:
        return None
    return best


def _unquoted(line: str) -> str:
    return re.sub(r'"[^"]*"', "", line)


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


# ------------------------------------------------------------------------------ one value

@lru_cache(maxsize=1024)
def _cc_prefix(digits3: str) -> tuple[int, tuple[re.Pattern, ...], int | None] | None:
    """(country code length, what phonenumbers strips after it, how many digits that can span).

    The strip patterns are every region's trunk prefix and ``national_prefix_for_parsing``
    (CN's includes carrier-selection codes such as 11627): a number whose national part starts
    with one of them is left to phonenumbers. When the patterns can only ever look at the first
    few digits (no anchors, bounded width) the verdict is cached on those digits.
    """
    for n in (1, 2, 3):
        regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(int(digits3[:n]))
        if regions:
            if "001" in regions:
                return None  # non-geographic: leave it to phonenumbers
            pats: list[re.Pattern] = []
            width: int | None = 1
            for r in regions:
                meta = phonenumbers.PhoneMetadata.metadata_for_region(r)
                if meta is None:
                    return None
                for p in (meta.national_prefix_for_parsing, national_prefix(r)):
                    if p:
                        pats.append(re.compile(p))
                        width = _max_width(p, width)
            return n, tuple(pats), width
    return None


def _max_width(pattern: str, acc: int | None) -> int | None:
    if acc is None or any(t in pattern for t in ("$", "^", "(?=", "(?!", "(?<", "\\b", "\\B")):
        return None  # anchors and lookarounds look beyond what they consume
    try:
        from re import _parser  # type: ignore[attr-defined]

        hi = _parser.parse(pattern).getwidth()[1]
    except Exception:
        return None
    return max(acc, hi) if hi <= 12 else None


@lru_cache(maxsize=65536)
def _strippable(cc_digits3: str, head: str) -> bool:
    """Whether phonenumbers might strip something from a national part starting with ``head``."""
    cc = _cc_prefix(cc_digits3)
    return cc is None or not head or head[0] == "0" or any(p.match(head) for p in cc[1])


@lru_cache(maxsize=64)
def _dials_00(region: str) -> bool:
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
    return bool(meta and meta.international_prefix and re.fullmatch(meta.international_prefix, "00"))


def fast_pattern(compact: str, region: str) -> Pattern | None:
    """The exact pattern of an already-international number without asking phonenumbers.

    phonenumbers costs ~20 us a number: 20 s for a million-line feed. A number written
    ``+<cc><national>`` (or ``00``... where 00 is the region's international prefix) whose
    national part starts neither with 0 nor with anything phonenumbers strips has exactly the
    E.164 form phonenumbers would give it (tests/test_feeds.py checks that against
    parse_pattern); anything else returns None and takes the full path.
    """
    # (+|00) then 7-15 ASCII digits, not 0 first (a regex fullmatch costs more than these tests)
    if compact[:1] == "+":
        digits = compact[1:]
    elif compact[:2] == "00":
        digits = compact[2:]
    else:
        return None
    if not (7 <= len(digits) <= 15 and digits.isdigit() and digits.isascii() and digits[0] != "0"):
        return None
    if compact[0] == "0" and not _dials_00(region):
        return None
    d3 = digits[:3]
    cc = _cc_prefix(d3)
    if cc is None:
        return None
    n, pats, width = cc
    rest = digits[n:]
    if width is not None:
        if len(rest) <= width or _strippable(d3, rest[:width]):
            return None
    elif not rest or rest[0] == "0" or any(p.match(rest) for p in pats):
        return None
    return make_pattern("exact", digits, "+" + digits)


def read_value(raw: str, region: str) -> Pattern:
    """One number or pattern from a file cell; raises PatternError with the reason."""
    compact = raw if raw[1:].isdigit() and raw[:1] == "+" else strip_visual(raw)  # most feeds: already bare
    p = fast_pattern(compact, region)
    if p is not None:
        return p
    return parse_pattern(raw, region)


def _show(raw: str, limit: int = 40) -> str:
    raw = raw.strip()
    return repr(raw[:limit]) + ("..." if len(raw) > limit else "")


def _category(value: str, opts: FeedOptions) -> tuple[str, str | None]:
    """(category, error) for a category cell: lower-cased, checked against the known ones."""
    cat = value.strip().lower()
    if not cat:
        return "", None
    if len(cat) > MAX_CATEGORY:
        return "", f"category longer than {MAX_CATEGORY} characters"
    if opts.categories is not None and cat not in opts.categories:
        return "", f"unknown category {_show(cat)} (configured: {', '.join(sorted(opts.categories))})"
    return cat, None


def _too_long(line: str) -> str | None:
    if len(line) > MAX_LINE:
        return f"line longer than {MAX_LINE} characters ({len(line)}); not read"
    return None


# ------------------------------------------------------------------------------ text
_COMMENT = re.compile(r"\s#")


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
        for i, (line_no, num, mid) in enumerate(zip(chunk.lines, chunk.nums, chunk.meta_ids)):
            name = lists[mid]
            if num is None:
                f = first((name, chunk.patterns[i]), line_no)
            else:
                f = first(num if name == "block" else -num, line_no)
            if f != line_no:
                out[i] = f
        return out

"""One cell of a feed file: the shared limits and options, and one number or pattern read from a
cell (``read_value``, with the fast path that skips phonenumbers for plain international numbers).

Split out of feeds.py (issue 18); ``edgefilter.lists.feeds`` re-exports the public names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import phonenumbers

from edgefilter.core.numbers import national_prefix, strip_visual
from edgefilter.lists.index import Entry, Pattern, make_pattern, parse_pattern

#: Longest line read; anything longer is refused as a line (not a number, and a memory hazard).
MAX_LINE = 4096
#: A quoted CSV field may span lines (address fields in contact exports), but not the whole file.
MAX_ROW_LINES = 50
MAX_CATEGORY = 64
DELIMITERS = ",;\t|"

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


_COMMENT = re.compile(r"\s#")


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


"""The patterns admins write and the entries of the block and allow lists: parsing a number,
prefix rule or digit mask into a canonical Pattern, and building Entry objects fast.

Split out of index.py (issue 18); ``edgefilter.lists.index`` re-exports every name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgefilter.core.errors import PatternError
from edgefilter.core.model import NumberKind
from edgefilter.core.numbers import country_digits, national_prefix, normalize, strip_visual

LISTS = ("block", "allow")
KINDS = ("exact", "prefix", "mask")
MAX_NOTE = 500


@dataclass(frozen=True, slots=True)
class Pattern:
    """A parsed list pattern in canonical form.

    ``key`` is what the index stores: E.164 digits without '+' for numbers and prefixes, the mask
    digits (with '#') for masks; ``text`` is the canonical spelling shown to admins and stored.
    """

    kind: str
    key: str
    text: str

    @classmethod
    def from_text(cls, text: str) -> Pattern:
        """Rebuild a Pattern from its canonical text (as stored); no region needed."""
        if text.endswith("*"):
            return cls("prefix", text[1:-1], text)
        if "#" in text:
            return cls("mask", text.lstrip("+"), text)
        return cls("exact", text.lstrip("+"), text)

    @property
    def fixed_digits(self) -> int:
        """How specific the pattern is: the number of digits it pins down."""
        if self.kind == "exact":
            return 100 + len(self.key)  # an exact number beats any pattern
        if self.kind == "mask":
            return len(self.key) - self.key.count("#")
        return len(self.key)


def parse_pattern(text: str, region: str) -> Pattern:
    """Read what an admin typed (or an import line) into a canonical Pattern; raise PatternError.

    National forms use ``region``: ``0301234*`` in DE is ``+49301234*``; ``00`` means international.
    """
    if not isinstance(text, str):
        raise PatternError(f"not a number or pattern: {text!r}")
    raw = text.strip()
    if not raw:
        raise PatternError("empty number or pattern")
    if len(raw) > 64:
        raise PatternError(f"too long to be a number or pattern ({len(raw)} characters)")
    compact = strip_visual(raw)
    if compact.endswith("*"):
        body = compact[:-1]
        if not re.fullmatch(r"\+?[0-9]+", body):
            raise PatternError(f"{raw!r}: a prefix rule is digits followed by one '*', e.g. +86170*")
        digits = _international_digits(body, region)
        if len(digits) < 2:
            raise PatternError(f"{raw!r}: prefix too short; it would match whole countries by accident")
        return Pattern("prefix", digits, f"+{digits}*")
    if "#" in compact:
        if not re.fullmatch(r"\+?[0-9#]+", compact) or compact.lstrip("+").startswith("#"):
            raise PatternError(f"{raw!r}: a digit mask is digits and '#' (one digit each), starting with a digit, e.g. +4121560####")
        digits = _international_digits(compact, region)
        if len(digits) > 20:
            raise PatternError(f"{raw!r}: mask longer than any phone number")
        return Pattern("mask", digits, f"+{digits}")
    num = normalize(raw, region)
    if num.kind in (NumberKind.WITHHELD, NumberKind.GARBAGE) or num.e164 is None:
        raise PatternError(f"{raw!r} is not a phone number, prefix rule (+86170*) or digit mask (+4121560####)")
    if num.kind is NumberKind.SHORT:
        return Pattern("exact", num.e164, num.e164)
    return Pattern("exact", num.e164.lstrip("+"), num.e164)


def _international_digits(body: str, region: str) -> str:
    """Digits of a prefix or mask in international form (country code first, no '+')."""
    if body.startswith("+"):
        return body[1:]
    if body.startswith("00"):
        return body[2:]
    trunk = national_prefix(region)
    rest = body[len(trunk):] if trunk and body.startswith(trunk) else body
    return country_digits(region) + rest


@dataclass(frozen=True, slots=True)
class Entry:
    """One list entry as the index holds it."""

    list: str
    pattern: Pattern
    category: str = ""
    note: str = ""
    source: str = "cli"
    created_at: float = 0.0
    expires_at: float | None = None

    def active(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True, slots=True)
class Match:
    """The winning entry for a number, and the best entry of the other list it beat, if any."""

    entry: Entry
    shadowed: Entry | None = None



# The Entry of a compact hit is built on every lookup that finds one: through the slot descriptors
# it costs half of the frozen dataclass __init__ (which sets each field through
# object.__setattr__). Same fields, same equality and hash: tests/test_index_compact.py compares.
_new = object.__new__
_P_KIND, _P_KEY, _P_TEXT = (Pattern.__dict__[n].__set__ for n in ("kind", "key", "text"))
_E_SETTERS = tuple(Entry.__dict__[n].__set__ for n in ("category", "note", "source", "created_at", "expires_at"))
_E_LIST, _E_PATTERN = Entry.__dict__["list"].__set__, Entry.__dict__["pattern"].__set__


_M_ENTRY, _M_SHADOWED = Match.__dict__["entry"].__set__, Match.__dict__["shadowed"].__set__
_E_CAT, _E_NOTE, _E_SOURCE, _E_CREATED, _E_EXPIRES = _E_SETTERS


def make_pattern(kind: str, key: str, text: str) -> Pattern:
    """``Pattern(kind, key, text)`` without the frozen-dataclass __init__ (a full load reads
    100,000 prefix rules); equal and hashing the same as the dataclass-built one."""
    p = _new(Pattern)
    _P_KIND(p, kind)
    _P_KEY(p, key)
    _P_TEXT(p, text)
    return p


def make_entry(list_name: str, pattern: Pattern, category: str, note: str, source: str, created_at: float,
               expires_at: float | None) -> Entry:
    """``Entry(...)`` with every field given, without the frozen-dataclass __init__ (bulk imports)."""
    e = _new(Entry)
    _E_LIST(e, list_name)
    _E_PATTERN(e, pattern)
    s_cat, s_note, s_source, s_created, s_expires = _E_SETTERS
    s_cat(e, category)
    s_note(e, note)
    s_source(e, source)
    s_created(e, created_at)
    s_expires(e, expires_at)
    return e

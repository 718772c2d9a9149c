"""Block and allow lists: the patterns admins write and the in-memory index the call path reads.

Three kinds of entry, all keyed on E.164 digits so that every way a trunk writes a number
matches: exact numbers (``+8613800138000``, or a short number ``95588``), prefix rules
(``+86170*``) and fixed-length digit masks (``+4121560####``). The longest match wins; at equal
length allow beats block. The index is plain dicts (O(1) exact lookups, at most ~20 probes for
prefixes) so the per-call lookup costs microseconds and never touches the database.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from .errors import PatternError
from .model import NumberKind
from .numbers import country_digits, national_prefix, normalize, strip_visual

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
    def from_text(cls, text: str) -> "Pattern":
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


class ListIndex:
    """In-memory index of both lists. Not thread-safe: owned by the event loop."""

    def __init__(self) -> None:
        self._exact: dict[str, list[Entry]] = {}
        self._prefix: dict[str, list[Entry]] = {}
        self._prefix_lengths: list[int] = []
        self._mask: dict[tuple[str, int], list[Entry]] = {}
        self._mask_heads: set[int] = set()
        self.size = 0
        self._counts = {name: 0 for name in LISTS}  # kept in step so counts() is O(1) (gauges)

    # -- mutation -------------------------------------------------------------------------
    def _bucket(self, p: Pattern) -> tuple[dict, object]:
        if p.kind == "exact":
            return self._exact, p.key
        if p.kind == "prefix":
            return self._prefix, p.key
        head = p.key.split("#", 1)[0]
        return self._mask, (head, len(p.key))

    def put(self, entry: Entry) -> None:
        """Insert or replace the entry with the same list and pattern."""
        table, key = self._bucket(entry.pattern)
        bucket = table.setdefault(key, [])
        for i, old in enumerate(bucket):
            if old.list == entry.list and old.pattern == entry.pattern:
                bucket[i] = entry
                return
        bucket.append(entry)
        self.size += 1
        self._counts[entry.list] = self._counts.get(entry.list, 0) + 1
        if entry.pattern.kind == "prefix" and len(key) not in self._prefix_lengths:
            self._prefix_lengths.append(len(key))
            self._prefix_lengths.sort(reverse=True)
        elif entry.pattern.kind == "mask":
            self._mask_heads.add(len(key[0]))

    def remove(self, list_name: str, pattern: Pattern) -> bool:
        table, key = self._bucket(pattern)
        bucket = table.get(key)
        if not bucket:
            return False
        for i, old in enumerate(bucket):
            if old.list == list_name and old.pattern == pattern:
                del bucket[i]
                if not bucket:
                    del table[key]
                self.size -= 1
                self._counts[list_name] -= 1
                return True
        return False

    def extend(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            self.put(e)

    def exact(self, key: str) -> list[Entry]:
        """Entries (both lists) for one exact number key; empty if none."""
        return list(self._exact.get(key, ()))

    def exact_keys(self) -> Iterator[str]:
        """Every exact number key held (either list)."""
        return iter(list(self._exact))

    def __iter__(self) -> Iterator[Entry]:
        for table in (self._exact, self._prefix, self._mask):
            for bucket in table.values():
                yield from bucket

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, digits: str | None, now: float | None = None) -> Match | None:
        """Best active entry for E.164 digits (no '+'), or None. Microseconds; no I/O."""
        if not digits:
            return None
        now = time.time() if now is None else now
        best: dict[str, tuple[int, Entry]] = {}

        def consider(entries: list[Entry], spec: int) -> None:
            for e in entries:
                if e.active(now):
                    cur = best.get(e.list)
                    if cur is None or spec > cur[0]:
                        best[e.list] = (spec, e)

        bucket = self._exact.get(digits)
        if bucket:
            consider(bucket, 100 + len(digits))
        n = len(digits)
        for length in self._prefix_lengths:
            if length <= n:
                bucket = self._prefix.get(digits[:length])
                if bucket:
                    consider(bucket, length)
        for head in self._mask_heads:
            bucket = self._mask.get((digits[:head], n))
            if bucket:
                for e in bucket:
                    if _mask_matches(e.pattern.key, digits):
                        consider([e], e.pattern.fixed_digits)
        if not best:
            return None
        allow, block = best.get("allow"), best.get("block")
        if allow and block:
            if allow[0] >= block[0]:
                return Match(allow[1], shadowed=block[1])
            return Match(block[1], shadowed=allow[1])
        return Match((allow or block)[1])

    def counts(self) -> dict[str, int]:
        """Entries per list (including expired ones not yet purged); O(1), for periodic gauges."""
        return dict(self._counts)


def _mask_matches(mask: str, digits: str) -> bool:
    if len(mask) != len(digits):
        return False
    for m, d in zip(mask, digits):
        if m != "#" and m != d:
            return False
    return True

"""Durations as admins write them in config and on the command line: ``"300ms"``, ``"10m"``, ``"30d"``.

A bare number is refused on purpose: ``timeout = 5`` is ambiguous (seconds? ms?) and an admin
who meant 5 ms gets 5 s. Strings with a unit read the same in every file.
"""

from __future__ import annotations

import re
from datetime import datetime

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    """Return seconds for ``"300ms"``, ``"1h30m"``, ``"30d"``; raise ValueError with the allowed units."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string such as \"300ms\" or \"10m\", got {text!r}")
    s = text.strip().lower().replace(" ", "")
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit (ms, s, m, h, d, w), e.g. \"300ms\", \"30d\""
        )
    return total


def format_duration(seconds: float) -> str:
    """The shortest exact spelling, for ``config dump`` and messages."""
    if seconds == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s"):
        n = seconds / _UNITS[unit]
        if n >= 1 and abs(n - round(n)) < 1e-9:
            return f"{int(round(n))}{unit}"
    return f"{seconds * 1000:g}ms"


def parse_offset_or_date(text: str, now: float, *, sign: int) -> float:
    """A time given as a duration from ``now`` (``sign`` +1 forward, -1 back: ``30d``) or as a
    date (``2026-12-31``, local midnight); ValueError when it is neither. Used by ``--expires``
    and ``--since`` so both options read the same two spellings."""
    try:
        return now + sign * parse_duration(text)
    except ValueError:
        pass
    return datetime.strptime(text, "%Y-%m-%d").timestamp()

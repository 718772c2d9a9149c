"""Value parsers for the config schema: each turns one TOML value into its typed form or says why not.

A parser raises ``_Invalid`` with the bare reason and no location: the schema check (schema.py)
prefixes file, table and key, so one parser serves every table that holds such a value, and the
build (build.py) can parse the merged value again without repeating where it came from.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable
from datetime import time as dtime
from typing import Any

import phonenumbers

from edgefilter.core.durations import parse_duration
from edgefilter.core.model import THRESHOLD_ACTIONS, Action

#: Reject causes the dial plan knows how to send (``[actions] reject_cause``): Q.850 causes 21
#: (SIP 403 Forbidden) and 17 (486 Busy Here) through Hangup(), SIP 607 Unwanted and 608
#: Rejected through PJSIPHangup(). The dial plan's reject branch names exactly these.
REJECT_CAUSES = ("21", "17", "607", "608")
RULE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{1,63}\Z")  # \Z: "$" would accept a trailing LF
SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class _Invalid(Exception):
    """Raised by a type checker; the message is completed with file and key by the caller."""


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"expected a string, got {type(v).__name__} {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"expected true or false, got {v!r}")
    return v


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Invalid(f"expected an integer, got {v!r}")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise _Invalid(f"{v} is out of range ({lo}..{hi if hi is not None else ''})")
        return v

    return check


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Invalid(f"expected a number, got {v!r}")
    return float(v)


def _duration(v: Any) -> float:
    try:
        return parse_duration(v)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _action(v: Any) -> Action:
    try:
        return Action.parse(_str(v))
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = _str(v)
        if s not in choices:
            raise _Invalid(f"{s!r} is not one of: {', '.join(choices)}")
        return s

    return check


def _region(v: Any) -> str:
    s = _str(v).upper()
    if s not in phonenumbers.SUPPORTED_REGIONS:
        raise _Invalid(f"{v!r} is not an ISO 3166 region phonenumbers knows (e.g. \"CN\", \"US\", \"DE\")")
    return s


def _hostport(v: Any) -> tuple[str, int]:
    s = _str(v)
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise _Invalid(f"expected \"host:port\", e.g. \"127.0.0.1:4573\", got {s!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _address(*, listen: bool) -> Callable[[Any], tuple[str, int] | None]:
    """An optional "host:port": "" turns the output off; port 0 only where we listen (tests)."""

    def check(v: Any) -> tuple[str, int] | None:
        if _str(v).strip() == "":
            return None
        host, port = _hostport(v.strip())
        if port == 0 and not listen:
            raise _Invalid(f"{v!r}: port 0 is not a destination; use the collector's port, or \"\" to turn this off")
        if not host or re.search(r"[\s/\\]", host):
            raise _Invalid(f"{v!r}: expected \"host:port\" (IPv6 as \"[::1]:8125\")")
        return host, port

    return check


SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}


def _metric_prefix(v: Any) -> str:
    s = _str(v)
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", s) or len(s) > 64:
        raise _Invalid(f"{s!r}: dot-separated words of letters, digits, '_' and '-' (e.g. \"edgefilter\" or \"pbx1.edgefilter\")")
    return s


def _app_name(v: Any) -> str:
    s = _str(v)
    if not re.fullmatch(r"[\x21-\x7e]{1,48}", s):
        raise _Invalid(f"{s!r}: 1 to 48 printable ASCII characters without spaces (RFC 5424 APP-NAME)")
    return s


def _pg_url(v: Any) -> str:
    s = _str(v).strip()
    if s and not re.match(r"^postgres(ql)?://[^\s]+$", s):
        raise _Invalid(f"expected \"postgresql://user@host:port/database\" (or empty for SQLite), got {s!r}")
    return s


def _node_name(v: Any) -> str:
    s = _str(v).strip()
    if s and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", s):
        raise _Invalid(f"{s!r}: a node name is 1-64 letters, digits, '.', '_' or '-' (e.g. \"pbx-beijing-1\")")
    return s


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    def check(v: Any) -> tuple:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise _Invalid(f"expected a list, got {v!r}")
        return tuple(item(x) for x in v)

    return check


def _network(v: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(_str(v), strict=False)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _regex_str(pattern: str, what: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = _str(v)
        if not re.fullmatch(pattern, s):
            raise _Invalid(f"{s!r}: expected {what}")
        return s

    return check


#: Characters a value the service echoes into the AGI stream may hold: exactly what
#: agi.safe_value keeps, so nothing an admin writes is silently dropped on the wire. No quote,
#: backslash, comma, '$', parenthesis, '=' or control byte: none can end the MSet argument,
#: split it, nest or expand in the dial plan.
ECHO_SAFE = re.compile(r"^[A-Za-z0-9_.:+\-\[\]?!#/@*]([A-Za-z0-9_ .:+\-\[\]?!#/@*]{0,38}[A-Za-z0-9_.:+\-\[\]?!#/@*])?\Z")


def _echo_text(v: Any) -> str:
    """Text the service echoes into the AGI stream (tags): a strict character set, 1-40 chars."""
    s = _str(v)
    if not ECHO_SAFE.match(s) or not _balanced(s):
        raise _Invalid(
            f"{s!r}: 1 to 40 characters from A-Z a-z 0-9 and _ . : + - [ ] ? ! # / @ * (spaces inside only); "
            "brackets balanced; no quotes, commas, backslashes, '$', parentheses, '=', non-ASCII or control characters"
        )
    return s


def _reject_cause(v: Any) -> str:
    s = str(v) if isinstance(v, int) and not isinstance(v, bool) else _str(v)
    if s not in REJECT_CAUSES:
        raise _Invalid(
            f"{v!r} is not a reject cause the dial plan sends; use \"21\" (SIP 403), \"17\" (486 Busy), "
            "\"607\" (Unwanted) or \"608\" (Rejected)"
        )
    return s


def _mailbox(v: Any) -> str:
    """A VoiceMail() mailbox as the service sends it: ``box`` or ``box@context``, or empty."""
    s = _str(v)
    if s and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}(@[A-Za-z0-9_-]{1,40})?", s):
        raise _Invalid(f"{s!r}: a mailbox is \"box\" or \"box@context\" (letters, digits, '_' and '-')")
    return s


def _balanced(s: str) -> bool:
    """Asterisk's MSet nests on '[': an unclosed one would swallow the variables after it."""
    depth = 0
    for ch in s:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _regex(v: Any) -> re.Pattern:
    try:
        return re.compile(_str(v))
    except re.error as e:
        raise _Invalid(f"invalid regular expression {v!r}: {e}") from None


def _hhmm_range(v: Any) -> tuple[dtime, dtime]:
    s = _str(v)
    m = re.fullmatch(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})", s)
    if not m:
        raise _Invalid(f"expected \"HH:MM-HH:MM\", got {s!r}")
    h1, m1, h2, m2 = map(int, m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
        raise _Invalid(f"hour/minute out of range in {s!r}")
    end = dtime(23, 59, 59, 999999) if h2 == 24 else dtime(h2, m2)
    return dtime(h1, m1), end


def _days(v: Any) -> frozenset[int]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise _Invalid(f"expected day names such as [\"mon-fri\", \"sat\"], got {v!r}")
    out: set[int] = set()
    for item in items:
        s = _str(item).strip().lower()
        a, _, b = s.partition("-")
        if a not in DAYS or (b and b not in DAYS):
            raise _Invalid(f"unknown day {s!r}: use mon, tue, wed, thu, fri, sat, sun or a range like \"mon-fri\"")
        i, j = DAYS.index(a), DAYS.index(b or a)
        k = i
        while True:
            out.add(k)
            if k == j:
                break
            k = (k + 1) % 7
    return frozenset(out)


def _rule_key(name: str) -> str | None:
    if not RULE_NAME.match(name):
        return "rule names are UPPER_SNAKE_CASE (e.g. NAME_AUTODIALER)"
    return None


def _safe_key(name: str) -> str | None:
    if not SAFE_NAME.match(name):
        return "names use lowercase letters, digits, '_' and '-'"
    return None


def _weights(v: Any) -> dict[str, float]:
    if not isinstance(v, dict):
        raise _Invalid("expected a table of RULE = weight")
    out = {}
    for k, w in v.items():
        if not RULE_NAME.match(k):
            raise _Invalid(f"{k!r} is not a rule name")
        out[k] = _float(w)
    return out


def _thresholds_override(v: Any) -> dict[Action, float]:
    if not isinstance(v, dict):
        raise _Invalid("expected a table such as { tag = 2, reject = 12 }")
    out = {}
    for k, t in v.items():
        if k not in {a.value for a in THRESHOLD_ACTIONS}:
            raise _Invalid(f"{k!r} is not a threshold; use tag, challenge, voicemail or reject")
        out[Action(k)] = _float(t)
    return out


def _action_map(v: Any) -> dict[Action, Action]:
    if not isinstance(v, dict):
        raise _Invalid("expected a table such as { tag = \"voicemail\" }")
    out = {}
    for k, a in v.items():
        try:
            out[Action.parse(k)] = Action.parse(_str(a))
        except ValueError as e:
            raise _Invalid(str(e)) from None
    return out


#: Placeholders a reputation source may put in its url, headers and body.
REPUTATION_PLACEHOLDERS = ("e164", "digits", "sha256", "sha256_digits", "api_key")
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")
_JSON_PATH = re.compile(r"^[A-Za-z0-9_$@-]+(\[\d+\])*(\.[A-Za-z0-9_$@-]+(\[\d+\])*)*$|^(\[\d+\])+(\.[A-Za-z0-9_$@-]+(\[\d+\])*)*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")


def _template(v: Any) -> str:
    s = _str(v)
    if re.search(r"[\x00-\x1f\x7f]", s):
        raise _Invalid("control characters (CR, LF...) are not allowed in a request template")
    for name in _PLACEHOLDER.findall(s):
        if name not in REPUTATION_PLACEHOLDERS:
            raise _Invalid(
                f"unknown placeholder {{{name}}}{_suggest(name, REPUTATION_PLACEHOLDERS)}; "
                f"use {', '.join('{' + p + '}' for p in REPUTATION_PLACEHOLDERS)}"
            )
    return s


def _url_template(v: Any) -> str:
    s = _template(v)
    host = re.match(r"^https?://([^/?#]*)", s)
    if not host or not host.group(1) or re.search(r"[\s{}]", host.group(1)):
        raise _Invalid(f"{s!r}: expected an http:// or https:// URL with a fixed host, e.g. \"https://api.example.org/v1/{{e164}}\"")
    return s


def _headers(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise _Invalid("expected a table such as { Authorization = \"Bearer {api_key}\" }")
    out = {}
    for k, val in v.items():
        if not _HEADER_NAME.match(k):
            raise _Invalid(f"{k!r} is not a valid HTTP header name")
        out[k] = _template(val)
    return out


def _json_path(v: Any) -> str:
    s = _str(v)
    if not _JSON_PATH.match(s):
        raise _Invalid(f"{s!r}: expected a dotted path such as \"data.score\" or \"results[0].category\"")
    return s


def _statuses(v: Any) -> tuple[int, ...]:
    items = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(items, list) or not items:
        raise _Invalid(f"expected an HTTP status or a list of them (e.g. 200 or [200, 204]), got {v!r}")
    return tuple(_int(100, 599)(x) for x in items)


def _float_table(v: Any) -> dict[str, float]:
    if not isinstance(v, dict):
        raise _Invalid("expected a table such as { scam = 15.0, marketing = 5.0 }")
    return {str(k).lower(): _float(w) for k, w in v.items()}


def _score_weights(v: Any) -> tuple[tuple[float, float], ...]:
    """``{ 50 = 3.0, 80 = 8.0, "0.5" = 1.0 }``: a score reaching a key gets that key's weight."""
    if not isinstance(v, dict) or not v:
        raise _Invalid("expected a table of score = weight, e.g. { 50 = 3.0, 80 = 8.0 }")
    out = []
    for k, w in v.items():
        try:
            t = float(k)
        except ValueError:
            raise _Invalid(f"{k!r} is not a score (keys are numbers; quote decimals: \"0.5\" = 1.0)") from None
        out.append((t, _float(w)))
    return tuple(sorted(out))


def _request_timeout(v: Any) -> float:
    """A request must end: 0 would mean "no timeout" to the HTTP client and pin a slot forever."""
    t = _duration(v)
    if not 0.01 <= t <= 60:
        raise _Invalid(f"{v!r}: a request timeout is between 10ms and 60s")
    return t


def _method(v: Any) -> str:
    s = _str(v).upper()
    if s not in ("GET", "POST", "HEAD"):
        raise _Invalid(f"{v!r} is not one of: GET, POST, HEAD")
    return s


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

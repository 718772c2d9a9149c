"""Admin configuration: layered TOML files -> one validated, typed, immutable Settings object.

Layering follows fail2ban's jail.conf/jail.local and rspamd's local.d: the shipped
``defaults.toml`` inside the package, then the admin's ``edgefilter.toml``, then every
``conf.d/*.toml`` beside it in sorted order; later files win key by key. Each file is checked
against the schema on its own so that an error names the file that holds the mistake, and the
merged result is checked again for cross-key rules (ascending thresholds, references between
tables). Config flows once: the service and CLI build a Settings and pass it down; nothing
else reads files or the environment.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from edgefilter.core.durations import format_duration, parse_duration
from edgefilter.core.errors import ConfigError
from edgefilter.core.model import THRESHOLD_ACTIONS, Action

DEFAULTS_PATH = Path(__file__).resolve().parent.parent / "defaults.toml"  # at the package root, where admins look
#: Looked up in this order when no --config is given (the first that exists is used).
DEFAULT_CONFIG_PATHS = (Path("edgefilter.toml"), Path("/etc/edgefilter/edgefilter.toml"))
CONFIG_ENV = "EDGEFILTER_CONFIG"

BUILTIN_RULES = (
    "LIST_ALLOWED",
    "LIST_BLOCKED",
    "LIST_CATEGORY",
    "CLI_WITHHELD",
    "CLI_INVALID",
    "CLI_GARBAGE",
    "CLI_SHORT",
    "CLI_FORGED",
    "CLI_FILTERED",
    "POLICY_NEVER_BLOCK",
    "POLICY_ALLOWLIST_ONLY",
    "SCREEN_ERROR",
    "SCREEN_TIMEOUT",
    "CHALLENGE_FAILED",
    "REPUTATION_LISTED",
    "REPUTATION_PENDING",
    "REPUTATION_ERROR",
    "REPUTATION_UNAVAILABLE",
)
#: Reject causes the dial plan knows how to send (``[actions] reject_cause``): Q.850 causes 21
#: (SIP 403 Forbidden) and 17 (486 Busy Here) through Hangup(), SIP 607 Unwanted and 608
#: Rejected through PJSIPHangup(). The dial plan's reject branch names exactly these.
REJECT_CAUSES = ("21", "17", "607", "608")
RULE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{1,63}$")
SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
RULE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{1,63}\Z")  # \Z: "$" would accept a trailing LF
SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# --------------------------------------------------------------------------- schema types
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


class _Table:
    """A table whose keys are admin-chosen names (rules, policies...) each holding ``fields``."""

    def __init__(self, fields: dict[str, Callable[[Any], Any]], key_check: Callable[[str], str | None]):
        self.fields = fields
        self.key_check = key_check


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


class _Section:
    """A table with fixed keys plus named sub-tables of admin-chosen entries.

    ``[reputation]`` holds defaults for every source and ``[reputation.sources.NAME]`` one table
    per source: both validated as strictly as the flat sections (file, key, suggestion).
    """

    def __init__(self, fields: dict[str, Callable[[Any], Any]], tables: dict[str, _Table]):
        self.fields = fields
        self.tables = tables


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


REPUTATION_SOURCE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "url": _url_template,
    "method": _method,
    "headers": _headers,
    "body": _template,
    "api_key_file": _str,
    "json_path": _json_path,
    "listed_status": _statuses,
    "unlisted_status": _statuses,
    "weight": _float,
    "weight_per_point": _float,
    "min_score": _float,
    "score_weights": _score_weights,
    "category_weights": _float_table,
    "timeout": _request_timeout,
    "ttl_positive": _duration,
    "ttl_negative": _duration,
    "max_in_flight": _int(1, 1000),
    "breaker_failures": _int(1, 1000),
    "breaker_cooldown": _duration,
    "enabled": _bool,
    "description": _str,
}


SCHEMA: dict[str, Any] = {
    "agi": {
        "listen": _hostport,
        "read_timeout": _duration,
        "max_env_bytes": _int(1024, 1 << 20),
        "max_sessions": _int(1, 100000),
        "allow_peers": _list_of(_network),
        "workers": _int(1, 64),
        "event_loop": _choice("auto", "uvloop", "asyncio"),
    },
    "store": {
        "path": _str,
        "poll_interval": _duration,
        "history_retention": _duration,
        "busy_timeout": _duration,
        "url": _pg_url,
        "password_file": _str,
        "node": _node_name,
        "spool_path": _str,
        "spool_max": _int(100, 100_000_000),
    },
    "numbers": {"default_region": _region},
    "screen": {
        "budget": _duration,
        "on_error": _action,
        "mode": _choice("enforce", "log-only"),
        "timezone": _str,
        "tag_text": _echo_text,
        "allowlist_only_action": _action,
    },
    "actions": {
        "reject_cause": _reject_cause,
        "reject_sit": _bool,
        "voicemail_box": _mailbox,
        "tag_category": _bool,
    },
    "challenge": {
        "retries": _int(0, 5),
        "timeout": _duration,
        "allow_for": _duration,
        "fail_window": _duration,
        "hangup_is_failure": _bool,
        "max_pending": _int(1, 1000000),
    },
    "appeal": {
        "enabled": _bool,
        "rules": _list_of(_regex_str(r"[A-Z][A-Z0-9_]{1,63}", "rule names (UPPER_SNAKE_CASE)")),
        "refused_before": _bool,
        "digit": _regex_str(r"[0-9]", "one digit, 0-9"),
        "timeout": _duration,
        "max_seconds": _int(5, 300),
        "cooldown": _duration,
        "max_pending": _int(1, 1_000_000),
        "max_offers": _int(1, 10000),
        "retention": _duration,
        "grant_for": _duration,
        "recordings_dir": _str,
        "webhook": _str,
        "webhook_timeout": _duration,
    },
    "mirror": {
        "enabled": _bool,
        "family": _regex_str(r"[A-Za-z0-9_-]{1,40}", "letters, digits, '_' and '-' (an AstDB family)"),
        "max_entries": _int(0, 1000000),
    },
    "ami": {
        "enabled": _bool,
        "host": _str,
        "port": _int(1, 65535),
        "user": _str,
        "secret_file": _str,
        "secret_env": _str,
        "connect_timeout": _duration,
        "ping_interval": _duration,
        "ping_timeout": _duration,
        "backoff_initial": _duration,
        "backoff_max": _duration,
        "action_timeout": _duration,
    },
    "behaviour": {
        "enabled": _bool,
        "memory_calls": _int(100, 10_000_000),
        "burst_window": _duration,
        "burst_calls": _int(2, 100000),
        "burst_step": _float,
        "spread_window": _duration,
        "spread_targets": _int(2, 100000),
        "short_window": _duration,
        "short_seconds": _duration,
        "short_share": _float,
        "short_min_calls": _int(1, 100000),
        "campaign_window": _duration,
        "campaign_numbers": _int(2, 100000),
        "campaign_block_digits": _int(1, 8),
        "neighbour_digits": _int(3, 15),
        "known_contact_talk": _duration,
        "known_contact_ttl": _duration,
        "outbound_contexts": _list_of(_str),
        "refusal_scope": _choice("callee", "anyone"),
        "stir_ok_results": _list_of(_str),
    },
    "log": {
        "level": _choice("debug", "info", "warning", "error"),
        "format": _choice("kv", "json"),
    },
    "thresholds": {a.value: _float for a in THRESHOLD_ACTIONS},
    "outputs": {
        "statsd": _address(listen=False),
        "statsd_prefix": _metric_prefix,
        "syslog": _address(listen=False),
        "syslog_facility": _choice(*SYSLOG_FACILITIES),
        "syslog_app_name": _app_name,
        "prometheus": _address(listen=True),
        "gauge_interval": _duration,
        "queue_size": _int(10, 1_000_000),
    },
    "rules": _Table(
        {
            "weight": _float,
            "group": _str,
            "force": _action,
            "description": _str,
            "name_pattern": _regex,
            "enabled": _bool,
        },
        _rule_key,
    ),
    "groups": _Table({"max": _float, "description": _str}, _safe_key),
    "categories": _Table(
        {"weight": _float, "force": _action, "schedule": _str, "description": _str}, _safe_key
    ),
    "schedules": _Table(
        {"days": _days, "hours": _list_of(_hhmm_range), "description": _str}, _safe_key
    ),
    "policies": _Table(
        {
            "description": _str,
            "match_did": _list_of(_str),
            "match_extension": _list_of(_str),
            "match_context": _list_of(_str),
            "schedule": _str,
            "thresholds": _thresholds_override,
            "weights": _weights,
            "actions": _action_map,
            "allowlist_only": _bool,
            "never_block": _list_of(_str),
            "appeal": _bool,
        },
        _safe_key,
    ),
    "reputation": _Section(
        {
            "max_in_flight": _int(1, 10000),
            "margin": _duration,
            "cache_size": _int(0, 10_000_000),
            "timeout": _request_timeout,
            "ttl_positive": _duration,
            "ttl_negative": _duration,
            "source_max_in_flight": _int(1, 1000),
            "breaker_failures": _int(1, 1000),
            "breaker_cooldown": _duration,
        },
        {"sources": _Table(REPUTATION_SOURCE_FIELDS, _safe_key)},
    ),
}


# --------------------------------------------------------------------------- typed settings
@dataclass(frozen=True)
class AgiSettings:
    listen: tuple[str, int]
    read_timeout: float
    max_env_bytes: int
    max_sessions: int
    allow_peers: tuple
    workers: int = 1
    event_loop: str = "auto"  # uvloop when installed (eventloop.py), or "uvloop" / "asyncio"


@dataclass(frozen=True)
class StoreSettings:
    path: str
    poll_interval: float
    history_retention: float
    busy_timeout: float = 5.0
    url: str = ""  # postgresql://... selects PostgreSQL; empty: the SQLite file at ``path``
    password_file: str = ""
    node: str = ""  # this node's name in shared call records (default: the host name)
    spool_path: str = "var/edgefilter-spool.db"  # default: beside the SQLite `path`
    spool_max: int = 100000

    @property
    def backend(self) -> str:
        return "postgresql" if self.url else "sqlite"

    @property
    def where(self) -> str:
        """The database in words for logs: the SQLite path or the URL without its password."""
        return redact_url(self.url) if self.url else self.path


def redact_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db`` (for logs and errors)."""
    return re.sub(r"^(\w+://[^:/@]*):[^@]*@", r"\1:***@", url)


@dataclass(frozen=True)
class ScreenSettings:
    budget: float
    on_error: Action
    mode: str
    timezone: str
    tag_text: str
    allowlist_only_action: Action


@dataclass(frozen=True)
class OutputsSettings:
    """Where decisions and metrics go besides the log line; None = that output is off."""

    statsd: tuple[str, int] | None = None
    statsd_prefix: str = "edgefilter"
    syslog: tuple[str, int] | None = None
    syslog_facility: str = "local0"
    syslog_app_name: str = "edgefilter"
    prometheus: tuple[str, int] | None = None
    gauge_interval: float = 10.0
    queue_size: int = 10000


@dataclass(frozen=True)
class ActionSettings:
    """How the dial plan carries out reject, voicemail and tag (sent as EDGEFILTER_* variables)."""

    reject_cause: str = "21"
    reject_sit: bool = False
    voicemail_box: str = ""
    tag_category: bool = True


@dataclass(frozen=True)
class ChallengeSettings:
    """The "press N" challenge: attempts, timing, what a pass buys and how long a fail counts."""

    retries: int = 1
    timeout: float = 5.0
    allow_for: float = 30 * 86400.0
    fail_window: float = 30 * 86400.0
    hangup_is_failure: bool = True
    max_pending: int = 10000


@dataclass(frozen=True)
class AppealSettings:
    """[appeal]: a refused caller may press a digit, say why, and get a reference (appeals.py)."""

    enabled: bool = False
    rules: tuple[str, ...] = ()  # empty: any refusal; else only refusals one of these rules fired on
    refused_before: bool = False  # refusals while the callee's refusal (REFUSED_BEFORE) is in force
    digit: str = "1"
    timeout: float = 6.0
    max_seconds: int = 30
    cooldown: float = 30 * 86400.0
    max_pending: int = 100
    max_offers: int = 20
    retention: float = 90 * 86400.0
    grant_for: float = 30 * 86400.0
    recordings_dir: str = ""
    webhook: str = ""
    webhook_timeout: float = 5.0


@dataclass(frozen=True)
class MirrorSettings:
    """Hard blocks mirrored into Asterisk's database (AstDB) for when the service is down."""

    enabled: bool = True
    family: str = "edgefilter-block"
    max_entries: int = 10000


@dataclass(frozen=True)
class AmiSettings:
    """[ami]: the Asterisk Manager connection that feeds call outcomes (never the call path)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 5038
    user: str = "edgefilter"
    secret_file: str = ""
    secret_env: str = ""
    connect_timeout: float = 5.0
    ping_interval: float = 10.0
    ping_timeout: float = 5.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    action_timeout: float = 5.0


@dataclass(frozen=True)
class BehaviourSettings:
    """[behaviour]: windows and thresholds of the history rules (weights live in [rules.X])."""

    enabled: bool = True
    memory_calls: int = 100000
    burst_window: float = 60.0
    burst_calls: int = 5
    burst_step: float = 2.0
    spread_window: float = 600.0
    spread_targets: int = 5
    short_window: float = 3600.0
    short_seconds: float = 6.0
    short_share: float = 0.6
    short_min_calls: int = 4
    campaign_window: float = 600.0
    campaign_numbers: int = 5
    campaign_block_digits: int = 4
    neighbour_digits: int = 7
    known_contact_talk: float = 60.0
    known_contact_ttl: float = 180 * 86400.0
    outbound_contexts: tuple[str, ...] = ()
    refusal_scope: str = "callee"
    stir_ok_results: tuple[str, ...] = ()

    @property
    def horizon(self) -> float:
        """How far back the in-memory history must reach to serve every window."""
        return max(self.burst_window, self.spread_window, self.short_window, self.campaign_window)


@dataclass(frozen=True)
class RuleSettings:
    name: str
    weight: float
    group: str = ""
    force: Action | None = None
    description: str = ""
    name_pattern: re.Pattern | None = None
    enabled: bool = True


@dataclass(frozen=True)
class CategorySettings:
    name: str
    weight: float = 0.0
    force: Action | None = None
    schedule: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Schedule:
    """Weekdays and time ranges; a time is inside when its weekday and clock time both match."""

    name: str
    days: frozenset[int] = frozenset(range(7))
    hours: tuple[tuple[dtime, dtime], ...] = ((dtime(0, 0), dtime(23, 59, 59, 999999)),)
    description: str = ""

    def active(self, when: datetime) -> bool:
        if when.weekday() not in self.days:
            return False
        t = when.time()
        for start, end in self.hours:
            if start <= end:
                if start <= t < end or (end == dtime(23, 59, 59, 999999) and t >= start):
                    return True
            elif t >= start or t < end:  # crosses midnight, e.g. 18:00-08:00
                return True
        return False


@dataclass(frozen=True)
class Policy:
    name: str
    order: int
    description: str = ""
    match_did: tuple[str, ...] = ()
    match_extension: tuple[str, ...] = ()
    match_context: tuple[str, ...] = ()
    schedule: str | None = None  # name, or "!name" for "outside that schedule"
    thresholds: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    actions: dict = field(default_factory=dict)
    allowlist_only: bool | None = None
    never_block: tuple[str, ...] = ()
    appeal: bool | None = None  # [appeal] enabled for this line (None: as the global switch says)

    @property
    def specificity(self) -> int:
        if self.match_did:
            return 3
        if self.match_extension:
            return 2
        if self.match_context:
            return 1
        return 0


@dataclass(frozen=True)
class ReputationSource:
    """One online reputation service, as ``[reputation.sources.NAME]`` declares it."""

    name: str
    url: str
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    api_key: str = field(default="", repr=False)  # read from api_key_file; never logged
    api_key_file: str = ""
    json_path: str = ""
    listed_status: tuple[int, ...] = ()
    unlisted_status: tuple[int, ...] = ()
    weight: float | None = None
    weight_per_point: float | None = None
    min_score: float | None = None
    score_weights: tuple[tuple[float, float], ...] = ()
    category_weights: dict = field(default_factory=dict)
    timeout: float = 2.0
    ttl_positive: float = 86400.0
    ttl_negative: float = 21600.0
    max_in_flight: int = 8
    breaker_failures: int = 5
    breaker_cooldown: float = 60.0
    enabled: bool = True
    description: str = ""


@dataclass(frozen=True)
class ReputationSettings:
    """``[reputation]``: limits shared by every source, and the sources themselves."""

    max_in_flight: int = 32
    margin: float = 0.05
    cache_size: int = 100000
    sources: tuple[ReputationSource, ...] = ()

    @property
    def active(self) -> tuple[ReputationSource, ...]:
        return tuple(src for src in self.sources if src.enabled)


@dataclass(frozen=True)
class Settings:
    agi: AgiSettings
    store: StoreSettings
    default_region: str
    screen: ScreenSettings
    log_level: str
    log_format: str
    thresholds: dict[Action, float]
    rules: dict[str, RuleSettings]
    groups: dict[str, float | None]
    categories: dict[str, CategorySettings]
    schedules: dict[str, Schedule]
    policies: tuple[Policy, ...]
    sources: tuple[str, ...] = ()  # files merged, in order (for `config check` and logs)
    raw: dict = field(default_factory=dict, repr=False)  # merged plain values, for `config dump`
    outputs: OutputsSettings = OutputsSettings()
    actions: ActionSettings = field(default_factory=ActionSettings)
    challenge: ChallengeSettings = field(default_factory=ChallengeSettings)
    appeal: AppealSettings = field(default_factory=AppealSettings)
    mirror: MirrorSettings = field(default_factory=MirrorSettings)
    reputation: ReputationSettings = field(default_factory=ReputationSettings)
    ami: AmiSettings = field(default_factory=AmiSettings)
    behaviour: BehaviourSettings = field(default_factory=BehaviourSettings)

    @property
    def tz(self) -> ZoneInfo | None:
        return ZoneInfo(self.screen.timezone) if self.screen.timezone else None

    def now(self) -> datetime:
        return datetime.now(self.tz).replace(tzinfo=None) if self.tz else datetime.now()


# --------------------------------------------------------------------------- loading
def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_file(data: dict, origin: str) -> None:
    """Validate one file's keys and value types against SCHEMA; raise ConfigError naming file and key."""
    for section, body in data.items():
        spec = SCHEMA.get(section)
        if spec is None:
            raise ConfigError(f"{origin}: unknown table [{section}]{_suggest(section, SCHEMA)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        if isinstance(spec, _Table):
            _check_table(body, spec, origin, section)
        elif isinstance(spec, _Section):
            plain = {k: v for k, v in body.items() if k not in spec.tables}
            _check_keys(plain, spec.fields, origin, section, extra=spec.tables)
            for name, sub in spec.tables.items():
                if name in body:
                    if not isinstance(body[name], dict):
                        raise ConfigError(f"{origin}: [{section}.{name}] must be a table of named tables")
                    _check_table(body[name], sub, origin, f"{section}.{name}")
        else:
            _check_keys(body, spec, origin, section)


def _check_table(body: dict, spec: _Table, origin: str, where: str) -> None:
    for name, entry in body.items():
        problem = spec.key_check(name)
        if problem:
            raise ConfigError(f"{origin}: [{where}.{name}]: {problem}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{origin}: [{where}.{name}] must be a table")
        _check_keys(entry, spec.fields, origin, f"{where}.{name}")


def _check_keys(body: dict, fields: dict, origin: str, where: str, extra: dict | None = None) -> None:
    for key, value in body.items():
        check = fields.get(key)
        if check is None:
            raise ConfigError(f"{origin}: unknown key '{key}' in [{where}]{_suggest(key, [*fields, *(extra or ())])}")
        try:
            check(value)
        except _Invalid as e:
            raise ConfigError(f"{origin}: [{where}] {key}: {e}") from None


def _merge(base: dict, over: dict, origins: dict, origin: str, prefix: str = "") -> None:
    for k, v in over.items():
        path = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and isinstance(base.get(k), dict) and _is_table_path(path):
            _merge(base[k], v, origins, origin, path)
        else:
            base[k] = v
            origins[path] = origin


def _is_table_path(path: str) -> bool:
    """True for tables merged key by key ([rules.X], [reputation.sources.X]); False for values
    that are replaced whole (a policy's weights, a source's headers)."""
    parts = path.split(".")
    spec = SCHEMA.get(parts[0])
    if len(parts) == 1:
        return True
    if isinstance(spec, _Section):
        return parts[1] in spec.tables and len(parts) <= 3
    return len(parts) == 2 and isinstance(spec, _Table)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except RecursionError:
        raise ConfigError(f"{path}: TOML nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None


def resolve_config_path(explicit: str | os.PathLike | None) -> Path | None:
    """The admin file to use: --config, else $EDGEFILTER_CONFIG, else the first default that exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    for p in DEFAULT_CONFIG_PATHS:
        if p.is_file():
            return p
    return None


def load_settings(path: str | os.PathLike | None = None, *, use_default_paths: bool = True) -> Settings:
    """Build Settings from defaults + the admin file + its conf.d/*.toml; raise ConfigError on any mistake."""
    files: list[Path] = [DEFAULTS_PATH]
    admin = resolve_config_path(path) if use_default_paths else (Path(path) if path else None)
    if admin is not None:
        files.append(admin)
        confd = admin.parent / "conf.d"
        if confd.is_dir():
            files.extend(sorted(confd.glob("*.toml")))
    merged: dict = {}
    origins: dict[str, str] = {}
    for f in files:
        data = _read_toml(f)
        _check_file(data, str(f))
        _merge(merged, data, origins, str(f))
    return _build(merged, origins, tuple(str(f) for f in files))


def settings_from_dict(data: dict, *, origin: str = "<test>") -> Settings:
    """Defaults overlaid with ``data`` (used by tests and `replay` to try a config without files)."""
    merged: dict = {}
    origins: dict[str, str] = {}
    defaults = _read_toml(DEFAULTS_PATH)
    _check_file(defaults, str(DEFAULTS_PATH))
    _merge(merged, defaults, origins, str(DEFAULTS_PATH))
    _check_file(data, origin)
    _merge(merged, data, origins, origin)
    return _build(merged, origins, (str(DEFAULTS_PATH), origin))


def _build(m: dict, origins: dict, sources: tuple[str, ...]) -> Settings:
    def origin_of(path: str) -> str:
        return origins.get(path, sources[-1])

    def fail(path: str, msg: str) -> ConfigError:
        return ConfigError(f"{origin_of(path)}: [{path.rsplit('.', 1)[0]}] {path.rsplit('.', 1)[-1]}: {msg}")

    a, s, sc = m["agi"], m["store"], m["screen"]
    ch = m["challenge"]
    if not 1.0 <= _duration(ch["timeout"]) <= 60.0:
        raise fail("challenge.timeout", "between 1s and 60s (how long the dial plan waits for the digit)")
    if _duration(ch["allow_for"]) <= 0:
        raise fail("challenge.allow_for", "must be longer than 0s")
    tz = sc.get("timezone", "")
    if tz:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise fail("screen.timezone", f"unknown time zone {tz!r} (e.g. \"Asia/Shanghai\")") from None

    thresholds = {act: float(m["thresholds"][act.value]) for act in THRESHOLD_ACTIONS}
    _check_ascending(thresholds, lambda act: fail(f"thresholds.{act.value}", "thresholds must ascend: tag < challenge < voicemail < reject"))

    groups = {name: (float(g["max"]) if "max" in g else None) for name, g in m.get("groups", {}).items()}
    rules: dict[str, RuleSettings] = {}
    known = _shipped_rule_names()
    for name, r in m.get("rules", {}).items():
        if "weight" not in r:
            raise fail(f"rules.{name}.weight", "every rule needs a weight")
        if name not in known and "name_pattern" not in r:
            raise ConfigError(
                f"{origin_of(f'rules.{name}.weight')}: [rules.{name}]: unknown rule{_suggest(name, known)}; "
                "a rule of your own needs a name_pattern"
            )
        group = r.get("group", "")
        if group and group not in groups:
            raise fail(f"rules.{name}.group", f"unknown group {group!r}{_suggest(group, groups)}; declare it under [groups.{group}]")
        rules[name] = RuleSettings(
            name=name,
            weight=float(r["weight"]),
            group=group,
            force=_action(r["force"]) if "force" in r else None,
            description=r.get("description", ""),
            name_pattern=_regex(r["name_pattern"]) if "name_pattern" in r else None,
            enabled=r.get("enabled", True),
        )
    for name in BUILTIN_RULES:
        if name not in rules:
            raise ConfigError(f"{sources[0]}: built-in rule {name} has no [rules.{name}] entry")

    schedules = {
        name: Schedule(
            name=name,
            days=_days(v["days"]) if "days" in v else frozenset(range(7)),
            hours=_list_of(_hhmm_range)(v["hours"]) if "hours" in v else Schedule.hours,
            description=v.get("description", ""),
        )
        for name, v in m.get("schedules", {}).items()
    }

    def check_schedule_ref(path: str, ref: str | None) -> None:
        if ref and ref.lstrip("!") not in schedules:
            raise fail(path, f"unknown schedule {ref!r}{_suggest(ref.lstrip('!'), schedules)}")

    categories = {}
    for name, c in m.get("categories", {}).items():
        check_schedule_ref(f"categories.{name}.schedule", c.get("schedule"))
        categories[name] = CategorySettings(
            name=name,
            weight=float(c.get("weight", 0.0)),
            force=_action(c["force"]) if "force" in c else None,
            schedule=c.get("schedule"),
            description=c.get("description", ""),
        )

    policies = []
    for order, (name, p) in enumerate(m.get("policies", {}).items()):
        check_schedule_ref(f"policies.{name}.schedule", p.get("schedule"))
        for rule in p.get("weights", {}):
            if rule not in rules:
                raise fail(f"policies.{name}.weights", f"unknown rule {rule!r}{_suggest(rule, rules)}")
        pol = Policy(
            name=name,
            order=order,
            description=p.get("description", ""),
            match_did=tuple(p.get("match_did", ())) if not isinstance(p.get("match_did"), str) else (p["match_did"],),
            match_extension=_list_of(_str)(p.get("match_extension", [])),
            match_context=_list_of(_str)(p.get("match_context", [])),
            schedule=p.get("schedule"),
            thresholds=_thresholds_override(p.get("thresholds", {})),
            weights=_weights(p.get("weights", {})),
            actions=_action_map(p.get("actions", {})),
            allowlist_only=p.get("allowlist_only"),
            never_block=_list_of(_str)(p.get("never_block", [])),
            appeal=p.get("appeal"),
        )
        merged_thr = {**thresholds, **pol.thresholds}
        _check_ascending(merged_thr, lambda act, n=name: fail(f"policies.{n}.thresholds", "thresholds must ascend once merged with the global ones"))
        policies.append(pol)

    budget = _duration(sc["budget"])
    reputation = _build_reputation(m.get("reputation", {}), origin_of, fail, budget)
    ami = _build_ami(m.get("ami", {}), fail)
    behaviour = _build_behaviour(m.get("behaviour", {}), fail)
    appeal = _build_appeal(m.get("appeal", {}), fail, rules)

    return Settings(
        agi=AgiSettings(
            listen=_hostport(a["listen"]),
            read_timeout=_duration(a["read_timeout"]),
            max_env_bytes=a["max_env_bytes"],
            max_sessions=a["max_sessions"],
            allow_peers=_list_of(_network)(a["allow_peers"]),
            workers=a.get("workers", 1),
            event_loop=a.get("event_loop", "auto"),
        ),
        store=StoreSettings(
            path=s["path"],
            poll_interval=_duration(s["poll_interval"]),
            history_retention=_duration(s["history_retention"]),
            busy_timeout=_duration(s["busy_timeout"]),
            url=_pg_url(s.get("url", "")),
            password_file=s.get("password_file", ""),
            node=_node_name(s.get("node", "")) or _default_node(),
            spool_path=s.get("spool_path", "") or str(Path(s["path"]).parent / "edgefilter-spool.db"),
            spool_max=s.get("spool_max", 100000),
        ),
        default_region=_region(m["numbers"]["default_region"]),
        screen=ScreenSettings(
            budget=budget,
            on_error=_action(sc["on_error"]),
            mode=sc["mode"],
            timezone=tz,
            tag_text=sc["tag_text"],
            allowlist_only_action=_action(sc["allowlist_only_action"]),
        ),
        log_level=m["log"]["level"],
        log_format=m["log"]["format"],
        thresholds=thresholds,
        rules=rules,
        groups=groups,
        categories=categories,
        schedules=schedules,
        policies=tuple(policies),
        sources=sources,
        raw=m,
        outputs=_build_outputs(m.get("outputs", {}), fail),
        actions=ActionSettings(
            reject_cause=_reject_cause(m["actions"]["reject_cause"]),
            reject_sit=m["actions"]["reject_sit"],
            voicemail_box=m["actions"]["voicemail_box"],
            tag_category=m["actions"]["tag_category"],
        ),
        challenge=ChallengeSettings(
            retries=m["challenge"]["retries"],
            timeout=_duration(m["challenge"]["timeout"]),
            allow_for=_duration(m["challenge"]["allow_for"]),
            fail_window=_duration(m["challenge"]["fail_window"]),
            hangup_is_failure=m["challenge"]["hangup_is_failure"],
            max_pending=m["challenge"]["max_pending"],
        ),
        mirror=MirrorSettings(
            enabled=m["mirror"]["enabled"],
            family=m["mirror"]["family"],
            max_entries=m["mirror"]["max_entries"],
        ),
        reputation=reputation,
        ami=ami,
        behaviour=behaviour,
        appeal=appeal,
    )


def _build_outputs(o: dict, fail: Callable[[str, str], ConfigError]) -> OutputsSettings:
    d = OutputsSettings()
    out = OutputsSettings(
        statsd=_address(listen=False)(o.get("statsd", "")),
        statsd_prefix=_metric_prefix(o.get("statsd_prefix", d.statsd_prefix)),
        syslog=_address(listen=False)(o.get("syslog", "")),
        syslog_facility=o.get("syslog_facility", d.syslog_facility),
        syslog_app_name=_app_name(o.get("syslog_app_name", d.syslog_app_name)),
        prometheus=_address(listen=True)(o.get("prometheus", "")),
        gauge_interval=_duration(o.get("gauge_interval", "10s")),
        queue_size=o.get("queue_size", d.queue_size),
    )
    if out.gauge_interval < 1.0:
        raise fail("outputs.gauge_interval", "at least \"1s\" (list sizes change slowly; this is not per call)")
    return out


#: Source keys whose default comes from a [reputation] key (source key -> [reputation] key).
_SOURCE_DEFAULTS = {
    "timeout": "timeout",
    "ttl_positive": "ttl_positive",
    "ttl_negative": "ttl_negative",
    "max_in_flight": "source_max_in_flight",
    "breaker_failures": "breaker_failures",
    "breaker_cooldown": "breaker_cooldown",
}


def _build_reputation(rep: dict, origin_of: Callable[[str], str], fail: Callable[[str, str], ConfigError], budget: float) -> ReputationSettings:
    """[reputation] and its sources, with the cross-key checks no single validator can make."""
    margin = _duration(rep.get("margin", "50ms"))
    sources = []
    for name, src in rep.get("sources", {}).items():
        where = f"reputation.sources.{name}"

        def get(key: str, default: Any = None) -> Any:
            if key in src:
                return REPUTATION_SOURCE_FIELDS[key](src[key])
            shared = _SOURCE_DEFAULTS.get(key)
            if shared in rep:  # [reputation] holds the defaults of every source
                return REPUTATION_SOURCE_FIELDS[key](rep[shared])
            return default

        if "url" not in src:
            raise ConfigError(f"{origin_of(where + '.url')}: [{where}]: a source needs a url (e.g. \"https://api.example.org/v1/{{e164}}\")")
        json_path = src.get("json_path", "")
        if not json_path and "listed_status" not in src:
            raise ConfigError(
                f"{origin_of(where + '.url')}: [{where}]: say how to read the answer: json_path = \"data.score\" "
                "(a score or category in a JSON body) or listed_status = 200 (an HTTP status meaning listed)"
            )
        mapping = [k for k in ("weight", "weight_per_point", "score_weights", "category_weights") if k in src]
        if not mapping:
            raise ConfigError(
                f"{origin_of(where + '.url')}: [{where}]: say what a listing weighs: weight = 6.0, "
                "weight_per_point = 0.1, score_weights = { 50 = 3.0, 80 = 8.0 } or category_weights = { scam = 15.0 }"
            )
        if not json_path and mapping != ["weight"]:
            raise fail(f"{where}.{mapping[-1]}", "without json_path an answer is only listed or not: use weight")
        if "weight_per_point" in src and "score_weights" in src:
            raise fail(f"{where}.score_weights", "use either weight_per_point or score_weights, not both")
        listed = get("listed_status", ())
        unlisted = get("unlisted_status", ())
        both = set(listed) & set(unlisted)
        if both:
            raise fail(f"{where}.unlisted_status", f"status {sorted(both)[0]} is also in listed_status")
        method = get("method", "GET")
        if "body" in src and method != "POST":
            raise fail(f"{where}.body", "a body is sent with method = \"POST\" only")
        headers = tuple(get("headers", {}).items())
        templates = [src["url"], src.get("body", ""), *(v for _, v in headers)]
        uses_key = any("{api_key}" in t for t in templates)
        api_key = ""
        if "api_key_file" in src:
            if not uses_key:
                raise fail(f"{where}.api_key_file", "the key is never sent: put {api_key} in the url or a header")
            api_key = _read_api_key(src["api_key_file"], origin_of(f"{where}.api_key_file"), f"{where}")
        elif uses_key:
            raise fail(f"{where}.url", "{api_key} is used but no api_key_file says where the key is")
        sources.append(ReputationSource(
            name=name,
            url=src["url"],
            method=method,
            headers=headers,
            body=src.get("body", ""),
            api_key=api_key,
            api_key_file=src.get("api_key_file", ""),
            json_path=json_path,
            listed_status=listed,
            unlisted_status=unlisted,
            weight=get("weight"),
            weight_per_point=get("weight_per_point"),
            min_score=get("min_score"),
            score_weights=get("score_weights", ()),
            category_weights=get("category_weights", {}),
            timeout=get("timeout", 2.0),
            ttl_positive=get("ttl_positive", 86400.0),
            ttl_negative=get("ttl_negative", 21600.0),
            max_in_flight=get("max_in_flight", 8),
            breaker_failures=get("breaker_failures", 5),
            breaker_cooldown=get("breaker_cooldown", 60.0),
            enabled=get("enabled", True),
            description=src.get("description", ""),
        ))
    settings = ReputationSettings(
        max_in_flight=rep.get("max_in_flight", 32),
        margin=margin,
        cache_size=rep.get("cache_size", 100000),
        sources=tuple(sources),
    )
    if settings.active and margin >= budget:
        raise fail("reputation.margin", f"the margin ({format_duration(margin)}) must be shorter than [screen] budget ({format_duration(budget)}): "
                   "sources get the budget minus the margin")
    return settings


def _read_api_key(path: str, origin: str, where: str) -> str:
    """Read a source's API key; refuse a file every local user can read (the key is a secret)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and origin and Path(origin).is_file():
        p = Path(origin).parent / p  # relative to the config file that names it
    try:
        st = p.stat()
        if st.st_mode & stat.S_IROTH:
            raise ConfigError(
                f"{origin}: [{where}] api_key_file: {p} is readable by every user "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {p}` (or 640 with a group for edgefilter)"
            )
        text = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{origin}: [{where}] api_key_file: {p} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{origin}: [{where}] api_key_file: permission denied reading {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"{origin}: [{where}] api_key_file: {p} is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{origin}: [{where}] api_key_file: {p} is not UTF-8 text") from None
    if not text or len(text) > 4096 or re.search(r"[\x00-\x1f\x7f]", text):
        raise ConfigError(f"{origin}: [{where}] api_key_file: {p} must hold the key on one line (empty, too long or control characters)")
    return text


def _build_ami(a: dict, fail: Callable[[str, str], ConfigError]) -> AmiSettings:
    conv = {k: SCHEMA["ami"][k](v) for k, v in a.items()}
    out = AmiSettings(**conv)
    if out.enabled and not (out.secret_file or out.secret_env):
        raise fail("ami.secret_file", "AMI is enabled but neither secret_file nor secret_env is set")
    if out.ping_timeout <= 0 or out.ping_interval <= 0:
        raise fail("ami.ping_interval", "ping_interval and ping_timeout must be above zero (the watchdog needs them)")
    if out.backoff_initial <= 0 or out.backoff_max < out.backoff_initial:
        raise fail("ami.backoff_max", "need 0 < backoff_initial <= backoff_max")
    return out


def _build_behaviour(b: dict, fail: Callable[[str, str], ConfigError]) -> BehaviourSettings:
    conv = {k: SCHEMA["behaviour"][k](v) for k, v in b.items()}
    out = BehaviourSettings(**conv)
    if not 0.0 < out.short_share <= 1.0:
        raise fail("behaviour.short_share", "a share between 0 (exclusive) and 1")
    for key in ("burst_window", "spread_window", "short_window", "campaign_window"):
        if getattr(out, key) <= 0:
            raise fail(f"behaviour.{key}", "a window must be longer than 0s")
    return out


def _build_appeal(a: dict, fail: Callable[[str, str], ConfigError], rules: dict) -> AppealSettings:
    conv = {k: SCHEMA["appeal"][k](v) for k, v in a.items()}
    out = AppealSettings(**conv)
    for rule in out.rules:
        if rule not in rules:
            raise fail("appeal.rules", f"unknown rule {rule!r}{_suggest(rule, rules)}")
    if "CLI_FORGED" in out.rules:
        raise fail("appeal.rules", "a forged caller ID is never appealable (CLI_FORGED)")
    if not 1.0 <= out.timeout <= 60.0:
        raise fail("appeal.timeout", "between 1s and 60s (how long the dial plan waits for the digit)")
    for key in ("cooldown", "retention", "grant_for"):
        if getattr(out, key) <= 0:
            raise fail(f"appeal.{key}", "must be longer than 0s")
    if out.webhook and not re.match(r"^https?://[^\s/]+", out.webhook):
        raise fail("appeal.webhook", "an http:// or https:// URL, or empty for none")
    if not 0.1 <= out.webhook_timeout <= 60.0:
        raise fail("appeal.webhook_timeout", "between 100ms and 60s")
    return out


def _default_node() -> str:
    """The host name, cut to a valid node name (several PBXs sharing a database tell calls apart by it)."""
    import socket

    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:64].strip("-._")
    return name or "node"


_SHIPPED_RULES: frozenset[str] | None = None


def _shipped_rule_names() -> frozenset[str]:
    """Rules declared in the shipped defaults.toml: the ones the code implements."""
    global _SHIPPED_RULES
    if _SHIPPED_RULES is None:
        _SHIPPED_RULES = frozenset(_read_toml(DEFAULTS_PATH).get("rules", {}))
    return _SHIPPED_RULES


def _check_ascending(thr: dict[Action, float], err: Callable[[Action], ConfigError]) -> None:
    prev = None
    for act in THRESHOLD_ACTIONS:
        if prev is not None and not thr[act] > thr[prev]:
            raise err(act)
        prev = act


def dump(settings: Settings) -> str:
    """The merged configuration as TOML, for `edgefilter config dump` (a password written into
    [store] url is masked: dumps end up in tickets)."""
    raw = settings.raw
    if raw.get("store", {}).get("url"):
        raw = {**raw, "store": {**raw["store"], "url": redact_url(raw["store"]["url"])}}
    return _to_toml(raw)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_fmt(x)}" for k, x in v.items()) + " }"
    return _fmt(str(v))


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _fmt(k)


def _to_toml(m: dict) -> str:
    out: list[str] = []
    for section, body in m.items():
        spec = SCHEMA.get(section)
        if isinstance(spec, _Table):
            for name, entry in body.items():
                out.append(f"[{section}.{_key(name)}]")
                out.extend(f"{k} = {_fmt(v)}" for k, v in entry.items())
                out.append("")
        elif isinstance(spec, _Section):
            out.append(f"[{section}]")
            out.extend(f"{k} = {_fmt(v)}" for k, v in body.items() if k not in spec.tables)
            out.append("")
            for table in spec.tables:
                for name, entry in body.get(table, {}).items():
                    out.append(f"[{section}.{table}.{_key(name)}]")
                    out.extend(f"{k} = {_fmt(v)}" for k, v in entry.items())
                    out.append("")
        else:
            out.append(f"[{section}]")
            out.extend(f"{k} = {_fmt(v)}" for k, v in body.items())
            out.append("")
    return "\n".join(out)


__all__ = [
    "Settings",
    "OutputsSettings",
    "SYSLOG_FACILITIES",
    "AmiSettings",
    "BehaviourSettings",
    "AppealSettings",
    "Policy",
    "Schedule",
    "RuleSettings",
    "CategorySettings",
    "load_settings",
    "settings_from_dict",
    "resolve_config_path",
    "dump",
    "format_duration",
    "BUILTIN_RULES",
    "REJECT_CAUSES",
    "ReputationSettings",
    "ReputationSource",
]

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
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, time as dtime
from pathlib import Path
from typing import Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from .durations import format_duration, parse_duration
from .errors import ConfigError
from .model import THRESHOLD_ACTIONS, Action

DEFAULTS_PATH = Path(__file__).with_name("defaults.toml")
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
)
RULE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{1,63}$")
SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
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


def _echo_text(v: Any) -> str:
    """Text the service echoes into the AGI stream (tags): no quotes, commas, control bytes."""
    s = _str(v)
    if len(s) > 40 or re.search(r'[\x00-\x1f\x7f",\\$]', s):
        raise _Invalid(f"{s!r}: at most 40 characters, no quotes, commas, backslashes, '$' or control characters")
    return s


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


SCHEMA: dict[str, Any] = {
    "agi": {
        "listen": _hostport,
        "read_timeout": _duration,
        "max_env_bytes": _int(1024, 1 << 20),
        "max_sessions": _int(1, 100000),
        "allow_peers": _list_of(_network),
    },
    "store": {
        "path": _str,
        "poll_interval": _duration,
        "history_retention": _duration,
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
    "log": {
        "level": _choice("debug", "info", "warning", "error"),
        "format": _choice("kv", "json"),
    },
    "thresholds": {a.value: _float for a in THRESHOLD_ACTIONS},
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
        },
        _safe_key,
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


@dataclass(frozen=True)
class StoreSettings:
    path: str
    poll_interval: float
    history_retention: float
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
            for name, entry in body.items():
                problem = spec.key_check(name)
                if problem:
                    raise ConfigError(f"{origin}: [{section}.{name}]: {problem}")
                if not isinstance(entry, dict):
                    raise ConfigError(f"{origin}: [{section}.{name}] must be a table")
                _check_keys(entry, spec.fields, origin, f"{section}.{name}")
        else:
            _check_keys(body, spec, origin, section)


def _check_keys(body: dict, fields: dict, origin: str, where: str) -> None:
    for key, value in body.items():
        check = fields.get(key)
        if check is None:
            raise ConfigError(f"{origin}: unknown key '{key}' in [{where}]{_suggest(key, fields)}")
        try:
            check(value)
        except _Invalid as e:
            raise ConfigError(f"{origin}: [{where}] {key}: {e}") from None


def _merge(base: dict, over: dict, origins: dict, origin: str, prefix: str = "") -> None:
    for k, v in over.items():
        path = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and isinstance(base.get(k), dict) and path.count(".") < 2:
            _merge(base[k], v, origins, origin, path)
        else:
            base[k] = v
            origins[path] = origin


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
        )
        merged_thr = {**thresholds, **pol.thresholds}
        _check_ascending(merged_thr, lambda act, n=name: fail(f"policies.{n}.thresholds", "thresholds must ascend once merged with the global ones"))
        policies.append(pol)

    return Settings(
        agi=AgiSettings(
            listen=_hostport(a["listen"]),
            read_timeout=_duration(a["read_timeout"]),
            max_env_bytes=a["max_env_bytes"],
            max_sessions=a["max_sessions"],
            allow_peers=_list_of(_network)(a["allow_peers"]),
        ),
        store=StoreSettings(
            path=s["path"],
            poll_interval=_duration(s["poll_interval"]),
            history_retention=_duration(s["history_retention"]),
            url=_pg_url(s.get("url", "")),
            password_file=s.get("password_file", ""),
            node=_node_name(s.get("node", "")) or _default_node(),
            spool_path=s.get("spool_path", "") or str(Path(s["path"]).parent / "edgefilter-spool.db"),
            spool_max=s.get("spool_max", 100000),
        ),
        default_region=_region(m["numbers"]["default_region"]),
        screen=ScreenSettings(
            budget=_duration(sc["budget"]),
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
    )


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
        else:
            out.append(f"[{section}]")
            out.extend(f"{k} = {_fmt(v)}" for k, v in body.items())
            out.append("")
    return "\n".join(out)


__all__ = [
    "Settings",
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
]

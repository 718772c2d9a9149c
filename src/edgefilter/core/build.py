"""Merged config -> Settings, with the cross-key checks no single value parser can make.

Runs once on the merged result of every file, so an error here names the file that set the key
last (``origins``), or the admin's file when the key comes from the defaults.
"""

from __future__ import annotations

import functools
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from edgefilter.core.durations import format_duration
from edgefilter.core.errors import ConfigError
from edgefilter.core.model import THRESHOLD_ACTIONS, Action
from edgefilter.core.schema import REPUTATION_SOURCE_FIELDS, SCHEMA
from edgefilter.core.settings import (
    ActionSettings,
    AgiSettings,
    AmiSettings,
    AppealSettings,
    BehaviourSettings,
    CategorySettings,
    ChallengeSettings,
    MirrorSettings,
    OutputsSettings,
    Policy,
    ReputationSettings,
    ReputationSource,
    RuleSettings,
    Schedule,
    ScreenSettings,
    Settings,
    StoreSettings,
)
from edgefilter.core.validate import (
    _action,
    _action_map,
    _address,
    _app_name,
    _days,
    _duration,
    _hhmm_range,
    _hostport,
    _list_of,
    _metric_prefix,
    _network,
    _node_name,
    _pg_url,
    _regex,
    _region,
    _reject_cause,
    _str,
    _suggest,
    _thresholds_override,
    _weights,
)

#: Rules the code fires itself: the merged config must weigh each one (a [rules.NAME] entry).
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


def _build(m: dict, origins: dict, sources: tuple[str, ...], shipped_rules: frozenset[str]) -> Settings:
    """``shipped_rules``: the rules defaults.toml declares (the ones the code implements); the
    loader reads them, as it owns the file paths."""

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
    known = shipped_rules
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

        def unordered(act: Action, n: str = name) -> ConfigError:
            return fail(f"policies.{n}.thresholds", "thresholds must ascend once merged with the global ones")

        _check_ascending(merged_thr, unordered)
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


def _source_value(src: dict, rep: dict, key: str, default: Any = None) -> Any:
    if key in src:
        return REPUTATION_SOURCE_FIELDS[key](src[key])
    shared = _SOURCE_DEFAULTS.get(key)
    if shared in rep:  # [reputation] holds the defaults of every source
        return REPUTATION_SOURCE_FIELDS[key](rep[shared])
    return default


def _build_reputation(rep: dict, origin_of: Callable[[str], str], fail: Callable[[str, str], ConfigError], budget: float) -> ReputationSettings:
    """[reputation] and its sources, with the cross-key checks no single validator can make."""
    margin = _duration(rep.get("margin", "50ms"))
    sources = []
    for name, src in rep.get("sources", {}).items():
        where = f"reputation.sources.{name}"
        get = functools.partial(_source_value, src, rep)
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


def _check_ascending(thr: dict[Action, float], err: Callable[[Action], ConfigError]) -> None:
    prev = None
    for act in THRESHOLD_ACTIONS:
        if prev is not None and not thr[act] > thr[prev]:
            raise err(act)
        prev = act

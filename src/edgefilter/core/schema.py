"""Which tables and keys a config file may hold, the parser of each, and the check of one file.

Each file is checked on its own before merging, so that an error names the file that holds the
mistake (with a did-you-mean for a misspelt table or key); cross-key rules wait for the merged
result (build.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgefilter.core.errors import ConfigError
from edgefilter.core.model import THRESHOLD_ACTIONS
from edgefilter.core.validate import (
    SYSLOG_FACILITIES,
    _action,
    _action_map,
    _address,
    _app_name,
    _bool,
    _choice,
    _days,
    _duration,
    _echo_text,
    _float,
    _float_table,
    _headers,
    _hhmm_range,
    _hostport,
    _int,
    _Invalid,
    _json_path,
    _list_of,
    _mailbox,
    _method,
    _metric_prefix,
    _network,
    _node_name,
    _pg_url,
    _regex,
    _regex_str,
    _region,
    _reject_cause,
    _request_timeout,
    _rule_key,
    _safe_key,
    _score_weights,
    _statuses,
    _str,
    _suggest,
    _template,
    _thresholds_override,
    _url_template,
    _weights,
)


class _Table:
    """A table whose keys are admin-chosen names (rules, policies...) each holding ``fields``."""

    def __init__(self, fields: dict[str, Callable[[Any], Any]], key_check: Callable[[str], str | None]):
        self.fields = fields
        self.key_check = key_check


class _Section:
    """A table with fixed keys plus named sub-tables of admin-chosen entries.

    ``[reputation]`` holds defaults for every source and ``[reputation.sources.NAME]`` one table
    per source: both validated as strictly as the flat sections (file, key, suggestion).
    """

    def __init__(self, fields: dict[str, Callable[[Any], Any]], tables: dict[str, _Table]):
        self.fields = fields
        self.tables = tables


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

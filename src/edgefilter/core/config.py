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

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from edgefilter.core.build import BUILTIN_RULES, _build
from edgefilter.core.durations import format_duration
from edgefilter.core.errors import ConfigError
from edgefilter.core.schema import SCHEMA, _check_file, _Section, _Table
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
    redact_url,
)
from edgefilter.core.validate import REJECT_CAUSES, SYSLOG_FACILITIES, _suggest

DEFAULTS_PATH = Path(__file__).parent.parent / "defaults.toml"  # at the package root, where admins look
#: Looked up in this order when no --config is given (the first that exists is used).
DEFAULT_CONFIG_PATHS = (Path("edgefilter.toml"), Path("/etc/edgefilter/edgefilter.toml"))
CONFIG_ENV = "EDGEFILTER_CONFIG"


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
    return _build(merged, origins, tuple(str(f) for f in files), _shipped_rule_names())


def settings_from_dict(data: dict, *, origin: str = "<test>") -> Settings:
    """Defaults overlaid with ``data`` (used by tests and `replay` to try a config without files)."""
    merged: dict = {}
    origins: dict[str, str] = {}
    defaults = _read_toml(DEFAULTS_PATH)
    _check_file(defaults, str(DEFAULTS_PATH))
    _merge(merged, defaults, origins, str(DEFAULTS_PATH))
    _check_file(data, origin)
    _merge(merged, data, origins, origin)
    return _build(merged, origins, (str(DEFAULTS_PATH), origin), _shipped_rule_names())


_SHIPPED_RULES: frozenset[str] | None = None


def _shipped_rule_names() -> frozenset[str]:
    """Rules declared in the shipped defaults.toml: the ones the code implements."""
    global _SHIPPED_RULES
    if _SHIPPED_RULES is None:
        _SHIPPED_RULES = frozenset(_read_toml(DEFAULTS_PATH).get("rules", {}))
    return _SHIPPED_RULES


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
    # loading and dumping (this module)
    "DEFAULTS_PATH",
    "DEFAULT_CONFIG_PATHS",
    "CONFIG_ENV",
    "load_settings",
    "settings_from_dict",
    "resolve_config_path",
    "dump",
    # re-exported so that importers keep one place to import config names from
    "ConfigError",
    "format_duration",
    "BUILTIN_RULES",
    "SCHEMA",
    "REJECT_CAUSES",
    "SYSLOG_FACILITIES",
    "redact_url",
    "_suggest",  # the did-you-mean of cli.py's --source
    "Settings",
    "AgiSettings",
    "StoreSettings",
    "ScreenSettings",
    "OutputsSettings",
    "ActionSettings",
    "ChallengeSettings",
    "AppealSettings",
    "MirrorSettings",
    "AmiSettings",
    "BehaviourSettings",
    "RuleSettings",
    "CategorySettings",
    "Schedule",
    "Policy",
    "ReputationSource",
    "ReputationSettings",
]

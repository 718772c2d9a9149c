"""The typed, frozen settings the rest of the service reads, built once from the merged config.

Frozen because a reload (SIGHUP) swaps in a whole new Settings rather than editing this one:
whatever holds a reference never sees values change under it, nor half of an old config and
half of a new one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as dtime
from zoneinfo import ZoneInfo

from edgefilter.core.model import Action


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

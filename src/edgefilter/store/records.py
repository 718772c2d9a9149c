"""What both stores read and write: the record dataclasses and the column lists they map to.

Backend-neutral (no driver is imported here): the service, the CLI, the spool and both stores
share these types, and ``Record(*row)`` reads a row of the matching ``*_COLUMNS`` back.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from edgefilter.lists.index import Entry, exact_num, make_entry, make_pattern

ENTRY_COLUMNS = "list, pattern, kind, key, category, note, source, created_at, expires_at"
REPUTATION_COLUMNS = "number, source, score, category, status, fetched_at, expires_at"


@dataclass(frozen=True, slots=True)
class ReputationRow:
    """One cached answer of a reputation source about one number (E.164)."""

    number: str
    source: str
    score: float | None
    category: str | None
    status: str  # 'listed' or 'unlisted'
    fetched_at: float
    expires_at: float

    def row(self) -> tuple:
        return (self.number, self.source, self.score, self.category, self.status, self.fetched_at, self.expires_at)


@dataclass(frozen=True)
class CallRecord:
    """One screened call as written to the call log."""

    ts: float
    uniqueid: str
    caller: str
    caller_e164: str | None
    caller_kind: str
    caller_name: str
    called: str
    extension: str
    context: str
    action: str
    would: str | None
    score: float
    rules: str
    policy: str
    elapsed_ms: float
    # The node that screened the call and a key unique across nodes, so a retried write (spool
    # drain, `db copy` re-run) never makes a second row (both backends, SQLite since schema v6).
    node: str = ""
    key: str = ""

    def row(self) -> tuple:
        return (
            self.ts, self.uniqueid, self.caller, self.caller_e164, self.caller_kind, self.caller_name,
            self.called, self.extension, self.context, self.action, self.would, self.score, self.rules,
            self.policy, self.elapsed_ms,
        )


CALL_COLUMNS = (
    "ts, uniqueid, caller, caller_e164, caller_kind, caller_name, called, extension, context, "
    "action, would, score, rules, policy, elapsed_ms"
)
#: Every CallRecord field: CALL_COLUMNS then node, key (``CallRecord(*row)`` reads them back).
KEYED_CALL_COLUMNS = CALL_COLUMNS + ", node, key"


def keyed_row(r: CallRecord, node: str = "") -> tuple:
    """The row to insert: every field, the store's node when the record names none, a fresh key
    when it has none (a record without a key cannot be deduplicated, but still gets one)."""
    return r.row() + (r.node or node, r.key or uuid.uuid4().hex)


@dataclass(frozen=True)
class CallOutcome:
    """What happened to a screened call after the decision (from AMI), joined by uniqueid."""

    uniqueid: str
    linkedid: str = ""
    answered: bool | None = None
    talk_seconds: float | None = None
    hangup_cause: int | None = None
    hangup_text: str = ""
    dial_status: str = ""
    ended_at: float | None = None
    node: str = ""  # the node whose call it is (a shared store: uniqueids of two PBXs may collide)


@dataclass(frozen=True)
class ContactSeen:
    """A number our users called out to or talked with (feeds KNOWN_CONTACT)."""

    e164: str
    ts: float
    how: str  # "outbound" | "talked"


@dataclass(frozen=True)
class Refusal:
    """One row of the refusal ledger."""

    id: int
    caller_e164: str
    callee: str
    ts: float
    kind: str
    category: str = ""
    source: str = ""
    call_uniqueid: str = ""
    pattern: str = ""
    undone_at: float | None = None


REFUSAL_COLUMNS = "id, caller_e164, callee, ts, kind, category, source, call_uniqueid, pattern, undone_at"


@dataclass(frozen=True)
class Appeal:
    """One appeal a refused caller left from the call (appeals.py), as stored."""

    id: int
    code: str  # the reference the caller heard (digits); what admins type
    key: str  # the service's appeal id (our charset): names the recording
    ts: float
    caller_e164: str
    uniqueid: str = ""
    called: str = ""
    node: str = ""
    rules: str = ""  # the refusal appealed: "RULE(+weight) ..."
    score: float = 0.0
    policy: str = ""
    entry_list: str = ""  # the list entry that matched (block, or an allow it beat), if any
    entry_pattern: str = ""
    entry_source: str = ""
    entry_category: str = ""
    recording: str = ""  # where Asterisk wrote it
    recording_bytes: int | None = None  # None: the service cannot see the recordings directory
    status: str = "pending"  # pending | granted | denied
    decided_at: float | None = None
    note: str = ""
    grant_pattern: str = ""  # the allow entry a grant added
    grant_expires: float | None = None

    @property
    def rule_names(self) -> list[str]:
        return [r.split("(", 1)[0] for r in self.rules.split()]


APPEAL_COLUMNS = (
    "id, code, key, ts, caller_e164, uniqueid, called, node, rules, score, policy, entry_list, entry_pattern, "
    "entry_source, entry_category, recording, recording_bytes, status, decided_at, note, grant_pattern, grant_expires"
)
#: Columns an insert writes (id comes from the database).
APPEAL_INSERT = APPEAL_COLUMNS.split(", ", 1)[1]
APPEAL_STATUSES = ("pending", "granted", "denied")


def new_appeal_code() -> str:
    """A 6-digit reference, spoken to the caller and typed by admins (unique: the store retries)."""
    import secrets

    return str(100000 + secrets.randbelow(900000))
#: Columns the behaviour history and evidence read besides the CallRecord ones.
OUTCOME_COLUMNS = "linkedid, answered, talk_seconds, hangup_cause, hangup_text, dial_status, ended_at"


def astuple_appeal(a: Appeal) -> tuple:
    """Every field of an Appeal in APPEAL_COLUMNS order."""
    import dataclasses

    return dataclasses.astuple(a)


def entry_from_row(row: Sequence) -> Entry:
    list_, pattern, kind, key, category, note, source, created, expires = row
    return make_entry(list_, make_pattern(kind, key, pattern), category, note, source, created, expires)


#: One entry as an import stages it: (pattern text, its compact key (lists.exact_num) or None,
#: meta) with meta = (list, category, note, source, created_at, expires_at). A feed's entries share
#: a handful of meta tuples (the same object, not equal copies), which is what makes a
#: million-line import cheap to stage: no Entry object is needed per line.
StagedRow = tuple[str, "int | None", tuple]


def staged_row(e: Entry) -> StagedRow:
    """The StagedRow of an Entry (callers that have Entry objects; bulk imports build rows directly)."""
    return e.pattern.text, exact_num(e.pattern), (e.list, e.category, e.note, e.source, e.created_at, e.expires_at)


@dataclass(frozen=True)
class ImportResult:
    added: int
    updated: int
    unchanged: int
    removed: int = 0

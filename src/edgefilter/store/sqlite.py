"""The durable store: SQLite in WAL mode through aiosqlite.

The call path never waits on it: the service loads the lists into memory at start and follows a
change feed (the ``changes`` table, one row per list mutation, written in the same transaction as
the mutation) so that a CLI change or an import reaches the running service within one poll
interval, without a full reload. Call records are written in batches by a background task.
Every SQL statement is parameterised; every sqlite failure becomes a StoreError that says what
is wrong in words an admin can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sqlite3
import sys
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from edgefilter.core.errors import StoreError
from edgefilter.lists.index import LISTS, ChangedRow, Entry, ListIndex, Pattern, exact_num, make_entry, make_pattern

SCHEMA_VERSION = 8


def _num_sql(row: str = "") -> str:
    """SQL for the compact int64 key of a canonical exact number (lists.exact_num), else NULL."""
    r = row
    return (
        f"CASE WHEN {r}kind = 'exact' AND {r}pattern = '+' || {r}key AND length({r}key) BETWEEN 1 AND 18 "
        f"AND {r}key NOT GLOB '*[^0-9]*' THEN CAST('1' || {r}key AS INTEGER) END"
    )


#: Every entry of an import shares its metadata; the service loads (num, profile) pairs only.
PROFILE_SIG = "json_array(list, category, note, source, created_at, expires_at)"
ASSIGN_PROFILES = f"""
    INSERT OR IGNORE INTO profiles (sig, list, category, note, source, created_at, expires_at)
        SELECT {PROFILE_SIG}, list, category, note, source, created_at, expires_at
        FROM entries INDEXED BY entries_unprofiled WHERE num IS NOT NULL AND profile IS NULL;
    UPDATE entries INDEXED BY entries_unprofiled SET profile = (SELECT p.id FROM profiles p WHERE p.sig = json_array(
            entries.list, entries.category, entries.note, entries.source, entries.created_at, entries.expires_at))
        WHERE num IS NOT NULL AND profile IS NULL;
"""
#: Migration 8 on both backends ({ID}: the id column's type). ``code`` is the reference the caller
#: hears and admins type; ``key`` the service's appeal id (a retried write is stored once).
APPEALS_SCHEMA = """
    ALTER TABLE entries ADD COLUMN no_appeal INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX IF NOT EXISTS entries_no_appeal ON entries (list, pattern) WHERE no_appeal != 0;
    CREATE TABLE IF NOT EXISTS appeals (
        id              {ID},
        code            TEXT NOT NULL UNIQUE,
        key             TEXT NOT NULL UNIQUE,
        ts              DOUBLE PRECISION NOT NULL,
        caller_e164     TEXT NOT NULL,
        uniqueid        TEXT NOT NULL DEFAULT '',
        called          TEXT NOT NULL DEFAULT '',
        node            TEXT NOT NULL DEFAULT '',
        rules           TEXT NOT NULL DEFAULT '',
        score           DOUBLE PRECISION NOT NULL DEFAULT 0,
        policy          TEXT NOT NULL DEFAULT '',
        entry_list      TEXT NOT NULL DEFAULT '',
        entry_pattern   TEXT NOT NULL DEFAULT '',
        entry_source    TEXT NOT NULL DEFAULT '',
        entry_category  TEXT NOT NULL DEFAULT '',
        recording       TEXT NOT NULL DEFAULT '',
        recording_bytes BIGINT,
        status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'granted', 'denied')),
        decided_at      DOUBLE PRECISION,
        note            TEXT NOT NULL DEFAULT '',
        grant_pattern   TEXT NOT NULL DEFAULT '',
        grant_expires   DOUBLE PRECISION
    );
    CREATE INDEX IF NOT EXISTS appeals_caller ON appeals (caller_e164, ts);
    CREATE INDEX IF NOT EXISTS appeals_status ON appeals (status, ts);
    CREATE INDEX IF NOT EXISTS appeals_ts ON appeals (ts);
"""
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS entries (
        list       TEXT NOT NULL CHECK (list IN ('block', 'allow')),
        pattern    TEXT NOT NULL,
        kind       TEXT NOT NULL CHECK (kind IN ('exact', 'prefix', 'mask')),
        key        TEXT NOT NULL,
        category   TEXT NOT NULL DEFAULT '',
        note       TEXT NOT NULL DEFAULT '',
        source     TEXT NOT NULL DEFAULT 'cli',
        created_at REAL NOT NULL,
        expires_at REAL,
        PRIMARY KEY (list, pattern)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS entries_source ON entries (source);
    CREATE INDEX IF NOT EXISTS entries_key ON entries (key);
    CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE IF NOT EXISTS changes (
        rev     INTEGER PRIMARY KEY AUTOINCREMENT,
        list    TEXT NOT NULL,
        pattern TEXT NOT NULL,
        op      TEXT NOT NULL CHECK (op IN ('put', 'del'))
    );
    CREATE TABLE IF NOT EXISTS calls (
        id          INTEGER PRIMARY KEY,
        ts          REAL NOT NULL,
        uniqueid    TEXT NOT NULL DEFAULT '',
        caller      TEXT NOT NULL DEFAULT '',
        caller_e164 TEXT,
        caller_kind TEXT NOT NULL DEFAULT '',
        caller_name TEXT NOT NULL DEFAULT '',
        called      TEXT NOT NULL DEFAULT '',
        extension   TEXT NOT NULL DEFAULT '',
        context     TEXT NOT NULL DEFAULT '',
        action      TEXT NOT NULL,
        would       TEXT,
        score       REAL NOT NULL DEFAULT 0,
        rules       TEXT NOT NULL DEFAULT '',
        policy      TEXT NOT NULL DEFAULT '',
        elapsed_ms  REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts);
    CREATE INDEX IF NOT EXISTS calls_caller ON calls (caller_e164, ts);
    CREATE INDEX IF NOT EXISTS calls_uniqueid ON calls (uniqueid);
    """,
    # 5: outcomes of the press-a-digit challenge (failures feed rule CHALLENGE_FAILED after a restart)
    5: """
    CREATE TABLE IF NOT EXISTS challenge_outcomes (
        id          INTEGER PRIMARY KEY,
        ts          REAL NOT NULL,
        uniqueid    TEXT NOT NULL DEFAULT '',
        caller_e164 TEXT NOT NULL,
        outcome     TEXT NOT NULL CHECK (outcome IN ('pass', 'fail', 'hangup'))
    );
    CREATE INDEX IF NOT EXISTS challenge_outcomes_caller ON challenge_outcomes (caller_e164, ts);
    CREATE INDEX IF NOT EXISTS challenge_outcomes_ts ON challenge_outcomes (ts);
    """,
    # 4: the reputation cache (answers of online reputation sources, per number and source)
    4: """
    CREATE TABLE IF NOT EXISTS reputation (
        number     TEXT NOT NULL,
        source     TEXT NOT NULL,
        score      REAL,
        category   TEXT,
        status     TEXT NOT NULL CHECK (status IN ('listed', 'unlisted')),
        fetched_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (source, number)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS reputation_number ON reputation (number);
    CREATE INDEX IF NOT EXISTS reputation_expires ON reputation (expires_at);
    """,
    # 2: behaviour and evidence: call outcomes from AMI, the refusal ledger, known contacts.
    2: """
    ALTER TABLE calls ADD COLUMN linkedid TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN answered INTEGER;
    ALTER TABLE calls ADD COLUMN talk_seconds REAL;
    ALTER TABLE calls ADD COLUMN hangup_cause INTEGER;
    ALTER TABLE calls ADD COLUMN hangup_text TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN dial_status TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN ended_at REAL;
    CREATE INDEX IF NOT EXISTS calls_extension ON calls (extension, ts);
    CREATE TABLE IF NOT EXISTS refusals (
        id            INTEGER PRIMARY KEY,
        caller_e164   TEXT NOT NULL,
        callee        TEXT NOT NULL,
        ts            REAL NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('refuse', 'block', 'report')),
        category      TEXT NOT NULL DEFAULT '',
        source        TEXT NOT NULL DEFAULT '',
        call_uniqueid TEXT NOT NULL DEFAULT '',
        pattern       TEXT NOT NULL DEFAULT '',
        undone_at     REAL
    );
    CREATE INDEX IF NOT EXISTS refusals_caller ON refusals (caller_e164, ts);
    CREATE INDEX IF NOT EXISTS refusals_callee ON refusals (callee, ts);
    CREATE TABLE IF NOT EXISTS contacts (
        e164       TEXT PRIMARY KEY,
        last_ts    REAL NOT NULL,
        how        TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS contacts_last ON contacts (last_ts);
    """,
    # 6: rows written per node carry the node and a key unique across nodes (PostgreSQL shares
    # the tables between PBXs; a retried write - spool drain, `db copy` re-run - is stored once).
    # Rows from before keep key '' (outside the unique index).
    6: """
    ALTER TABLE calls ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN key TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX IF NOT EXISTS calls_key ON calls (key) WHERE key != '';
    ALTER TABLE challenge_outcomes ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE challenge_outcomes ADD COLUMN key TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX IF NOT EXISTS challenge_outcomes_key ON challenge_outcomes (key) WHERE key != '';
    """,
    # 3 (issue 6, lists at scale; merged after 4-6, see LATE_MIGRATIONS): exact numbers get an
    # int64 key (num) and a shared metadata
    # profile so that the service loads 10 million entries as two arrays, not 10 million rows of
    # text. A trigger drops the profile of a row whose metadata a writer changes.
    3: f"""
    ALTER TABLE entries ADD COLUMN num INTEGER;
    ALTER TABLE entries ADD COLUMN profile INTEGER;
    CREATE TABLE IF NOT EXISTS profiles (
        id         INTEGER PRIMARY KEY,
        sig        TEXT NOT NULL UNIQUE,
        list       TEXT NOT NULL,
        category   TEXT NOT NULL,
        note       TEXT NOT NULL,
        source     TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL
    );
    UPDATE entries SET num = {_num_sql()};
    CREATE INDEX IF NOT EXISTS entries_num ON entries (list, num, profile) WHERE num IS NOT NULL;
    CREATE INDEX IF NOT EXISTS entries_loose ON entries (list, pattern) WHERE num IS NULL;
    CREATE INDEX IF NOT EXISTS entries_unprofiled ON entries (list, pattern) WHERE num IS NOT NULL AND profile IS NULL;
    -- (a trigger entries_num_insert filling num on INSERT was created here until migration 7
    -- dropped it; it is no longer created, so a late-applied 3 does not bring it back)
    CREATE TRIGGER IF NOT EXISTS entries_profile_stale AFTER UPDATE OF category, note, source, created_at, expires_at ON entries
        WHEN NEW.profile IS NOT NULL
        BEGIN UPDATE entries SET profile = NULL WHERE list = NEW.list AND pattern = NEW.pattern; END;
    {ASSIGN_PROFILES}
    """,
    # 7 (issue 6, imports at scale): the per-row AFTER INSERT trigger that filled num for writers
    # which do not set it cost a bulk import ~2 s per million rows even when it did nothing. Every
    # edgefilter writer sets num; a row written without it (a foreign writer) still loads, through
    # the generic path (entries_loose), just as a Python object instead of two array slots.
    # The key index held every exact number a second time (its key is its pattern without '+'):
    # it now holds only the rows the compact path does not (prefixes, masks, short numbers), and
    # masks get an index of their own, so candidates() reads only indexes, never the whole table.
    # The stale-profile trigger now fires only when a writer changed an entry's metadata and left
    # its profile as it was (a writer that knows profiles sets the right one in the same UPDATE:
    # a million updated entries no longer need a second pass to find their profiles).
    7: """
    DROP TRIGGER IF EXISTS entries_num_insert;
    DROP TRIGGER IF EXISTS entries_profile_stale;
    CREATE TRIGGER entries_profile_stale AFTER UPDATE OF category, note, source, created_at, expires_at ON entries
        WHEN NEW.profile IS NOT NULL AND NEW.profile IS OLD.profile
        BEGIN UPDATE entries SET profile = NULL WHERE list = NEW.list AND pattern = NEW.pattern; END;
    DROP INDEX IF EXISTS entries_key;
    CREATE INDEX IF NOT EXISTS entries_key ON entries (key) WHERE num IS NULL;
    CREATE INDEX IF NOT EXISTS entries_masks ON entries (length(key)) WHERE kind = 'mask';
    """,
    # 8 (issue 17, appeals): block entries an admin made never appealable (`block --no-appeal`),
    # and the appeals callers left from the call (appeals.py), with the decision they appealed.
    8: APPEALS_SCHEMA.replace("{ID}", "INTEGER PRIMARY KEY"),
}

#: Migrations merged after higher numbers had shipped (3: lists at scale, merged after 4-6). A
#: database migrated past such a number while it was still reserved gets it on its next open;
#: it is recognised by a column the migration adds: {version: (table, column)}.
LATE_MIGRATIONS: dict[int, tuple[str, str]] = {3: ("entries", "num")}

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


def describe_sqlite_error(path: str, exc: BaseException) -> str:
    """An admin-readable reason for a sqlite failure."""
    msg = str(exc).lower()
    if "locked" in msg or "busy" in msg:
        return f"{path}: database is locked by another process (an import still running?)"
    if "readonly" in msg or "read-only" in msg:
        return f"{path}: database is read-only (check the file's and directory's permissions)"
    if "disk is full" in msg or "database or disk is full" in msg:
        return f"{path}: disk is full"
    if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
        return f"{path}: database file is corrupt or not an edgefilter database ({exc})"
    if "disk i/o error" in msg:
        return f"{path}: disk I/O error (disk full, failing, or the file removed under us?)"
    if "unable to open" in msg:
        return f"{path}: cannot open the database (missing directory or no permission)"
    return f"{path}: database error: {exc}"


#: One entry as an import stages it: (pattern text, its compact key (lists.exact_num) or None,
#: meta) with meta = (list, category, note, source, created_at, expires_at). A feed's entries share
#: a handful of meta tuples (the same object, not equal copies), which is what makes a
#: million-line import cheap to stage: no Entry object is needed per line.
StagedRow = tuple[str, "int | None", tuple]


def staged_row(e: Entry) -> StagedRow:
    """The StagedRow of an Entry (callers that have Entry objects; bulk imports build rows directly)."""
    return e.pattern.text, exact_num(e.pattern), (e.list, e.category, e.note, e.source, e.created_at, e.expires_at)


class BatchedImport:
    """``import_entries`` and ``stage_import`` for any store with begin_import / stage_rows /
    apply_import: the same staging loop on SQLite and PostgreSQL, written once."""

    async def stage_import(self, entries: Iterable[Entry]) -> None:
        """Add entries to the import being staged (the first of a duplicate pattern wins)."""
        await self.stage_rows([staged_row(e) for e in entries])

    async def import_entries(
        self, entries: Iterable[Entry], *, replace_source: str | None = None, lists: Sequence[str] = LISTS,
        dry_run: bool = False,
    ) -> ImportResult:
        """Stage and apply in one go (see apply_import)."""
        await self.begin_import()
        batch: list[Entry] = []
        for e in entries:
            batch.append(e)
            if len(batch) >= 20000:
                await self.stage_import(batch)
                batch = []
        await self.stage_import(batch)
        return await self.apply_import(replace_source=replace_source, lists=lists, dry_run=dry_run)


class Store(BatchedImport):
    """One aiosqlite connection to the database; use ``async with Store.open(path)``.

    The PostgreSQL store (pgstore.PgStore) has the same methods with the same meaning; code above
    this layer gets either from ``stores.open_store(settings)`` and must not care which.
    """

    backend = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path
        self.where = path
        self.node = ""  # this node's name, for rows that name none (stores.open_store sets it)
        # One connection serves every task of the service: transactions take turns (the lock) and
        # a transaction opened inside another one, in the same task, becomes a savepoint.
        self._tx_lock = asyncio.Lock()
        self._tx_depth: contextvars.ContextVar[int] = contextvars.ContextVar(f"sqlite_tx_{id(self)}", default=0)

    def describe_error(self, exc: BaseException) -> str:
        """An admin-readable reason for a failure of this store."""
        if isinstance(exc, StoreError):
            return str(exc)
        return describe_sqlite_error(self.path, exc)

    async def load_index(self) -> tuple[int, ListIndex]:
        """Every list entry in a new ListIndex with the change-feed revision it reflects.

        A file database is read in a worker thread on a connection of its own (module function
        load_index: compact arrays, ``<db>.index`` snapshot), so calls keep being answered."""
        if self.path == ":memory:":
            rev = await self.head_rev()
            index = ListIndex()
            async for batch in self.iter_entries():
                index.extend(batch)
            return rev, index
        return await asyncio.to_thread(load_index, self.path)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: str, *, create: bool = True, busy_timeout_ms: int = 5000) -> AsyncIterator[Store]:
        if path != ":memory:":
            p = Path(path)
            if not create and not p.exists():
                raise StoreError(f"{path}: database does not exist (run `edgefilter serve` or add an entry first)")
            if create:
                try:
                    p.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StoreError(f"{path}: cannot create directory {p.parent}: {e.strerror}") from None
        try:
            db = await aiosqlite.connect(path, timeout=busy_timeout_ms / 1000)
        except sqlite3.Error as e:
            raise StoreError(describe_sqlite_error(path, e)) from None
        store = cls(db, path)
        try:
            await store._setup(busy_timeout_ms)
            yield store
        except sqlite3.Error as e:
            raise StoreError(describe_sqlite_error(path, e)) from None
        finally:
            await db.close()

    async def _setup(self, busy_timeout_ms: int) -> None:
        await self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if self.path != ":memory:":
            mode = await (await self.db.execute("PRAGMA journal_mode")).fetchone()
            if mode and mode[0].lower() != "wal":
                await self.db.execute("PRAGMA journal_mode = WAL")
        await self.db.execute("PRAGMA synchronous = NORMAL")
        await self.db.execute("PRAGMA foreign_keys = ON")
        await self.migrate()

    async def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION; each step in its own transaction."""
        (version,) = await (await self.db.execute("PRAGMA user_version")).fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: database schema v{version} is newer than this edgefilter (v{SCHEMA_VERSION}); upgrade edgefilter"
            )
        for v in range(1, SCHEMA_VERSION + 1):  # in version order: a late one before those after it
            if v not in MIGRATIONS:  # a number reserved for a change not merged yet
                continue
            if v > version:
                await self.db.executescript("BEGIN IMMEDIATE;\n" + MIGRATIONS[v] + f"\nPRAGMA user_version = {v};\nCOMMIT;")
            elif v in LATE_MIGRATIONS:
                # a database that went past v while its number was still reserved lacks it
                table, column = LATE_MIGRATIONS[v]
                cur = await self.db.execute(f"SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?", (column,))
                if await cur.fetchone() is None:
                    await self.db.executescript("BEGIN IMMEDIATE;\n" + MIGRATIONS[v] + "\nCOMMIT;")
        return SCHEMA_VERSION

    async def schema_version(self) -> int:
        (version,) = await (await self.db.execute("PRAGMA user_version")).fetchone()
        return int(version)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: nothing partial is ever written.
        Store methods called inside it join it (nested transactions are savepoints)."""
        depth = self._tx_depth.get()
        if depth:
            name = f"sp{depth}"
            await self.db.execute(f"SAVEPOINT {name}")
            token = self._tx_depth.set(depth + 1)
            try:
                yield
            except BaseException:
                await self.db.execute(f"ROLLBACK TO {name}")
                await self.db.execute(f"RELEASE {name}")
                raise
            else:
                await self.db.execute(f"RELEASE {name}")
            finally:
                self._tx_depth.reset(token)
            return
        async with self._tx_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            token = self._tx_depth.set(1)
            try:
                yield
            except BaseException:
                await self.db.rollback()
                raise
            else:
                await self.db.commit()
            finally:
                self._tx_depth.reset(token)

    # -- lists ----------------------------------------------------------------------------
    async def put_entry(self, entry: Entry) -> str:
        """Insert or update one entry; returns 'added', 'updated' or 'unchanged'."""
        async with self.transaction():
            return await self._put(entry)

    async def _put(self, e: Entry) -> str:
        cur = await self.db.execute(
            "SELECT category, note, source, expires_at FROM entries WHERE list = ? AND pattern = ?",
            (e.list, e.pattern.text),
        )
        old = await cur.fetchone()
        if old is not None and tuple(old) == (e.category, e.note, e.source, e.expires_at):
            return "unchanged"
        if old is None:
            await self.db.execute(
                f"INSERT INTO entries ({ENTRY_COLUMNS}, num) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (e.list, e.pattern.text, e.pattern.kind, e.pattern.key, e.category, e.note, e.source, e.created_at,
                 e.expires_at, exact_num(e.pattern)),
            )
        else:
            await self.db.execute(
                "UPDATE entries SET category = ?, note = ?, source = ?, expires_at = ?, profile = NULL WHERE list = ? AND pattern = ?",
                (e.category, e.note, e.source, e.expires_at, e.list, e.pattern.text),
            )
        await self._assign_profiles()
        await self.db.execute("INSERT INTO changes (list, pattern, op) VALUES (?, ?, 'put')", (e.list, e.pattern.text))
        return "added" if old is None else "updated"

    async def put_entries(self, entries: Iterable[Entry], batch: int = 5000) -> dict[str, int]:
        """Insert or update many entries in one transaction; counts of added/updated/unchanged."""
        counts = {"added": 0, "updated": 0, "unchanged": 0}
        async with self.transaction():
            for e in entries:
                counts[await self._put(e)] += 1
        return counts
    async def _assign_profiles(self) -> None:
        for stmt in ASSIGN_PROFILES.split(";"):
            if stmt.strip():
                await self.db.execute(stmt)

    async def remove_entry(self, pattern: Pattern, list_name: str | None = None) -> list[str]:
        """Delete the pattern from one list or both; returns the lists it was removed from."""
        lists = [list_name] if list_name else ["block", "allow"]
        removed = []
        async with self.transaction():
            for name in lists:
                cur = await self.db.execute("DELETE FROM entries WHERE list = ? AND pattern = ?", (name, pattern.text))
                if cur.rowcount:
                    removed.append(name)
                    await self.db.execute("INSERT INTO changes (list, pattern, op) VALUES (?, ?, 'del')", (name, pattern.text))
        return removed

    # -- bulk import (issue 6) ----------------------------------------------------------
    async def begin_import(self) -> None:
        """Create the empty staging table an import is collected in (TEMP: this connection only).

        Staging writes nothing to the database file, so a killed import leaves no trace and
        parsing a big file does not hold the write lock the running service's writers need.
        A staged row is (list, pattern, profile): everything else an entry carries is in its
        metadata profile (shared by all the entries of an import), kind and key follow from the
        canonical pattern text (as Pattern.from_text reads it).
        """
        await self.db.execute("PRAGMA cache_size = -131072")  # 128 MB: a big import spills less
        await self.db.execute("DROP TABLE IF EXISTS temp.import_stage")
        await self.db.execute("DROP TABLE IF EXISTS temp.import_heap")
        await self.db.execute("DROP TABLE IF EXISTS temp.import_profiles")
        await self.db.execute("DROP TABLE IF EXISTS temp.import_upd_profiles")
        # staged rows arrive in file order (random keys): appended to a heap, then copied once,
        # sorted, into the keyed table in apply_import (B-tree appends instead of random inserts)
        await self.db.execute(
            "CREATE TEMP TABLE import_heap (list TEXT NOT NULL, pattern TEXT NOT NULL, num INTEGER, profile INTEGER NOT NULL)"
        )
        await self.db.execute(
            "CREATE TEMP TABLE import_stage (list TEXT NOT NULL, pattern TEXT NOT NULL, num INTEGER, profile INTEGER NOT NULL, "
            "st TEXT, old_created REAL, PRIMARY KEY (list, pattern)) WITHOUT ROWID"
        )
        await self.db.execute(
            "CREATE TEMP TABLE import_profiles (prov INTEGER PRIMARY KEY, real INTEGER, list TEXT, category TEXT, "
            "note TEXT, source TEXT, created_at REAL, expires_at REAL)"
        )
        # profiles of updated entries: (import profile, the entry's own created_at) -> profile id
        await self.db.execute(
            "CREATE TEMP TABLE import_upd_profiles (prov INTEGER NOT NULL, created_at REAL NOT NULL, real INTEGER, "
            "PRIMARY KEY (prov, created_at))"
        )
        await self.db.commit()
        # profiles are never deleted, so the ids seen now are still right when the import applies;
        # new ones get a provisional negative id, resolved under the write lock in apply_import
        cur = await self.db.execute("SELECT id, list, category, note, source, created_at, expires_at FROM profiles")
        self._import_profiles: dict[tuple, int] = {tuple(r[1:]): r[0] for r in await cur.fetchall()}
        self._used_profiles: dict[int, tuple] = {}
        self._new_count = 0

    def _staged_profile(self, meta: tuple) -> int:
        """The profile id for (list, category, note, source, created_at, expires_at)."""
        pid = self._import_profiles.get(meta)
        if pid is None:
            self._new_count += 1
            pid = -self._new_count
            self._import_profiles[meta] = pid
        if pid not in self._used_profiles:
            self._used_profiles[pid] = meta
        return pid

    async def stage_rows(self, rows: Sequence[StagedRow]) -> None:
        """Add rows to the staging table (the first of a duplicate pattern wins)."""
        out = []
        append = out.append
        pids: dict[int, int] = {}  # by id(): a feed's rows share a few meta objects (alive in rows)
        get = pids.get
        for text, num, meta in rows:
            pid = get(id(meta))
            if pid is None:
                pid = pids[id(meta)] = self._staged_profile(meta)
            append((meta[0], text, num, pid))
        await self.db.executemany("INSERT INTO temp.import_heap VALUES (?, ?, ?, ?)", out)
        await self.db.commit()

    async def apply_import(
        self, *, replace_source: str | None = None, lists: Sequence[str] = LISTS, dry_run: bool = False
    ) -> ImportResult:
        """Apply the staged entries in ONE transaction, with change-feed rows for the service.

        Counts compare category, note, source and expiry: re-running the same import reports
        everything unchanged and writes nothing. ``replace_source`` also deletes that source's
        entries on ``lists`` that are not staged (a feed replaced wholesale). ``dry_run`` computes
        the same counts and rolls back.
        """
        # sorted by key (appends to the keyed table); the first staged of a duplicate pattern wins
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO temp.import_stage SELECT list, pattern, num, profile, NULL, NULL FROM temp.import_heap "
            "ORDER BY list, pattern, rowid"
        )
        staged = cur.rowcount
        await self.db.execute("DROP TABLE temp.import_heap")
        await self.db.commit()
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.executemany(
                "INSERT INTO temp.import_profiles VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(pid, pid if pid > 0 else None, *key) for pid, key in self._used_profiles.items()],
            )
            await self.db.execute(
                f"""INSERT OR IGNORE INTO main.profiles (sig, list, category, note, source, created_at, expires_at)
                    SELECT {PROFILE_SIG}, list, category, note, source, created_at, expires_at
                    FROM temp.import_profiles WHERE prov < 0"""
            )
            await self.db.execute(
                """UPDATE temp.import_profiles AS n SET real = (SELECT p.id FROM main.profiles p WHERE p.sig =
                       json_array(n.list, n.category, n.note, n.source, n.created_at, n.expires_at)) WHERE prov < 0"""
            )
            # st stays NULL for a new entry: only the rows already in the list are written here
            await self.db.execute(
                """UPDATE temp.import_stage AS s SET st = CASE WHEN e.category IS p.category AND e.note IS p.note
                           AND e.source IS p.source AND e.expires_at IS p.expires_at THEN 'same' ELSE 'upd' END,
                       old_created = e.created_at
                   FROM main.entries AS e, temp.import_profiles AS p
                   WHERE e.list = s.list AND e.pattern = s.pattern AND p.prov = s.profile"""
            )
            # num was computed while staging (lists.exact_num); kind and key follow from the
            # canonical text (as Pattern.from_text reads it), spelt out only for the rare non-numbers
            cur = await self.db.execute(
                f"""INSERT INTO main.entries ({ENTRY_COLUMNS}, num, profile)
                    SELECT s.list, s.pattern,
                           CASE WHEN s.num IS NOT NULL THEN 'exact' WHEN s.pattern GLOB '*[*]' THEN 'prefix'
                                WHEN instr(s.pattern, '#') THEN 'mask' ELSE 'exact' END,
                           CASE WHEN s.num IS NOT NULL THEN substr(s.pattern, 2)
                                WHEN s.pattern GLOB '*[*]' THEN substr(s.pattern, 2, length(s.pattern) - 2)
                                ELSE ltrim(s.pattern, '+') END,
                           p.category, p.note, p.source, p.created_at, p.expires_at, s.num,
                           CASE WHEN s.num IS NOT NULL THEN p.real END
                    FROM temp.import_stage s JOIN temp.import_profiles p ON p.prov = s.profile
                    WHERE s.st IS NULL ORDER BY s.list, s.pattern"""
            )
            added = cur.rowcount
            # an updated entry keeps its created_at: its profile is the import's with that date.
            # The few (import profile, created_at) pairs get their profile ids first, set-wise.
            await self.db.execute(
                "INSERT INTO temp.import_upd_profiles (prov, created_at) SELECT DISTINCT profile, old_created "
                "FROM temp.import_stage WHERE st = 'upd' AND num IS NOT NULL"
            )
            upd_sig = "json_array(p.list, p.category, p.note, p.source, u.created_at, p.expires_at)"
            await self.db.execute(
                f"""INSERT OR IGNORE INTO main.profiles (sig, list, category, note, source, created_at, expires_at)
                    SELECT {upd_sig}, p.list, p.category, p.note, p.source, u.created_at, p.expires_at
                    FROM temp.import_upd_profiles u JOIN temp.import_profiles p ON p.prov = u.prov"""
            )
            await self.db.execute(
                f"""UPDATE temp.import_upd_profiles AS u SET real = (SELECT pr.id FROM main.profiles pr, temp.import_profiles p
                        WHERE p.prov = u.prov AND pr.sig = {upd_sig})"""
            )
            cur = await self.db.execute(
                """UPDATE main.entries SET category = p.category, note = p.note, source = p.source,
                       expires_at = p.expires_at, profile = CASE WHEN s.num IS NOT NULL THEN (SELECT u.real
                           FROM temp.import_upd_profiles u WHERE u.prov = s.profile AND u.created_at = s.old_created) END
                   FROM temp.import_stage AS s JOIN temp.import_profiles AS p ON p.prov = s.profile
                   WHERE s.st = 'upd' AND entries.list = s.list AND entries.pattern = s.pattern"""
            )
            updated = cur.rowcount
            await self.db.execute(
                "INSERT INTO main.changes (list, pattern, op) SELECT list, pattern, 'put' FROM temp.import_stage "
                "WHERE st IS NULL OR st = 'upd' ORDER BY list, pattern"
            )
            removed = 0
            if replace_source is not None:
                marks = ", ".join("?" * len(lists))
                gone = (
                    f"FROM main.entries AS e WHERE e.source = ? AND e.list IN ({marks}) AND NOT EXISTS "
                    "(SELECT 1 FROM temp.import_stage s WHERE s.list = e.list AND s.pattern = e.pattern)"
                )
                await self.db.execute(
                    f"INSERT INTO main.changes (list, pattern, op) SELECT e.list, e.pattern, 'del' {gone}",
                    (replace_source, *lists),
                )
                cur = await self.db.execute(
                    f"DELETE FROM main.entries WHERE (list, pattern) IN (SELECT e.list, e.pattern {gone})",
                    (replace_source, *lists),
                )
                removed = cur.rowcount
            await self._assign_profiles()
        except BaseException:
            await self.db.rollback()
            raise
        if dry_run:
            await self.db.rollback()
        else:
            await self.db.commit()
        await self.db.execute("DROP TABLE IF EXISTS temp.import_stage")
        await self.db.execute("DROP TABLE IF EXISTS temp.import_profiles")
        await self.db.execute("DROP TABLE IF EXISTS temp.import_upd_profiles")
        await self.db.commit()
        return ImportResult(added, updated, staged - added - updated, removed)

    async def remove_source(self, source: str, list_name: str | None = None) -> int:
        """Delete every entry a source brought in (one transaction, with 'del' changes)."""
        cond, args = "source = ?", [source]
        if list_name:
            cond += " AND list = ?"
            args.append(list_name)
        async with self.transaction():
            await self.db.execute(f"INSERT INTO changes (list, pattern, op) SELECT list, pattern, 'del' FROM entries WHERE {cond}", args)
            cur = await self.db.execute(f"DELETE FROM entries WHERE {cond}", args)
        return cur.rowcount

    async def export_entries(
        self, list_name: str | None = None, source: str | None = None, batch: int = 20000
    ) -> AsyncIterator[list[Entry]]:
        """Entries in list/pattern order, in batches (export streams; it never holds a whole list)."""
        cond, args = [], []
        if list_name:
            cond.append("list = ?")
            args.append(list_name)
        if source:
            cond.append("source = ?")
            args.append(source)
        sql = f"SELECT {ENTRY_COLUMNS} FROM entries" + (" WHERE " + " AND ".join(cond) if cond else "") + " ORDER BY list, pattern"
        cur = await self.db.execute(sql, args)
        while True:
            rows = await cur.fetchmany(batch)
            if not rows:
                break
            yield [entry_from_row(r) for r in rows]

    async def entries(self, list_name: str | None = None, *, include_expired: bool = True, now: float | None = None) -> list[Entry]:
        sql = f"SELECT {ENTRY_COLUMNS} FROM entries"
        cond, args = [], []
        if list_name:
            cond.append("list = ?")
            args.append(list_name)
        if not include_expired:
            cond.append("(expires_at IS NULL OR expires_at > ?)")
            args.append(time.time() if now is None else now)
        if cond:
            sql += " WHERE " + " AND ".join(cond)
        sql += " ORDER BY list, pattern"
        cur = await self.db.execute(sql, args)
        return [entry_from_row(r) for r in await cur.fetchall()]

    async def candidates(self, digits: str) -> list[Entry]:
        """Entries that could match ``digits``: exact, every prefix, same-length masks (indexed)."""
        keys = [digits[:i] for i in range(1, len(digits) + 1)]
        marks = ", ".join("?" * len(keys))
        cur = await self.db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE list IN ('block', 'allow') AND pattern IN (?, ?) "
            f"UNION ALL SELECT {ENTRY_COLUMNS} FROM entries WHERE num IS NULL AND kind = 'prefix' AND key IN ({marks}) "
            f"UNION ALL SELECT {ENTRY_COLUMNS} FROM entries WHERE kind = 'mask' AND length(key) = ?",
            ("+" + digits, digits, *keys, len(digits)),
        )
        return [entry_from_row(r) for r in await cur.fetchall()]

    async def iter_entries(self, batch: int = 50000) -> AsyncIterator[list[Entry]]:
        """All entries in batches (start-up load of the index)."""
        cur = await self.db.execute(f"SELECT {ENTRY_COLUMNS} FROM entries")
        while True:
            rows = await cur.fetchmany(batch)
            if not rows:
                break
            yield [entry_from_row(r) for r in rows]

    async def head_rev(self) -> int:
        # execute_fetchall: one hop to the connection's thread instead of two (the list
        # follower asks this several times a second)
        ((rev,),) = await self.db.execute_fetchall("SELECT COALESCE(MAX(rev), 0) FROM changes")
        return int(rev)

    async def changes_since(self, rev: int, limit: int) -> list[tuple[int, str, str, str, Entry | None]]:
        """Changes after ``rev`` with the entry's current row (None when it is gone)."""
        rows = await self.db.execute_fetchall(
            f"""SELECT c.rev, c.op, c.list, c.pattern, {', '.join('e.' + c.strip() for c in ENTRY_COLUMNS.split(','))}
                FROM changes c LEFT JOIN entries e ON e.list = c.list AND e.pattern = c.pattern
                WHERE c.rev > ? ORDER BY c.rev LIMIT ?""",
            (rev, limit),
        )
        out = []
        for r in rows:
            entry = entry_from_row(r[4:]) if r[4] is not None else None
            out.append((r[0], r[1], r[2], r[3], entry))
        return out

    async def changed_entries(self, since: int) -> tuple[int, list[ChangedRow], dict]:
        """(head revision, each entry changed after ``since`` once as it is now, the metadata
        profiles): a big batch of changes for ListIndex.plan_merge, read in a worker thread on a
        connection of its own (one read transaction)."""
        if self.path == ":memory:":  # no second connection to a memory database: this one
            head = await self.head_rev()
            rows = [changed_row(r) for r in await (await self.db.execute(CHANGED_SQL, (since, head))).fetchall()]
            profiles = {r[0]: tuple(r[1:]) for r in await (await self.db.execute(PROFILES_SQL)).fetchall()}
            return head, rows, profiles  # (read_changed_file's work, on the aiosqlite connection)
        return await asyncio.to_thread(read_changed_file, self.path, since)

    async def watch_changes(self, wake, resync=None) -> None:
        """PostgreSQL pushes change notices to ``wake``; SQLite has none: the poll is the feed."""
        return None

    async def purge_expired(self, now: float | None = None) -> int:
        """Delete expired entries (they already stopped matching); records 'del' changes."""
        now = time.time() if now is None else now
        async with self.transaction():
            cur = await self.db.execute(
                "SELECT list, pattern FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            )
            rows = await cur.fetchall()
            await self.db.execute("DELETE FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
            await self.db.executemany("INSERT INTO changes (list, pattern, op) VALUES (?, ?, 'del')", rows)
        return len(rows)

    async def trim_changes(self, keep: int = 100000) -> None:
        """Forget old change rows; a service that fell that far behind does a full reload."""
        head = await self.head_rev()
        async with self.transaction():
            await self.db.execute("DELETE FROM changes WHERE rev <= ?", (head - keep,))

    async def counts(self) -> dict[str, int]:
        cur = await self.db.execute("SELECT list, COUNT(*) FROM entries GROUP BY list")
        out = {"block": 0, "allow": 0}
        out.update({k: v for k, v in await cur.fetchall()})
        return out

    # -- call log -------------------------------------------------------------------------
    async def record_calls(self, records: Iterable[CallRecord]) -> int:
        """Write call records; a record whose key is already there is skipped (a retry).
        Returns how many rows were new."""
        rows = [keyed_row(r, self.node) for r in records]
        if not rows:
            return 0
        async with self.transaction():
            return await self._insert_calls(rows)

    async def _insert_calls(self, rows: list[tuple]) -> int:
        before = self.db.total_changes
        await self.db.executemany(
            f"INSERT INTO calls ({KEYED_CALL_COLUMNS}) VALUES ({', '.join('?' * 17)}) ON CONFLICT DO NOTHING", rows
        )
        return self.db.total_changes - before

    async def recent_calls(self, since: float, limit: int = 1000000) -> list[CallRecord]:
        cur = await self.db.execute(
            f"SELECT {KEYED_CALL_COLUMNS} FROM calls WHERE ts >= ? ORDER BY ts LIMIT ?", (since, limit)
        )
        return [CallRecord(*r) for r in await cur.fetchall()]

    async def iter_calls(self, since: float, until: float | None = None, batch: int = 10000) -> AsyncIterator[list[CallRecord]]:
        """Call records with since <= ts (< until), oldest first, in batches (`edgefilter stats`)."""
        sql = f"SELECT {KEYED_CALL_COLUMNS} FROM calls WHERE ts >= ?"
        args: list[float] = [since]
        if until is not None:
            sql += " AND ts < ?"
            args.append(until)
        cur = await self.db.execute(sql + " ORDER BY ts", args)
        while True:
            rows = await cur.fetchmany(batch)
            if not rows:
                break
            yield [CallRecord(*r) for r in rows]
    # -- challenge outcomes ---------------------------------------------------------------
    async def record_challenges(self, records: Iterable) -> int:
        """Store challenge outcomes (objects with ts, uniqueid, caller_e164, outcome and, optionally,
        key: a retried write of the same outcome is stored once). Returns how many were new."""
        rows = [(r.ts, r.uniqueid, r.caller_e164, r.outcome, self.node, getattr(r, "key", "") or uuid.uuid4().hex)
                for r in records]
        if not rows:
            return 0
        async with self.transaction():
            before = self.db.total_changes
            await self.db.executemany(
                "INSERT INTO challenge_outcomes (ts, uniqueid, caller_e164, outcome, node, key) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING", rows
            )
            return self.db.total_changes - before

    async def challenge_failures_since(self, since: float, caller_e164: str | None = None) -> list[tuple[str, float]]:
        """(E.164 digits without '+', ts) of every failed challenge since ``since``, oldest first."""
        sql = "SELECT caller_e164, ts FROM challenge_outcomes WHERE outcome = 'fail' AND ts > ?"
        args: tuple = (since,)
        if caller_e164 is not None:
            sql += " AND caller_e164 = ?"
            args += (caller_e164,)
        cur = await self.db.execute(sql + " ORDER BY ts", args)
        return [(e164.lstrip("+"), ts) for e164, ts in await cur.fetchall()]

    async def purge_challenges(self, before: float) -> int:
        async with self.transaction():
            cur = await self.db.execute("DELETE FROM challenge_outcomes WHERE ts < ?", (before,))
        return cur.rowcount

    async def calls_after(self, cursor: int, limit: int = 10000) -> list[tuple[int, CallRecord]]:
        """Calls with id > ``cursor`` in id order, with their ids: lets an in-memory history follow
        the call log (every node's calls on PostgreSQL) without re-reading a time window."""
        cur = await self.db.execute(
            f"SELECT id, {KEYED_CALL_COLUMNS} FROM calls WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)
        )
        return [(r[0], CallRecord(*r[1:])) for r in await cur.fetchall()]

    async def calls_head(self) -> int:
        """The largest call id (0 when none): where a follower of ``calls_after`` starts."""
        (head,) = await (await self.db.execute("SELECT COALESCE(MAX(id), 0) FROM calls")).fetchone()
        return int(head)

    async def purge_calls(self, before: float) -> int:
        async with self.transaction():
            cur = await self.db.execute("DELETE FROM calls WHERE ts < ?", (before,))
            await self.db.execute("DELETE FROM contacts WHERE last_ts < ?", (before,))
        return cur.rowcount

    # -- reputation cache -----------------------------------------------------------------
    async def put_reputation(self, rows: Iterable[ReputationRow]) -> int:
        """Insert or replace cached answers (one transaction for the batch)."""
        values = [r.row() for r in rows]
        if not values:
            return 0
        async with self.transaction():
            await self.db.executemany(
                f"INSERT OR REPLACE INTO reputation ({REPUTATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", values
            )
        return len(values)

    async def get_reputation(self, source: str, number: str) -> ReputationRow | None:
        cur = await self.db.execute(
            f"SELECT {REPUTATION_COLUMNS} FROM reputation WHERE source = ? AND number = ?", (source, number)
        )
        row = await cur.fetchone()
        return ReputationRow(*row) if row else None

    async def reputation_rows(
        self, *, number: str | None = None, fresh_at: float | None = None, limit: int = 1000000
    ) -> list[ReputationRow]:
        """Cached answers, newest first; only those still fresh at ``fresh_at`` when given."""
        where, params = [], []
        if number is not None:
            where.append("number = ?")
            params.append(number)
        if fresh_at is not None:
            where.append("expires_at > ?")
            params.append(fresh_at)
        sql = f"SELECT {REPUTATION_COLUMNS} FROM reputation"
        if where:
            sql += " WHERE " + " AND ".join(where)
        cur = await self.db.execute(sql + " ORDER BY fetched_at DESC LIMIT ?", (*params, limit))
        return [ReputationRow(*r) for r in await cur.fetchall()]

    async def purge_reputation(self, *, source: str | None = None, expired_at: float | None = None) -> int:
        """Delete cached answers: all, one source's, and/or only those expired at ``expired_at``."""
        where, params = [], []
        if source is not None:
            where.append("source = ?")
            params.append(source)
        if expired_at is not None:
            where.append("expires_at <= ?")
            params.append(expired_at)
        sql = "DELETE FROM reputation" + (" WHERE " + " AND ".join(where) if where else "")
        async with self.transaction():
            cur = await self.db.execute(sql, params)
        return cur.rowcount
    async def write_batch(self, items: Sequence[object]) -> int:
        """Call records, outcomes and contacts in one transaction, in queue order.

        One queue keeps the order: an outcome is always applied after the insert of its call.
        """
        if not items:
            return 0
        async with self.transaction():
            run: list[tuple] = []  # consecutive call records go in one executemany
            for item in [*items, None]:
                if isinstance(item, CallRecord):
                    run.append(keyed_row(item, self.node))
                    continue
                if run:
                    await self._insert_calls(run)
                    run = []
                if item is None:
                    break
                if isinstance(item, CallOutcome):
                    await self._apply_outcome(item)
                elif isinstance(item, ContactSeen):
                    await self.db.execute(
                        "INSERT INTO contacts (e164, last_ts, how) VALUES (?, ?, ?) "
                        "ON CONFLICT (e164) DO UPDATE SET last_ts = max(last_ts, excluded.last_ts), how = excluded.how",
                        (item.e164, item.ts, item.how),
                    )
                else:  # pragma: no cover - a programming error
                    raise TypeError(f"cannot store {type(item).__name__}")
        return len(items)

    async def _apply_outcome(self, o: CallOutcome) -> None:
        if not o.uniqueid:
            return
        await self.db.execute(
            """UPDATE calls SET linkedid = CASE WHEN ? != '' THEN ? ELSE linkedid END,
                   answered = COALESCE(?, answered), talk_seconds = COALESCE(?, talk_seconds),
                   hangup_cause = COALESCE(?, hangup_cause),
                   hangup_text = CASE WHEN ? != '' THEN ? ELSE hangup_text END,
                   dial_status = CASE WHEN ? != '' THEN ? ELSE dial_status END,
                   ended_at = COALESCE(?, ended_at)
               WHERE uniqueid = ? AND (? = '' OR node = ?)""",
            (
                o.linkedid, o.linkedid, None if o.answered is None else int(o.answered), o.talk_seconds,
                o.hangup_cause, o.hangup_text, o.hangup_text, o.dial_status, o.dial_status, o.ended_at, o.uniqueid,
                o.node, o.node,
            ),
        )

    async def history_rows(self, since: float, limit: int = 1000000, through_id: int | None = None) -> list[tuple]:
        """Recent calls for the in-memory history: (ts, uniqueid, caller_e164, caller_kind,
        called, extension, answered, talk_seconds, action), oldest first, newest ``limit`` kept;
        only ids up to ``through_id`` when given (``calls_after(through_id)`` follows on)."""
        cur = await self.db.execute(
            """SELECT ts, uniqueid, caller_e164, caller_kind, called, extension, answered, talk_seconds, action
               FROM (SELECT * FROM calls WHERE ts >= ? AND id <= ? ORDER BY ts DESC LIMIT ?) ORDER BY ts""",
            (since, through_id if through_id is not None else 2**62, limit),
        )
        return [tuple(r) for r in await cur.fetchall()]

    async def last_callers(self, limit: int = 100000) -> list[tuple]:
        """The newest call per extension with a caller number: (extension, ts, uniqueid, caller_e164, called)."""
        cur = await self.db.execute(
            """SELECT c.extension, c.ts, c.uniqueid, c.caller_e164, c.called FROM calls c
               JOIN (SELECT extension, MAX(ts) AS ts FROM calls
                     WHERE extension != '' AND caller_e164 IS NOT NULL GROUP BY extension) l
               ON c.extension = l.extension AND c.ts = l.ts WHERE c.caller_e164 IS NOT NULL LIMIT ?""",
            (limit,),
        )
        return [tuple(r) for r in await cur.fetchall()]

    async def calls_from(self, e164: str, since: float) -> list[dict]:
        """Every call from ``e164`` since ``since`` with its outcome, oldest first (evidence)."""
        cur = await self.db.execute(
            f"SELECT {CALL_COLUMNS}, {OUTCOME_COLUMNS} FROM calls WHERE caller_e164 = ? AND ts >= ? ORDER BY ts, id",
            (e164, since),
        )
        names = [c.strip() for c in (CALL_COLUMNS + ", " + OUTCOME_COLUMNS).split(",")]
        return [dict(zip(names, r)) for r in await cur.fetchall()]

    async def outcome_of(self, uniqueid: str) -> dict | None:
        cur = await self.db.execute(f"SELECT {OUTCOME_COLUMNS} FROM calls WHERE uniqueid = ? ORDER BY ts DESC LIMIT 1", (uniqueid,))
        row = await cur.fetchone()
        return None if row is None else dict(zip([c.strip() for c in OUTCOME_COLUMNS.split(",")], row))

    # -- refusal ledger ---------------------------------------------------------------------
    async def add_refusal(self, r: Refusal, entry: Entry | None = None) -> int:
        """Record a refusal (and, for block/report, its list entry) in one transaction.

        An entry already on the blocklist (an admin's) is left as it is and the ledger row keeps
        no pattern, so undoing the star code never removes what someone else put there.
        """
        pattern = ""
        async with self.transaction():
            if entry is not None:
                cur = await self.db.execute(
                    "SELECT 1 FROM entries WHERE list = ? AND pattern = ?", (entry.list, entry.pattern.text)
                )
                if await cur.fetchone() is None:
                    await self._put(entry)
                    pattern = entry.pattern.text
            cur = await self.db.execute(
                "INSERT INTO refusals (caller_e164, callee, ts, kind, category, source, call_uniqueid, pattern) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (r.caller_e164, r.callee, r.ts, r.kind, r.category, r.source, r.call_uniqueid, pattern),
            )
        return int(cur.lastrowid)

    async def undo_last_refusal(self, callee: str, now: float) -> Refusal | None:
        """Undo the callee's newest refusal still in force; a block/report also loses the list
        entry it created (only if that entry is still the one the star code wrote)."""
        async with self.transaction():
            cur = await self.db.execute(
                f"SELECT {REFUSAL_COLUMNS} FROM refusals WHERE callee = ? AND undone_at IS NULL ORDER BY ts DESC, id DESC LIMIT 1",
                (callee,),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            r = Refusal(*row)
            await self.db.execute("UPDATE refusals SET undone_at = ? WHERE id = ?", (now, r.id))
            if r.pattern:
                src = f"starcode:{callee}"
                gone = await self.db.execute(
                    "DELETE FROM entries WHERE list = 'block' AND pattern = ? AND source = ?", (r.pattern, src)
                )
                if gone.rowcount:
                    await self.db.execute("INSERT INTO changes (list, pattern, op) VALUES ('block', ?, 'del')", (r.pattern,))
        return Refusal(*row[:-1], undone_at=now)

    async def refusals(self, *, caller: str | None = None, active_only: bool = False) -> list[Refusal]:
        sql = f"SELECT {REFUSAL_COLUMNS} FROM refusals"
        cond, args = [], []
        if caller is not None:
            cond.append("caller_e164 = ?")
            args.append(caller)
        if active_only:
            cond.append("undone_at IS NULL")
        if cond:
            sql += " WHERE " + " AND ".join(cond)
        cur = await self.db.execute(sql + " ORDER BY ts, id", args)
        return [Refusal(*r) for r in await cur.fetchall()]

    async def refusals_version(self) -> tuple[int, int, int]:
        """(rows, largest id, rows undone): changes whenever a refusal is recorded or undone on
        any node (the ledger is never purged), so a follower re-reads the ledger only then."""
        cur = await self.db.execute("SELECT COUNT(*), COALESCE(MAX(id), 0), COUNT(undone_at) FROM refusals")
        n, head, undone = await cur.fetchone()
        return int(n), int(head), int(undone)

    # -- appeals (issue 17) ----------------------------------------------------------------
    async def set_no_appeal(self, list_name: str, pattern: Pattern, flag: bool) -> bool:
        """Mark an entry never appealable (or appealable again); a change row wakes followers.
        False when nothing changed (no such entry, or it was so already)."""
        async with self.transaction():
            cur = await self.db.execute(
                "UPDATE entries SET no_appeal = ? WHERE list = ? AND pattern = ? AND no_appeal != ?",
                (int(flag), list_name, pattern.text, int(flag)),
            )
            if not cur.rowcount:
                return False
            await self.db.execute("INSERT INTO changes (list, pattern, op) VALUES (?, ?, 'put')", (list_name, pattern.text))
        return True

    async def no_appeal_patterns(self) -> list[tuple[str, str]]:
        """(list, pattern) of every entry marked never appealable."""
        cur = await self.db.execute("SELECT list, pattern FROM entries WHERE no_appeal != 0")
        return [tuple(r) for r in await cur.fetchall()]

    async def add_appeal(self, a: Appeal, *, keep_code: bool = False) -> Appeal:
        """Store an appeal with a fresh unique code (``keep_code``: its own first, as `db copy`
        does); the same key twice (a retried write) is stored once and the stored one returned."""
        for i in range(50):
            row = (a.code if keep_code and a.code and i == 0 else new_appeal_code(), *astuple_appeal(a)[2:])
            async with self.transaction():
                cur = await self.db.execute(f"SELECT {APPEAL_COLUMNS} FROM appeals WHERE key = ?", (a.key,))
                old = await cur.fetchone()
                if old is not None:
                    return Appeal(*old)
                cur = await self.db.execute(
                    f"INSERT INTO appeals ({APPEAL_INSERT}) VALUES ({', '.join('?' * len(row))}) ON CONFLICT DO NOTHING", row
                )
                if cur.rowcount:
                    return Appeal(int(cur.lastrowid), *row)
        raise StoreError(f"{self.path}: no free appeal code after 50 tries (too many appeals kept?)")

    async def appeals(self, *, status: str | None = None, caller: str | None = None, since: float | None = None,
                      limit: int = 100000) -> list[Appeal]:
        """Appeals, oldest first: all, or of one status, one caller, since a time."""
        cond, args = [], []
        for col, op, val in (("status", "=", status), ("caller_e164", "=", caller), ("ts", ">=", since)):
            if val is not None:
                cond.append(f"{col} {op} ?")
                args.append(val)
        sql = f"SELECT {APPEAL_COLUMNS} FROM appeals" + (" WHERE " + " AND ".join(cond) if cond else "")
        cur = await self.db.execute(sql + " ORDER BY ts, id LIMIT ?", (*args, limit))
        return [Appeal(*r) for r in await cur.fetchall()]

    async def get_appeal(self, code: str) -> Appeal | None:
        cur = await self.db.execute(f"SELECT {APPEAL_COLUMNS} FROM appeals WHERE code = ?", (code,))
        row = await cur.fetchone()
        return Appeal(*row) if row else None

    async def decide_appeal(self, code: str, status: str, now: float, *, note: str = "", entry: Entry | None = None) -> Appeal | None:
        """Grant or deny a pending appeal; a grant's allow entry is written in the same transaction.
        Returns the appeal as it is after (unchanged when it was not pending), None when unknown."""
        if status not in ("granted", "denied"):
            raise ValueError(f"not a decision: {status!r}")
        async with self.transaction():
            cur = await self.db.execute(
                "UPDATE appeals SET status = ?, decided_at = ?, note = ?, grant_pattern = ?, grant_expires = ? "
                "WHERE code = ? AND status = 'pending'",
                (status, now, note, entry.pattern.text if entry else "", entry.expires_at if entry else None, code),
            )
            if cur.rowcount and entry is not None:
                await self._put(entry)
        return await self.get_appeal(code)

    async def appeal_summary(self, since: float) -> tuple[int, list[tuple[str, float]]]:
        """(appeals pending, (caller, newest ts) of every caller who appealed since ``since``):
        what the service's guard keeps in memory (cap and cooldown)."""
        (pending,) = await (await self.db.execute("SELECT COUNT(*) FROM appeals WHERE status = 'pending'")).fetchone()
        cur = await self.db.execute("SELECT caller_e164, MAX(ts) FROM appeals WHERE ts >= ? GROUP BY caller_e164", (since,))
        return int(pending), [tuple(r) for r in await cur.fetchall()]

    async def purge_appeals(self, before: float) -> list[Appeal]:
        """Delete appeals that came in before ``before``; returns them (their recordings go too)."""
        async with self.transaction():
            cur = await self.db.execute(f"SELECT {APPEAL_COLUMNS} FROM appeals WHERE ts < ?", (before,))
            gone = [Appeal(*r) for r in await cur.fetchall()]
            await self.db.execute("DELETE FROM appeals WHERE ts < ?", (before,))
        return gone


    async def contacts(self, since: float) -> list[tuple[str, float]]:
        cur = await self.db.execute("SELECT e164, last_ts FROM contacts WHERE last_ts >= ?", (since,))
        return [tuple(r) for r in await cur.fetchall()]


@dataclass(frozen=True)
class ImportResult:
    added: int
    updated: int
    unchanged: int
    removed: int = 0


#: The compact part of a loaded index, written beside the database after a full load so that a
#: restart reads two arrays from a file instead of 10 million rows (see load_index).
SNAPSHOT_SUFFIX = ".index"
SNAPSHOT_MAGIC = b"EDGEFILTER-INDEX-1\n"
#: A snapshot more than this many changes behind the database is not used (a full load is cheaper).
SNAPSHOT_MAX_BEHIND = 20000
#: Further behind than SNAPSHOT_MAX_BEHIND (a big import while the service runs), the snapshot's
#: arrays still serve, as do a running service's (service.ListFollower): the numbers added since
#: are merged into them in key order (a 100,000-line feed beside 10 million numbers: about a
#: second instead of a full read). Beyond this many changes a full read is the cheaper way.
MERGE_MAX_BEHIND = 1_000_000


def load_index(path: str, *, busy_timeout_ms: int = 30000, snapshot: bool = True) -> tuple[int, ListIndex]:
    """Read every list entry into a new ListIndex with the change-feed revision it reflects.

    Synchronous on a connection of its own, so the service runs it in a worker thread and keeps
    answering calls while it loads. Exact numbers arrive as (num, profile) integer pairs in key
    order (a covering index) straight into arrays: no Python object per entry is kept. With
    ``snapshot``, the arrays come from ``<db>.index`` when it matches this database's change
    feed (the changes made since are applied on top, in the same read transaction); after a
    full load the snapshot is rewritten.
    """
    con = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
    try:
        con.execute("BEGIN")  # one read snapshot for the revision and the entries
        (rev,) = con.execute("SELECT COALESCE(MAX(rev), 0) FROM changes").fetchone()
        profiles = read_profiles(con)
        index = ListIndex()
        snap = _read_snapshot(con, path, rev) if snapshot else None
        merge = snap is not None and rev - snap[0] > SNAPSHOT_MAX_BEHIND
        for name in LISTS:
            if snap is not None:
                keys, pids = snap[1][name]
            else:
                keys, pids = read_compact(con, name, max(profiles, default=0))
            index.load_compact(name, keys, pids, profiles)
        for sql in (
            f"SELECT {ENTRY_COLUMNS} FROM entries INDEXED BY entries_loose WHERE num IS NULL",
            f"SELECT {ENTRY_COLUMNS} FROM entries INDEXED BY entries_unprofiled WHERE num IS NOT NULL AND profile IS NULL",
        ):
            index.extend(map(entry_from_row, con.execute(sql)))
        if snap is not None:  # bring the snapshot up to this read transaction: each entry changed
            # since, as it is now; far behind, the numbers new to the arrays are merged into them
            rows = changed_rows(con, snap[0], rev)
            apply_changed(index, index.adopt_merge(index.plan_merge(rows, profiles)) if merge else rows)
        rewrite = snapshot and rev > 0 and (snap is None or merge)
        check = con.execute("SELECT list, pattern, op FROM changes WHERE rev = ?", (rev,)).fetchone() if rewrite else None
        con.execute("COMMIT")
        if check is not None:
            _write_snapshot(path, rev, list(check), index)
        return int(rev), index
    except sqlite3.Error as e:
        raise StoreError(describe_sqlite_error(path, e)) from None
    finally:
        con.close()


#: Exact numbers are read in chunks of this many rows, each chunk one row of one JSON array.
COMPACT_CHUNK = 32768


def read_compact(con: sqlite3.Connection, list_name: str, max_profile: int) -> tuple[array, array]:
    """One list's (num, profile) pairs in key order, as the arrays ListIndex.load_compact adopts.

    Read row by row, 10 million pairs cost 8 s of a cold start, nearly all of it in the sqlite3
    module (a tuple and two ints per row, the GIL released and taken per step), not in SQLite.
    So SQLite hands them over in chunks, each chunk one JSON array that json.loads turns into
    ints in C. Best, each pair is packed into one integer, ``num << shift | profile``: a key of
    an E.164 number (at most 15 digits) takes 51 bits, which leaves a byte or two for the profile
    id, and the packed array is split by byte slicing (half the time of row by row). Otherwise
    keys and profile ids come as two arrays per chunk; rows one by one only when neither works.
    """
    keys, pids = array("q"), array("I")
    lo, hi = con.execute(
        "SELECT (SELECT min(num) FROM entries INDEXED BY entries_num WHERE list = ?1 AND num IS NOT NULL), "
        "(SELECT max(num) FROM entries INDEXED BY entries_num WHERE list = ?1 AND num IS NOT NULL)",
        (list_name,),
    ).fetchone()
    if lo is None:
        return keys, pids
    if lo >= 0:
        packs = sys.byteorder == "little" and keys.itemsize == 8 and pids.itemsize == 4  # the byte slicing
        shift = next((s for s in (8, 16) if packs and max_profile < 1 << s and hi < 1 << (63 - s)), 0)
        if _read_compact_chunks(con, list_name, shift, keys, pids):
            return keys, pids
        keys, pids = array("q"), array("I")  # see _read_compact_chunks: the plain way below
    cur = con.execute(
        "SELECT num, profile FROM entries INDEXED BY entries_num "
        "WHERE list = ? AND num IS NOT NULL AND profile IS NOT NULL ORDER BY num",
        (list_name,),
    )
    while rows := cur.fetchmany(65536):
        keys.extend([r[0] for r in rows])
        pids.extend([r[1] for r in rows])
    return keys, pids


def _read_compact_chunks(con: sqlite3.Connection, list_name: str, shift: int, keys: array, pids: array) -> bool:
    """read_compact's fast ways: chunks of ``num << shift | profile`` (``shift`` 8 or 16) as one
    JSON array, unpacked by byte slicing (little-endian int64: the low ``shift // 8`` bytes are
    the profile id, the rest the key), or with ``shift`` 0 keys and profile ids as two arrays.
    False when a chunk is not usable (the caller then reads row by row): not in key order
    (SQLite feeds an aggregate in its subquery's order, but does not promise it), or a profile
    id out of range (packed as null; or too big for the array)."""
    import json

    rows = (
        "FROM (SELECT num, profile FROM entries INDEXED BY entries_num "
        "WHERE list = ? AND num > ? AND profile IS NOT NULL ORDER BY num LIMIT ?)"
    )
    if shift:
        sql = (f"SELECT json_group_array(CASE WHEN profile BETWEEN 0 AND {(1 << shift) - 1} "
               f"THEN num * {1 << shift} + profile END), NULL {rows}")
    else:
        sql = f"SELECT json_group_array(num), json_group_array(profile) {rows}"
    low = shift // 8  # bytes of each packed value that hold the profile id
    last = -1
    while True:
        first, second = con.execute(sql, (list_name, last, COMPACT_CHUNK)).fetchone()
        values = json.loads(first)
        if not values:
            return True
        try:
            if values != sorted(values):
                return False
            chunk = array("q", values)
            if not shift:
                profile_ids = array("I", json.loads(second))
                if len(profile_ids) != len(chunk):
                    return False
                pids.extend(profile_ids)
        except (TypeError, OverflowError):
            return False
        last = values[-1] >> shift
        if not shift:
            keys.extend(chunk)
            continue
        raw = chunk.tobytes()
        key_bytes = bytearray(len(raw))
        for j in range(8 - low):
            key_bytes[j::8] = raw[j + low :: 8]
        pid_bytes = bytearray(len(values) * 4)
        for j in range(low):
            pid_bytes[j::4] = raw[j::8]
        keys.frombytes(key_bytes)
        pids.frombytes(pid_bytes)


#: Each (list, pattern) changed in (?, ?] once, with its row as it is now (NULL columns: deleted).
CHANGED_SQL = (
    "SELECT c.list, c.pattern, " + ", ".join("e." + c.strip() for c in ENTRY_COLUMNS.split(",")) + ", e.num, e.profile "
    "FROM (SELECT DISTINCT list, pattern FROM changes WHERE rev > ? AND rev <= ?) c "
    "LEFT JOIN entries e ON e.list = c.list AND e.pattern = c.pattern ORDER BY c.list, e.num"
)
PROFILES_SQL = "SELECT id, category, note, source, created_at, expires_at FROM profiles"


def changed_row(r: Sequence) -> ChangedRow:
    """A CHANGED_SQL row as ListIndex.plan_merge takes it."""
    return r[0], r[1], tuple(r[2:11]) if r[2] is not None else None, r[11], r[12]


def changed_rows(con: sqlite3.Connection, since: int, head: int) -> list[ChangedRow]:
    """Each (list, pattern) changed in (since, head] once, as it is now: the input of
    ListIndex.plan_merge, or of apply_changed alone."""
    return [changed_row(r) for r in con.execute(CHANGED_SQL, (since, head))]


def read_profiles(con: sqlite3.Connection) -> dict[int, tuple]:
    """Every metadata profile: {id: (category, note, source, created_at, expires_at)}."""
    return {r[0]: tuple(r[1:]) for r in con.execute(PROFILES_SQL)}


def read_changed_file(path: str, since: int, busy_timeout_ms: int = 30000) -> tuple[int, list[ChangedRow], dict]:
    """(head revision, changed_rows since ``since``, the profiles) on a connection of its own, in
    one read transaction (for a worker thread)."""
    con = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
    try:
        con.execute("BEGIN")
        (head,) = con.execute("SELECT COALESCE(MAX(rev), 0) FROM changes").fetchone()
        out = int(head), changed_rows(con, since, head), read_profiles(con)
        con.execute("COMMIT")
        return out
    except sqlite3.Error as e:
        raise StoreError(describe_sqlite_error(path, e)) from None
    finally:
        con.close()


def apply_changed(index: ListIndex, rows: Iterable[ChangedRow]) -> None:
    """put or remove each changed row (the rows plan_merge left)."""
    for list_name, text, columns, _num, _pid in rows:
        if columns is not None:
            index.put(entry_from_row(columns))
        else:
            index.remove(list_name, Pattern.from_text(text))


def _read_snapshot(con: sqlite3.Connection, path: str, head: int) -> tuple[int, dict] | None:
    """The snapshot's (rev, arrays per list) when it belongs to this database, else None."""
    header = read_snapshot_header(path + SNAPSHOT_SUFFIX, head, MERGE_MAX_BEHIND)
    if header is None:
        return None
    row = con.execute("SELECT list, pattern, op FROM changes WHERE rev = ?", (header["rev"],)).fetchone()
    if row is None or list(row) != header["check"]:
        return None  # another database, or its feed was trimmed past the snapshot
    arrays = read_snapshot_arrays(path + SNAPSHOT_SUFFIX, header)
    return None if arrays is None else (header["rev"], arrays)


def read_snapshot_header(file: str, head: int, max_behind: int = SNAPSHOT_MAX_BEHIND) -> dict | None:
    """A snapshot file's header ({"rev", "check", "lists", "offset"}) when it is usable at change
    feed revision ``head`` (not ahead of it, not too far behind), else None. The caller then
    checks that the database's change ``rev`` is the one recorded in "check": the same change
    feed, not another database's nor one trimmed past the snapshot."""
    import json

    try:
        with open(file, "rb") as f:
            if f.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
                return None
            header = json.loads(f.readline())
            header["rev"] = int(header["rev"])
            header["offset"] = f.tell()
            if header["rev"] > head or head - header["rev"] > max_behind:
                return None
            return header
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_snapshot_arrays(file: str, header: dict) -> dict[str, tuple[array, array]] | None:
    """The (keys, profile ids) arrays per list of a snapshot file (see read_snapshot_header)."""
    try:
        with open(file, "rb") as f:
            f.seek(header["offset"])
            arrays = {}
            for name in LISTS:
                n = int(header["lists"][name])
                keys, pids = array("q"), array("I")
                keys.fromfile(f, n)
                pids.fromfile(f, n)
                arrays[name] = (keys, pids)
            return arrays
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _write_snapshot(path: str, rev: int, check: list, index: ListIndex) -> None:
    write_snapshot(path + SNAPSHOT_SUFFIX, rev, check, index)


def write_snapshot(file: str, rev: int, check: list, index: ListIndex) -> None:
    """Write a snapshot file atomically (temp file + rename); a failure only costs the next start.
    ``check`` is the (list, pattern, op) of change ``rev``, which identifies the change feed."""
    import json

    arrays = index.compact_arrays()
    tmp = f"{file}.{os.getpid()}.tmp"
    try:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(SNAPSHOT_MAGIC)
            header = {"rev": rev, "check": check, "lists": {n: len(arrays[n][0]) for n in LISTS}}
            f.write(json.dumps(header).encode() + b"\n")
            for name in LISTS:
                keys, pids = arrays[name]
                keys.tofile(f)
                pids.tofile(f)
        os.replace(tmp, file)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)

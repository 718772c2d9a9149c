"""The shared store: PostgreSQL through asyncpg, for several PBXs in front of one database.

Same methods and meaning as store.Store (the SQLite file of a single box), so the service and the
CLI do not care which one ``stores.open_store`` gave them. What differs, and why:

- Change feed: a statement trigger on ``changes`` fires ``NOTIFY edgefilter_changes``;
  ``watch_changes`` keeps one LISTEN connection per node and nudges the list follower, so a change
  made on any node (or by the CLI) reaches every node's in-memory index in milliseconds. The
  periodic poll stays as the fallback when that connection is down.
- Writers to ``changes`` (and to ``calls``) take a transaction-scoped advisory lock before drawing
  a number from the sequence, so numbers commit in order: a reader that has seen rev N has seen
  every rev below N. Without it a follower could skip a slow transaction's change for ever.
  List writes are rare and call batches are short, so the serialisation costs nothing visible.
- Call records carry the node that screened the call and a key unique across nodes;
  ``INSERT ... ON CONFLICT (key) DO NOTHING`` makes retries (spool drains, `db copy` re-runs)
  harmless.
- Schema migrations are our own (MIGRATIONS below, a ``schema_version`` table), applied under an
  advisory lock so that two nodes starting together do not race.

Every SQL statement is parameterised. Every driver or network failure becomes a StoreError
whose message says what to do, and never contains the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import struct
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import asyncpg

from edgefilter.core.config import redact_url
from edgefilter.core.errors import StoreError
from edgefilter.lists.index import LISTS, ChangedRow, Entry, ListIndex, Pattern
from edgefilter.store.sqlite import (
    APPEAL_COLUMNS,
    APPEAL_INSERT,
    APPEALS_SCHEMA,
    CALL_COLUMNS,
    CHANGED_SQL,
    ENTRY_COLUMNS,
    KEYED_CALL_COLUMNS,
    OUTCOME_COLUMNS,
    PROFILES_SQL,
    REFUSAL_COLUMNS,
    REPUTATION_COLUMNS,
    Appeal,
    BatchedImport,
    CallOutcome,
    CallRecord,
    ContactSeen,
    ImportResult,
    Refusal,
    ReputationRow,
    StagedRow,
    astuple_appeal,
    changed_row,
    entry_from_row,
    keyed_row,
    new_appeal_code,
    read_snapshot_arrays,
    read_snapshot_header,
    write_snapshot,
)

log = logging.getLogger("edgefilter.pgstore")

SCHEMA_VERSION = 8
CHANGES_CHANNEL = "edgefilter_changes"
# pg_advisory_xact_lock keys (bigint): "edgefi" + a small number, unlikely to meet anyone else's.
LOCK_MIGRATE = 0x65646765666901
LOCK_CHANGES = 0x65646765666902
LOCK_CALLS = 0x65646765666903
LOCK_REFUSALS = 0x65646765666904

# One entry per schema version, applied in order, each in its own transaction together with its
# row in schema_version. Keep the version numbers in step with store.MIGRATIONS (SQLite): a
# feature's tables land on both backends under the same number.
MIGRATIONS: dict[int, str] = {
    1: """
    -- COLLATE "C": byte order as in SQLite, whatever the server's locale ('+', '*' and '#' are
    -- not ignored), so listings and the keyset scans of iter_entries agree on both backends.
    CREATE TABLE entries (
        list       TEXT COLLATE "C" NOT NULL CHECK (list IN ('block', 'allow')),
        pattern    TEXT COLLATE "C" NOT NULL,
        kind       TEXT NOT NULL CHECK (kind IN ('exact', 'prefix', 'mask')),
        key        TEXT COLLATE "C" NOT NULL,
        category   TEXT NOT NULL DEFAULT '',
        note       TEXT NOT NULL DEFAULT '',
        source     TEXT NOT NULL DEFAULT 'cli',
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        PRIMARY KEY (list, pattern)
    );
    CREATE INDEX entries_source ON entries (source);
    CREATE INDEX entries_key ON entries (key);
    CREATE INDEX entries_expires ON entries (expires_at) WHERE expires_at IS NOT NULL;

    CREATE TABLE changes (
        rev     BIGSERIAL PRIMARY KEY,
        list    TEXT NOT NULL,
        pattern TEXT NOT NULL,
        op      TEXT NOT NULL CHECK (op IN ('put', 'del'))
    );
    CREATE FUNCTION edgefilter_notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('edgefilter_changes', '');
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER changes_notify AFTER INSERT ON changes
        FOR EACH STATEMENT EXECUTE FUNCTION edgefilter_notify_changes();

    CREATE TABLE calls (
        id          BIGSERIAL PRIMARY KEY,
        node        TEXT NOT NULL DEFAULT '',
        key         TEXT NOT NULL UNIQUE,
        ts          DOUBLE PRECISION NOT NULL,
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
        score       DOUBLE PRECISION NOT NULL DEFAULT 0,
        rules       TEXT NOT NULL DEFAULT '',
        policy      TEXT NOT NULL DEFAULT '',
        elapsed_ms  DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX calls_ts ON calls (ts);
    CREATE INDEX calls_caller ON calls (caller_e164, ts);
    CREATE INDEX calls_uniqueid ON calls (uniqueid);
    """,
    # 2 (SQLite 2): behaviour and evidence: call outcomes from AMI, the refusal ledger, known contacts.
    2: """
    ALTER TABLE calls ADD COLUMN linkedid TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN answered INTEGER;
    ALTER TABLE calls ADD COLUMN talk_seconds DOUBLE PRECISION;
    ALTER TABLE calls ADD COLUMN hangup_cause INTEGER;
    ALTER TABLE calls ADD COLUMN hangup_text TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN dial_status TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN ended_at DOUBLE PRECISION;
    CREATE INDEX calls_extension ON calls (extension, ts);
    -- outcomes are applied per node (two PBXs may hand out the same uniqueid)
    CREATE INDEX calls_node_uniqueid ON calls (uniqueid, node);
    CREATE TABLE refusals (
        id            BIGSERIAL PRIMARY KEY,
        caller_e164   TEXT NOT NULL,
        callee        TEXT NOT NULL,
        ts            DOUBLE PRECISION NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('refuse', 'block', 'report')),
        category      TEXT NOT NULL DEFAULT '',
        source        TEXT NOT NULL DEFAULT '',
        call_uniqueid TEXT NOT NULL DEFAULT '',
        pattern       TEXT NOT NULL DEFAULT '',
        undone_at     DOUBLE PRECISION
    );
    CREATE INDEX refusals_caller ON refusals (caller_e164, ts);
    CREATE INDEX refusals_callee ON refusals (callee, ts);
    CREATE TABLE contacts (
        e164    TEXT PRIMARY KEY,
        last_ts DOUBLE PRECISION NOT NULL,
        how     TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX contacts_last ON contacts (last_ts);
    """,
    # 3 (SQLite 3, lists at scale): exact numbers get an int64 key (num, lists.exact_num) and a
    # shared metadata profile, so a node loads millions of numbers as two arrays. Merged after
    # 4-6: a database already past v3 gets it on its next migrate (its schema_version row is
    # missing, see migrate). Row triggers keep num right and drop a profile whose metadata
    # changed for writers that do not set them; assign_profiles (set-based) gives new rows theirs.
    3: """
    ALTER TABLE entries ADD COLUMN num BIGINT;
    ALTER TABLE entries ADD COLUMN profile BIGINT;
    CREATE TABLE profiles (
        id         BIGSERIAL PRIMARY KEY,
        sig        TEXT COLLATE "C" NOT NULL UNIQUE,
        list       TEXT NOT NULL,
        category   TEXT NOT NULL,
        note       TEXT NOT NULL,
        source     TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION
    );
    CREATE FUNCTION edgefilter_entry_num() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.pattern = '+' || NEW.key AND NEW.key ~ '^[0-9]{1,18}$' THEN
            NEW.num := ('1' || NEW.key)::bigint;
        END IF;
        RETURN NEW;
    END
    $$;
    CREATE FUNCTION edgefilter_entry_profile_stale() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.profile := NULL;
        RETURN NEW;
    END
    $$;
    CREATE TRIGGER entries_num BEFORE INSERT ON entries
        FOR EACH ROW WHEN (NEW.num IS NULL AND NEW.kind = 'exact') EXECUTE FUNCTION edgefilter_entry_num();
    CREATE TRIGGER entries_profile_stale BEFORE UPDATE ON entries
        FOR EACH ROW WHEN (NEW.profile IS NOT NULL AND NEW.profile IS NOT DISTINCT FROM OLD.profile
            AND (NEW.category, NEW.note, NEW.source, NEW.created_at, NEW.expires_at)
                IS DISTINCT FROM (OLD.category, OLD.note, OLD.source, OLD.created_at, OLD.expires_at))
        EXECUTE FUNCTION edgefilter_entry_profile_stale();
    UPDATE entries SET num = ('1' || key)::bigint
        WHERE kind = 'exact' AND pattern = '+' || key AND key ~ '^[0-9]{1,18}$';
    CREATE INDEX entries_num ON entries (list, num) INCLUDE (profile) WHERE num IS NOT NULL;
    CREATE INDEX entries_loose ON entries (list, pattern) WHERE num IS NULL;
    CREATE INDEX entries_unprofiled ON entries (list, pattern) WHERE num IS NOT NULL AND profile IS NULL;
    """,
    # 4 (SQLite 4): the reputation cache (answers of online reputation sources, per number and source).
    4: """
    CREATE TABLE reputation (
        number     TEXT NOT NULL,
        source     TEXT NOT NULL,
        score      DOUBLE PRECISION,
        category   TEXT,
        status     TEXT NOT NULL CHECK (status IN ('listed', 'unlisted')),
        fetched_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (source, number)
    );
    CREATE INDEX reputation_number ON reputation (number);
    CREATE INDEX reputation_expires ON reputation (expires_at);
    """,
    # 5 (SQLite 5): outcomes of the press-a-digit challenge; node + key as SQLite gains in 6.
    5: """
    CREATE TABLE challenge_outcomes (
        id          BIGSERIAL PRIMARY KEY,
        ts          DOUBLE PRECISION NOT NULL,
        uniqueid    TEXT NOT NULL DEFAULT '',
        caller_e164 TEXT NOT NULL,
        outcome     TEXT NOT NULL CHECK (outcome IN ('pass', 'fail', 'hangup')),
        node        TEXT NOT NULL DEFAULT '',
        key         TEXT NOT NULL UNIQUE
    );
    CREATE INDEX challenge_outcomes_caller ON challenge_outcomes (caller_e164, ts);
    CREATE INDEX challenge_outcomes_ts ON challenge_outcomes (ts);
    """,
    # 6 (SQLite 6: node + key on calls and challenge outcomes): PostgreSQL has had them since 1 and 5.
    6: "SELECT 1",
    # 7 (as SQLite's): the key index keeps only rows without a compact key (exact numbers are
    # found by their pattern), masks get an index of their own: candidates() reads only indexes
    # and a bulk import maintains one index less. (SQLite also drops a per-row trigger;
    # PostgreSQL keeps its BEFORE INSERT trigger, skipped by its WHEN clause without PL/pgSQL.)
    7: """
    DROP INDEX IF EXISTS entries_key;
    CREATE INDEX entries_key ON entries (key) WHERE num IS NULL;
    CREATE INDEX IF NOT EXISTS entries_masks ON entries (length(key)) WHERE kind = 'mask';
    """,
    # 8 (as SQLite's, issue 17): entries never appealable, and the appeals themselves.
    8: APPEALS_SCHEMA.replace("{ID}", "BIGSERIAL PRIMARY KEY"),
}

#: Migrations merged after higher numbers had shipped (same numbers as store.LATE_MIGRATIONS).
LATE_MIGRATIONS = frozenset({3})

# unnest() casts for a bulk insert of CallRecord rows (KEYED_CALL_COLUMNS order).
_CALL_TYPES = (
    "float8", "text", "text", "text", "text", "text", "text", "text", "text",
    "text", "text", "float8", "text", "text", "float8", "text", "text",
)
_OUTCOME_TYPES = ("text", "int4", "float8", "int4", "text", "text", "float8")  # OUTCOME_COLUMNS
_ENTRY_TYPES = ("text", "text", "text", "text", "text", "text", "text", "float8", "float8")


def describe_pg_error(where: str, exc: BaseException) -> str:
    """An admin-readable reason for a PostgreSQL failure (never includes the password)."""
    if isinstance(exc, StoreError):
        return str(exc)
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return f"{where}: password authentication failed (check [store] password_file or PGPASSWORD)"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"{where}: the server refused this user: {exc}"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{where}: the database does not exist (create it: createdb -O USER DBNAME)"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return f"{where}: permission denied ({exc}); the user needs to own the database or its tables"
    if isinstance(exc, (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError)):
        return f"{where}: the server is shutting down or restarting"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return f"{where}: the server is starting up or shutting down"
    if isinstance(exc, (asyncpg.ConnectionDoesNotExistError, asyncpg.ConnectionFailureError)):
        return f"{where}: connection lost (server restarted or network down)"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"{where}: no answer in time (server down or network unreachable)"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{where}: cannot connect ({reason}): is PostgreSQL running and reachable?"
    if isinstance(exc, asyncpg.InterfaceError):
        return f"{where}: connection problem: {exc}"
    return f"{where}: database error: {exc}"


_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError, TimeoutError)


class PgStore(BatchedImport):
    """A small asyncpg pool on one PostgreSQL database; use ``async with PgStore.open(url)``."""

    backend = "postgresql"

    def __init__(self, pool: asyncpg.Pool, url: str, password: str | None, connect_timeout: float) -> None:
        self.pool = pool
        self.url = url
        self.where = redact_url(url)
        self.path = self.where  # what older code prints as "the database"
        self._password = password
        self._connect_timeout = connect_timeout
        self._tx: contextvars.ContextVar[asyncpg.Connection | None] = contextvars.ContextVar("pg_tx", default=None)
        self.node = ""  # this node's name, for rows that name none (stores.open_store sets it)
        self.notices = 0  # change notices received (tests and `explain` of latency)
        self.listening = False
        self._import_conn: asyncpg.Connection | None = None  # held from begin_import to apply_import
        #: node-local start-up cache of the compact index (stores.open_store sets it); "" = none
        self.snapshot_path = ""
        self.last_load = ""  # "snapshot" or "full": how the last load_index got the numbers

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        password: str | None = None,
        migrate: bool = True,
        connect_timeout: float = 5.0,
        command_timeout: float | None = 60.0,
    ) -> AsyncIterator[PgStore]:
        """A pool that connects on first use; with ``migrate`` the schema is brought up to date
        (and so the server must answer) before the store is handed out."""
        where = redact_url(url)
        try:
            pool = await asyncpg.create_pool(
                dsn=url,
                password=password,
                min_size=0,
                max_size=4,
                timeout=connect_timeout,
                command_timeout=command_timeout,
                max_inactive_connection_lifetime=60.0,
            )
        except _DB_ERRORS as e:
            raise StoreError(describe_pg_error(where, e)) from None
        except ValueError as e:  # a malformed URL
            raise StoreError(f"{where}: invalid PostgreSQL URL ({e})") from None
        store = cls(pool, url, password, connect_timeout)
        try:
            if migrate:
                await store.migrate()
            yield store
        finally:
            await store._end_import()
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:  # a dead server can keep close() waiting: cut the sockets
                pool.terminate()

    def describe_error(self, exc: BaseException) -> str:
        return describe_pg_error(self.where, exc)

    # -- connections and transactions ----------------------------------------------------
    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """The current transaction's connection, else one from the pool; driver errors -> StoreError."""
        c = self._tx.get()
        if c is not None:
            yield c
            return
        try:
            async with self.pool.acquire(timeout=self._connect_timeout + 1) as c:
                yield c
        except _DB_ERRORS as e:
            raise StoreError(describe_pg_error(self.where, e)) from None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN ... COMMIT on one pooled connection, rolled back on any error; store methods
        called inside it join it (nested calls become savepoints)."""
        c = self._tx.get()
        if c is not None:
            async with c.transaction():
                yield
            return
        async with self._connection() as c:
            token = self._tx.set(c)
            try:
                async with c.transaction():
                    yield
            finally:
                self._tx.reset(token)

    async def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION, one transaction per step, under an advisory lock."""
        async with self._connection() as c:
            while True:
                async with c.transaction():
                    await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_MIGRATE)
                    await c.execute(
                        "CREATE TABLE IF NOT EXISTS schema_version ("
                        " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                    )
                    version = await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                    if version > SCHEMA_VERSION:
                        raise StoreError(
                            f"{self.where}: database schema v{version} is newer than this edgefilter "
                            f"(v{SCHEMA_VERSION}); upgrade edgefilter"
                        )
                    # a migration merged after higher numbers (3) is applied when its row is
                    # missing, even to a database already past it
                    done = {r[0] for r in await c.fetch("SELECT version FROM schema_version")}
                    late = [v for v in MIGRATIONS if v < version and v not in done and v in LATE_MIGRATIONS]
                    if version == SCHEMA_VERSION and not late:
                        return SCHEMA_VERSION
                    # numbers reserved for changes not merged yet are skipped, as in SQLite
                    step = min(late or [v for v in [*MIGRATIONS, SCHEMA_VERSION] if version < v <= SCHEMA_VERSION])
                    if step in MIGRATIONS:
                        await c.execute(MIGRATIONS[step])
                    await c.execute("INSERT INTO schema_version (version) VALUES ($1)", step)
                    log.info("%s: schema migrated to v%d", self.where, step)

    async def schema_version(self) -> int:
        async with self._connection() as c:
            exists = await c.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            return int(await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")) if exists else 0

    async def _log_changes(self, c: asyncpg.Connection, rows: list[tuple[str, str]], op: str) -> None:
        """Append change rows; the advisory lock makes revs commit in order (see module doc)."""
        if not rows:
            return
        await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_CHANGES)
        await c.execute(
            "INSERT INTO changes (list, pattern, op) SELECT l, p, $3 FROM unnest($1::text[], $2::text[]) AS u(l, p)",
            [r[0] for r in rows], [r[1] for r in rows], op,
        )

    # -- lists ----------------------------------------------------------------------------
    async def put_entry(self, entry: Entry) -> str:
        """Insert or update one entry; returns 'added', 'updated' or 'unchanged'."""
        counts = await self.put_entries([entry])
        return next(k for k, v in counts.items() if v)

    async def put_entries(self, entries: Iterable[Entry], batch: int = 5000) -> dict[str, int]:
        """Insert or update many entries in one transaction; counts of added/updated/unchanged.
        Like put_entry, an update changes category, note, source and expiry (created_at stays)."""
        latest: dict[tuple[str, str], Entry] = {}
        for e in entries:  # one row may not be touched twice by one INSERT ... ON CONFLICT
            latest[(e.list, e.pattern.text)] = e
        items = list(latest.values())
        counts = {"added": 0, "updated": 0, "unchanged": 0}
        casts = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_ENTRY_TYPES))
        sql = (
            f"INSERT INTO entries ({ENTRY_COLUMNS}) SELECT * FROM unnest({casts}) "
            "ON CONFLICT (list, pattern) DO UPDATE SET category = EXCLUDED.category, note = EXCLUDED.note, "
            "source = EXCLUDED.source, expires_at = EXCLUDED.expires_at "
            "WHERE (entries.category, entries.note, entries.source, entries.expires_at) IS DISTINCT FROM "
            "(EXCLUDED.category, EXCLUDED.note, EXCLUDED.source, EXCLUDED.expires_at) "
            "RETURNING list, pattern, (xmax = 0) AS inserted"
        )
        async with self.transaction():
            async with self._connection() as c:
                for i in range(0, len(items), batch):
                    chunk = items[i:i + batch]
                    cols = list(zip(*[
                        (e.list, e.pattern.text, e.pattern.kind, e.pattern.key, e.category, e.note, e.source,
                         e.created_at, e.expires_at)
                        for e in chunk
                    ]))
                    rows = await c.fetch(sql, *[list(col) for col in cols])
                    added = sum(1 for r in rows if r["inserted"])
                    counts["added"] += added
                    counts["updated"] += len(rows) - added
                    counts["unchanged"] += len(chunk) - len(rows)
                    await self._log_changes(c, [(r["list"], r["pattern"]) for r in rows], "put")
                await self._assign_profiles(c)
        return counts

    async def remove_entry(self, pattern, list_name: str | None = None) -> list[str]:
        """Delete the pattern from one list or both; returns the lists it was removed from."""
        lists = [list_name] if list_name else ["block", "allow"]
        async with self.transaction():
            async with self._connection() as c:
                rows = await c.fetch(
                    "DELETE FROM entries WHERE pattern = $1 AND list = ANY($2::text[]) RETURNING list",
                    pattern.text, lists,
                )
                removed = [n for n in lists if any(r["list"] == n for r in rows)]
                await self._log_changes(c, [(n, pattern.text) for n in removed], "del")
        return removed

    async def entries(self, list_name: str | None = None, *, include_expired: bool = True, now: float | None = None) -> list[Entry]:
        cond, args = [], []
        if list_name:
            args.append(list_name)
            cond.append(f"list = ${len(args)}")
        if not include_expired:
            args.append(time.time() if now is None else now)
            cond.append(f"(expires_at IS NULL OR expires_at > ${len(args)})")
        sql = f"SELECT {ENTRY_COLUMNS} FROM entries"
        if cond:
            sql += " WHERE " + " AND ".join(cond)
        sql += " ORDER BY list, pattern"
        async with self._connection() as c:
            return [entry_from_row(r) for r in await c.fetch(sql, *args)]

    async def candidates(self, digits: str) -> list[Entry]:
        """Entries that could match ``digits``: exact, every prefix, same-length masks (indexed)."""
        keys = [digits[:i] for i in range(1, len(digits) + 1)]
        async with self._connection() as c:
            rows = await c.fetch(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE list IN ('block', 'allow') AND pattern = ANY($3::text[]) "
                f"UNION ALL SELECT {ENTRY_COLUMNS} FROM entries WHERE num IS NULL AND kind = 'prefix' AND key = ANY($1::text[]) "
                f"UNION ALL SELECT {ENTRY_COLUMNS} FROM entries WHERE kind = 'mask' AND length(key) = $2",
                keys, len(digits), ["+" + digits, digits],
            )
        return [entry_from_row(r) for r in rows]

    async def iter_entries(self, batch: int = 50000) -> AsyncIterator[list[Entry]]:
        """All entries in batches (start-up load of the index), by key ranges: no long transaction."""
        last = ("", "")
        while True:
            async with self._connection() as c:
                rows = await c.fetch(
                    f"SELECT {ENTRY_COLUMNS} FROM entries WHERE (list, pattern) > ($1, $2) "
                    "ORDER BY list, pattern LIMIT $3",
                    last[0], last[1], batch,
                )
            if not rows:
                break
            last = (rows[-1]["list"], rows[-1]["pattern"])
            yield [entry_from_row(r) for r in rows]

    async def head_rev(self) -> int:
        async with self._connection() as c:
            return int(await c.fetchval("SELECT COALESCE(MAX(rev), 0) FROM changes"))

    async def changes_since(self, rev: int, limit: int) -> list[tuple[int, str, str, str, Entry | None]]:
        """Changes after ``rev`` with the entry's current row (None when it is gone)."""
        cols = ", ".join("e." + c.strip() for c in ENTRY_COLUMNS.split(","))
        async with self._connection() as c:
            rows = await c.fetch(
                f"""SELECT c.rev, c.op, c.list, c.pattern, {cols}
                    FROM changes c LEFT JOIN entries e ON e.list = c.list AND e.pattern = c.pattern
                    WHERE c.rev > $1 ORDER BY c.rev LIMIT $2""",
                rev, limit,
            )
        return [(r[0], r[1], r[2], r[3], entry_from_row(tuple(r)[4:]) if r[4] is not None else None) for r in rows]

    async def changed_entries(self, since: int) -> tuple[int, list[ChangedRow], dict]:
        """(head revision, each entry changed after ``since`` once as it is now, the metadata
        profiles), in one repeatable-read transaction: a big batch for ListIndex.plan_merge."""
        sql = CHANGED_SQL.replace("rev > ?", "rev > $1").replace("rev <= ?", "rev <= $2")
        rows: list[ChangedRow] = []
        async with self._connection() as c:
            async with c.transaction(isolation="repeatable_read", readonly=True):
                head = int(await c.fetchval("SELECT COALESCE(MAX(rev), 0) FROM changes"))
                # a cursor, converted as it comes: a million rows must not hold the event loop
                async for r in c.cursor(sql, since, head, prefetch=5000):
                    rows.append(changed_row(tuple(r)))
                    if not len(rows) % 5000:
                        await asyncio.sleep(0)
                profiles = {r[0]: tuple(r)[1:] for r in await c.fetch(PROFILES_SQL)}
        return head, rows, profiles

    async def watch_changes(self, wake: Callable[[], None], resync: Callable[[], None] | None = None) -> None:
        """Run for ever: LISTEN on the change channel and call ``wake`` on every notice and after
        connecting. After a lost connection it calls ``resync`` instead: the server may be a
        promoted standby that lacks the last changes (asynchronous replication), which only a
        full reload corrects. Reconnects with backoff; a ping every 10 s notices a connection
        that died silently."""
        delay, failing = 0.5, False
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.url, password=self._password, timeout=self._connect_timeout)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c: lost.set())

                def notice(*_args) -> None:
                    self.notices += 1
                    wake()

                await conn.add_listener(CHANGES_CHANNEL, notice)
                self.listening = True
                if failing:
                    log.info("%s: change notices back; reloading the lists once (failover-safe), then changes apply at once again", self.where)
                    (resync or wake)()
                else:
                    log.info("%s: listening for list changes (LISTEN %s)", self.where, CHANGES_CHANNEL)
                    wake()
                failing, delay = False, 0.5
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), 10.0)
                    except TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=5.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning(
                        "change notices from %s lost (%s); the poll keeps following list changes, reconnecting with backoff",
                        self.where, describe_pg_error(self.where, e),
                    )
                failing = True
            finally:
                self.listening = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if not failing:  # the connection ended without an exception (server closed it)
                log.warning("change notices from %s lost (connection closed); reconnecting", self.where)
                failing = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def purge_expired(self, now: float | None = None) -> int:
        """Delete expired entries (they already stopped matching); records 'del' changes."""
        now = time.time() if now is None else now
        async with self.transaction():
            async with self._connection() as c:
                rows = await c.fetch(
                    "DELETE FROM entries WHERE expires_at IS NOT NULL AND expires_at <= $1 RETURNING list, pattern", now
                )
                await self._log_changes(c, [(r[0], r[1]) for r in rows], "del")
        return len(rows)

    async def trim_changes(self, keep: int = 100000) -> None:
        """Forget old change rows; a service that fell that far behind does a full reload."""
        async with self._connection() as c:
            await c.execute("DELETE FROM changes WHERE rev <= (SELECT COALESCE(MAX(rev), 0) FROM changes) - $1", keep)

    async def counts(self) -> dict[str, int]:
        out = {"block": 0, "allow": 0}
        async with self._connection() as c:
            out.update({r[0]: r[1] for r in await c.fetch("SELECT list, COUNT(*) FROM entries GROUP BY list")})
        return out

    async def _assign_profiles(self, c: asyncpg.Connection) -> None:
        """Give exact numbers without a profile theirs (set-based; the partial index finds them)."""
        await c.execute(
            f"""INSERT INTO profiles (sig, list, category, note, source, created_at, expires_at)
                SELECT DISTINCT {_sig('e')}, e.list, e.category, e.note, e.source, e.created_at, e.expires_at
                FROM entries e WHERE e.num IS NOT NULL AND e.profile IS NULL
                ON CONFLICT (sig) DO NOTHING"""
        )
        await c.execute(
            f"""UPDATE entries e SET profile = p.id FROM profiles p
                WHERE e.num IS NOT NULL AND e.profile IS NULL AND p.sig = {_sig('e')}"""
        )

    # -- bulk import (same contract as store.Store) ---------------------------------------
    async def begin_import(self) -> None:
        """Hold one connection for the import and create its empty staging table (TEMP: only
        this connection sees it, a killed import leaves nothing, staging takes no lock)."""
        await self._end_import()
        try:
            self._import_conn = await self.pool.acquire(timeout=self._connect_timeout + 1)
            await self._import_conn.execute(
                "CREATE TEMP TABLE import_stage (seq BIGSERIAL, list TEXT COLLATE \"C\", pattern TEXT COLLATE \"C\", "
                "num BIGINT, category TEXT, note TEXT, source TEXT, created_at DOUBLE PRECISION, expires_at DOUBLE PRECISION)"
            )
        except _DB_ERRORS as e:
            await self._end_import()
            raise StoreError(describe_pg_error(self.where, e)) from None

    async def _end_import(self) -> None:
        c = getattr(self, "_import_conn", None)
        self._import_conn = None
        if c is not None:
            with contextlib.suppress(Exception):
                await c.execute("DROP TABLE IF EXISTS pg_temp.import_stage")
            with contextlib.suppress(Exception):
                await self.pool.release(c)

    async def stage_rows(self, rows: Sequence[StagedRow]) -> None:
        """Add rows to the staging table by COPY (the first of a duplicate pattern wins)."""
        records = [(m[0], text, num, m[1], m[2], m[3], m[4], m[5]) for text, num, m in rows]
        if not records:
            return
        c = self._import_conn
        if c is None:
            raise StoreError(f"{self.where}: stage_rows before begin_import")
        try:
            await c.copy_records_to_table(
                "import_stage", records=records,
                columns=["list", "pattern", "num", "category", "note", "source", "created_at", "expires_at"],
            )
        except _DB_ERRORS as e:
            await self._end_import()
            raise StoreError(describe_pg_error(self.where, e)) from None

    async def apply_import(
        self, *, replace_source: str | None = None, lists: Sequence[str] = LISTS, dry_run: bool = False
    ) -> ImportResult:
        """Apply the staged entries in ONE transaction of set-based statements, with change-feed
        rows (whose NOTIFY wakes every node). Same counts and meaning as store.Store.apply_import:
        unchanged rows are not written, ``replace_source`` deletes that source's entries on
        ``lists`` that were not staged, ``dry_run`` computes the counts and rolls back."""
        c = self._import_conn
        if c is None:
            raise StoreError(f"{self.where}: apply_import before begin_import")
        try:
            tx = c.transaction()
            await tx.start()
            try:
                await c.execute(
                    """CREATE TEMP TABLE import_rows ON COMMIT DROP AS
                        SELECT s.list, s.pattern,
                               CASE WHEN s.pattern LIKE '%*' THEN 'prefix' WHEN strpos(s.pattern, '#') > 0 THEN 'mask' ELSE 'exact' END AS kind,
                               CASE WHEN s.pattern LIKE '%*' THEN substr(s.pattern, 2, length(s.pattern) - 2)
                                    ELSE ltrim(s.pattern, '+') END AS key,
                               s.category, s.note, s.source, s.created_at, s.expires_at, s.num,
                               CASE WHEN e.list IS NULL THEN 'add'
                                    WHEN (e.category, e.note, e.source, e.expires_at) IS NOT DISTINCT FROM
                                         (s.category, s.note, s.source, s.expires_at) THEN 'same'
                                    ELSE 'upd' END AS st
                        FROM (SELECT DISTINCT ON (list, pattern) * FROM import_stage ORDER BY list, pattern, seq) s
                        LEFT JOIN entries e ON e.list = s.list AND e.pattern = s.pattern"""
                )
                # an import's entries share a few metadata profiles: find them once, then join
                # each row to its profile by equality (a hash join; no per-row signature)
                await c.execute(
                    f"""CREATE TEMP TABLE import_metas ON COMMIT DROP AS
                        SELECT m.*, {_sig('m')} AS sig, NULL::bigint AS id FROM (
                            SELECT DISTINCT list, category, note, source, created_at, expires_at
                            FROM import_rows WHERE st = 'add' AND num IS NOT NULL) m"""
                )
                await c.execute(
                    """INSERT INTO profiles (sig, list, category, note, source, created_at, expires_at)
                       SELECT sig, list, category, note, source, created_at, expires_at FROM import_metas
                       ON CONFLICT (sig) DO NOTHING"""
                )
                await c.execute("UPDATE import_metas m SET id = p.id FROM profiles p WHERE p.sig = m.sig")
                # an entry written by another node meanwhile is updated, not a failed import
                await c.execute(
                    f"""INSERT INTO entries ({ENTRY_COLUMNS}, num, profile)
                        SELECT r.list, r.pattern, r.kind, r.key, r.category, r.note, r.source, r.created_at,
                               r.expires_at, r.num, m.id
                        FROM import_rows r LEFT JOIN import_metas m ON r.st = 'add' AND r.num IS NOT NULL
                            AND m.list = r.list AND m.category = r.category AND m.note = r.note AND m.source = r.source
                            AND m.created_at = r.created_at AND COALESCE(m.expires_at, -1) = COALESCE(r.expires_at, -1)
                        WHERE r.st != 'same' ORDER BY r.list, r.pattern
                        ON CONFLICT (list, pattern) DO UPDATE SET category = EXCLUDED.category, note = EXCLUDED.note,
                            source = EXCLUDED.source, expires_at = EXCLUDED.expires_at, profile = NULL"""
                )
                await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_CHANGES)
                await c.execute(
                    "INSERT INTO changes (list, pattern, op) SELECT list, pattern, 'put' FROM import_rows "
                    "WHERE st != 'same' ORDER BY list, pattern"
                )
                removed = 0
                if replace_source is not None:
                    status = await c.execute(
                        """WITH gone AS (
                               DELETE FROM entries e WHERE e.source = $1 AND e.list = ANY($2::text[]) AND NOT EXISTS
                                   (SELECT 1 FROM import_rows r WHERE r.list = e.list AND r.pattern = e.pattern)
                               RETURNING e.list, e.pattern)
                           INSERT INTO changes (list, pattern, op) SELECT list, pattern, 'del' FROM gone ORDER BY list, pattern""",
                        replace_source, list(lists),
                    )
                    removed = int(status.rsplit(" ", 1)[-1])
                await self._assign_profiles(c)
                by = {r[0]: r[1] for r in await c.fetch("SELECT st, COUNT(*) FROM import_rows GROUP BY st")}
            except BaseException:
                await tx.rollback()
                raise
            if dry_run:
                await tx.rollback()
            else:
                await tx.commit()
        except _DB_ERRORS as e:
            raise StoreError(describe_pg_error(self.where, e)) from None
        finally:
            await self._end_import()
        return ImportResult(by.get("add", 0), by.get("upd", 0), by.get("same", 0), removed)

    async def remove_source(self, source: str, list_name: str | None = None) -> int:
        """Delete every entry a source brought in (one transaction, with 'del' changes)."""
        lists = [list_name] if list_name else ["block", "allow"]
        async with self.transaction():
            async with self._connection() as c:
                rows = await c.fetch(
                    "DELETE FROM entries WHERE source = $1 AND list = ANY($2::text[]) RETURNING list, pattern", source, lists
                )
                await self._log_changes(c, [(r[0], r[1]) for r in rows], "del")
        return len(rows)

    async def export_entries(
        self, list_name: str | None = None, source: str | None = None, batch: int = 20000
    ) -> AsyncIterator[list[Entry]]:
        """Entries in list/pattern order, in batches (keyset pages: no long transaction)."""
        last = ("", "")
        while True:
            args: list = [last[0], last[1], batch]
            cond = ["(list, pattern) > ($1, $2)"]
            if list_name:
                args.append(list_name)
                cond.append(f"list = ${len(args)}")
            if source:
                args.append(source)
                cond.append(f"source = ${len(args)}")
            async with self._connection() as c:
                rows = await c.fetch(
                    f"SELECT {ENTRY_COLUMNS} FROM entries WHERE {' AND '.join(cond)} ORDER BY list, pattern LIMIT $3", *args
                )
            if not rows:
                break
            last = (rows[-1]["list"], rows[-1]["pattern"])
            yield [entry_from_row(r) for r in rows]

    async def load_index(self) -> tuple[int, ListIndex]:
        """Every list entry in a new ListIndex with the change-feed revision it reflects, read in
        one REPEATABLE READ transaction. Exact numbers come as (num, profile) pairs by binary COPY
        straight into arrays; with ``snapshot_path`` set (stores.open_store: beside the spool),
        they come from that node-local file when it matches this database's change feed, and the
        changes made since - by any node - are applied on top. A full load rewrites the file."""
        self.last_load = "full"
        async with self._connection() as c:
            async with c.transaction(isolation="repeatable_read", readonly=True):
                rev = int(await c.fetchval("SELECT COALESCE(MAX(rev), 0) FROM changes"))
                profiles = {
                    r[0]: tuple(r[1:])
                    for r in await c.fetch("SELECT id, category, note, source, created_at, expires_at FROM profiles")
                }
                snap = await self._read_snapshot(c, rev)
                index = ListIndex()
                for name in LISTS:
                    if snap is not None:
                        keys, pids = snap[1][name]
                    else:
                        keys, pids = await _copy_pairs(
                            c, "SELECT num, profile FROM entries WHERE list = '%s' AND num IS NOT NULL "
                            "AND profile IS NOT NULL ORDER BY num" % name  # name from LISTS, not input
                        )
                    index.load_compact(name, keys, pids, profiles)
                cur = c.cursor(
                    f"SELECT {ENTRY_COLUMNS} FROM entries WHERE num IS NULL OR profile IS NULL", prefetch=10000
                )
                async for r in cur:
                    index.put(entry_from_row(r))
                check = None
                if snap is not None:
                    self.last_load = "snapshot"
                    cols = ", ".join("e." + col.strip() for col in ENTRY_COLUMNS.split(","))
                    rows = c.cursor(
                        f"""SELECT c.list, c.pattern, {cols} FROM changes c LEFT JOIN entries e
                            ON e.list = c.list AND e.pattern = c.pattern WHERE c.rev > $1 ORDER BY c.rev""",
                        snap[0], prefetch=10000,
                    )
                    async for r in rows:
                        if r[2] is not None:
                            index.put(entry_from_row(tuple(r)[2:]))
                        else:
                            index.remove(r[0], Pattern.from_text(r[1]))
                elif rev > 0:
                    check = await c.fetchrow("SELECT list, pattern, op FROM changes WHERE rev = $1", rev)
        if check is not None and self.snapshot_path:
            await asyncio.to_thread(write_snapshot, self.snapshot_path, rev, list(check), index)
        return rev, index

    async def _read_snapshot(self, c: asyncpg.Connection, head: int) -> tuple[int, dict] | None:
        if not self.snapshot_path:
            return None
        header = await asyncio.to_thread(read_snapshot_header, self.snapshot_path, head)
        if header is None:
            return None
        row = await c.fetchrow("SELECT list, pattern, op FROM changes WHERE rev = $1", header["rev"])
        if row is None or list(row) != header["check"]:
            return None  # another database, or its feed was trimmed past the snapshot
        arrays = await asyncio.to_thread(read_snapshot_arrays, self.snapshot_path, header)
        return None if arrays is None else (header["rev"], arrays)

    # -- call log -------------------------------------------------------------------------
    async def record_calls(self, records: Iterable[CallRecord]) -> int:
        """Write call records; a record whose key is already there is skipped (a retry).
        Returns how many rows were new."""
        rows = [keyed_row(r, self.node) for r in records]
        if not rows:
            return 0
        async with self.transaction():
            async with self._connection() as c:
                return await self._insert_calls(c, rows)

    async def _insert_calls(self, c: asyncpg.Connection, rows: list[tuple]) -> int:
        """Bulk insert (unnest) under LOCK_CALLS, so ids commit in order (see module doc)."""
        cols = [list(col) for col in zip(*rows)]
        casts = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_CALL_TYPES))
        await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_CALLS)
        status = await c.execute(
            f"INSERT INTO calls ({KEYED_CALL_COLUMNS}) SELECT * FROM unnest({casts}) ON CONFLICT (key) DO NOTHING",
            *cols,
        )
        return int(status.rsplit(" ", 1)[-1])

    async def write_batch(self, items: Sequence[object]) -> int:
        """Call records, outcomes and contacts in one transaction, in queue order.

        One queue keeps the order: an outcome is always applied after the insert of its call.
        Retries are harmless: records are skipped by key, outcomes and contacts are idempotent.
        """
        if not items:
            return 0
        async with self.transaction():
            async with self._connection() as c:
                i = 0
                while i < len(items):
                    kind = type(items[i])
                    j = i
                    while j < len(items) and type(items[j]) is kind:
                        j += 1
                    run = items[i:j]
                    if kind is CallRecord:
                        await self._insert_calls(c, [keyed_row(r, self.node) for r in run])
                    elif kind is CallOutcome:
                        args = [_outcome_args(o) for o in run if o.uniqueid]
                        if args:
                            await c.executemany(_OUTCOME_SQL, args)
                    elif kind is ContactSeen:
                        await c.executemany(
                            "INSERT INTO contacts (e164, last_ts, how) VALUES ($1, $2, $3) ON CONFLICT (e164) DO UPDATE "
                            "SET last_ts = GREATEST(contacts.last_ts, EXCLUDED.last_ts), how = EXCLUDED.how",
                            [(o.e164, o.ts, o.how) for o in run],
                        )
                    else:  # pragma: no cover - a programming error
                        raise TypeError(f"cannot store {kind.__name__}")
                    i = j
        return len(items)

    async def recent_calls(self, since: float, limit: int = 1000000) -> list[CallRecord]:
        """Every node's calls since ``since`` (epoch seconds), oldest first."""
        async with self._connection() as c:
            rows = await c.fetch(f"SELECT {KEYED_CALL_COLUMNS} FROM calls WHERE ts >= $1 ORDER BY ts LIMIT $2", since, limit)
        return [CallRecord(*r) for r in rows]

    async def iter_calls(self, since: float, until: float | None = None, batch: int = 10000) -> AsyncIterator[list[CallRecord]]:
        """Call records with since <= ts (< until), oldest first, in batches (`edgefilter stats`);
        keyset pages on (ts, id): no long transaction or server-side cursor."""
        last_ts, last_id = float("-inf"), 0
        while True:
            async with self._connection() as c:
                rows = await c.fetch(
                    f"SELECT id, {KEYED_CALL_COLUMNS} FROM calls WHERE ts >= $1 AND ts < $2 AND (ts, id) > ($3, $4) "
                    "ORDER BY ts, id LIMIT $5",
                    since, until if until is not None else float("inf"), last_ts, last_id, batch,
                )
            if not rows:
                break
            last_ts, last_id = rows[-1]["ts"], rows[-1]["id"]
            yield [CallRecord(*tuple(r)[1:]) for r in rows]

    async def calls_after(self, cursor: int, limit: int = 10000) -> list[tuple[int, CallRecord]]:
        """Every node's calls with id > ``cursor`` in id order. Ids commit in order (LOCK_CALLS),
        so following the largest id seen never skips a row."""
        async with self._connection() as c:
            rows = await c.fetch(
                f"SELECT id, {KEYED_CALL_COLUMNS} FROM calls WHERE id > $1 ORDER BY id LIMIT $2", cursor, limit
            )
        return [(r[0], CallRecord(*tuple(r)[1:])) for r in rows]

    async def calls_head(self) -> int:
        """The largest call id (0 when none): where a follower of ``calls_after`` starts."""
        async with self._connection() as c:
            return int(await c.fetchval("SELECT COALESCE(MAX(id), 0) FROM calls"))

    async def purge_calls(self, before: float) -> int:
        async with self.transaction():
            async with self._connection() as c:
                status = await c.execute("DELETE FROM calls WHERE ts < $1", before)
                await c.execute("DELETE FROM contacts WHERE last_ts < $1", before)
        return int(status.rsplit(" ", 1)[-1])

    async def history_rows(self, since: float, limit: int = 1000000, through_id: int | None = None) -> list[tuple]:
        """Recent calls of every node for the in-memory history: (ts, uniqueid, caller_e164,
        caller_kind, called, extension, answered, talk_seconds, action), oldest first, newest
        ``limit`` kept; only ids up to ``through_id`` when given (``calls_after`` follows on)."""
        async with self._connection() as c:
            rows = await c.fetch(
                """SELECT ts, uniqueid, caller_e164, caller_kind, called, extension, answered, talk_seconds, action
                   FROM (SELECT * FROM calls WHERE ts >= $1 AND id <= $2 ORDER BY ts DESC LIMIT $3) recent ORDER BY ts""",
                since, through_id if through_id is not None else 2**62, limit,
            )
        return [tuple(r) for r in rows]

    async def last_callers(self, limit: int = 100000) -> list[tuple]:
        """The newest call per extension with a caller number: (extension, ts, uniqueid, caller_e164, called)."""
        async with self._connection() as c:
            rows = await c.fetch(
                """SELECT c.extension, c.ts, c.uniqueid, c.caller_e164, c.called FROM calls c
                   JOIN (SELECT extension, MAX(ts) AS ts FROM calls
                         WHERE extension != '' AND caller_e164 IS NOT NULL GROUP BY extension) l
                   ON c.extension = l.extension AND c.ts = l.ts WHERE c.caller_e164 IS NOT NULL LIMIT $1""",
                limit,
            )
        return [tuple(r) for r in rows]

    async def calls_from(self, e164: str, since: float) -> list[dict]:
        """Every call from ``e164`` since ``since`` with its outcome, oldest first (evidence)."""
        async with self._connection() as c:
            rows = await c.fetch(
                f"SELECT {CALL_COLUMNS}, {OUTCOME_COLUMNS} FROM calls WHERE caller_e164 = $1 AND ts >= $2 ORDER BY ts, id",
                e164, since,
            )
        names = [n.strip() for n in (CALL_COLUMNS + ", " + OUTCOME_COLUMNS).split(",")]
        return [dict(zip(names, tuple(r))) for r in rows]

    async def outcome_of(self, uniqueid: str) -> dict | None:
        async with self._connection() as c:
            row = await c.fetchrow(
                f"SELECT {OUTCOME_COLUMNS} FROM calls WHERE uniqueid = $1 ORDER BY ts DESC LIMIT 1", uniqueid
            )
        return None if row is None else dict(zip([n.strip() for n in OUTCOME_COLUMNS.split(",")], tuple(row)))

    # -- challenge outcomes ---------------------------------------------------------------
    async def record_challenges(self, records: Iterable) -> int:
        """Store challenge outcomes (objects with ts, uniqueid, caller_e164, outcome and, optionally,
        key: a retried write of the same outcome is stored once). Returns how many were new."""
        rows = [(r.ts, r.uniqueid, r.caller_e164, r.outcome, self.node, getattr(r, "key", "") or uuid.uuid4().hex)
                for r in records]
        if not rows:
            return 0
        cols = [list(col) for col in zip(*rows)]
        async with self._connection() as c:
            status = await c.execute(
                "INSERT INTO challenge_outcomes (ts, uniqueid, caller_e164, outcome, node, key) "
                "SELECT * FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) "
                "ON CONFLICT (key) DO NOTHING",
                *cols,
            )
        return int(status.rsplit(" ", 1)[-1])

    async def challenge_failures_since(self, since: float, caller_e164: str | None = None) -> list[tuple[str, float]]:
        """(E.164 digits without '+', ts) of every failed challenge since ``since`` (every node's),
        oldest first."""
        sql = "SELECT caller_e164, ts FROM challenge_outcomes WHERE outcome = 'fail' AND ts > $1"
        args: list = [since]
        if caller_e164 is not None:
            sql += " AND caller_e164 = $2"
            args.append(caller_e164)
        async with self._connection() as c:
            rows = await c.fetch(sql + " ORDER BY ts, id", *args)
        return [(r[0].lstrip("+"), r[1]) for r in rows]

    async def purge_challenges(self, before: float) -> int:
        async with self._connection() as c:
            status = await c.execute("DELETE FROM challenge_outcomes WHERE ts < $1", before)
        return int(status.rsplit(" ", 1)[-1])

    # -- reputation cache -----------------------------------------------------------------
    async def put_reputation(self, rows: Iterable[ReputationRow]) -> int:
        """Insert or replace cached answers (one transaction for the batch)."""
        latest = {(r.source, r.number): r.row() for r in rows}  # one upsert may not touch a row twice
        if not latest:
            return 0
        cols = [list(col) for col in zip(*latest.values())]
        async with self._connection() as c:
            await c.execute(
                f"INSERT INTO reputation ({REPUTATION_COLUMNS}) SELECT * FROM unnest($1::text[], $2::text[], "
                "$3::float8[], $4::text[], $5::text[], $6::float8[], $7::float8[]) "
                "ON CONFLICT (source, number) DO UPDATE SET score = EXCLUDED.score, category = EXCLUDED.category, "
                "status = EXCLUDED.status, fetched_at = EXCLUDED.fetched_at, expires_at = EXCLUDED.expires_at",
                *cols,
            )
        return len(latest)

    async def get_reputation(self, source: str, number: str) -> ReputationRow | None:
        async with self._connection() as c:
            row = await c.fetchrow(
                f"SELECT {REPUTATION_COLUMNS} FROM reputation WHERE source = $1 AND number = $2", source, number
            )
        return ReputationRow(*row) if row else None

    async def reputation_rows(
        self, *, number: str | None = None, fresh_at: float | None = None, limit: int = 1000000
    ) -> list[ReputationRow]:
        """Cached answers, newest first; only those still fresh at ``fresh_at`` when given."""
        where, params = [], []
        if number is not None:
            params.append(number)
            where.append(f"number = ${len(params)}")
        if fresh_at is not None:
            params.append(fresh_at)
            where.append(f"expires_at > ${len(params)}")
        sql = f"SELECT {REPUTATION_COLUMNS} FROM reputation"
        if where:
            sql += " WHERE " + " AND ".join(where)
        params.append(limit)
        async with self._connection() as c:
            rows = await c.fetch(sql + f" ORDER BY fetched_at DESC LIMIT ${len(params)}", *params)
        return [ReputationRow(*r) for r in rows]

    async def purge_reputation(self, *, source: str | None = None, expired_at: float | None = None) -> int:
        """Delete cached answers: all, one source's, and/or only those expired at ``expired_at``."""
        where, params = [], []
        if source is not None:
            params.append(source)
            where.append(f"source = ${len(params)}")
        if expired_at is not None:
            params.append(expired_at)
            where.append(f"expires_at <= ${len(params)}")
        sql = "DELETE FROM reputation" + (" WHERE " + " AND ".join(where) if where else "")
        async with self._connection() as c:
            status = await c.execute(sql, *params)
        return int(status.rsplit(" ", 1)[-1])

    # -- refusal ledger ---------------------------------------------------------------------
    async def add_refusal(self, r: Refusal, entry: Entry | None = None) -> int:
        """Record a refusal (and, for block/report, its list entry) in one transaction.

        An entry already on the blocklist (an admin's) is left as it is and the ledger row keeps
        no pattern, so undoing the star code never removes what someone else put there.
        """
        pattern = ""
        async with self.transaction():
            async with self._connection() as c:
                await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_REFUSALS)
                if entry is not None:
                    exists = await c.fetchval(
                        "SELECT 1 FROM entries WHERE list = $1 AND pattern = $2", entry.list, entry.pattern.text
                    )
                    if exists is None:
                        await self.put_entries([entry])  # joins this transaction
                        pattern = entry.pattern.text
                rid = await c.fetchval(
                    "INSERT INTO refusals (caller_e164, callee, ts, kind, category, source, call_uniqueid, pattern) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                    r.caller_e164, r.callee, r.ts, r.kind, r.category, r.source, r.call_uniqueid, pattern,
                )
        return int(rid)

    async def undo_last_refusal(self, callee: str, now: float) -> Refusal | None:
        """Undo the callee's newest refusal still in force; a block/report also loses the list
        entry it created (only if that entry is still the one the star code wrote)."""
        async with self.transaction():
            async with self._connection() as c:
                await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_REFUSALS)  # two nodes undoing at once
                row = await c.fetchrow(
                    f"SELECT {REFUSAL_COLUMNS} FROM refusals WHERE callee = $1 AND undone_at IS NULL "
                    "ORDER BY ts DESC, id DESC LIMIT 1",
                    callee,
                )
                if row is None:
                    return None
                r = Refusal(*row)
                await c.execute("UPDATE refusals SET undone_at = $1 WHERE id = $2", now, r.id)
                if r.pattern:
                    gone = await c.fetch(
                        "DELETE FROM entries WHERE list = 'block' AND pattern = $1 AND source = $2 RETURNING pattern",
                        r.pattern, f"starcode:{callee}",
                    )
                    await self._log_changes(c, [("block", g[0]) for g in gone], "del")
        return Refusal(*tuple(row)[:-1], undone_at=now)

    async def refusals(self, *, caller: str | None = None, active_only: bool = False) -> list[Refusal]:
        sql = f"SELECT {REFUSAL_COLUMNS} FROM refusals"
        cond, args = [], []
        if caller is not None:
            args.append(caller)
            cond.append(f"caller_e164 = ${len(args)}")
        if active_only:
            cond.append("undone_at IS NULL")
        if cond:
            sql += " WHERE " + " AND ".join(cond)
        async with self._connection() as c:
            rows = await c.fetch(sql + " ORDER BY ts, id", *args)
        return [Refusal(*r) for r in rows]

    async def refusals_version(self) -> tuple[int, int, int]:
        """(rows, largest id, rows undone): changes whenever a refusal is recorded or undone on
        any node (the ledger is never purged), so a follower re-reads the ledger only then."""
        async with self._connection() as c:
            row = await c.fetchrow("SELECT COUNT(*), COALESCE(MAX(id), 0), COUNT(undone_at) FROM refusals")
        return int(row[0]), int(row[1]), int(row[2])

    # -- appeals (issue 17) ----------------------------------------------------------------
    async def set_no_appeal(self, list_name: str, pattern: Pattern, flag: bool) -> bool:
        """Mark an entry never appealable (or appealable again); a change row wakes followers.
        False when nothing changed (no such entry, or it was so already)."""
        async with self.transaction():
            async with self._connection() as c:
                status = await c.execute(
                    "UPDATE entries SET no_appeal = $1 WHERE list = $2 AND pattern = $3 AND no_appeal != $1",
                    int(flag), list_name, pattern.text,
                )
                if status.endswith(" 0"):
                    return False
                await self._log_changes(c, [(list_name, pattern.text)], "put")
        return True

    async def no_appeal_patterns(self) -> list[tuple[str, str]]:
        """(list, pattern) of every entry marked never appealable."""
        async with self._connection() as c:
            rows = await c.fetch("SELECT list, pattern FROM entries WHERE no_appeal != 0")
        return [tuple(r) for r in rows]

    async def add_appeal(self, a: Appeal, *, keep_code: bool = False) -> Appeal:
        """Store an appeal with a fresh unique code (``keep_code``: its own first, as `db copy`
        does); the same key twice (a retried write) is stored once and the stored one returned."""
        marks = ", ".join(f"${i + 1}" for i in range(len(APPEAL_INSERT.split(", "))))
        for i in range(50):
            row = (a.code if keep_code and a.code and i == 0 else new_appeal_code(), *astuple_appeal(a)[2:])
            async with self._connection() as c:
                got = await c.fetchrow(
                    f"INSERT INTO appeals ({APPEAL_INSERT}) VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING {APPEAL_COLUMNS}", *row
                )
                if got is not None:
                    return Appeal(*got)
                old = await c.fetchrow(f"SELECT {APPEAL_COLUMNS} FROM appeals WHERE key = $1", a.key)
                if old is not None:
                    return Appeal(*old)
        raise StoreError(f"{self.where}: no free appeal code after 50 tries (too many appeals kept?)")

    async def appeals(self, *, status: str | None = None, caller: str | None = None, since: float | None = None,
                      limit: int = 100000) -> list[Appeal]:
        """Appeals, oldest first: all, or of one status, one caller, since a time."""
        cond, args = [], []
        for col, op, val in (("status", "=", status), ("caller_e164", "=", caller), ("ts", ">=", since)):
            if val is not None:
                args.append(val)
                cond.append(f"{col} {op} ${len(args)}")
        args.append(limit)
        sql = f"SELECT {APPEAL_COLUMNS} FROM appeals" + (" WHERE " + " AND ".join(cond) if cond else "")
        async with self._connection() as c:
            rows = await c.fetch(sql + f" ORDER BY ts, id LIMIT ${len(args)}", *args)
        return [Appeal(*r) for r in rows]

    async def get_appeal(self, code: str) -> Appeal | None:
        async with self._connection() as c:
            row = await c.fetchrow(f"SELECT {APPEAL_COLUMNS} FROM appeals WHERE code = $1", code)
        return Appeal(*row) if row else None

    async def decide_appeal(self, code: str, status: str, now: float, *, note: str = "", entry: Entry | None = None) -> Appeal | None:
        """Grant or deny a pending appeal; a grant's allow entry is written in the same transaction.
        Returns the appeal as it is after (unchanged when it was not pending), None when unknown."""
        if status not in ("granted", "denied"):
            raise ValueError(f"not a decision: {status!r}")
        async with self.transaction():
            async with self._connection() as c:
                done = await c.execute(
                    "UPDATE appeals SET status = $1, decided_at = $2, note = $3, grant_pattern = $4, grant_expires = $5 "
                    "WHERE code = $6 AND status = 'pending'",
                    status, now, note, entry.pattern.text if entry else "", entry.expires_at if entry else None, code,
                )
                if not done.endswith(" 0") and entry is not None:
                    await self.put_entries([entry])  # joins this transaction
        return await self.get_appeal(code)

    async def appeal_summary(self, since: float) -> tuple[int, list[tuple[str, float]]]:
        """(appeals pending, (caller, newest ts) of every caller who appealed since ``since``):
        what the service's guard keeps in memory (cap and cooldown)."""
        async with self._connection() as c:
            pending = await c.fetchval("SELECT COUNT(*) FROM appeals WHERE status = 'pending'")
            rows = await c.fetch("SELECT caller_e164, MAX(ts) FROM appeals WHERE ts >= $1 GROUP BY caller_e164", since)
        return int(pending), [tuple(r) for r in rows]

    async def purge_appeals(self, before: float) -> list[Appeal]:
        """Delete appeals that came in before ``before``; returns them (their recordings go too)."""
        async with self._connection() as c:
            rows = await c.fetch(f"DELETE FROM appeals WHERE ts < $1 RETURNING {APPEAL_COLUMNS}", before)
        return [Appeal(*r) for r in rows]


    async def contacts(self, since: float) -> list[tuple[str, float]]:
        async with self._connection() as c:
            rows = await c.fetch("SELECT e164, last_ts FROM contacts WHERE last_ts >= $1", since)
        return [tuple(r) for r in rows]

    # -- `db copy` (stores.copy_sqlite_to_postgres): not part of the store API -----------
    async def _copy_calls(self, rows: list[tuple]) -> int:
        """Insert call rows with their outcome columns (KEYED_CALL_COLUMNS, OUTCOME_COLUMNS order);
        rows whose key is already there are skipped. Returns how many were new."""
        if not rows:
            return 0
        types = _CALL_TYPES + _OUTCOME_TYPES
        casts = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
        async with self.transaction():
            async with self._connection() as c:
                await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_CALLS)
                status = await c.execute(
                    f"INSERT INTO calls ({KEYED_CALL_COLUMNS}, {OUTCOME_COLUMNS}) SELECT * FROM unnest({casts}) "
                    "ON CONFLICT (key) DO NOTHING",
                    *[list(col) for col in zip(*rows)],
                )
        return int(status.rsplit(" ", 1)[-1])

    async def _copy_refusals(self, refusals: list[Refusal]) -> int:
        """Insert ledger rows not there yet (same caller, callee, time and kind). Returns how many."""
        if not refusals:
            return 0
        cols = [list(col) for col in zip(*[
            (r.caller_e164, r.callee, r.ts, r.kind, r.category, r.source, r.call_uniqueid, r.pattern, r.undone_at)
            for r in refusals
        ])]
        async with self.transaction():
            async with self._connection() as c:
                await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_REFUSALS)
                status = await c.execute(
                    """INSERT INTO refusals (caller_e164, callee, ts, kind, category, source, call_uniqueid, pattern, undone_at)
                       SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[], $5::text[], $6::text[],
                                            $7::text[], $8::text[], $9::float8[])
                           AS u(caller_e164, callee, ts, kind, category, source, call_uniqueid, pattern, undone_at)
                       WHERE NOT EXISTS (SELECT 1 FROM refusals r WHERE r.caller_e164 = u.caller_e164
                                         AND r.callee = u.callee AND r.ts = u.ts AND r.kind = u.kind)""",
                    *cols,
                )
        return int(status.rsplit(" ", 1)[-1])

    async def _copy_reputation(self, rows: list[ReputationRow]) -> int:
        """Upsert cached answers, keeping an answer already there that was fetched later."""
        latest = {(r.source, r.number): r.row() for r in rows}
        if not latest:
            return 0
        cols = [list(col) for col in zip(*latest.values())]
        async with self._connection() as c:
            status = await c.execute(
                f"INSERT INTO reputation ({REPUTATION_COLUMNS}) SELECT * FROM unnest($1::text[], $2::text[], "
                "$3::float8[], $4::text[], $5::text[], $6::float8[], $7::float8[]) "
                "ON CONFLICT (source, number) DO UPDATE SET score = EXCLUDED.score, category = EXCLUDED.category, "
                "status = EXCLUDED.status, fetched_at = EXCLUDED.fetched_at, expires_at = EXCLUDED.expires_at "
                "WHERE reputation.fetched_at < EXCLUDED.fetched_at",
                *cols,
            )
        return int(status.rsplit(" ", 1)[-1])


_OUTCOME_SQL = """UPDATE calls SET linkedid = CASE WHEN $1 != '' THEN $1 ELSE linkedid END,
       answered = COALESCE($2::integer, answered), talk_seconds = COALESCE($3::float8, talk_seconds),
       hangup_cause = COALESCE($4::integer, hangup_cause),
       hangup_text = CASE WHEN $5 != '' THEN $5 ELSE hangup_text END,
       dial_status = CASE WHEN $6 != '' THEN $6 ELSE dial_status END,
       ended_at = COALESCE($7::float8, ended_at)
   WHERE uniqueid = $8 AND ($9 = '' OR node = $9)"""


def _sig(t: str) -> str:
    """SQL for a profile's signature (its metadata as one text) from table alias ``t``."""
    return (
        f"concat_ws(chr(31), {t}.list, {t}.category, {t}.note, {t}.source, {t}.created_at::text, "
        f"COALESCE({t}.expires_at::text, '-'))"
    )


async def _copy_pairs(c: asyncpg.Connection, query: str) -> tuple[array, array]:
    """(int64 keys, uint32 ids) of a two-column bigint query, by binary COPY: no row objects."""
    keys, pids = array("q"), array("I")
    buf = bytearray()
    header = [True]
    row = struct.Struct(">hiqiq")  # field count, length, num, length, profile (bigint)

    async def sink(chunk: bytes) -> None:
        buf.extend(chunk)
        start = 0
        if header[0]:
            if len(buf) < 19:
                return
            start, header[0] = 19 + struct.unpack_from(">i", buf, 15)[0], False
        n = (len(buf) - start) // row.size
        if n:
            end = start + n * row.size
            got = list(row.iter_unpack(memoryview(buf)[start:end]))
            keys.extend([r[2] for r in got])
            pids.extend([r[4] for r in got])
            start = end
        del buf[:start]

    await c.copy_from_query(query, output=sink, format="binary")
    return keys, pids


def _outcome_args(o: CallOutcome) -> tuple:
    return (
        o.linkedid, None if o.answered is None else int(o.answered), o.talk_seconds, o.hangup_cause,
        o.hangup_text, o.dial_status, o.ended_at, o.uniqueid, o.node,
    )


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
import time
import uuid
from typing import AsyncIterator, Callable, Iterable

import asyncpg

from .config import redact_url
from .errors import StoreError
from .lists import Entry
from .store import CALL_COLUMNS, ENTRY_COLUMNS, CallRecord, entry_from_row

log = logging.getLogger("edgefilter.pgstore")

SCHEMA_VERSION = 1
CHANGES_CHANNEL = "edgefilter_changes"
# pg_advisory_xact_lock keys (bigint): "edgefi" + a small number, unlikely to meet anyone else's.
LOCK_MIGRATE = 0x65646765666901
LOCK_CHANGES = 0x65646765666902
LOCK_CALLS = 0x65646765666903

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
}

PG_CALL_COLUMNS = CALL_COLUMNS + ", node, key"
# unnest() casts for a bulk insert of CallRecord rows (CALL_COLUMNS order, then node, key).
_CALL_TYPES = (
    "float8", "text", "text", "text", "text", "text", "text", "text", "text",
    "text", "text", "float8", "text", "text", "float8", "text", "text",
)
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


class PgStore:
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
        self.notices = 0  # change notices received (tests and `explain` of latency)
        self.listening = False

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
    ) -> AsyncIterator["PgStore"]:
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
                    if version == SCHEMA_VERSION:
                        return SCHEMA_VERSION
                    await c.execute(MIGRATIONS[version + 1])
                    await c.execute("INSERT INTO schema_version (version) VALUES ($1)", version + 1)
                    log.info("%s: schema migrated to v%d", self.where, version + 1)

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
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE (key = ANY($1::text[]) AND kind != 'mask') "
                "OR (kind = 'mask' AND length(key) = $2)",
                keys, len(digits),
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
                    except asyncio.TimeoutError:
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

    # -- call log -------------------------------------------------------------------------
    async def record_calls(self, records: Iterable[CallRecord]) -> int:
        """Write call records; a record whose key is already there is skipped (a retry).
        Returns how many rows were new."""
        rows = [r.row() + (r.node, r.key or uuid.uuid4().hex) for r in records]
        if not rows:
            return 0
        cols = [list(col) for col in zip(*rows)]
        casts = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_CALL_TYPES))
        async with self.transaction():
            async with self._connection() as c:
                await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_CALLS)
                status = await c.execute(
                    f"INSERT INTO calls ({PG_CALL_COLUMNS}) SELECT * FROM unnest({casts}) ON CONFLICT (key) DO NOTHING",
                    *cols,
                )
        return int(status.rsplit(" ", 1)[-1])

    async def recent_calls(self, since: float, limit: int = 1000000) -> list[CallRecord]:
        """Every node's calls since ``since`` (epoch seconds), oldest first."""
        async with self._connection() as c:
            rows = await c.fetch(f"SELECT {PG_CALL_COLUMNS} FROM calls WHERE ts >= $1 ORDER BY ts LIMIT $2", since, limit)
        return [CallRecord(*r) for r in rows]

    async def calls_after(self, cursor: int, limit: int = 10000) -> list[tuple[int, CallRecord]]:
        """Every node's calls with id > ``cursor`` in id order. Ids commit in order (LOCK_CALLS),
        so following the largest id seen never skips a row."""
        async with self._connection() as c:
            rows = await c.fetch(
                f"SELECT id, {PG_CALL_COLUMNS} FROM calls WHERE id > $1 ORDER BY id LIMIT $2", cursor, limit
            )
        return [(r[0], CallRecord(*tuple(r)[1:])) for r in rows]

    async def purge_calls(self, before: float) -> int:
        async with self._connection() as c:
            status = await c.execute("DELETE FROM calls WHERE ts < $1", before)
        return int(status.rsplit(" ", 1)[-1])

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterable, Sequence

import aiosqlite

from .errors import StoreError
from .lists import Entry, Pattern

SCHEMA_VERSION = 1
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
}

ENTRY_COLUMNS = "list, pattern, kind, key, category, note, source, created_at, expires_at"


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
    # Shared-store fields (PostgreSQL): the node that screened the call and a key unique across
    # nodes, so a retried write (spool drain, `db copy` re-run) never makes a second row. The
    # SQLite schema has no columns for them: a single box needs neither.
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


def entry_from_row(row: Sequence) -> Entry:
    list_, pattern, kind, key, category, note, source, created, expires = row
    return Entry(list_, Pattern(kind, key, pattern), category, note, source, created, expires)


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
    if "unable to open" in msg:
        return f"{path}: cannot open the database (missing directory or no permission)"
    return f"{path}: database error: {exc}"


class Store:
    """One aiosqlite connection to the database; use ``async with Store.open(path)``.

    The PostgreSQL store (pgstore.PgStore) has the same methods with the same meaning; code above
    this layer gets either from ``stores.open_store(settings)`` and must not care which.
    """

    backend = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path
        self.where = path
        # One connection serves every task of the service: transactions take turns (the lock) and
        # a transaction opened inside another one, in the same task, becomes a savepoint.
        self._tx_lock = asyncio.Lock()
        self._tx_depth: contextvars.ContextVar[int] = contextvars.ContextVar(f"sqlite_tx_{id(self)}", default=0)

    def describe_error(self, exc: BaseException) -> str:
        """An admin-readable reason for a failure of this store."""
        if isinstance(exc, StoreError):
            return str(exc)
        return describe_sqlite_error(self.path, exc)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: str, *, create: bool = True, busy_timeout_ms: int = 5000) -> AsyncIterator["Store"]:
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
        for v in range(version + 1, SCHEMA_VERSION + 1):
            await self.db.executescript("BEGIN IMMEDIATE;\n" + MIGRATIONS[v] + f"\nPRAGMA user_version = {v};\nCOMMIT;")
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
                f"INSERT INTO entries ({ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (e.list, e.pattern.text, e.pattern.kind, e.pattern.key, e.category, e.note, e.source, e.created_at, e.expires_at),
            )
        else:
            await self.db.execute(
                "UPDATE entries SET category = ?, note = ?, source = ?, expires_at = ? WHERE list = ? AND pattern = ?",
                (e.category, e.note, e.source, e.expires_at, e.list, e.pattern.text),
            )
        await self.db.execute("INSERT INTO changes (list, pattern, op) VALUES (?, ?, 'put')", (e.list, e.pattern.text))
        return "added" if old is None else "updated"

    async def put_entries(self, entries: Iterable[Entry], batch: int = 5000) -> dict[str, int]:
        """Insert or update many entries in one transaction; counts of added/updated/unchanged."""
        counts = {"added": 0, "updated": 0, "unchanged": 0}
        async with self.transaction():
            for e in entries:
                counts[await self._put(e)] += 1
        return counts

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
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE (key IN ({marks}) AND kind != 'mask') "
            "OR (kind = 'mask' AND length(key) = ?)",
            (*keys, len(digits)),
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
        (rev,) = await (await self.db.execute("SELECT COALESCE(MAX(rev), 0) FROM changes")).fetchone()
        return int(rev)

    async def changes_since(self, rev: int, limit: int) -> list[tuple[int, str, str, str, Entry | None]]:
        """Changes after ``rev`` with the entry's current row (None when it is gone)."""
        cur = await self.db.execute(
            f"""SELECT c.rev, c.op, c.list, c.pattern, {', '.join('e.' + c.strip() for c in ENTRY_COLUMNS.split(','))}
                FROM changes c LEFT JOIN entries e ON e.list = c.list AND e.pattern = c.pattern
                WHERE c.rev > ? ORDER BY c.rev LIMIT ?""",
            (rev, limit),
        )
        out = []
        for r in await cur.fetchall():
            entry = entry_from_row(r[4:]) if r[4] is not None else None
            out.append((r[0], r[1], r[2], r[3], entry))
        return out

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
        rows = [r.row() for r in records]
        if not rows:
            return 0
        async with self.transaction():
            await self.db.executemany(
                f"INSERT INTO calls ({CALL_COLUMNS}) VALUES ({', '.join('?' * 15)})", rows
            )
        return len(rows)

    async def recent_calls(self, since: float, limit: int = 1000000) -> list[CallRecord]:
        cur = await self.db.execute(
            f"SELECT {CALL_COLUMNS} FROM calls WHERE ts >= ? ORDER BY ts LIMIT ?", (since, limit)
        )
        return [CallRecord(*r) for r in await cur.fetchall()]

    async def calls_after(self, cursor: int, limit: int = 10000) -> list[tuple[int, CallRecord]]:
        """Calls with id > ``cursor`` in id order, with their ids: lets an in-memory history follow
        the call log (every node's calls on PostgreSQL) without re-reading a time window."""
        cur = await self.db.execute(
            f"SELECT id, {CALL_COLUMNS} FROM calls WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)
        )
        return [(r[0], CallRecord(*r[1:])) for r in await cur.fetchall()]

    async def purge_calls(self, before: float) -> int:
        async with self.transaction():
            cur = await self.db.execute("DELETE FROM calls WHERE ts < ?", (before,))
        return cur.rowcount


def check_path_writable(path: str) -> None:
    """Fail early with a clear message when the database directory cannot be written."""
    d = Path(path).parent
    if d.exists() and not os.access(d, os.W_OK):
        raise StoreError(f"{path}: directory {d} is not writable")

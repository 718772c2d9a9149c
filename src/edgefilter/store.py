"""The durable store: SQLite in WAL mode through aiosqlite.

The call path never waits on it: the service loads the lists into memory at start and follows a
change feed (the ``changes`` table, one row per list mutation, written in the same transaction as
the mutation) so that a CLI change or an import reaches the running service within one poll
interval, without a full reload. Call records are written in batches by a background task.
Every SQL statement is parameterised; every sqlite failure becomes a StoreError that says what
is wrong in words an admin can act on.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterable, Sequence

import aiosqlite

from .errors import StoreError
from .lists import LISTS, Entry, ListIndex, Pattern, exact_num

SCHEMA_VERSION = 3


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
    # v3 (issue 6, lists at scale): exact numbers get an int64 key (num) and a shared metadata
    # profile so that the service loads 10 million entries as two arrays, not 10 million rows of
    # text. Triggers keep num/profile right for writers that do not know about them.
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
    CREATE TRIGGER IF NOT EXISTS entries_num_insert AFTER INSERT ON entries
        WHEN NEW.num IS NULL AND NEW.kind = 'exact'
        BEGIN UPDATE entries SET num = {_num_sql("NEW.")} WHERE list = NEW.list AND pattern = NEW.pattern; END;
    CREATE TRIGGER IF NOT EXISTS entries_profile_stale AFTER UPDATE OF category, note, source, created_at, expires_at ON entries
        WHEN NEW.profile IS NOT NULL
        BEGIN UPDATE entries SET profile = NULL WHERE list = NEW.list AND pattern = NEW.pattern; END;
    {ASSIGN_PROFILES}
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
    """One aiosqlite connection to the database; use ``async with Store.open(path)``."""

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path

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
            # a version reserved for another branch may be absent here: it is a no-op step
            await self.db.executescript("BEGIN IMMEDIATE;\n" + MIGRATIONS.get(v, "") + f"\nPRAGMA user_version = {v};\nCOMMIT;")
        return SCHEMA_VERSION

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: nothing partial is ever written."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            await self.db.rollback()
            raise
        else:
            await self.db.commit()

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
        await self.db.execute("DROP TABLE IF EXISTS temp.import_profiles")
        await self.db.execute(
            "CREATE TEMP TABLE import_stage (list TEXT NOT NULL, pattern TEXT NOT NULL, profile INTEGER NOT NULL, "
            "st TEXT, PRIMARY KEY (list, pattern)) WITHOUT ROWID"
        )
        await self.db.execute(
            "CREATE TEMP TABLE import_profiles (prov INTEGER PRIMARY KEY, real INTEGER, list TEXT, category TEXT, "
            "note TEXT, source TEXT, created_at REAL, expires_at REAL)"
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

    async def stage_import(self, entries: Iterable[Entry]) -> None:
        """Add entries to the staging table (the first of a duplicate pattern wins)."""
        rows = []
        last_meta, pid = None, 0
        for e in entries:
            meta = (e.list, e.category, e.note, e.source, e.created_at, e.expires_at)
            if meta != last_meta:  # consecutive entries of a feed share everything but the pattern
                pid = self._staged_profile(meta)
                last_meta = meta
            rows.append((e.list, e.pattern.text, pid))
        await self.db.executemany("INSERT OR IGNORE INTO temp.import_stage VALUES (?, ?, ?, NULL)", rows)
        await self.db.commit()

    async def apply_import(
        self, *, replace_source: str | None = None, lists: Sequence[str] = LISTS, dry_run: bool = False
    ) -> "ImportResult":
        """Apply the staged entries in ONE transaction, with change-feed rows for the service.

        Counts compare category, note, source and expiry: re-running the same import reports
        everything unchanged and writes nothing. ``replace_source`` also deletes that source's
        entries on ``lists`` that are not staged (a feed replaced wholesale). ``dry_run`` computes
        the same counts and rolls back.
        """
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
            await self.db.execute(
                """UPDATE temp.import_stage AS s SET st = COALESCE((
                       SELECT CASE WHEN e.category IS p.category AND e.note IS p.note AND e.source IS p.source
                                    AND e.expires_at IS p.expires_at THEN 'same' ELSE 'upd' END
                       FROM main.entries e JOIN temp.import_profiles p ON p.prov = s.profile
                       WHERE e.list = s.list AND e.pattern = s.pattern), 'add')"""
            )
            num = (
                "CASE WHEN s.pattern GLOB '+[0-9]*' AND substr(s.pattern, 2) NOT GLOB '*[^0-9]*' "
                "AND length(s.pattern) <= 19 THEN CAST('1' || substr(s.pattern, 2) AS INTEGER) END"
            )
            await self.db.execute(
                f"""INSERT INTO main.entries ({ENTRY_COLUMNS}, num, profile)
                    SELECT s.list, s.pattern,
                           CASE WHEN s.pattern GLOB '*[*]' THEN 'prefix' WHEN instr(s.pattern, '#') THEN 'mask' ELSE 'exact' END,
                           CASE WHEN s.pattern GLOB '*[*]' THEN substr(s.pattern, 2, length(s.pattern) - 2)
                                ELSE ltrim(s.pattern, '+') END,
                           p.category, p.note, p.source, p.created_at, p.expires_at, {num},
                           CASE WHEN {num} IS NULL THEN NULL ELSE p.real END
                    FROM temp.import_stage s JOIN temp.import_profiles p ON p.prov = s.profile
                    WHERE s.st = 'add' ORDER BY s.list, s.pattern"""
            )
            await self.db.execute(
                """UPDATE main.entries SET category = p.category, note = p.note, source = p.source,
                       expires_at = p.expires_at, profile = NULL
                   FROM temp.import_stage AS s JOIN temp.import_profiles AS p ON p.prov = s.profile
                   WHERE s.st = 'upd' AND entries.list = s.list AND entries.pattern = s.pattern"""
            )
            await self.db.execute(
                "INSERT INTO main.changes (list, pattern, op) SELECT list, pattern, 'put' FROM temp.import_stage "
                "WHERE st IN ('add', 'upd') ORDER BY list, pattern"
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
            cur = await self.db.execute("SELECT st, COUNT(*) FROM temp.import_stage GROUP BY st")
            by = dict(await cur.fetchall())
        except BaseException:
            await self.db.rollback()
            raise
        if dry_run:
            await self.db.rollback()
        else:
            await self.db.commit()
        await self.db.execute("DROP TABLE IF EXISTS temp.import_stage")
        await self.db.execute("DROP TABLE IF EXISTS temp.import_profiles")
        await self.db.commit()
        return ImportResult(by.get("add", 0), by.get("upd", 0), by.get("same", 0), removed)

    async def import_entries(
        self, entries: Iterable[Entry], *, replace_source: str | None = None, lists: Sequence[str] = LISTS,
        dry_run: bool = False,
    ) -> "ImportResult":
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

    async def purge_calls(self, before: float) -> int:
        async with self.transaction():
            cur = await self.db.execute("DELETE FROM calls WHERE ts < ?", (before,))
        return cur.rowcount


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
        profiles = {
            r[0]: tuple(r[1:])
            for r in con.execute("SELECT id, category, note, source, created_at, expires_at FROM profiles")
        }
        index = ListIndex()
        snap = _read_snapshot(con, path, rev) if snapshot else None
        for name in LISTS:
            if snap is not None:
                keys, pids = snap[1][name]
            else:
                keys, pids = array("q"), array("I")
                cur = con.execute(
                    "SELECT num, profile FROM entries INDEXED BY entries_num "
                    "WHERE list = ? AND num IS NOT NULL AND profile IS NOT NULL ORDER BY num",
                    (name,),
                )
                while rows := cur.fetchmany(65536):
                    keys.extend([r[0] for r in rows])
                    pids.extend([r[1] for r in rows])
            index.load_compact(name, keys, pids, profiles)
        for sql in (
            f"SELECT {ENTRY_COLUMNS} FROM entries INDEXED BY entries_loose WHERE num IS NULL",
            f"SELECT {ENTRY_COLUMNS} FROM entries INDEXED BY entries_unprofiled WHERE num IS NOT NULL AND profile IS NULL",
        ):
            for r in con.execute(sql):
                index.put(entry_from_row(r))
        if snap is not None:  # bring the snapshot's arrays up to this read transaction
            cols = ", ".join("e." + c.strip() for c in ENTRY_COLUMNS.split(","))
            for r in con.execute(
                f"SELECT c.list, c.pattern, {cols} FROM changes c LEFT JOIN entries e "
                "ON e.list = c.list AND e.pattern = c.pattern WHERE c.rev > ? ORDER BY c.rev",
                (snap[0],),
            ):
                if r[2] is not None:
                    index.put(entry_from_row(r[2:]))
                else:
                    index.remove(r[0], Pattern.from_text(r[1]))
        else:
            check = con.execute("SELECT list, pattern, op FROM changes WHERE rev = ?", (rev,)).fetchone()
        con.execute("COMMIT")
        if snap is None and snapshot and rev > 0 and check is not None:
            _write_snapshot(path, rev, list(check), index)
        return int(rev), index
    except sqlite3.Error as e:
        raise StoreError(describe_sqlite_error(path, e)) from None
    finally:
        con.close()


def _read_snapshot(con: sqlite3.Connection, path: str, head: int) -> tuple[int, dict] | None:
    """The snapshot's (rev, arrays per list) when it belongs to this database, else None."""
    import json

    try:
        with open(path + SNAPSHOT_SUFFIX, "rb") as f:
            if f.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
                return None
            header = json.loads(f.readline())
            rev = int(header["rev"])
            if rev > head or head - rev > SNAPSHOT_MAX_BEHIND:
                return None
            row = con.execute("SELECT list, pattern, op FROM changes WHERE rev = ?", (rev,)).fetchone()
            if row is None or list(row) != header["check"]:
                return None  # another database, or its feed was trimmed past the snapshot
            arrays = {}
            for name in LISTS:
                n = int(header["lists"][name])
                keys, pids = array("q"), array("I")
                keys.fromfile(f, n)
                pids.fromfile(f, n)
                arrays[name] = (keys, pids)
            return rev, arrays
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _write_snapshot(path: str, rev: int, check: list, index: ListIndex) -> None:
    """Write ``<db>.index`` atomically (temp file + rename); a failure only costs the next start."""
    import json

    arrays = index.compact_arrays()
    tmp = f"{path}{SNAPSHOT_SUFFIX}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(SNAPSHOT_MAGIC)
            header = {"rev": rev, "check": check, "lists": {n: len(arrays[n][0]) for n in LISTS}}
            f.write(json.dumps(header).encode() + b"\n")
            for name in LISTS:
                keys, pids = arrays[name]
                keys.tofile(f)
                pids.tofile(f)
        os.replace(tmp, path + SNAPSHOT_SUFFIX)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def check_path_writable(path: str) -> None:
    """Fail early with a clear message when the database directory cannot be written."""
    d = Path(path).parent
    if d.exists() and not os.access(d, os.W_OK):
        raise StoreError(f"{path}: directory {d} is not writable")

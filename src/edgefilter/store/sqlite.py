"""The durable store: SQLite in WAL mode through aiosqlite.

The call path never waits on it: the service loads the lists into memory at start and follows a
change feed (the ``changes`` table, one row per list mutation, written in the same transaction as
the mutation) so that a CLI change or an import reaches the running service within one poll
interval, without a full reload. Call records are written in batches by a background task.
Every SQL statement is parameterised; every sqlite failure becomes a StoreError that says what
is wrong in words an admin can act on.

Layout (issue 18): the Store class is put together here from mixins by concern - sqlite_base
(connection, transactions, migrations), sqlite_lists (entries and the change feed),
sqlite_import (bulk imports), sqlite_calls (call log, contacts, challenges, reputation cache),
sqlite_ledger (refusals, appeals) - and satisfies contract.StoreContract like postgres.PgStore.
This module keeps the reads that run on a connection of their own in a worker thread (the
index load, its snapshot, the changed rows), and re-exports every name importers used when all
of this was one module (records, schema, snapshot helpers), so none of them has to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from array import array
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite

from edgefilter.core.errors import StoreError
from edgefilter.lists.index import LISTS, ChangedRow, ListIndex
from edgefilter.store.contract import BatchedImport
from edgefilter.store.records import (
    APPEAL_COLUMNS,
    APPEAL_INSERT,
    APPEAL_STATUSES,
    CALL_COLUMNS,
    ENTRY_COLUMNS,
    KEYED_CALL_COLUMNS,
    OUTCOME_COLUMNS,
    REFUSAL_COLUMNS,
    REPUTATION_COLUMNS,
    Appeal,
    CallOutcome,
    CallRecord,
    ContactSeen,
    ImportResult,
    Refusal,
    ReputationRow,
    StagedRow,
    astuple_appeal,
    entry_from_row,
    keyed_row,
    new_appeal_code,
    staged_row,
)
from edgefilter.store.snapshot import (
    CHANGED_SQL,
    MERGE_MAX_BEHIND,
    PROFILES_SQL,
    SNAPSHOT_MAGIC,
    SNAPSHOT_MAX_BEHIND,
    SNAPSHOT_SUFFIX,
    apply_changed,
    changed_row,
    read_snapshot_arrays,
    read_snapshot_header,
    write_snapshot,
)
from edgefilter.store.sqlite_base import describe_sqlite_error
from edgefilter.store.sqlite_calls import SqliteCalls
from edgefilter.store.sqlite_import import SqliteImport
from edgefilter.store.sqlite_ledger import SqliteLedger
from edgefilter.store.sqlite_schema import (
    APPEALS_SCHEMA,
    ASSIGN_PROFILES,
    LATE_MIGRATIONS,
    MIGRATIONS,
    PROFILE_SIG,
    SCHEMA_VERSION,
)

__all__ = [
    "APPEALS_SCHEMA",
    "APPEAL_COLUMNS",
    "APPEAL_INSERT",
    "APPEAL_STATUSES",
    "ASSIGN_PROFILES",
    "CALL_COLUMNS",
    "CHANGED_SQL",
    "COMPACT_CHUNK",
    "ENTRY_COLUMNS",
    "KEYED_CALL_COLUMNS",
    "LATE_MIGRATIONS",
    "MERGE_MAX_BEHIND",
    "MIGRATIONS",
    "OUTCOME_COLUMNS",
    "PROFILES_SQL",
    "PROFILE_SIG",
    "REFUSAL_COLUMNS",
    "REPUTATION_COLUMNS",
    "SCHEMA_VERSION",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_MAX_BEHIND",
    "SNAPSHOT_SUFFIX",
    "Appeal",
    "BatchedImport",
    "CallOutcome",
    "CallRecord",
    "ContactSeen",
    "ImportResult",
    "Refusal",
    "ReputationRow",
    "StagedRow",
    "Store",
    "apply_changed",
    "astuple_appeal",
    "changed_row",
    "changed_rows",
    "describe_sqlite_error",
    "entry_from_row",
    "keyed_row",
    "load_index",
    "new_appeal_code",
    "read_changed_file",
    "read_compact",
    "read_profiles",
    "read_snapshot_arrays",
    "read_snapshot_header",
    "staged_row",
    "write_snapshot",
]


class Store(SqliteLedger, SqliteImport, SqliteCalls):
    """One aiosqlite connection to the database; use ``async with Store.open(path)``.

    The PostgreSQL store (postgres.PgStore) has the same methods with the same meaning; code above
    this layer gets either from ``open.open_store(settings)`` and must not care which.
    """

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


def _write_snapshot(path: str, rev: int, check: list, index: ListIndex) -> None:
    write_snapshot(path + SNAPSHOT_SUFFIX, rev, check, index)

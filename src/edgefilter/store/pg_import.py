"""The PostgreSQL store's bulk import (COPY into a TEMP table, set-based apply) and index load
(binary COPY into arrays, the node-local snapshot)."""

from __future__ import annotations

import asyncio
import struct
from array import array
from collections.abc import Sequence

import asyncpg

from edgefilter.core.errors import StoreError
from edgefilter.lists.index import LISTS, ListIndex, Pattern
from edgefilter.store.contract import BatchedImport
from edgefilter.store.pg_base import _DB_ERRORS, PgBase, _sig, describe_pg_error
from edgefilter.store.pg_schema import LOCK_CHANGES
from edgefilter.store.records import ENTRY_COLUMNS, ImportResult, StagedRow, entry_from_row
from edgefilter.store.snapshot import read_snapshot_arrays, read_snapshot_header, write_snapshot


class PgImport(PgBase, BatchedImport):
    """begin_import / stage_rows / apply_import and load_index (postgres.PgStore)."""

    # -- bulk import (same contract as sqlite.Store) ---------------------------------------
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
        rows (whose NOTIFY wakes every node). Same counts and meaning as sqlite.Store.apply_import:
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

    async def load_index(self) -> tuple[int, ListIndex]:
        """Every list entry in a new ListIndex with the change-feed revision it reflects, read in
        one REPEATABLE READ transaction. Exact numbers come as (num, profile) pairs by binary COPY
        straight into arrays; with ``snapshot_path`` set (open.open_store: beside the spool),
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
                            c, f"SELECT num, profile FROM entries WHERE list = '{name}' AND num IS NOT NULL "  # name from LISTS, not input
                            "AND profile IS NOT NULL ORDER BY num"
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

"""The SQLite store's bulk import (issue 6): staged in a TEMP table, applied in one transaction."""

from __future__ import annotations

from collections.abc import Sequence

from edgefilter.lists.index import LISTS
from edgefilter.store.contract import BatchedImport
from edgefilter.store.records import ENTRY_COLUMNS, ImportResult, StagedRow
from edgefilter.store.sqlite_base import SqliteBase
from edgefilter.store.sqlite_schema import PROFILE_SIG


class SqliteImport(SqliteBase, BatchedImport):
    """begin_import / stage_rows / apply_import (sqlite.Store)."""

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
        out: list[tuple[str, str, int | None, int]] = []
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

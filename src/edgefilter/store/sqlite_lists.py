"""The SQLite store's list entries: writes with their change rows, reads, the change feed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable

from edgefilter.lists.index import Entry, Pattern, exact_num
from edgefilter.store.records import ENTRY_COLUMNS, entry_from_row
from edgefilter.store.sqlite_base import SqliteBase


class SqliteLists(SqliteBase):
    """List entries, the change feed and the never-appealable flag (sqlite.Store)."""

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
        cond: list[str] = []
        args: list[str | float] = []
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
        cond: list[str] = []
        args: list[str | float] = []
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

    async def watch_changes(self, wake: Callable[[], None], resync: Callable[[], None] | None = None) -> None:
        """PostgreSQL pushes change notices to ``wake``; SQLite has none: the poll is the feed."""
        return None

    async def purge_expired(self, now: float | None = None) -> int:
        """Delete expired entries (they already stopped matching); records 'del' changes."""
        now = time.time() if now is None else now
        async with self.transaction():
            cur = await self.db.execute(
                "SELECT list, pattern FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            )
            rows = list(await cur.fetchall())
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

"""The PostgreSQL store's list entries: writes with their change rows, reads, the change feed
(LISTEN/NOTIFY in watch_changes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable

import asyncpg

from edgefilter.lists.index import ChangedRow, Entry, Pattern
from edgefilter.store.pg_base import _ENTRY_TYPES, PgBase, describe_pg_error, log
from edgefilter.store.pg_schema import CHANGES_CHANNEL
from edgefilter.store.records import ENTRY_COLUMNS, entry_from_row
from edgefilter.store.snapshot import CHANGED_SQL, PROFILES_SQL, changed_row


class PgLists(PgBase):
    """List entries, the change feed and the never-appealable flag (postgres.PgStore)."""

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
                    ], strict=True))
                    rows = await c.fetch(sql, *[list(col) for col in cols])
                    added = sum(1 for r in rows if r["inserted"])
                    counts["added"] += added
                    counts["updated"] += len(rows) - added
                    counts["unchanged"] += len(chunk) - len(rows)
                    await self._log_changes(c, [(r["list"], r["pattern"]) for r in rows], "put")
                await self._assign_profiles(c)
        return counts

    async def remove_entry(self, pattern: Pattern, list_name: str | None = None) -> list[str]:
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
        cond: list[str] = []
        args: list[str | float] = []
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
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())

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

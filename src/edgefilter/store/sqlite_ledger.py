"""The SQLite store's refusal ledger (star codes) and appeals (issue 17)."""

from __future__ import annotations

import dataclasses

import aiosqlite

from edgefilter.core.errors import StoreError
from edgefilter.lists.index import Entry
from edgefilter.store.records import (
    APPEAL_COLUMNS,
    APPEAL_INSERT,
    REFUSAL_COLUMNS,
    Appeal,
    Refusal,
    astuple_appeal,
    new_appeal_code,
)
from edgefilter.store.sqlite_lists import SqliteLists


def _inserted_id(cur: aiosqlite.Cursor) -> int:
    """The id of the row an INSERT wrote (sqlite3 gives None only when none was written)."""
    if cur.lastrowid is None:  # pragma: no cover - callers ask only after a row was written
        raise StoreError("the database gave no id for the row it inserted")
    return int(cur.lastrowid)


class SqliteLedger(SqliteLists):
    """Refusals and appeals: both may write a list entry in their transaction (sqlite.Store)."""

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
        return _inserted_id(cur)

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
        return dataclasses.replace(r, undone_at=now)

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
        ((n, head, undone),) = await self.db.execute_fetchall(
            "SELECT COUNT(*), COALESCE(MAX(id), 0), COUNT(undone_at) FROM refusals")
        return int(n), int(head), int(undone)

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
                    return Appeal(_inserted_id(cur), *row)
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
        ((pending,),) = await self.db.execute_fetchall("SELECT COUNT(*) FROM appeals WHERE status = 'pending'")
        cur = await self.db.execute("SELECT caller_e164, MAX(ts) FROM appeals WHERE ts >= ? GROUP BY caller_e164", (since,))
        return int(pending), [tuple(r) for r in await cur.fetchall()]

    async def purge_appeals(self, before: float) -> list[Appeal]:
        """Delete appeals that came in before ``before``; returns them (their recordings go too)."""
        async with self.transaction():
            cur = await self.db.execute(f"SELECT {APPEAL_COLUMNS} FROM appeals WHERE ts < ?", (before,))
            gone = [Appeal(*r) for r in await cur.fetchall()]
            await self.db.execute("DELETE FROM appeals WHERE ts < ?", (before,))
        return gone

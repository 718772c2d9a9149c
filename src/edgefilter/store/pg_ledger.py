"""The PostgreSQL store's refusal ledger (star codes), appeals (issue 17), and the bulk writers
`db copy` uses (open.copy_sqlite_to_postgres)."""

from __future__ import annotations

import dataclasses

from edgefilter.core.errors import StoreError
from edgefilter.lists.index import Entry
from edgefilter.store.pg_base import _CALL_TYPES, _OUTCOME_TYPES
from edgefilter.store.pg_lists import PgLists
from edgefilter.store.pg_schema import LOCK_CALLS, LOCK_REFUSALS
from edgefilter.store.records import (
    APPEAL_COLUMNS,
    APPEAL_INSERT,
    KEYED_CALL_COLUMNS,
    OUTCOME_COLUMNS,
    REFUSAL_COLUMNS,
    REPUTATION_COLUMNS,
    Appeal,
    Refusal,
    ReputationRow,
    astuple_appeal,
    new_appeal_code,
)


class PgLedger(PgLists):
    """Refusals and appeals: both may write a list entry in their transaction (postgres.PgStore)."""

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
        return dataclasses.replace(r, undone_at=now)

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

    # -- `db copy` (open.copy_sqlite_to_postgres): not part of the store API -----------
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
                    *[list(col) for col in zip(*rows, strict=True)],
                )
        return int(status.rsplit(" ", 1)[-1])

    async def _copy_refusals(self, refusals: list[Refusal]) -> int:
        """Insert ledger rows not there yet (same caller, callee, time and kind). Returns how many."""
        if not refusals:
            return 0
        cols = [list(col) for col in zip(*[
            (r.caller_e164, r.callee, r.ts, r.kind, r.category, r.source, r.call_uniqueid, r.pattern, r.undone_at)
            for r in refusals
        ], strict=True)]
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
        cols = [list(col) for col in zip(*latest.values(), strict=True)]
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

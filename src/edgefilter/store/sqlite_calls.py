"""The SQLite store's call log: call records and their outcomes, contacts, challenge outcomes,
the reputation cache."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Sequence

from edgefilter.store.records import (
    CALL_COLUMNS,
    KEYED_CALL_COLUMNS,
    OUTCOME_COLUMNS,
    REPUTATION_COLUMNS,
    CallOutcome,
    CallRecord,
    ContactSeen,
    ReputationRow,
    keyed_row,
)
from edgefilter.store.sqlite_base import SqliteBase


class SqliteCalls(SqliteBase):
    """Call history and what is recorded beside it (sqlite.Store)."""

    # -- call log -------------------------------------------------------------------------
    async def record_calls(self, records: Iterable[CallRecord]) -> int:
        """Write call records; a record whose key is already there is skipped (a retry).
        Returns how many rows were new."""
        rows = [keyed_row(r, self.node) for r in records]
        if not rows:
            return 0
        async with self.transaction():
            return await self._insert_calls(rows)

    async def _insert_calls(self, rows: list[tuple]) -> int:
        before = self.db.total_changes
        await self.db.executemany(
            f"INSERT INTO calls ({KEYED_CALL_COLUMNS}) VALUES ({', '.join('?' * 17)}) ON CONFLICT DO NOTHING", rows
        )
        return self.db.total_changes - before

    async def recent_calls(self, since: float, limit: int = 1000000) -> list[CallRecord]:
        cur = await self.db.execute(
            f"SELECT {KEYED_CALL_COLUMNS} FROM calls WHERE ts >= ? ORDER BY ts LIMIT ?", (since, limit)
        )
        return [CallRecord(*r) for r in await cur.fetchall()]

    async def iter_calls(self, since: float, until: float | None = None, batch: int = 10000) -> AsyncIterator[list[CallRecord]]:
        """Call records with since <= ts (< until), oldest first, in batches (`edgefilter stats`)."""
        sql = f"SELECT {KEYED_CALL_COLUMNS} FROM calls WHERE ts >= ?"
        args: list[float] = [since]
        if until is not None:
            sql += " AND ts < ?"
            args.append(until)
        cur = await self.db.execute(sql + " ORDER BY ts", args)
        while True:
            rows = await cur.fetchmany(batch)
            if not rows:
                break
            yield [CallRecord(*r) for r in rows]
    # -- challenge outcomes ---------------------------------------------------------------
    async def record_challenges(self, records: Iterable) -> int:
        """Store challenge outcomes (objects with ts, uniqueid, caller_e164, outcome and, optionally,
        key: a retried write of the same outcome is stored once). Returns how many were new."""
        rows = [(r.ts, r.uniqueid, r.caller_e164, r.outcome, self.node, getattr(r, "key", "") or uuid.uuid4().hex)
                for r in records]
        if not rows:
            return 0
        async with self.transaction():
            before = self.db.total_changes
            await self.db.executemany(
                "INSERT INTO challenge_outcomes (ts, uniqueid, caller_e164, outcome, node, key) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING", rows
            )
            return self.db.total_changes - before

    async def challenge_failures_since(self, since: float, caller_e164: str | None = None) -> list[tuple[str, float]]:
        """(E.164 digits without '+', ts) of every failed challenge since ``since``, oldest first."""
        sql = "SELECT caller_e164, ts FROM challenge_outcomes WHERE outcome = 'fail' AND ts > ?"
        args: tuple = (since,)
        if caller_e164 is not None:
            sql += " AND caller_e164 = ?"
            args += (caller_e164,)
        cur = await self.db.execute(sql + " ORDER BY ts", args)
        return [(e164.lstrip("+"), ts) for e164, ts in await cur.fetchall()]

    async def purge_challenges(self, before: float) -> int:
        async with self.transaction():
            cur = await self.db.execute("DELETE FROM challenge_outcomes WHERE ts < ?", (before,))
        return cur.rowcount

    async def calls_after(self, cursor: int, limit: int = 10000) -> list[tuple[int, CallRecord]]:
        """Calls with id > ``cursor`` in id order, with their ids: lets an in-memory history follow
        the call log (every node's calls on PostgreSQL) without re-reading a time window."""
        cur = await self.db.execute(
            f"SELECT id, {KEYED_CALL_COLUMNS} FROM calls WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)
        )
        return [(r[0], CallRecord(*r[1:])) for r in await cur.fetchall()]

    async def calls_head(self) -> int:
        """The largest call id (0 when none): where a follower of ``calls_after`` starts."""
        ((head,),) = await self.db.execute_fetchall("SELECT COALESCE(MAX(id), 0) FROM calls")
        return int(head)

    async def purge_calls(self, before: float) -> int:
        async with self.transaction():
            cur = await self.db.execute("DELETE FROM calls WHERE ts < ?", (before,))
            await self.db.execute("DELETE FROM contacts WHERE last_ts < ?", (before,))
        return cur.rowcount

    # -- reputation cache -----------------------------------------------------------------
    async def put_reputation(self, rows: Iterable[ReputationRow]) -> int:
        """Insert or replace cached answers (one transaction for the batch)."""
        values = [r.row() for r in rows]
        if not values:
            return 0
        async with self.transaction():
            await self.db.executemany(
                f"INSERT OR REPLACE INTO reputation ({REPUTATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", values
            )
        return len(values)

    async def get_reputation(self, source: str, number: str) -> ReputationRow | None:
        cur = await self.db.execute(
            f"SELECT {REPUTATION_COLUMNS} FROM reputation WHERE source = ? AND number = ?", (source, number)
        )
        row = await cur.fetchone()
        return ReputationRow(*row) if row else None

    async def reputation_rows(
        self, *, number: str | None = None, fresh_at: float | None = None, limit: int = 1000000
    ) -> list[ReputationRow]:
        """Cached answers, newest first; only those still fresh at ``fresh_at`` when given."""
        where: list[str] = []
        params: list[str | float] = []
        if number is not None:
            where.append("number = ?")
            params.append(number)
        if fresh_at is not None:
            where.append("expires_at > ?")
            params.append(fresh_at)
        sql = f"SELECT {REPUTATION_COLUMNS} FROM reputation"
        if where:
            sql += " WHERE " + " AND ".join(where)
        cur = await self.db.execute(sql + " ORDER BY fetched_at DESC LIMIT ?", (*params, limit))
        return [ReputationRow(*r) for r in await cur.fetchall()]

    async def purge_reputation(self, *, source: str | None = None, expired_at: float | None = None) -> int:
        """Delete cached answers: all, one source's, and/or only those expired at ``expired_at``."""
        where: list[str] = []
        params: list[str | float] = []
        if source is not None:
            where.append("source = ?")
            params.append(source)
        if expired_at is not None:
            where.append("expires_at <= ?")
            params.append(expired_at)
        sql = "DELETE FROM reputation" + (" WHERE " + " AND ".join(where) if where else "")
        async with self.transaction():
            cur = await self.db.execute(sql, params)
        return cur.rowcount

    async def write_batch(self, items: Sequence[object]) -> int:
        """Call records, outcomes and contacts in one transaction, in queue order.

        One queue keeps the order: an outcome is always applied after the insert of its call.
        """
        if not items:
            return 0
        async with self.transaction():
            run: list[tuple] = []  # consecutive call records go in one executemany
            for item in [*items, None]:
                if isinstance(item, CallRecord):
                    run.append(keyed_row(item, self.node))
                    continue
                if run:
                    await self._insert_calls(run)
                    run = []
                if item is None:
                    break
                if isinstance(item, CallOutcome):
                    await self._apply_outcome(item)
                elif isinstance(item, ContactSeen):
                    await self.db.execute(
                        "INSERT INTO contacts (e164, last_ts, how) VALUES (?, ?, ?) "
                        "ON CONFLICT (e164) DO UPDATE SET last_ts = max(last_ts, excluded.last_ts), how = excluded.how",
                        (item.e164, item.ts, item.how),
                    )
                else:  # pragma: no cover - a programming error
                    raise TypeError(f"cannot store {type(item).__name__}")
        return len(items)

    async def _apply_outcome(self, o: CallOutcome) -> None:
        if not o.uniqueid:
            return
        await self.db.execute(
            """UPDATE calls SET linkedid = CASE WHEN ? != '' THEN ? ELSE linkedid END,
                   answered = COALESCE(?, answered), talk_seconds = COALESCE(?, talk_seconds),
                   hangup_cause = COALESCE(?, hangup_cause),
                   hangup_text = CASE WHEN ? != '' THEN ? ELSE hangup_text END,
                   dial_status = CASE WHEN ? != '' THEN ? ELSE dial_status END,
                   ended_at = COALESCE(?, ended_at)
               WHERE uniqueid = ? AND (? = '' OR node = ?)""",
            (
                o.linkedid, o.linkedid, None if o.answered is None else int(o.answered), o.talk_seconds,
                o.hangup_cause, o.hangup_text, o.hangup_text, o.dial_status, o.dial_status, o.ended_at, o.uniqueid,
                o.node, o.node,
            ),
        )

    async def history_rows(self, since: float, limit: int = 1000000, through_id: int | None = None) -> list[tuple]:
        """Recent calls for the in-memory history: (ts, uniqueid, caller_e164, caller_kind,
        called, extension, answered, talk_seconds, action), oldest first, newest ``limit`` kept;
        only ids up to ``through_id`` when given (``calls_after(through_id)`` follows on)."""
        cur = await self.db.execute(
            """SELECT ts, uniqueid, caller_e164, caller_kind, called, extension, answered, talk_seconds, action
               FROM (SELECT * FROM calls WHERE ts >= ? AND id <= ? ORDER BY ts DESC LIMIT ?) ORDER BY ts""",
            (since, through_id if through_id is not None else 2**62, limit),
        )
        return [tuple(r) for r in await cur.fetchall()]

    async def last_callers(self, limit: int = 100000) -> list[tuple]:
        """The newest call per extension with a caller number: (extension, ts, uniqueid, caller_e164, called)."""
        cur = await self.db.execute(
            """SELECT c.extension, c.ts, c.uniqueid, c.caller_e164, c.called FROM calls c
               JOIN (SELECT extension, MAX(ts) AS ts FROM calls
                     WHERE extension != '' AND caller_e164 IS NOT NULL GROUP BY extension) l
               ON c.extension = l.extension AND c.ts = l.ts WHERE c.caller_e164 IS NOT NULL LIMIT ?""",
            (limit,),
        )
        return [tuple(r) for r in await cur.fetchall()]

    async def calls_from(self, e164: str, since: float) -> list[dict]:
        """Every call from ``e164`` since ``since`` with its outcome, oldest first (evidence)."""
        cur = await self.db.execute(
            f"SELECT {CALL_COLUMNS}, {OUTCOME_COLUMNS} FROM calls WHERE caller_e164 = ? AND ts >= ? ORDER BY ts, id",
            (e164, since),
        )
        names = [c.strip() for c in (CALL_COLUMNS + ", " + OUTCOME_COLUMNS).split(",")]
        return [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]

    async def outcome_of(self, uniqueid: str) -> dict | None:
        cur = await self.db.execute(f"SELECT {OUTCOME_COLUMNS} FROM calls WHERE uniqueid = ? ORDER BY ts DESC LIMIT 1", (uniqueid,))
        row = await cur.fetchone()
        return None if row is None else dict(zip([c.strip() for c in OUTCOME_COLUMNS.split(",")], row, strict=True))

    async def contacts(self, since: float) -> list[tuple[str, float]]:
        cur = await self.db.execute("SELECT e164, last_ts FROM contacts WHERE last_ts >= ?", (since,))
        return [tuple(r) for r in await cur.fetchall()]

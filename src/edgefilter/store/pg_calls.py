"""The PostgreSQL store's call log: every node's call records and their outcomes, contacts,
challenge outcomes, the reputation cache."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import cast

import asyncpg

from edgefilter.store.pg_base import _CALL_TYPES, PgBase
from edgefilter.store.pg_schema import LOCK_CALLS
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


class PgCalls(PgBase):
    """Call history and what is recorded beside it (postgres.PgStore)."""

    # -- call log -------------------------------------------------------------------------
    async def record_calls(self, records: Iterable[CallRecord]) -> int:
        """Write call records; a record whose key is already there is skipped (a retry).
        Returns how many rows were new."""
        rows = [keyed_row(r, self.node) for r in records]
        if not rows:
            return 0
        async with self.transaction():
            async with self._connection() as c:
                return await self._insert_calls(c, rows)

    async def _insert_calls(self, c: asyncpg.Connection, rows: list[tuple]) -> int:
        """Bulk insert (unnest) under LOCK_CALLS, so ids commit in order (see module doc)."""
        cols = [list(col) for col in zip(*rows, strict=True)]
        casts = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_CALL_TYPES))
        await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_CALLS)
        status = await c.execute(
            f"INSERT INTO calls ({KEYED_CALL_COLUMNS}) SELECT * FROM unnest({casts}) ON CONFLICT (key) DO NOTHING",
            *cols,
        )
        return int(status.rsplit(" ", 1)[-1])

    async def write_batch(self, items: Sequence[object]) -> int:
        """Call records, outcomes and contacts in one transaction, in queue order.

        One queue keeps the order: an outcome is always applied after the insert of its call.
        Retries are harmless: records are skipped by key, outcomes and contacts are idempotent.
        """
        if not items:
            return 0
        async with self.transaction():
            async with self._connection() as c:
                i = 0
                while i < len(items):
                    kind = type(items[i])
                    j = i
                    while j < len(items) and type(items[j]) is kind:
                        j += 1
                    run = items[i:j]
                    if kind is CallRecord:
                        # (a run is of one exact type: the casts only tell mypy so)
                        await self._insert_calls(c, [keyed_row(r, self.node) for r in cast(Sequence[CallRecord], run)])
                    elif kind is CallOutcome:
                        args = [_outcome_args(o) for o in cast(Sequence[CallOutcome], run) if o.uniqueid]
                        if args:
                            await c.executemany(_OUTCOME_SQL, args)
                    elif kind is ContactSeen:
                        await c.executemany(
                            "INSERT INTO contacts (e164, last_ts, how) VALUES ($1, $2, $3) ON CONFLICT (e164) DO UPDATE "
                            "SET last_ts = GREATEST(contacts.last_ts, EXCLUDED.last_ts), how = EXCLUDED.how",
                            [(o.e164, o.ts, o.how) for o in cast(Sequence[ContactSeen], run)],
                        )
                    else:  # pragma: no cover - a programming error
                        raise TypeError(f"cannot store {kind.__name__}")
                    i = j
        return len(items)

    async def recent_calls(self, since: float, limit: int = 1000000) -> list[CallRecord]:
        """Every node's calls since ``since`` (epoch seconds), oldest first."""
        async with self._connection() as c:
            rows = await c.fetch(f"SELECT {KEYED_CALL_COLUMNS} FROM calls WHERE ts >= $1 ORDER BY ts LIMIT $2", since, limit)
        return [CallRecord(*r) for r in rows]

    async def iter_calls(self, since: float, until: float | None = None, batch: int = 10000) -> AsyncIterator[list[CallRecord]]:
        """Call records with since <= ts (< until), oldest first, in batches (`edgefilter stats`);
        keyset pages on (ts, id): no long transaction or server-side cursor."""
        last_ts, last_id = float("-inf"), 0
        while True:
            async with self._connection() as c:
                rows = await c.fetch(
                    f"SELECT id, {KEYED_CALL_COLUMNS} FROM calls WHERE ts >= $1 AND ts < $2 AND (ts, id) > ($3, $4) "
                    "ORDER BY ts, id LIMIT $5",
                    since, until if until is not None else float("inf"), last_ts, last_id, batch,
                )
            if not rows:
                break
            last_ts, last_id = rows[-1]["ts"], rows[-1]["id"]
            yield [CallRecord(*tuple(r)[1:]) for r in rows]

    async def calls_after(self, cursor: int, limit: int = 10000) -> list[tuple[int, CallRecord]]:
        """Every node's calls with id > ``cursor`` in id order. Ids commit in order (LOCK_CALLS),
        so following the largest id seen never skips a row."""
        async with self._connection() as c:
            rows = await c.fetch(
                f"SELECT id, {KEYED_CALL_COLUMNS} FROM calls WHERE id > $1 ORDER BY id LIMIT $2", cursor, limit
            )
        return [(r[0], CallRecord(*tuple(r)[1:])) for r in rows]

    async def calls_head(self) -> int:
        """The largest call id (0 when none): where a follower of ``calls_after`` starts."""
        async with self._connection() as c:
            return int(await c.fetchval("SELECT COALESCE(MAX(id), 0) FROM calls"))

    async def purge_calls(self, before: float) -> int:
        async with self.transaction():
            async with self._connection() as c:
                status = await c.execute("DELETE FROM calls WHERE ts < $1", before)
                await c.execute("DELETE FROM contacts WHERE last_ts < $1", before)
        return int(status.rsplit(" ", 1)[-1])

    async def history_rows(self, since: float, limit: int = 1000000, through_id: int | None = None) -> list[tuple]:
        """Recent calls of every node for the in-memory history: (ts, uniqueid, caller_e164,
        caller_kind, called, extension, answered, talk_seconds, action), oldest first, newest
        ``limit`` kept; only ids up to ``through_id`` when given (``calls_after`` follows on)."""
        async with self._connection() as c:
            rows = await c.fetch(
                """SELECT ts, uniqueid, caller_e164, caller_kind, called, extension, answered, talk_seconds, action
                   FROM (SELECT * FROM calls WHERE ts >= $1 AND id <= $2 ORDER BY ts DESC LIMIT $3) recent ORDER BY ts""",
                since, through_id if through_id is not None else 2**62, limit,
            )
        return [tuple(r) for r in rows]

    async def last_callers(self, limit: int = 100000) -> list[tuple]:
        """The newest call per extension with a caller number: (extension, ts, uniqueid, caller_e164, called)."""
        async with self._connection() as c:
            rows = await c.fetch(
                """SELECT c.extension, c.ts, c.uniqueid, c.caller_e164, c.called FROM calls c
                   JOIN (SELECT extension, MAX(ts) AS ts FROM calls
                         WHERE extension != '' AND caller_e164 IS NOT NULL GROUP BY extension) l
                   ON c.extension = l.extension AND c.ts = l.ts WHERE c.caller_e164 IS NOT NULL LIMIT $1""",
                limit,
            )
        return [tuple(r) for r in rows]

    async def calls_from(self, e164: str, since: float) -> list[dict]:
        """Every call from ``e164`` since ``since`` with its outcome, oldest first (evidence)."""
        async with self._connection() as c:
            rows = await c.fetch(
                f"SELECT {CALL_COLUMNS}, {OUTCOME_COLUMNS} FROM calls WHERE caller_e164 = $1 AND ts >= $2 ORDER BY ts, id",
                e164, since,
            )
        names = [n.strip() for n in (CALL_COLUMNS + ", " + OUTCOME_COLUMNS).split(",")]
        return [dict(zip(names, tuple(r), strict=True)) for r in rows]

    async def outcome_of(self, uniqueid: str) -> dict | None:
        async with self._connection() as c:
            row = await c.fetchrow(
                f"SELECT {OUTCOME_COLUMNS} FROM calls WHERE uniqueid = $1 ORDER BY ts DESC LIMIT 1", uniqueid
            )
        return None if row is None else dict(zip([n.strip() for n in OUTCOME_COLUMNS.split(",")], tuple(row), strict=True))

    # -- challenge outcomes ---------------------------------------------------------------
    async def record_challenges(self, records: Iterable) -> int:
        """Store challenge outcomes (objects with ts, uniqueid, caller_e164, outcome and, optionally,
        key: a retried write of the same outcome is stored once). Returns how many were new."""
        rows = [(r.ts, r.uniqueid, r.caller_e164, r.outcome, self.node, getattr(r, "key", "") or uuid.uuid4().hex)
                for r in records]
        if not rows:
            return 0
        cols = [list(col) for col in zip(*rows, strict=True)]
        async with self._connection() as c:
            status = await c.execute(
                "INSERT INTO challenge_outcomes (ts, uniqueid, caller_e164, outcome, node, key) "
                "SELECT * FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) "
                "ON CONFLICT (key) DO NOTHING",
                *cols,
            )
        return int(status.rsplit(" ", 1)[-1])

    async def challenge_failures_since(self, since: float, caller_e164: str | None = None) -> list[tuple[str, float]]:
        """(E.164 digits without '+', ts) of every failed challenge since ``since`` (every node's),
        oldest first."""
        sql = "SELECT caller_e164, ts FROM challenge_outcomes WHERE outcome = 'fail' AND ts > $1"
        args: list = [since]
        if caller_e164 is not None:
            sql += " AND caller_e164 = $2"
            args.append(caller_e164)
        async with self._connection() as c:
            rows = await c.fetch(sql + " ORDER BY ts, id", *args)
        return [(r[0].lstrip("+"), r[1]) for r in rows]

    async def purge_challenges(self, before: float) -> int:
        async with self._connection() as c:
            status = await c.execute("DELETE FROM challenge_outcomes WHERE ts < $1", before)
        return int(status.rsplit(" ", 1)[-1])

    # -- reputation cache -----------------------------------------------------------------
    async def put_reputation(self, rows: Iterable[ReputationRow]) -> int:
        """Insert or replace cached answers (one transaction for the batch)."""
        latest = {(r.source, r.number): r.row() for r in rows}  # one upsert may not touch a row twice
        if not latest:
            return 0
        cols = [list(col) for col in zip(*latest.values(), strict=True)]
        async with self._connection() as c:
            await c.execute(
                f"INSERT INTO reputation ({REPUTATION_COLUMNS}) SELECT * FROM unnest($1::text[], $2::text[], "
                "$3::float8[], $4::text[], $5::text[], $6::float8[], $7::float8[]) "
                "ON CONFLICT (source, number) DO UPDATE SET score = EXCLUDED.score, category = EXCLUDED.category, "
                "status = EXCLUDED.status, fetched_at = EXCLUDED.fetched_at, expires_at = EXCLUDED.expires_at",
                *cols,
            )
        return len(latest)

    async def get_reputation(self, source: str, number: str) -> ReputationRow | None:
        async with self._connection() as c:
            row = await c.fetchrow(
                f"SELECT {REPUTATION_COLUMNS} FROM reputation WHERE source = $1 AND number = $2", source, number
            )
        return ReputationRow(*row) if row else None

    async def reputation_rows(
        self, *, number: str | None = None, fresh_at: float | None = None, limit: int = 1000000
    ) -> list[ReputationRow]:
        """Cached answers, newest first; only those still fresh at ``fresh_at`` when given."""
        where: list[str] = []
        params: list[str | float] = []
        if number is not None:
            params.append(number)
            where.append(f"number = ${len(params)}")
        if fresh_at is not None:
            params.append(fresh_at)
            where.append(f"expires_at > ${len(params)}")
        sql = f"SELECT {REPUTATION_COLUMNS} FROM reputation"
        if where:
            sql += " WHERE " + " AND ".join(where)
        params.append(limit)
        async with self._connection() as c:
            rows = await c.fetch(sql + f" ORDER BY fetched_at DESC LIMIT ${len(params)}", *params)
        return [ReputationRow(*r) for r in rows]

    async def purge_reputation(self, *, source: str | None = None, expired_at: float | None = None) -> int:
        """Delete cached answers: all, one source's, and/or only those expired at ``expired_at``."""
        where: list[str] = []
        params: list[str | float] = []
        if source is not None:
            params.append(source)
            where.append(f"source = ${len(params)}")
        if expired_at is not None:
            params.append(expired_at)
            where.append(f"expires_at <= ${len(params)}")
        sql = "DELETE FROM reputation" + (" WHERE " + " AND ".join(where) if where else "")
        async with self._connection() as c:
            status = await c.execute(sql, *params)
        return int(status.rsplit(" ", 1)[-1])

    async def contacts(self, since: float) -> list[tuple[str, float]]:
        async with self._connection() as c:
            rows = await c.fetch("SELECT e164, last_ts FROM contacts WHERE last_ts >= $1", since)
        return [tuple(r) for r in rows]


_OUTCOME_SQL = """UPDATE calls SET linkedid = CASE WHEN $1 != '' THEN $1 ELSE linkedid END,
       answered = COALESCE($2::integer, answered), talk_seconds = COALESCE($3::float8, talk_seconds),
       hangup_cause = COALESCE($4::integer, hangup_cause),
       hangup_text = CASE WHEN $5 != '' THEN $5 ELSE hangup_text END,
       dial_status = CASE WHEN $6 != '' THEN $6 ELSE dial_status END,
       ended_at = COALESCE($7::float8, ended_at)
   WHERE uniqueid = $8 AND ($9 = '' OR node = $9)"""


def _outcome_args(o: CallOutcome) -> tuple:
    return (
        o.linkedid, None if o.answered is None else int(o.answered), o.talk_seconds, o.hangup_cause,
        o.hangup_text, o.dial_status, o.ended_at, o.uniqueid, o.node,
    )

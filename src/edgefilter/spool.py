"""The call-record spool: a small local SQLite file that holds call records while the database
cannot take them (PostgreSQL down or unreachable, SQLite locked or full).

Records keep their order (a sequence number) and their unique key, so draining the spool into
PostgreSQL after an outage neither loses nor duplicates anything: a batch is deleted from the
spool only after the database committed it, and a batch written twice (a crash between the two)
is skipped by the key. The spool is bounded by count; past the bound new records are dropped
and counted, never blocking a call. It runs in aiosqlite's thread, off the event loop.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import aiosqlite

from .errors import StoreError
from .store import CallRecord, describe_sqlite_error

_FIELDS = [f.name for f in dataclasses.fields(CallRecord)]


class Spool:
    """Call records waiting for the database; ``await Spool.open(path, max_records)``."""

    def __init__(self, db: aiosqlite.Connection, path: str, max_records: int, count: int) -> None:
        self.db = db
        self.path = path
        self.max_records = max_records
        self.count = count  # records waiting (kept in memory: checked on every batch)
        self.dropped = 0  # records refused because the spool was full

    @classmethod
    async def open(cls, path: str, max_records: int) -> "Spool":
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(path)
        except OSError as e:
            raise StoreError(f"{path}: cannot create the call-record spool: {e.strerror or e}") from None
        except sqlite3.Error as e:
            raise StoreError("spool " + describe_sqlite_error(path, e)) from None
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute(
                "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL)"
            )
            await db.commit()
            (count,) = await (await db.execute("SELECT COUNT(*) FROM spool")).fetchone()
        except sqlite3.Error as e:
            await db.close()
            raise StoreError("spool " + describe_sqlite_error(path, e)) from None
        return cls(db, path, max_records, count)

    async def close(self) -> None:
        await self.db.close()

    async def add(self, records: list[CallRecord]) -> int:
        """Append records (as many as fit); returns how many were dropped for lack of room."""
        room = max(0, self.max_records - self.count)
        keep, drop = records[:room], len(records) - min(room, len(records))
        if keep:
            rows = [(json.dumps([getattr(r, f) for f in _FIELDS]),) for r in keep]
            await self.db.executemany("INSERT INTO spool (record) VALUES (?)", rows)
            await self.db.commit()
            self.count += len(keep)
        self.dropped += drop
        return drop

    async def peek(self, limit: int) -> list[tuple[int, CallRecord]]:
        """The oldest records, with their sequence numbers (for ``remove_through``)."""
        cur = await self.db.execute("SELECT seq, record FROM spool ORDER BY seq LIMIT ?", (limit,))
        return [(seq, CallRecord(*json.loads(text))) for seq, text in await cur.fetchall()]

    async def remove_through(self, seq: int) -> None:
        """Forget every record up to ``seq`` (the database has committed them)."""
        cur = await self.db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))
        await self.db.commit()
        self.count = max(0, self.count - cur.rowcount)

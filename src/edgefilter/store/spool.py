"""The call-log spool: a small local SQLite file that holds what the call-log writer could not
write while the database cannot take it (PostgreSQL down or unreachable, SQLite locked or full):
call records, their AMI outcomes and known contacts, in queue order.

Items keep their order (a sequence number), so an outcome is still applied after the insert of
its call; draining the spool after an outage neither loses nor duplicates anything: a batch is
deleted from the spool only after the database committed it, and a batch written twice (a crash
between the two) is harmless (call records are skipped by their unique key, outcomes and
contacts are idempotent updates). The spool is bounded by count; past the bound new items are
dropped and counted, never blocking a call. It runs in aiosqlite's thread, off the event loop.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import aiosqlite

from edgefilter.core.errors import StoreError
from edgefilter.store.sqlite import CallOutcome, CallRecord, ContactSeen, describe_sqlite_error

#: What the spool holds, by the tag stored with each item.
_KINDS: dict[str, type] = {"call": CallRecord, "outcome": CallOutcome, "contact": ContactSeen}
_TAGS = {cls: tag for tag, cls in _KINDS.items()}
_FIELDS = {cls: [f.name for f in dataclasses.fields(cls)] for cls in _KINDS.values()}


def _encode(item: object) -> str:
    cls = type(item)
    if cls not in _TAGS:
        raise TypeError(f"the spool cannot hold {cls.__name__}")
    return json.dumps([_TAGS[cls], [getattr(item, f) for f in _FIELDS[cls]]])


def _decode(text: str) -> object:
    data = json.loads(text)
    if data and isinstance(data[0], str):  # [tag, fields]
        return _KINDS[data[0]](*data[1])
    return CallRecord(*data)  # the first spool format: a bare call record


class Spool:
    """Call-log items waiting for the database; ``await Spool.open(path, max_records)``."""

    def __init__(self, db: aiosqlite.Connection, path: str, max_records: int, count: int) -> None:
        self.db = db
        self.path = path
        self.max_records = max_records
        self.count = count  # records waiting (kept in memory: checked on every batch)
        self.dropped = 0  # records refused because the spool was full

    @classmethod
    async def open(cls, path: str, max_records: int) -> Spool:
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
            ((count,),) = await db.execute_fetchall("SELECT COUNT(*) FROM spool")
        except sqlite3.Error as e:
            await db.close()
            raise StoreError("spool " + describe_sqlite_error(path, e)) from None
        return cls(db, path, max_records, count)

    async def close(self) -> None:
        await self.db.close()

    async def add(self, records: list[object]) -> int:
        """Append items (as many as fit); returns how many were dropped for lack of room."""
        room = max(0, self.max_records - self.count)
        keep, drop = records[:room], len(records) - min(room, len(records))
        if keep:
            rows = [(_encode(r),) for r in keep]
            await self.db.executemany("INSERT INTO spool (record) VALUES (?)", rows)
            await self.db.commit()
            self.count += len(keep)
        self.dropped += drop
        return drop

    async def peek(self, limit: int) -> list[tuple[int, object]]:
        """The oldest items, with their sequence numbers (for ``remove_through``)."""
        cur = await self.db.execute("SELECT seq, record FROM spool ORDER BY seq LIMIT ?", (limit,))
        rows = [(seq, _decode(text)) for seq, text in await cur.fetchall()]
        if not rows and limit > 0:
            self.count = 0  # the workers of a pool share the file: another one drained it
        return rows

    async def remove_through(self, seq: int) -> None:
        """Forget every record up to ``seq`` (the database has committed them)."""
        cur = await self.db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))
        await self.db.commit()
        self.count = max(0, self.count - cur.rowcount)

"""SqliteBase: the SQLite store's connection, transactions and migrations (the other sqlite_*
modules add the API by concern; sqlite.Store puts them together)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator

import aiosqlite

from edgefilter.core.errors import StoreError
from edgefilter.store.sqlite_schema import ASSIGN_PROFILES, LATE_MIGRATIONS, MIGRATIONS, SCHEMA_VERSION


def describe_sqlite_error(path: str, exc: BaseException) -> str:
    """An admin-readable reason for a sqlite failure."""
    msg = str(exc).lower()
    if "locked" in msg or "busy" in msg:
        return f"{path}: database is locked by another process (an import still running?)"
    if "readonly" in msg or "read-only" in msg:
        return f"{path}: database is read-only (check the file's and directory's permissions)"
    if "disk is full" in msg or "database or disk is full" in msg:
        return f"{path}: disk is full"
    if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
        return f"{path}: database file is corrupt or not an edgefilter database ({exc})"
    if "disk i/o error" in msg:
        return f"{path}: disk I/O error (disk full, failing, or the file removed under us?)"
    if "unable to open" in msg:
        return f"{path}: cannot open the database (missing directory or no permission)"
    return f"{path}: database error: {exc}"


class SqliteBase:
    """One aiosqlite connection to the database (see sqlite.Store)."""

    backend = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path
        self.where = path
        self.node = ""  # this node's name, for rows that name none (open.open_store sets it)
        # One connection serves every task of the service: transactions take turns (the lock) and
        # a transaction opened inside another one, in the same task, becomes a savepoint.
        self._tx_lock = asyncio.Lock()
        self._tx_depth: contextvars.ContextVar[int] = contextvars.ContextVar(f"sqlite_tx_{id(self)}", default=0)

    def describe_error(self, exc: BaseException) -> str:
        """An admin-readable reason for a failure of this store."""
        if isinstance(exc, StoreError):
            return str(exc)
        return describe_sqlite_error(self.path, exc)

    async def _setup(self, busy_timeout_ms: int) -> None:
        await self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if self.path != ":memory:":
            mode = await (await self.db.execute("PRAGMA journal_mode")).fetchone()
            if mode and mode[0].lower() != "wal":
                await self.db.execute("PRAGMA journal_mode = WAL")
        await self.db.execute("PRAGMA synchronous = NORMAL")
        await self.db.execute("PRAGMA foreign_keys = ON")
        await self.migrate()

    async def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION; each step in its own transaction."""
        ((version,),) = await self.db.execute_fetchall("PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: database schema v{version} is newer than this edgefilter (v{SCHEMA_VERSION}); upgrade edgefilter"
            )
        for v in range(1, SCHEMA_VERSION + 1):  # in version order: a late one before those after it
            if v not in MIGRATIONS:  # a number reserved for a change not merged yet
                continue
            if v > version:
                await self.db.executescript("BEGIN IMMEDIATE;\n" + MIGRATIONS[v] + f"\nPRAGMA user_version = {v};\nCOMMIT;")
            elif v in LATE_MIGRATIONS:
                # a database that went past v while its number was still reserved lacks it
                table, column = LATE_MIGRATIONS[v]
                cur = await self.db.execute(f"SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?", (column,))
                if await cur.fetchone() is None:
                    await self.db.executescript("BEGIN IMMEDIATE;\n" + MIGRATIONS[v] + "\nCOMMIT;")
        return SCHEMA_VERSION

    async def schema_version(self) -> int:
        ((version,),) = await self.db.execute_fetchall("PRAGMA user_version")
        return int(version)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: nothing partial is ever written.
        Store methods called inside it join it (nested transactions are savepoints)."""
        depth = self._tx_depth.get()
        if depth:
            name = f"sp{depth}"
            await self.db.execute(f"SAVEPOINT {name}")
            token = self._tx_depth.set(depth + 1)
            try:
                yield
            except BaseException:
                await self.db.execute(f"ROLLBACK TO {name}")
                await self.db.execute(f"RELEASE {name}")
                raise
            else:
                await self.db.execute(f"RELEASE {name}")
            finally:
                self._tx_depth.reset(token)
            return
        async with self._tx_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            token = self._tx_depth.set(1)
            try:
                yield
            except BaseException:
                await self.db.rollback()
                raise
            else:
                await self.db.commit()
            finally:
                self._tx_depth.reset(token)

    async def _assign_profiles(self) -> None:
        for stmt in ASSIGN_PROFILES.split(";"):
            if stmt.strip():
                await self.db.execute(stmt)

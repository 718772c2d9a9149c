"""PgBase: the PostgreSQL store's pool, transactions, migrations and error words (the other
pg_* modules add the API by concern; postgres.PgStore puts them together)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator

import asyncpg

from edgefilter.core.config import redact_url
from edgefilter.core.errors import StoreError
from edgefilter.store.pg_schema import LATE_MIGRATIONS, LOCK_CHANGES, LOCK_MIGRATE, MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("edgefilter.pgstore")

# unnest() casts for a bulk insert of CallRecord rows (KEYED_CALL_COLUMNS order).
_CALL_TYPES = (
    "float8", "text", "text", "text", "text", "text", "text", "text", "text",
    "text", "text", "float8", "text", "text", "float8", "text", "text",
)
_OUTCOME_TYPES = ("text", "int4", "float8", "int4", "text", "text", "float8")  # OUTCOME_COLUMNS
_ENTRY_TYPES = ("text", "text", "text", "text", "text", "text", "text", "float8", "float8")


def describe_pg_error(where: str, exc: BaseException) -> str:
    """An admin-readable reason for a PostgreSQL failure (never includes the password)."""
    if isinstance(exc, StoreError):
        return str(exc)
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return f"{where}: password authentication failed (check [store] password_file or PGPASSWORD)"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"{where}: the server refused this user: {exc}"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{where}: the database does not exist (create it: createdb -O USER DBNAME)"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return f"{where}: permission denied ({exc}); the user needs to own the database or its tables"
    if isinstance(exc, (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError)):
        return f"{where}: the server is shutting down or restarting"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return f"{where}: the server is starting up or shutting down"
    if isinstance(exc, (asyncpg.ConnectionDoesNotExistError, asyncpg.ConnectionFailureError)):
        return f"{where}: connection lost (server restarted or network down)"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"{where}: no answer in time (server down or network unreachable)"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{where}: cannot connect ({reason}): is PostgreSQL running and reachable?"
    if isinstance(exc, asyncpg.InterfaceError):
        return f"{where}: connection problem: {exc}"
    return f"{where}: database error: {exc}"


_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError, TimeoutError)


class PgBase:
    """A small asyncpg pool on one PostgreSQL database (see postgres.PgStore)."""

    backend = "postgresql"

    def __init__(self, pool: asyncpg.Pool, url: str, password: str | None, connect_timeout: float) -> None:
        self.pool = pool
        self.url = url
        self.where = redact_url(url)
        self.path = self.where  # what older code prints as "the database"
        self._password = password
        self._connect_timeout = connect_timeout
        self._tx: contextvars.ContextVar[asyncpg.Connection | None] = contextvars.ContextVar("pg_tx", default=None)
        self.node = ""  # this node's name, for rows that name none (open.open_store sets it)
        self.notices = 0  # change notices received (tests and `explain` of latency)
        self.listening = False
        self._import_conn: asyncpg.Connection | None = None  # held from begin_import to apply_import
        #: node-local start-up cache of the compact index (open.open_store sets it); "" = none
        self.snapshot_path = ""
        self.last_load = ""  # "snapshot" or "full": how the last load_index got the numbers

    def describe_error(self, exc: BaseException) -> str:
        return describe_pg_error(self.where, exc)

    # -- connections and transactions ----------------------------------------------------
    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """The current transaction's connection, else one from the pool; driver errors -> StoreError."""
        c = self._tx.get()
        if c is not None:
            yield c
            return
        try:
            async with self.pool.acquire(timeout=self._connect_timeout + 1) as c:
                yield c
        except _DB_ERRORS as e:
            raise StoreError(describe_pg_error(self.where, e)) from None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN ... COMMIT on one pooled connection, rolled back on any error; store methods
        called inside it join it (nested calls become savepoints)."""
        c = self._tx.get()
        if c is not None:
            async with c.transaction():
                yield
            return
        async with self._connection() as c:
            token = self._tx.set(c)
            try:
                async with c.transaction():
                    yield
            finally:
                self._tx.reset(token)

    async def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION, one transaction per step, under an advisory lock."""
        async with self._connection() as c:
            while True:
                async with c.transaction():
                    await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_MIGRATE)
                    await c.execute(
                        "CREATE TABLE IF NOT EXISTS schema_version ("
                        " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                    )
                    version = await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                    if version > SCHEMA_VERSION:
                        raise StoreError(
                            f"{self.where}: database schema v{version} is newer than this edgefilter "
                            f"(v{SCHEMA_VERSION}); upgrade edgefilter"
                        )
                    # a migration merged after higher numbers (3) is applied when its row is
                    # missing, even to a database already past it
                    done = {r[0] for r in await c.fetch("SELECT version FROM schema_version")}
                    late = [v for v in MIGRATIONS if v < version and v not in done and v in LATE_MIGRATIONS]
                    if version == SCHEMA_VERSION and not late:
                        return SCHEMA_VERSION
                    # numbers reserved for changes not merged yet are skipped, as in SQLite
                    step = min(late or [v for v in [*MIGRATIONS, SCHEMA_VERSION] if version < v <= SCHEMA_VERSION])
                    if step in MIGRATIONS:
                        await c.execute(MIGRATIONS[step])
                    await c.execute("INSERT INTO schema_version (version) VALUES ($1)", step)
                    log.info("%s: schema migrated to v%d", self.where, step)

    async def schema_version(self) -> int:
        async with self._connection() as c:
            exists = await c.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            return int(await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")) if exists else 0

    async def _log_changes(self, c: asyncpg.Connection, rows: list[tuple[str, str]], op: str) -> None:
        """Append change rows; the advisory lock makes revs commit in order (see module doc)."""
        if not rows:
            return
        await c.execute("SELECT pg_advisory_xact_lock($1)", LOCK_CHANGES)
        await c.execute(
            "INSERT INTO changes (list, pattern, op) SELECT l, p, $3 FROM unnest($1::text[], $2::text[]) AS u(l, p)",
            [r[0] for r in rows], [r[1] for r in rows], op,
        )

    async def _assign_profiles(self, c: asyncpg.Connection) -> None:
        """Give exact numbers without a profile theirs (set-based; the partial index finds them)."""
        await c.execute(
            f"""INSERT INTO profiles (sig, list, category, note, source, created_at, expires_at)
                SELECT DISTINCT {_sig('e')}, e.list, e.category, e.note, e.source, e.created_at, e.expires_at
                FROM entries e WHERE e.num IS NOT NULL AND e.profile IS NULL
                ON CONFLICT (sig) DO NOTHING"""
        )
        await c.execute(
            f"""UPDATE entries e SET profile = p.id FROM profiles p
                WHERE e.num IS NOT NULL AND e.profile IS NULL AND p.sig = {_sig('e')}"""
        )

    async def _end_import(self) -> None:
        c = getattr(self, "_import_conn", None)
        self._import_conn = None
        if c is not None:
            with contextlib.suppress(Exception):
                await c.execute("DROP TABLE IF EXISTS pg_temp.import_stage")
            with contextlib.suppress(Exception):
                await self.pool.release(c)


def _sig(t: str) -> str:
    """SQL for a profile's signature (its metadata as one text) from table alias ``t``."""
    return (
        f"concat_ws(chr(31), {t}.list, {t}.category, {t}.note, {t}.source, {t}.created_at::text, "
        f"COALESCE({t}.expires_at::text, '-'))"
    )

"""The shared store: PostgreSQL through asyncpg, for several PBXs in front of one database.

Same methods and meaning as sqlite.Store (the SQLite file of a single box), so the service and the
CLI do not care which one ``open.open_store`` gave them. What differs, and why:

- Change feed: a statement trigger on ``changes`` fires ``NOTIFY edgefilter_changes``;
  ``watch_changes`` keeps one LISTEN connection per node and nudges the list follower, so a change
  made on any node (or by the CLI) reaches every node's in-memory index in milliseconds. The
  periodic poll stays as the fallback when that connection is down.
- Writers to ``changes`` (and to ``calls``) take a transaction-scoped advisory lock before drawing
  a number from the sequence, so numbers commit in order: a reader that has seen rev N has seen
  every rev below N. Without it a follower could skip a slow transaction's change for ever.
  List writes are rare and call batches are short, so the serialisation costs nothing visible.
- Call records carry the node that screened the call and a key unique across nodes;
  ``INSERT ... ON CONFLICT (key) DO NOTHING`` makes retries (spool drains, `db copy` re-runs)
  harmless.
- Schema migrations are our own (MIGRATIONS below, a ``schema_version`` table), applied under an
  advisory lock so that two nodes starting together do not race.

Every SQL statement is parameterised. Every driver or network failure becomes a StoreError

Layout (issue 18): PgStore is put together here from mixins by concern - pg_base (pool,
transactions, migrations, error words), pg_lists (entries and the change feed), pg_import
(bulk imports, the index load), pg_calls (call log, contacts, challenges, reputation cache),
pg_ledger (refusals, appeals, `db copy` writers) - and satisfies contract.StoreContract like
sqlite.Store. The names importers used from this module are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

from edgefilter.core.config import redact_url
from edgefilter.core.errors import StoreError
from edgefilter.store.pg_base import _DB_ERRORS, describe_pg_error, log
from edgefilter.store.pg_calls import PgCalls
from edgefilter.store.pg_import import PgImport
from edgefilter.store.pg_ledger import PgLedger
from edgefilter.store.pg_schema import (
    CHANGES_CHANNEL,
    LATE_MIGRATIONS,
    LOCK_CALLS,
    LOCK_CHANGES,
    LOCK_MIGRATE,
    LOCK_REFUSALS,
    MIGRATIONS,
    SCHEMA_VERSION,
)

__all__ = [
    "CHANGES_CHANNEL",
    "LATE_MIGRATIONS",
    "LOCK_CALLS",
    "LOCK_CHANGES",
    "LOCK_MIGRATE",
    "LOCK_REFUSALS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PgStore",
    "describe_pg_error",
    "log",
]


class PgStore(PgLedger, PgImport, PgCalls):
    """A small asyncpg pool on one PostgreSQL database; use ``async with PgStore.open(url)``."""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        password: str | None = None,
        migrate: bool = True,
        connect_timeout: float = 5.0,
        command_timeout: float | None = 60.0,
    ) -> AsyncIterator[PgStore]:
        """A pool that connects on first use; with ``migrate`` the schema is brought up to date
        (and so the server must answer) before the store is handed out."""
        where = redact_url(url)
        try:
            pool = await asyncpg.create_pool(
                dsn=url,
                password=password,
                min_size=0,
                max_size=4,
                timeout=connect_timeout,
                command_timeout=command_timeout,
                max_inactive_connection_lifetime=60.0,
            )
        except _DB_ERRORS as e:
            raise StoreError(describe_pg_error(where, e)) from None
        except ValueError as e:  # a malformed URL
            raise StoreError(f"{where}: invalid PostgreSQL URL ({e})") from None
        store = cls(pool, url, password, connect_timeout)
        try:
            if migrate:
                await store.migrate()
            yield store
        finally:
            await store._end_import()
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:  # a dead server can keep close() waiting: cut the sockets
                pool.terminate()

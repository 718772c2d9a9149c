"""Shared fixtures: settings on a temporary database, a running service on an ephemeral port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefilter.core.config import settings_from_dict
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.service import Service
from edgefilter.store.open import open_store
from edgefilter.store.records import CallRecord

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "asterisk"
if not FIXTURES.exists():  # CI lays shared/ beside the clone; a worktree may sit elsewhere
    FIXTURES = Path(os.environ.get("EDGEFILTER_FIXTURES", "/work/shared/fixtures/asterisk"))


@pytest.fixture(autouse=True, scope="session")
def _fresh_normalisation_caches():
    """Every test session starts with empty caches in numbers. Under `make mutation`, sessions
    run in processes forked from one that already ran the suite: an answer cached from the
    unmutated code would hide the mutant under test (docs/testing.md)."""
    from edgefilter.core import numbers

    numbers._normalize_cached.cache_clear()
    numbers._is_short.cache_clear()
    numbers._country_code.cache_clear()
    numbers._IDD_PATTERNS.clear()


def behaviour_off(make_settings):
    """Wrap a ``make_settings`` so that the behaviour rules are off unless a test turns them on:
    for modules whose calls come from many numbers of one block in a row."""

    def make(extra: dict | None = None, **sections):
        if "behaviour" not in (extra or {}):
            sections.setdefault("behaviour", {"enabled": False})
        return make_settings(extra, **sections)

    return make


@pytest.fixture
def make_settings(tmp_path):
    def make(extra: dict | None = None, **sections):
        data = {
            "store": {"path": str(tmp_path / "edgefilter.db"), "poll_interval": "50ms", "spool_path": str(tmp_path / "spool.db")},
            "agi": {"listen": "127.0.0.1:0"},
        }
        for k, v in {**(extra or {}), **sections}.items():
            data.setdefault(k, {}).update(v) if isinstance(v, dict) and k in data else data.__setitem__(k, v)
        return settings_from_dict(data)

    return make


async def _running(settings):
    svc = Service(settings, port=0)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


@pytest.fixture
async def service(make_settings):
    """A running service (FastAGI on 127.0.0.1, ephemeral port) on a fresh database."""
    async for svc in _running(make_settings()):
        yield svc


# --------------------------------------------------------------------------- PostgreSQL
# `make test` (.ci/with-postgres) and `.ci/run` start a private PostgreSQL cluster and export
# these; on a machine without the server binaries the PostgreSQL tests skip (saying why) and the
# SQLite half of the store tests still runs.
PG_URL = os.environ.get("EDGEFILTER_TEST_PG_URL", "")
PG_DATA = os.environ.get("EDGEFILTER_TEST_PG_DATA", "")
PG_BIN = os.environ.get("EDGEFILTER_TEST_PG_BIN", "")
PG_SKIP = "EDGEFILTER_TEST_PG_URL is not set: no PostgreSQL server for this test (make test starts one when postgresql is installed)"


def reset_pg_schema(url: str) -> None:
    """A fresh, empty database for each test: drop everything edgefilter made."""
    import asyncio

    import asyncpg

    async def reset() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()

    asyncio.run(reset())


@pytest.fixture
def pg_url():
    if not PG_URL:
        pytest.skip(PG_SKIP)
    reset_pg_schema(PG_URL)
    return PG_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request):
    """Runs a test once per store backend (PostgreSQL only where a test server is configured)."""
    if request.param == "postgresql":
        request.getfixturevalue("pg_url")
    return request.param


@pytest.fixture
def backend_settings(make_settings, store_backend):
    """Like make_settings, on the backend under test."""

    def make(extra: dict | None = None, **sections):
        if store_backend == "postgresql":
            sections["store"] = {"url": PG_URL, **sections.get("store", {})}
        return make_settings(extra, **sections)

    return make


@pytest.fixture
async def store(backend_settings):
    """The store under test, once per backend (store_backend: sqlite, postgresql)."""
    async with open_store(backend_settings()) as s:
        yield s


def entry(list_name: str, text: str, **kw) -> Entry:
    """A list entry as the store tests write it (region CN, a fixed creation time)."""
    kw.setdefault("created_at", 1700000000.0)
    return Entry(list_name, parse_pattern(text, "CN"), **kw)


def record(i: int, ts: float = 1700000000.0, **kw) -> CallRecord:
    """Call record number ``i`` of the store tests (distinct caller, uniqueid and key)."""
    base = dict(
        ts=ts + i, uniqueid=f"1700000000.{i}", caller=f"+86138001380{i:02d}", caller_e164=f"+86138001380{i:02d}",
        caller_kind="mobile", caller_name="Zhang", called="1000", extension="1000", context="from-trunk",
        action="allow", would=None, score=0.5, rules="CLI_SHORT", policy="", elapsed_ms=0.4, node="pbx-a", key=f"k{i}",
    )
    base.update(kw)
    return CallRecord(**base)


@pytest.fixture
async def backend_service(backend_settings):
    """The running service on each store backend."""
    async for svc in _running(backend_settings()):
        yield svc

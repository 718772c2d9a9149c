"""What is built on the store, once per backend: SQLite (always) and PostgreSQL (when a test
server is set): the call-log spool, the [store] keys, late migrations, the behaviour memory
follower. The store contract itself (every method, on both backends) is tests/test_store_contract.py.
"""

from __future__ import annotations

import pytest

from edgefilter.core.errors import StoreError
from edgefilter.store.open import open_store
from edgefilter.store.sqlite import CallOutcome, ContactSeen, Refusal

from .conftest import entry, record


# ------------------------------------------------------------------ call log spool, every kind
class _Failing:
    """The store seen through an outage: write_batch fails while ``down``."""

    def __init__(self, store) -> None:
        self.store, self.down, self.where = store, True, store.where

    def describe_error(self, e: BaseException) -> str:
        return str(e)

    async def write_batch(self, items) -> int:
        if self.down:
            raise StoreError(f"{self.where}: connection lost")
        return await self.store.write_batch(items)


async def test_call_log_spools_calls_outcomes_and_contacts_in_order_during_an_outage(store, tmp_path):
    from edgefilter.service import CallLogWriter
    from edgefilter.store.spool import Spool

    path = str(tmp_path / "spool.db")
    spool = await Spool.open(path, 1000)
    failing = _Failing(store)
    writer = CallLogWriter(failing, spool, "pbx-a", batch=3)
    for item in [record(1, key="k1"), CallOutcome("1700000000.1", "l1", True, 30.0),
                 ContactSeen("+8613900139000", 1700000010.0, "outbound"),
                 record(2, key="k2"), CallOutcome("1700000000.2", answered=False)]:
        writer.submit(item)
    await writer.write(writer._take())  # the store fails: to the spool
    await writer.write(writer._take())  # a backlog: behind it, in order
    assert writer.failing and spool.count == 5 and writer.dropped == 0
    await spool.close()  # a restart during the outage: the spool is on disk
    spool = await Spool.open(path, 1000)
    kinds = [type(item).__name__ for _, item in await spool.peek(10)]
    assert kinds == ["CallRecord", "CallOutcome", "ContactSeen", "CallRecord", "CallOutcome"]
    assert (await spool.peek(10))[1][1].node == "pbx-a"  # outcomes are stamped with the node on submit
    failing.down = False
    writer = CallLogWriter(failing, spool, "pbx-a", batch=2)
    await writer.drain()
    assert spool.count == 0 and not writer.failing
    await spool.close()
    assert [(r.uniqueid, r.key) for r in await store.recent_calls(0)] == [("1700000000.1", "k1"), ("1700000000.2", "k2")]
    assert (await store.outcome_of("1700000000.1"))["talk_seconds"] == 30.0  # applied after its call's insert
    assert (await store.outcome_of("1700000000.2"))["answered"] == 0
    assert await store.contacts(0) == [("+8613900139000", 1700000010.0)]
    await writer.drain()  # nothing left: nothing written twice
    assert len(await store.recent_calls(0)) == 2


async def test_workers_sharing_one_spool_file_count_only_what_is_still_there(store, tmp_path, caplog):
    """The workers of one pool open the same spool file: what one drained (the other's items
    too) must not stay counted by the other, or its every later batch takes the spool path and
    logs a recovery."""
    from edgefilter.store.spool import Spool

    path = str(tmp_path / "spool.db")
    spool_a, spool_b = await Spool.open(path, 1000), await Spool.open(path, 1000)
    try:
        await _two_writers_one_spool(store, spool_a, spool_b, caplog)
    finally:
        await spool_a.close()
        await spool_b.close()


async def _two_writers_one_spool(store, spool_a, spool_b, caplog) -> None:
    from edgefilter.service import CallLogWriter

    failing = _Failing(store)
    a, b = CallLogWriter(failing, spool_a, "pbx", batch=10), CallLogWriter(failing, spool_b, "pbx", batch=10)
    a.submit(record(1, key="k1"))
    b.submit(record(2, key="k2"))
    await a.write(a._take())
    await b.write(b._take())
    assert (spool_a.count, spool_b.count) == (1, 1)
    failing.down = False
    a._next_try = b._next_try = 0.0
    await a.drain()  # worker a drains the file: both items
    await b.drain()
    assert (spool_a.count, spool_b.count) == (0, 0)
    caplog.clear()
    for i in range(3, 6):
        b.submit(record(i, key=f"k{i}"))
        await b.write(b._take())
    assert spool_b.count == 0 and "recovered" not in caplog.text
    assert sorted(r.key for r in await store.recent_calls(0)) == ["k1", "k2", "k3", "k4", "k5"]


# ------------------------------------------------------------------------------ [store] keys
def test_store_keys_select_the_backend_and_validate():
    from edgefilter.core.config import dump, settings_from_dict
    from edgefilter.core.errors import ConfigError

    s = settings_from_dict({"store": {"path": "/srv/ef/edgefilter.db"}})
    assert s.store.backend == "sqlite" and s.store.spool_path == "/srv/ef/edgefilter-spool.db"
    assert s.store.node  # the host name by default
    s = settings_from_dict({"store": {"url": "postgresql://ef:pw@db.example:5432/ef", "node": "pbx-sh-1"}})
    assert s.store.backend == "postgresql" and s.store.node == "pbx-sh-1"
    assert s.store.where == "postgresql://ef:***@db.example:5432/ef"
    assert "pw@" not in dump(s) and 'url = "postgresql://ef:***@db.example:5432/ef"' in dump(s)
    with pytest.raises(ConfigError, match=r"\[store\] url: expected \"postgresql://"):
        settings_from_dict({"store": {"url": "mysql://x@y/z"}})
    with pytest.raises(ConfigError, match=r"\[store\] node: .*a node name"):
        settings_from_dict({"store": {"node": "pbx one; drop"}})
    with pytest.raises(ConfigError, match=r"did you mean|password_file"):
        settings_from_dict({"store": {"pasword_file": "/etc/x"}})


# ------------------------------------------------------------------ imports (issue 6)

async def test_a_database_past_v3_before_it_was_merged_gets_it(backend_settings, tmp_path):
    """Migration 3 (lists at scale) was merged after 4-6: a database migrated to v6 without it
    gets it on its next open, with the numbers of its existing entries."""
    from edgefilter.store import postgres as pgstore
    from edgefilter.store import sqlite as sqlite_store

    settings = backend_settings()
    if settings.store.url:
        import asyncpg

        c = await asyncpg.connect(settings.store.url)
        try:
            await c.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            for v in (1, 2, 4, 5, 6):
                await c.execute(pgstore.MIGRATIONS[v])
                await c.execute("INSERT INTO schema_version (version) VALUES ($1)", v)
            await c.execute("INSERT INTO entries (list, pattern, kind, key, created_at) VALUES ('block', '+8613800138000', 'exact', '8613800138000', 1)")
        finally:
            await c.close()
    else:
        import sqlite3

        con = sqlite3.connect(settings.store.path)
        for v in (1, 2, 4, 5, 6):
            con.executescript(sqlite_store.MIGRATIONS[v])
        con.execute("INSERT INTO entries (list, pattern, kind, key, created_at) VALUES ('block', '+8613800138000', 'exact', '8613800138000', 1)")
        con.execute("PRAGMA user_version = 6")
        con.commit()
        con.close()
    async with open_store(settings) as s:
        assert await s.schema_version() == sqlite_store.SCHEMA_VERSION
        await s.put_entry(entry("block", "+8613800138001"))
        _, index = await s.load_index()
        assert index.counts() == {"block": 2, "allow": 0} and index.lookup("8613800138000") is not None
        assert index.compact_arrays()["block"][0].tolist() in ([18613800138000], [18613800138000, 18613800138001])


# ------------------------------------------------------------------ behaviour memory follower
async def test_memory_follower_brings_in_other_nodes_calls_refusals_and_contacts(store):
    """What a node learns from the shared store (memory.MemoryFollower): other nodes' calls once
    each, never its own again, the refusal ledger as it is now, recent contacts."""
    from edgefilter.core.config import settings_from_dict
    from edgefilter.rules.behaviour import BehaviourRules
    from edgefilter.rules.memory import MemoryFollower

    settings = settings_from_dict({})
    now = 1700000100.0
    behaviour = BehaviourRules(lambda: settings)
    h = behaviour.history
    await store.record_calls([record(1, ts=now - 50, caller_kind="valid", node="pbx-b", key="b1")])  # before start: loaded
    follower = MemoryFollower(store, behaviour, lambda: settings, "pbx-a", clock=lambda: now)
    await follower.poll()  # the first poll loads
    assert follower.loaded and [c.uniqueid for c in h.from_caller("+8613800138001", 0)] == ["1700000000.1"]
    await store.record_calls([record(2, ts=now - 40, caller_kind="valid", node="pbx-a", key="a2"),
                              record(3, ts=now - 30, caller_kind="valid", node="pbx-b", key="b3")])
    assert await follower.poll() == 1  # b's call; a's own was remembered at its decision
    assert [c.uniqueid for c in h.from_caller("+8613800138003", 0)] == ["1700000000.3"]
    assert list(h.from_caller("+8613800138002", 0)) == []
    assert await follower.poll() == 0  # nothing new: nothing twice
    await store.add_refusal(Refusal(0, "+8613800138003", "1000", now - 20, "refuse", source="starcode:1000"))
    await store.write_batch([ContactSeen("+8613900139000", now - 10, "outbound")])
    await follower.poll()
    assert h.refused("+8613800138003", "1000") and h.known_since("+8613900139000") == now - 10
    await store.undo_last_refusal("1000", now - 5)
    await follower.poll()
    assert not h.refused("+8613800138003", None)
    # the table emptied and refilled (SQLite reuses ids): the follower starts over, misses nothing
    await store.purge_calls(now + 1)
    await follower.poll()
    await store.record_calls([record(4, ts=now - 1, caller_kind="valid", node="pbx-b", key="b4")])
    await follower.poll()
    await follower.poll()
    assert [c.uniqueid for c in h.from_caller("+8613800138004", 0)] == ["1700000000.4"]


async def test_a_late_first_load_does_not_count_calls_decided_meanwhile_twice(store):
    """A node that started with the database away decided calls from memory; when the database
    answers, its first load must not add those calls (now written from the spool) again."""
    from edgefilter.core.config import settings_from_dict
    from edgefilter.rules.behaviour import BehaviourRules
    from edgefilter.rules.history import RecentCall
    from edgefilter.rules.memory import MemoryFollower

    settings = settings_from_dict({})
    now = 1700000100.0
    behaviour = BehaviourRules(lambda: settings)
    behaviour.history.add(RecentCall(now - 49.5, "1700000000.1", "+8613800138001", "1000"), now)  # decided meanwhile
    await store.record_calls([record(1, ts=now - 50, caller_kind="valid", node="pbx-a", key="a1"),
                              record(2, ts=now - 50, caller_kind="valid", node="pbx-b", key="b2")])
    follower = MemoryFollower(store, behaviour, lambda: settings, "pbx-a", clock=lambda: now)
    await follower.poll()
    assert len(list(behaviour.history.from_caller("+8613800138001", 0))) == 1
    assert len(list(behaviour.history.from_caller("+8613800138002", 0))) == 1

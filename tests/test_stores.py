"""The store API, once per backend: SQLite (always) and PostgreSQL (when a test server is set).

Both stores must mean the same thing by every method: the service, the CLI and the follower
code above them do not know which one they have.
"""

from __future__ import annotations

import dataclasses

import pytest

from edgefilter.lists import Entry, parse_pattern
from edgefilter.store import CallRecord
from edgefilter.stores import open_store


def entry(list_name: str, text: str, **kw) -> Entry:
    kw.setdefault("created_at", 1700000000.0)
    return Entry(list_name, parse_pattern(text, "CN"), **kw)


def record(i: int, ts: float = 1700000000.0, **kw) -> CallRecord:
    base = dict(
        ts=ts + i, uniqueid=f"1700000000.{i}", caller=f"+86138001380{i:02d}", caller_e164=f"+86138001380{i:02d}",
        caller_kind="mobile", caller_name="Zhang", called="1000", extension="1000", context="from-trunk",
        action="allow", would=None, score=0.5, rules="CLI_SHORT", policy="", elapsed_ms=0.4, node="pbx-a", key=f"k{i}",
    )
    base.update(kw)
    return CallRecord(**base)


@pytest.fixture
async def store(backend_settings):
    async with open_store(backend_settings()) as s:
        yield s


async def test_put_update_unchanged_remove_and_the_change_feed(store):
    e = entry("block", "+8613800138000", category="harassment", note="ex", source="cli", expires_at=1800000000.0)
    assert await store.put_entry(e) == "added"
    assert await store.put_entry(e) == "unchanged"
    assert await store.put_entry(dataclasses.replace(e, note="ex-partner")) == "updated"
    assert await store.put_entry(entry("allow", "+8613800138000")) == "added"
    rev = await store.head_rev()
    changes = await store.changes_since(0, 100)
    assert [(c[1], c[2], c[3]) for c in changes] == [
        ("put", "block", "+8613800138000"), ("put", "block", "+8613800138000"), ("put", "allow", "+8613800138000"),
    ]
    assert changes[-1][0] == rev
    assert changes[0][4].note == "ex-partner"  # the change carries the entry's current row
    assert await store.remove_entry(parse_pattern("+8613800138000", "CN"), "block") == ["block"]
    assert await store.remove_entry(parse_pattern("+8613800138000", "CN")) == ["allow"]
    assert await store.remove_entry(parse_pattern("+8613800138000", "CN")) == []
    tail = await store.changes_since(rev, 100)
    assert [(c[1], c[2], c[4]) for c in tail] == [("del", "block", None), ("del", "allow", None)]
    assert await store.counts() == {"block": 0, "allow": 0}


async def test_every_field_survives_and_candidates_find_exact_prefix_and_mask(store):
    rows = [
        entry("block", "+8613800138000", category="fraud", note="caller said \"bank\"", source="import:cnfeed", created_at=1700000001.5, expires_at=1900000000.25),
        entry("block", "+86170*", category="marketing"),
        entry("block", "+861390013####"),
        entry("allow", "+8613912345678", note="mum"),
        entry("block", "+4930*"),
    ]
    counts = await store.put_entries(rows)
    assert counts == {"added": 5, "updated": 0, "unchanged": 0}
    assert await store.put_entries(rows) == {"added": 0, "updated": 0, "unchanged": 5}
    got = await store.entries()
    assert sorted(got, key=lambda e: (e.list, e.pattern.text)) == sorted(rows, key=lambda e: (e.list, e.pattern.text))
    assert [e.pattern.text for e in await store.entries("allow")] == ["+8613912345678"]
    # exact and prefix entries by key, plus every mask of the same length (the index decides)
    found = {e.pattern.text for e in await store.candidates("8617012345678")}
    assert found == {"+86170*", "+861390013####"}
    assert {e.pattern.text for e in await store.candidates("8613800138000")} == {"+8613800138000", "+861390013####"}
    assert {e.pattern.text for e in await store.candidates("493012345")} == {"+4930*"}
    batches = [b async for b in store.iter_entries(batch=2)]
    assert [len(b) for b in batches] == [2, 2, 1]
    assert await store.counts() == {"block": 4, "allow": 1}


async def test_expiry_purge_records_deletions(store):
    now = 1800000000.0
    await store.put_entries([
        entry("block", "+8613800138001", expires_at=now - 1),
        entry("block", "+8613800138002", expires_at=now + 3600),
        entry("block", "+8613800138003"),
    ])
    active = await store.entries(include_expired=False, now=now)
    assert [e.pattern.text for e in active] == ["+8613800138002", "+8613800138003"]
    rev = await store.head_rev()
    assert await store.purge_expired(now=now) == 1
    assert [(c[1], c[3]) for c in await store.changes_since(rev, 10)] == [("del", "+8613800138001")]
    assert len(await store.entries()) == 2


async def test_a_failed_transaction_leaves_nothing(store):
    rev = await store.head_rev()
    with pytest.raises(RuntimeError):
        async with store.transaction():
            await store.put_entry(entry("block", "+8613800138000"))
            await store.put_entry(entry("allow", "+8613900139000"))
            raise RuntimeError("import failed half way")
    assert await store.entries() == []
    assert await store.head_rev() == rev


async def test_trim_changes_keeps_the_newest(store):
    await store.put_entries([entry("block", f"+86138001380{i:02d}") for i in range(10)])
    head = await store.head_rev()
    await store.trim_changes(keep=3)
    assert [c[0] for c in await store.changes_since(0, 100)] == [head - 2, head - 1, head]


async def test_call_log_recent_cursor_and_purge(store):
    await store.record_calls([record(i) for i in range(5)])
    recent = await store.recent_calls(1700000002.0)
    assert [r.uniqueid for r in recent] == ["1700000000.2", "1700000000.3", "1700000000.4"]
    assert recent[0].caller_name == "Zhang" and recent[0].elapsed_ms == 0.4 and recent[0].would is None
    page = await store.calls_after(0, limit=2)
    assert [r.uniqueid for _, r in page] == ["1700000000.0", "1700000000.1"]
    rest = await store.calls_after(page[-1][0])
    assert [r.uniqueid for _, r in rest] == ["1700000000.2", "1700000000.3", "1700000000.4"]
    assert await store.calls_after(rest[-1][0]) == []
    assert await store.purge_calls(1700000003.0) == 3
    assert [r.uniqueid for r in await store.recent_calls(0)] == ["1700000000.3", "1700000000.4"]


async def test_migrate_is_idempotent_and_reopening_keeps_data(backend_settings):
    settings = backend_settings()
    async with open_store(settings) as s:
        v = await s.migrate()
        assert v >= 1 and await s.migrate() == v
        await s.put_entry(entry("block", "+8613800138000"))
    async with open_store(settings) as s:
        assert await s.migrate() == v
        assert [e.pattern.text for e in await s.entries()] == ["+8613800138000"]



# ------------------------------------------------------------------------------ [store] keys
def test_store_keys_select_the_backend_and_validate():
    from edgefilter.config import dump, settings_from_dict
    from edgefilter.errors import ConfigError

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


def test_both_backends_offer_the_same_methods():
    """The contract that keeps porting mechanical: every public method exists on both stores with
    the same parameters (only how a store is opened differs)."""
    import inspect

    from edgefilter.pgstore import PgStore
    from edgefilter.store import Store

    def api(cls) -> dict[str, list[str]]:
        return {
            n: list(inspect.signature(getattr(cls, n)).parameters)
            for n in dir(cls)
            if not n.startswith("_") and callable(getattr(cls, n)) and n != "open"
        }

    assert api(Store) == api(PgStore)


def test_both_backends_have_the_same_schema_versions():
    """A feature's tables land on both backends under the same version number."""
    from edgefilter import pgstore, store

    missing = sorted(set(store.MIGRATIONS) - set(pgstore.MIGRATIONS))
    assert not missing, f"port SQLite migration(s) {missing} to pgstore.MIGRATIONS (see docs/postgresql.md)"
    assert pgstore.SCHEMA_VERSION == store.SCHEMA_VERSION

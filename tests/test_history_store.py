"""Store migration 2 (outcomes, refusal ledger, contacts), migration 6 (node + key) and
retention; the store-level tests run on each backend."""

from __future__ import annotations

import sqlite3
import time

from edgefilter.store.sqlite import MIGRATIONS, SCHEMA_VERSION, CallOutcome, CallRecord, ContactSeen, Refusal, Store


def _record(ts: float, uid: str, caller="+8613800138000", exten="1000") -> CallRecord:
    return CallRecord(ts, uid, caller, caller, "valid", "", exten, exten, "from-trunk", "allow", None, 0.0, "", "default", 1.0)


async def test_a_v1_database_is_migrated_and_keeps_its_calls(tmp_path):
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[1] + "\nPRAGMA user_version = 1;")
    db.execute("INSERT INTO calls (ts, uniqueid, caller_e164, action) VALUES (?, ?, ?, ?)", (1.0, "u1", "+8613800138000", "allow"))
    db.commit()
    db.close()
    async with Store.open(path) as store:
        (v,) = await (await store.db.execute("PRAGMA user_version")).fetchone()
        assert v == SCHEMA_VERSION >= 2
        assert await store.outcome_of("u1") == {
            "linkedid": "", "answered": None, "talk_seconds": None, "hangup_cause": None,
            "hangup_text": "", "dial_status": "", "ended_at": None,
        }
        assert await store.refusals() == []


async def test_outcomes_update_the_call_in_queue_order(store):
    now = time.time()
    await store.write_batch([
        _record(now, "u1"),
        CallOutcome("u1", "l1", True, 33.5, 16, "Normal Clearing", "ANSWER", now + 40),
        CallOutcome("u1", answered=True, talk_seconds=34.0),  # a later Cdr refines the talk time only
        ContactSeen("+8613800138000", now, "talked"),
    ])
    o = await store.outcome_of("u1")
    assert (o["linkedid"], o["answered"], o["talk_seconds"], o["hangup_cause"], o["hangup_text"], o["dial_status"]) == (
        "l1", 1, 34.0, 16, "Normal Clearing", "ANSWER")
    assert await store.contacts(now - 1) == [("+8613800138000", now)]
    rows = await store.history_rows(now - 10)
    assert rows == [(now, "u1", "+8613800138000", "valid", "1000", "1000", 1, 34.0, "allow")]


async def test_retention_purges_calls_and_contacts_but_keeps_the_refusal_ledger(store):
    now = time.time()
    old, new = now - 200 * 86400, now - 86400
    await store.write_batch([_record(old, "old"), _record(new, "new"),
                             ContactSeen("+8613900139000", old, "outbound"), ContactSeen("+8613700137000", new, "outbound")])
    await store.add_refusal(Refusal(0, "+8613800138000", "1000", old, "refuse", source="starcode:1000"))
    assert await store.purge_calls(now - 180 * 86400) == 1
    assert [r[1] for r in await store.history_rows(0)] == ["new"]
    assert [e for e, _ in await store.contacts(0)] == ["+8613700137000"]
    assert len(await store.refusals()) == 1  # evidence of a refusal outlives the call log


async def test_service_maintenance_applies_the_retention(backend_settings):
    from edgefilter.service import Service

    svc = Service(backend_settings(store={"history_retention": "30d"}), port=0)
    await svc.start()
    try:
        now = time.time()
        await svc.store.write_batch([_record(now - 31 * 86400, "old"), _record(now, "new")])
        await svc._maintenance()
        assert [r[1] for r in await svc.store.history_rows(0)] == ["new"]
    finally:
        await svc.stop()


async def test_last_caller_per_extension(store):
    await store.write_batch([_record(1.0, "a", "+8613800138000", "1000"), _record(2.0, "b", "+8613900139000", "1000"),
                             _record(3.0, "c", "+8613700137000", "1001")])
    assert sorted(await store.last_callers()) == [
        ("1000", 2.0, "b", "+8613900139000", "1000"), ("1001", 3.0, "c", "+8613700137000", "1001")]


async def test_a_v5_database_gains_node_and_key_and_retries_are_stored_once(tmp_path):
    """Migration 6: calls written before it keep key '' (outside the unique index); records
    written after carry node + key, and the same key twice (a spool drain retried) is one row."""
    path = str(tmp_path / "v5.db")
    db = sqlite3.connect(path)
    for v in sorted(MIGRATIONS):
        if v <= 5:
            db.executescript(MIGRATIONS[v])
    db.execute("PRAGMA user_version = 5")
    db.execute("INSERT INTO calls (ts, uniqueid, caller_e164, action) VALUES (1.0, 'old1', '+8613800138000', 'allow')")
    db.execute("INSERT INTO calls (ts, uniqueid, caller_e164, action) VALUES (2.0, 'old2', '+8613800138000', 'allow')")
    db.commit()
    db.close()
    async with Store.open(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION >= 6
        store.node = "pbx-a"
        keyed = CallRecord(3.0, "new", "+8613800138000", "+8613800138000", "valid", "", "1000", "1000", "ctx",
                           "allow", None, 0.0, "", "default", 1.0, key="k-new")
        assert await store.record_calls([keyed]) == 1
        assert await store.record_calls([keyed]) == 0
        assert await store.write_batch([keyed, _record(4.0, "fresh")]) == 2
        got = {r.uniqueid: (r.node, r.key) for r in await store.recent_calls(0)}
        assert got["old1"] == ("", "") and got["old2"] == ("", "")  # two empty keys are no conflict
        assert got["new"] == ("pbx-a", "k-new")
        assert got["fresh"][0] == "pbx-a" and len(got["fresh"][1]) == 32  # a key drawn for it
        assert len(got) == 4

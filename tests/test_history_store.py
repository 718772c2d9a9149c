"""Store migration 2 (outcomes, refusal ledger, contacts) and retention."""

from __future__ import annotations

import sqlite3
import time

from edgefilter.store import MIGRATIONS, SCHEMA_VERSION, CallOutcome, CallRecord, ContactSeen, Refusal, Store


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


async def test_outcomes_update_the_call_in_queue_order(tmp_path):
    async with Store.open(str(tmp_path / "e.db")) as store:
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


async def test_retention_purges_calls_and_contacts_but_keeps_the_refusal_ledger(tmp_path):
    async with Store.open(str(tmp_path / "r.db")) as store:
        now = time.time()
        old, new = now - 200 * 86400, now - 86400
        await store.write_batch([_record(old, "old"), _record(new, "new"),
                                 ContactSeen("+8613900139000", old, "outbound"), ContactSeen("+8613700137000", new, "outbound")])
        await store.add_refusal(Refusal(0, "+8613800138000", "1000", old, "refuse", source="starcode:1000"))
        assert await store.purge_calls(now - 180 * 86400) == 1
        assert [r[1] for r in await store.history_rows(0)] == ["new"]
        assert [e for e, _ in await store.contacts(0)] == ["+8613700137000"]
        assert len(await store.refusals()) == 1  # evidence of a refusal outlives the call log


async def test_service_maintenance_applies_the_retention(make_settings):
    from edgefilter.service import Service

    svc = Service(make_settings(store={"history_retention": "30d"}), port=0)
    await svc.start()
    try:
        now = time.time()
        await svc.store.write_batch([_record(now - 31 * 86400, "old"), _record(now, "new")])
        await svc._maintenance()
        assert [r[1] for r in await svc.store.history_rows(0)] == ["new"]
    finally:
        await svc.stop()


async def test_last_caller_per_extension(tmp_path):
    async with Store.open(str(tmp_path / "l.db")) as store:
        await store.write_batch([_record(1.0, "a", "+8613800138000", "1000"), _record(2.0, "b", "+8613900139000", "1000"),
                                 _record(3.0, "c", "+8613700137000", "1001")])
        assert sorted(await store.last_callers()) == [
            ("1000", 2.0, "b", "+8613900139000", "1000"), ("1001", 3.0, "c", "+8613700137000", "1001")]

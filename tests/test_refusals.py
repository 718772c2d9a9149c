"""Star codes through the FastAGI double, the refusal ledger, and the evidence export, on each
store backend (SQLite, and PostgreSQL when a test server is set)."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from datetime import UTC

import pytest

from edgefilter import cli
from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.outputs.evidence import build, to_csv, to_html
from edgefilter.service import Service
from edgefilter.store.sqlite import Refusal

SPAMMER = "+8617012345678"


@pytest.fixture
def service(backend_service):
    """This module runs on both store backends."""
    return backend_service


async def screen(svc: Service, caller=SPAMMER, exten="1000", **kw):
    r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=caller, args=[f"exten={exten}"], **kw), timeout=3.0)
    assert r.closed_by_server and r.pipelined == 0, r
    return r


async def star(svc: Service, route: str, *args: str):
    r = await place_call("127.0.0.1", svc.port, CallSpec(callerid="1000", script=route, args=list(args)), timeout=3.0)
    assert r.closed_by_server and r.pipelined == 0, r
    return r.variables


async def settle(svc: Service) -> None:
    """Wait until every record queued so far is in the database (not merely out of the queue: a
    batch being written is neither), then apply list changes."""
    log = svc.calllog
    deadline = time.monotonic() + 10
    while log.written < log.queued:
        assert time.monotonic() < deadline, f"{log.written} of {log.queued} call-log items written"
        await asyncio.sleep(0.01)
    assert log.dropped == 0 and svc.spool.count == 0
    await svc.follower.poll()


def evidence_csv(svc: Service, tmp_path, number=SPAMMER):
    cfg = tmp_path / "ev.toml"
    st = svc.settings.store
    cfg.write_text(f'[store]\npath = "{st.path}"\nurl = "{st.url}"\n[screen]\ntimezone = "Asia/Shanghai"\n')
    out = tmp_path / "ev.csv"
    assert cli.main(["evidence", number, "--config", str(cfg), "--output", str(out)]) == 0
    text = out.read_text()
    head, _, tail = text.partition("\n\n")
    rows = list(csv.DictReader(io.StringIO(head)))
    totals = dict(list(csv.reader(io.StringIO(tail)))[1:])
    return rows, totals


async def test_refuse_star_code_then_next_call_is_a_violation_in_evidence(service, tmp_path):
    first = await screen(service)
    assert first.variables["EDGEFILTER_ACTION"] == "allow"
    v = await star(service, "refuse", "callee=1000")
    assert v == {"EDGEFILTER_RESULT": "ok", "EDGEFILTER_NUMBER": SPAMMER}
    again = await screen(service)
    assert again.variables["EDGEFILTER_ACTION"] == "voicemail"
    assert again.variables["EDGEFILTER_RULES"] == "REFUSED_BEFORE"
    other = await screen(service, exten="1001")  # refusal scope is the callee by default
    assert other.variables["EDGEFILTER_ACTION"] == "allow"
    await settle(service)
    (r,) = await service.store.refusals(caller=SPAMMER)
    assert (r.callee, r.kind, r.source, r.call_uniqueid, r.undone_at) == ("1000", "refuse", "starcode:1000", first.uniqueid, None)

    rows, totals = await asyncio.to_thread(evidence_csv, service, tmp_path)
    assert [x["event"] for x in rows] == ["call", "refuse", "call", "call"]
    c1, ref, c2, c3 = rows
    assert (c1["callee"], c1["action"], c1["after_refusal"], c1["uniqueid"], c1["rules"]) == ("1000", "allow", "no", first.uniqueid, "")
    assert c1["caller_as_presented"] == SPAMMER and c1["time_local"].endswith("+08:00") and c1["time_utc"].endswith("Z")
    assert (ref["callee"], ref["note"], ref["uniqueid"]) == ("1000", "refused by callee via starcode:1000", first.uniqueid)
    assert (c2["callee"], c2["action"], c2["rules"], c2["after_refusal"], c2["note"]) == (
        "1000", "voicemail", "REFUSED_BEFORE", "yes", "call after refusal")
    assert (c3["callee"], c3["after_refusal"]) == ("1001", "no")
    assert c2["answered"] == "" and c2["talk_seconds"] == ""  # no AMI here: outcome unknown, not invented
    assert totals["number"] == SPAMMER and totals["calls"] == "3" and totals["calls_after_refusal"] == "1"
    assert totals["refusals"] == "1" and totals["distinct_callees"] == "2" and totals["outcome_unknown"] == "3"
    assert totals["action_allow"] == "2" and totals["action_voicemail"] == "1"


async def test_block_last_goes_through_the_change_feed_and_undo_removes_it(service):
    await screen(service)
    assert (await star(service, "block-last", "callee=1000"))["EDGEFILTER_RESULT"] == "ok"
    entries = await service.store.entries("block")
    assert [(e.pattern.text, e.source) for e in entries] == [(SPAMMER, "starcode:1000")]
    await service.follower.poll()
    r = await screen(service, exten="1001")  # the block applies to everyone, the refusal to 1000
    assert r.variables["EDGEFILTER_ACTION"] == "reject" and r.variables["EDGEFILTER_RULES"] == "LIST_BLOCKED"
    assert (await star(service, "undo-last", "callee=1000")) == {"EDGEFILTER_RESULT": "undone", "EDGEFILTER_NUMBER": SPAMMER}
    await service.follower.poll()
    assert await service.store.entries("block") == []
    assert (await screen(service, exten="1000")).variables["EDGEFILTER_ACTION"] == "allow"
    assert (await star(service, "undo-last", "callee=1000")) == {"EDGEFILTER_RESULT": "nothing"}


async def test_undo_never_removes_an_admins_block(service):
    from edgefilter.lists.index import Entry, parse_pattern

    await service.store.put_entry(Entry("block", parse_pattern(SPAMMER, "CN"), note="admin", source="cli"))
    await screen(service)
    assert (await star(service, "block-last", "callee=1000"))["EDGEFILTER_RESULT"] == "ok"
    await star(service, "undo-last", "callee=1000")
    assert [e.source for e in await service.store.entries("block")] == ["cli"]


async def test_report_last_with_a_category(service):
    await screen(service)
    assert (await star(service, "report-last", "callee=1000", "category=marketing"))["EDGEFILTER_RESULT"] == "ok"
    assert (await star(service, "report-last", "callee=1000", "category=nosuch"))["EDGEFILTER_RESULT"] == "badcategory"
    (e,) = await service.store.entries("block")
    assert e.category == "marketing"
    await service.follower.poll()
    r = await screen(service, exten="1001")
    assert r.variables["EDGEFILTER_CATEGORY"] == "marketing" and r.variables["EDGEFILTER_ACTION"] == "challenge"  # weight 8


async def test_in_call_feature_refuses_that_call_not_the_newest(service):
    first = await screen(service)
    await screen(service, caller="+8613900139000")  # a later call to the same extension
    v = await star(service, "refuse", "callee=1000", f"call={first.uniqueid}", "source=dtmf")
    assert v["EDGEFILTER_NUMBER"] == SPAMMER
    (r,) = await service.store.refusals(caller=SPAMMER)
    assert r.source == "dtmf:1000" and r.call_uniqueid == first.uniqueid


async def test_star_code_edge_cases(service):
    assert await star(service, "refuse", "callee=1000") == {"EDGEFILTER_RESULT": "nocaller"}
    assert await star(service, "refuse", "callee=10$(x)") == {"EDGEFILTER_RESULT": "badcallee"}
    await screen(service, caller="anonymous")
    assert await star(service, "refuse", "callee=1000") == {"EDGEFILTER_RESULT": "nocaller"}
    # positional form works too: AGI(agi://.../refuse,1000)
    await screen(service)
    assert (await star(service, "refuse", "1000"))["EDGEFILTER_RESULT"] == "ok"


async def test_outbound_call_makes_a_known_contact(service):
    v = await star(service, "outbound", "callee=1000", "number=013800138000")
    assert v == {"EDGEFILTER_RESULT": "ok"}
    r = await screen(service, caller="+8613800138000")
    assert "KNOWN_CONTACT" in r.variables["EDGEFILTER_RULES"].split()
    assert (await star(service, "outbound", "callee=1000", "number=hello"))["EDGEFILTER_RESULT"] == "badnumber"
    await settle(service)
    assert [e for e, _ in await service.store.contacts(0)] == ["+8613800138000"]


async def test_refusals_and_last_callers_survive_a_restart(backend_settings):
    settings = backend_settings()
    svc = Service(settings, port=0)
    await svc.start()
    try:
        await screen(svc)
        await screen(svc, caller="+8613900139000", exten="1002")
        assert (await star(svc, "refuse", "callee=1000"))["EDGEFILTER_RESULT"] == "ok"
        await settle(svc)
    finally:
        await svc.stop()
    svc = Service(settings, port=0)
    await svc.start()
    try:
        assert (await screen(svc)).variables["EDGEFILTER_RULES"] == "REFUSED_BEFORE"
        assert (await star(svc, "refuse", "callee=1002")) == {"EDGEFILTER_RESULT": "ok", "EDGEFILTER_NUMBER": "+8613900139000"}
    finally:
        await svc.stop()


def test_evidence_renders_hostile_text_safely():
    ts = 1_800_000_000.0
    calls = [
        dict(ts=ts + i * 3600, uniqueid=f"u{i}", caller=SPAMMER, caller_e164=SPAMMER, caller_kind="valid",
             caller_name="=HYPERLINK(\"http://x\")<script>alert(1)</script>", called="+861012345678", extension="1000",
             context="from-trunk", action="allow", would=None, score=0.0, rules="", policy="default", elapsed_ms=1.0,
             linkedid="", answered=1 if i == 0 else 0, talk_seconds=42.0 if i == 0 else 0.0, hangup_cause=16 if i == 0 else 21,
             hangup_text="Normal Clearing" if i == 0 else "Call Rejected", dial_status="", ended_at=None)
        for i in range(3)
    ]
    refusals = [Refusal(1, SPAMMER, "1000", ts + 1800, "refuse", source="starcode:1000", undone_at=ts + 2 * 3600 - 60)]
    ev = build(SPAMMER, calls, refusals, since=ts - 86400, until=ts + 86400, tz=UTC)
    text = to_csv(ev)
    rows = list(csv.DictReader(io.StringIO(text.partition("\n\n")[0])))
    assert [r["event"] for r in rows] == ["call", "refuse", "call", "undo", "call"]
    assert [r["after_refusal"] for r in rows if r["event"] == "call"] == ["no", "yes", "no"]  # undone before the 3rd
    assert rows[0]["caller_name"].startswith("'=HYPERLINK")  # no formula for spreadsheets
    assert rows[0]["caller_as_presented"] == SPAMMER  # our E.164 stays exact
    assert (rows[0]["answered"], rows[0]["talk_seconds"], rows[0]["hangup_cause"], rows[0]["hangup_text"]) == ("yes", "42", "16", "Normal Clearing")
    assert rows[0]["time_utc"] == "2027-01-15T08:00:00Z"
    page = to_html(ev, generated=ts, version="test")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<rect ") == 1 and "<svg" in page and "3 calls" in page  # all three on one day
    assert page.count('class="violation"') == 1 and page.count('class="refusal"') == 2
    assert "<link" not in page and "src=" not in page  # self-contained

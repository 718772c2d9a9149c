"""The issue's "done when", end to end through the real service, the FastAGI double and a fake AMI
that goes away and comes back in the middle: bursts escalate, spread is challenged, a refusal
star code blocks the next call and shows up in `edgefilter evidence` with its AMI outcome."""

from __future__ import annotations

import asyncio
import csv
import io
import time

import pytest

from edgefilter import cli
from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.core.errors import AmiError
from edgefilter.service import Service

from .amifake import FakeAmi, call_events
from .test_behaviour import Clock

SPAMMER = "+8617012345678"  # the caller in the AMI fixtures
AGI_UNIQUEID = "1795896515.9"  # the channel the FastAGI saw in fastagi-allow-ami-originate.txt


async def agi(svc, route="screen", callerid=SPAMMER, args=(), **kw):
    r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=callerid, script=route, args=list(args), **kw), timeout=3.0)
    assert r.closed_by_server and not r.timed_out and r.pipelined == 0, r
    # Screening never waits on AMI (an action times out after 5 s): a bound a loaded machine keeps.
    assert r.elapsed < 1.5, f"screening took {r.elapsed * 1000:.0f} ms"
    return r.variables


async def until(pred, timeout=3.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def test_done_when_with_ami_lost_and_regained(make_settings, tmp_path, monkeypatch):
    monkeypatch.setenv("EF_TEST_AMI_SECRET", "edgefilter")
    fake = FakeAmi()
    await fake.start()
    port = fake.port
    settings = make_settings(ami={
        "enabled": True, "port": port, "secret_env": "EF_TEST_AMI_SECRET", "ping_interval": "200ms",
        "ping_timeout": "200ms", "backoff_initial": "50ms", "backoff_max": "200ms",
    })
    svc = Service(settings, port=0)
    clock = Clock(time.time())
    svc.screener.clock = clock  # the behaviour windows run on this clock: no sleeping for minutes
    await svc.start()
    try:
        await asyncio.wait_for(svc.ami.connected_event.wait(), 2)

        # The refused caller's first call rings and is answered (its AMI events come later).
        first = await agi(svc, uniqueid=AGI_UNIQUEID, args=["exten=1000"])
        assert first["EDGEFILTER_ACTION"] == "allow"

        # Ten calls in a minute from one number escalate its action.
        actions = []
        for _ in range(10):
            clock.t += 5
            actions.append((await agi(svc, callerid="+8613800138000", args=["exten=1000"]))["EDGEFILTER_ACTION"])
        assert actions == ["allow"] * 4 + ["challenge"] * 2 + ["voicemail"] * 3 + ["reject"]

        assert (await svc.send_ami_action({"Action": "DBPut", "Family": "edgefilter-block", "Key": "1", "Val": "1"}))["Response"] == "Success"

        # AMI lost: Asterisk's manager goes away. Screening does not notice.
        await fake.stop()
        await until(lambda: not svc.ami.connected)
        with pytest.raises(AmiError, match="not connected"):
            await svc.send_ami_action({"Action": "DBPut", "Family": "edgefilter-block", "Key": "1", "Val": "1"})

        # A number that rang five extensions in a row is challenged.
        spread = []
        for ext in ("1001", "1002", "1003", "1004", "1005"):
            clock.t += 30
            spread.append(await agi(svc, callerid="+8613900139000", args=[f"exten={ext}"]))
        assert [v["EDGEFILTER_ACTION"] for v in spread] == ["allow"] * 4 + ["challenge"]
        assert spread[-1]["EDGEFILTER_RULES"] == "RATE_SPREAD"

        # The callee at 1000 dials the refusal star code; the same caller's next call is blocked.
        clock.t += 60
        assert (await agi(svc, route="refuse", callerid="1000", args=["callee=1000"])) == {
            "EDGEFILTER_RESULT": "ok", "EDGEFILTER_NUMBER": "+8613800138000"}  # the last caller to 1000...
        assert (await agi(svc, route="undo-last", callerid="1000", args=["callee=1000"]))["EDGEFILTER_RESULT"] == "undone"
        # ...so the in-call feature names the call it refuses (its uniqueid, set by the dial plan):
        v = await agi(svc, route="refuse", callerid="1000", args=["callee=1000", f"call={AGI_UNIQUEID}"])
        assert v == {"EDGEFILTER_RESULT": "ok", "EDGEFILTER_NUMBER": SPAMMER}
        clock.t += 3600
        blocked = await agi(svc, args=["exten=1000"])
        assert blocked["EDGEFILTER_ACTION"] == "voicemail" and "REFUSED_BEFORE" in blocked["EDGEFILTER_RULES"]

        # AMI regained: the listener reconnects by itself and the recorded call's events arrive.
        fake = FakeAmi(port)
        await fake.start()
        await asyncio.wait_for(svc.ami.connected_event.wait(), 3)
        assert svc.ami.connects == 2
        await fake.push(call_events("ami-originate-allow.edgefilter.txt"))
        # (the call left the in-memory windows an hour ago on the test clock; the log keeps it)
        for _ in range(300):
            outcome = await svc.store.outcome_of(AGI_UNIQUEID)
            if outcome["answered"] is not None:
                break
            await asyncio.sleep(0.01)
        assert outcome["answered"] == 1 and outcome["linkedid"] == "1795896515.8" and outcome["hangup_cause"] == 0

        # And it all shows up in `edgefilter evidence`.
        cfg = tmp_path / "cli.toml"
        cfg.write_text(f'[store]\npath = "{settings.store.path}"\n')
        out = tmp_path / "evidence.csv"
        assert await asyncio.to_thread(cli.main, ["evidence", SPAMMER, "--config", str(cfg), "--output", str(out)]) == 0
        head, _, tail = out.read_text().partition("\n\n")
        rows = list(csv.DictReader(io.StringIO(head)))
        totals = dict(list(csv.reader(io.StringIO(tail)))[1:])
        assert [r["event"] for r in rows] == ["call", "refuse", "call"]
        call1, refusal, call2 = rows
        assert (call1["uniqueid"], call1["answered"], call1["hangup_cause"], call1["hangup_text"], call1["after_refusal"]) == (
            AGI_UNIQUEID, "yes", "0", "Unknown", "no")
        assert refusal["callee"] == "1000" and refusal["uniqueid"] == AGI_UNIQUEID
        assert (call2["action"], call2["rules"], call2["after_refusal"]) == ("voicemail", "REFUSED_BEFORE", "yes")
        assert totals["calls"] == "2" and totals["calls_after_refusal"] == "1" and totals["answered"] == "1"
        html_out = tmp_path / "evidence.html"
        assert await asyncio.to_thread(cli.main, ["evidence", SPAMMER, "--format", "html", "--config", str(cfg),
                                                  "--output", str(html_out)]) == 0
        assert "<svg" in html_out.read_text() and 'class="violation"' in html_out.read_text()
    finally:
        await svc.stop()
        await fake.stop()


async def test_screening_with_ami_unreachable_from_the_start(make_settings, monkeypatch):
    from .amifake import free_port

    monkeypatch.setenv("EF_TEST_AMI_SECRET", "x")
    settings = make_settings(ami={"enabled": True, "port": free_port(), "secret_env": "EF_TEST_AMI_SECRET",
                                  "backoff_initial": "50ms", "backoff_max": "100ms"})
    svc = Service(settings, port=0)
    await svc.start()
    try:
        results = await asyncio.gather(*(agi(svc, callerid=f"+861380013{i:04d}", args=["exten=1000"]) for i in range(20)))
        assert all(r["EDGEFILTER_ACTION"] == "allow" for r in results)
        assert not svc.ami.connected and "Refused" in svc.ami.last_error
    finally:
        await svc.stop()


async def test_service_refuses_a_group_readable_secret_file(make_settings, tmp_path):
    import os

    import pytest

    from edgefilter.core.errors import ConfigError

    secret = tmp_path / "ami.secret"
    secret.write_text("edgefilter\n")
    os.chmod(secret, 0o640)
    svc = Service(make_settings(ami={"enabled": True, "secret_file": str(secret)}), port=0)
    with pytest.raises(ConfigError, match="chmod 600"):
        await svc.start()
    assert svc.server is None and svc.store is None  # nothing was left half-started


async def test_ami_outcomes_feed_rate_short_and_known_contacts(service):
    """Outcomes reach the in-memory history: one-ring calls fire RATE_SHORT, a long talk makes a
    known contact (synthetic events shaped like the fixtures' Hangup/DialEnd)."""
    t = [1000.0]
    service.tracker.clock = lambda: t[0]
    for i in range(4):
        uid = f"1795900000.{i}"
        r = await agi(service, callerid="+8613700137000", uniqueid=uid, args=["exten=1000"])
        assert "RATE_SHORT" not in r["EDGEFILTER_RULES"]
        service.tracker.feed({"Event": "Newchannel", "Uniqueid": uid, "Linkedid": uid})
        service.tracker.feed({"Event": "Hangup", "Uniqueid": uid, "Linkedid": uid, "Cause": "19", "Cause-txt": "No answer"})
    r = await agi(service, callerid="+8613700137000", args=["exten=1000"])
    assert "RATE_SHORT" in r["EDGEFILTER_RULES"].split()

    uid = "1795900001.1"
    await agi(service, callerid="+8613600136000", uniqueid=uid, args=["exten=1000"])
    service.tracker.feed({"Event": "DialBegin", "Uniqueid": uid, "Linkedid": uid, "DestUniqueid": "1795900001.2", "DestLinkedid": uid})
    service.tracker.feed({"Event": "DialEnd", "Uniqueid": uid, "Linkedid": uid, "DestUniqueid": "1795900001.2",
                          "DestLinkedid": uid, "DialStatus": "ANSWER"})
    t[0] += 95
    service.tracker.feed({"Event": "Hangup", "Uniqueid": uid, "Linkedid": uid, "Cause": "16", "Cause-txt": "Normal Clearing"})
    r = await agi(service, callerid="+8613600136000", args=["exten=1000"])
    assert "KNOWN_CONTACT" in r["EDGEFILTER_RULES"].split() and r["EDGEFILTER_ACTION"] == "allow"
    with pytest.raises(AmiError, match="disabled"):
        await service.send_ami_action({"Action": "Ping"})

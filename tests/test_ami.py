"""The AMI listener against a fake Asterisk Manager replaying the real fixture byte streams."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from edgefilter.asterisk.ami import AmiListener, load_secret
from edgefilter.asterisk.outcomes import OutcomeTracker
from edgefilter.core.config import AmiSettings
from edgefilter.core.errors import AmiError, ConfigError

from .amifake import FakeAmi, call_events, free_port, parse_fixture


def cfg(port: int, **kw) -> AmiSettings:
    base = dict(enabled=True, host="127.0.0.1", port=port, user="edgefilter", secret_env="X",
                connect_timeout=1.0, ping_interval=0.2, ping_timeout=0.2, backoff_initial=0.05,
                backoff_max=0.4, action_timeout=0.5)
    base.update(kw)
    return AmiSettings(**base)


async def wait_for(pred, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def fake():
    srv = FakeAmi()
    await srv.start()
    yield srv
    await srv.stop()


def test_fixture_parser_reads_the_real_transcripts():
    script = parse_fixture("ami-login-ping-logoff.txt")
    assert script[0] == ("banner", ["Asterisk Call Manager/11.0.0"])
    assert ("C", ["Action: Login", "Username: edgefilter", "Secret: edgefilter", "ActionID: login-1"]) in script
    assert script[-1] == ("EOF", [])
    events = call_events("ami-originate-allow.edgefilter.txt")
    names = [e[0] for e in events]
    assert "Event: DialEnd" in names and names.count("Event: Hangup") == 2
    assert not any(n == "Event: Cdr" for n in names)  # read=call,system,reporting brings no Cdr
    assert any(e[0] == "Event: Cdr" for e in call_events("ami-originate-reject21.all-events.txt"))


async def test_login_ping_action_and_events(fake):
    seen = []
    lst = AmiListener(cfg(fake.port), "edgefilter", seen.append)
    lst.start()
    try:
        await asyncio.wait_for(lst.connected_event.wait(), 2)
        login = fake.received[0]
        assert login["Action"] == "Login" and login["Username"] == "edgefilter" and login["Secret"] == "edgefilter"
        resp = await lst.send_action({"Action": "Ping"})
        assert resp["Response"] == "Success" and resp["Ping"] == "Pong"
        await fake.push(call_events("ami-originate-allow.edgefilter.txt"))
        await wait_for(lambda: any(e.get("Event") == "Hangup" for e in seen))
        assert {e["Event"] for e in seen} >= {"Newchannel", "DialBegin", "DialEnd", "Newstate", "Hangup", "FullyBooted"}
    finally:
        await lst.close()


async def _outcomes_for(fake, fixture: str, uniqueid: str):
    t = [100.0]
    got = []
    tracker = OutcomeTracker(got.append, clock=lambda: t[0])
    tracker.register(uniqueid)

    def feed(ev):
        t[0] += 1.0  # one second per event: talk time is then countable
        tracker.feed(ev)

    lst = AmiListener(cfg(fake.port), "s", feed)
    lst.start()
    try:
        await asyncio.wait_for(lst.connected_event.wait(), 2)
        await fake.push(call_events(fixture))
        await wait_for(lambda: got)
    finally:
        await lst.close()
    return got


async def test_outcome_of_an_answered_call_joined_by_linkedid(fake):
    # The AGI saw uniqueid 1795896515.9 (fastagi-allow-ami-originate.txt); its linkedid is .8.
    (o,) = await _outcomes_for(fake, "ami-originate-allow.edgefilter.txt", "1795896515.9")
    assert o.uniqueid == "1795896515.9" and o.linkedid == "1795896515.8"
    assert o.answered is True and o.dial_status == "ANSWER"
    assert o.hangup_cause == 0 and o.hangup_text == "Unknown"
    assert o.talk_seconds is not None and o.talk_seconds > 0


async def test_outcome_of_a_rejected_call_has_cause_21(fake):
    (o,) = await _outcomes_for(fake, "ami-originate-reject21.edgefilter.txt", "1795896534.11")
    assert o.answered is False and o.talk_seconds == 0.0
    assert o.hangup_cause == 21 and o.hangup_text == "Call Rejected"
    assert o.dial_status == "NOANSWER"


async def test_failed_login_is_reported_and_retried_with_backoff(fake, caplog):
    fake.refuse_login = True
    lst = AmiListener(cfg(fake.port, backoff_initial=0.05, backoff_max=1.0), "wrong-secret")
    with caplog.at_level(logging.ERROR, "edgefilter.ami"):
        lst.start()
        try:
            await wait_for(lambda: fake.connections >= 4, 5)
            await wait_for(lambda: lst.auth_failures >= 3)
            assert not lst.connected and lst.last_error == "Authentication failed"
            assert lst.state in ("auth-failed", "connecting")
            gaps = [b - a for a, b in zip(fake.connect_times, fake.connect_times[1:], strict=False)]
            assert gaps[2] > gaps[0] * 1.5, gaps  # exponential backoff, not a fixed interval
            assert "refused (Authentication failed)" in caplog.text and "manager.conf" in caplog.text
            with pytest.raises(AmiError, match="not connected"):
                await lst.send_action({"Action": "Ping"})
            fake.refuse_login = False  # admin fixed the secret on the Asterisk side
            await asyncio.wait_for(lst.connected_event.wait(), 3)
        finally:
            await lst.close()


async def test_dropped_connection_reconnects_and_actions_fail_fast_meanwhile(fake):
    # A long action timeout: an action queued while disconnected would either succeed after the
    # reconnect (0.3 s) or fail only after 5 s, so "raises within 1 s" is a bound a loaded
    # machine keeps and a queued action cannot.
    lst = AmiListener(cfg(fake.port, backoff_initial=0.3, backoff_max=0.3, action_timeout=5.0), "s")
    lst.start()
    try:
        await asyncio.wait_for(lst.connected_event.wait(), 2)
        fake.drop()
        await wait_for(lambda: not lst.connected)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(AmiError):
            await lst.send_action({"Action": "DBPut", "Family": "edgefilter-block", "Key": "1", "Val": "1"})
        assert asyncio.get_running_loop().time() - t0 < 1.0  # fails fast, never queued
        await asyncio.wait_for(lst.connected_event.wait(), 3)
        assert lst.connects == 2
        resp = await lst.send_action({"Action": "DBPut", "Family": "edgefilter-block", "Key": "1", "Val": "1"})
        assert resp["Response"] == "Success"
    finally:
        await lst.close()


async def test_action_in_flight_when_the_connection_drops_fails_instead_of_hanging(fake):
    lst = AmiListener(cfg(fake.port, action_timeout=5.0), "s")
    lst.start()
    try:
        await asyncio.wait_for(lst.connected_event.wait(), 2)
        fake.silent = True
        pending = asyncio.create_task(lst.send_action({"Action": "DBPut", "Family": "f", "Key": "k", "Val": "v"}))
        await wait_for(lambda: fake.received and fake.received[-1].get("Action") == "DBPut")
        fake.drop()
        with pytest.raises(AmiError, match="lost|closed"):
            await asyncio.wait_for(pending, 1.0)
    finally:
        await lst.close()


async def test_watchdog_notices_a_silent_connection(fake, caplog):
    lst = AmiListener(cfg(fake.port, ping_interval=0.1, ping_timeout=0.1, backoff_initial=0.05), "s")
    lst.start()
    try:
        await asyncio.wait_for(lst.connected_event.wait(), 2)
        fake.silent = True  # TCP stays up, Asterisk answers nothing (frozen, or state lost in a NAT)
        with caplog.at_level(logging.WARNING, "edgefilter.ami"):
            await wait_for(lambda: lst.watchdog_trips >= 1, 3)
        assert "no reply to Ping" in caplog.text
        assert any(m.get("Action") == "Ping" for m in fake.received)
        fake.silent = False
        await wait_for(lambda: lst.connects >= 2, 3)
        assert lst.connected
    finally:
        await lst.close()


async def test_asterisk_restart_on_the_same_port():
    port = free_port()
    fake = FakeAmi(port)
    await fake.start()
    lst = AmiListener(cfg(port, backoff_initial=0.05, backoff_max=0.2), "s")
    lst.start()
    try:
        await asyncio.wait_for(lst.connected_event.wait(), 2)
        await fake.stop()
        await wait_for(lambda: not lst.connected)
        # a refused reconnect while Asterisk is down (waited for, not slept for)
        await wait_for(lambda: "refused" in lst.last_error.lower())
        fake = FakeAmi(port)
        await fake.start()
        await asyncio.wait_for(lst.connected_event.wait(), 3)
    finally:
        await lst.close()
        await fake.stop()


async def test_send_action_refuses_header_injection(fake):
    lst = AmiListener(cfg(fake.port), "s")
    lst.start()
    try:
        await asyncio.wait_for(lst.connected_event.wait(), 2)
        with pytest.raises(ValueError, match="line break"):
            await lst.send_action({"Action": "DBPut", "Val": "x\r\nAction: Originate"})
        with pytest.raises(ValueError):
            await lst.send_action({"Family": "x"})
    finally:
        await lst.close()


def test_secret_from_a_private_file_or_the_environment(tmp_path):
    f = tmp_path / "ami.secret"
    f.write_text("s3cret\n")
    os.chmod(f, 0o600)
    assert load_secret(AmiSettings(enabled=True, secret_file=str(f))) == "s3cret"
    for mode in (0o640, 0o604, 0o644):
        os.chmod(f, mode)
        with pytest.raises(ConfigError, match="chmod 600"):
            load_secret(AmiSettings(enabled=True, secret_file=str(f)))
    with pytest.raises(ConfigError, match="not found"):
        load_secret(AmiSettings(enabled=True, secret_file=str(tmp_path / "none")))
    assert load_secret(AmiSettings(enabled=True, secret_env="EF_AMI"), {"EF_AMI": "envsecret"}) == "envsecret"
    with pytest.raises(ConfigError, match="EF_AMI is not set"):
        load_secret(AmiSettings(enabled=True, secret_env="EF_AMI"), {})


def test_enabled_ami_needs_a_secret_source(make_settings):
    with pytest.raises(ConfigError, match="secret_file nor secret_env"):
        make_settings(ami={"enabled": True})
    s = make_settings(ami={"enabled": True, "secret_env": "X", "ping_interval": "30s"})
    assert s.ami.ping_interval == 30.0


def test_tracker_outbound_dialbegin_and_cdr_refinement():
    got, out = [], []
    t = [0.0]
    tr = OutcomeTracker(got.append, clock=lambda: t[0], outbound=lambda n, ts: out.append(n),
                        outbound_contexts=lambda: ("from-internal*",))
    # an internal phone dials out: its context matches, its Exten is the number dialled
    tr.feed({"Event": "DialBegin", "Context": "from-internal-users", "Exten": "013800138000", "Uniqueid": "9.1", "Linkedid": "9.1"})
    tr.feed({"Event": "DialBegin", "Context": "from-trunk", "Exten": "1000", "Uniqueid": "9.2", "Linkedid": "9.2"})
    assert out == ["013800138000"]
    # a Cdr (read class cdr) refines the talk time of an answered call; a NO ANSWER one adds nothing
    for ev in call_events("ami-originate-reject21.all-events.txt"):
        tr.feed(dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "") for line in ev))
    assert got == []  # nobody registered 1795896534.11 yet: events of unknown calls are ignored
    tr.register("5.1")
    tr.feed({"Event": "Newchannel", "Uniqueid": "5.1", "Linkedid": "5.1"})
    tr.feed({"Event": "DialEnd", "Uniqueid": "5.1", "Linkedid": "5.1", "DestUniqueid": "5.2", "DestLinkedid": "5.1", "DialStatus": "ANSWER"})
    t[0] = 30.0
    tr.feed({"Event": "Hangup", "Uniqueid": "5.2", "Linkedid": "5.1", "Cause": "16"})  # the phone's leg: not the end yet
    assert got == []
    tr.feed({"Event": "Hangup", "Uniqueid": "5.1", "Linkedid": "5.1", "Cause": "16", "Cause-txt": "Normal Clearing"})
    tr.feed({"Event": "Cdr", "UniqueID": "5.2", "Disposition": "ANSWERED", "BillableSeconds": "29"})
    assert [(o.answered, o.talk_seconds, o.hangup_cause) for o in got] == [(True, 30.0, 16), (True, 29.0, None)]

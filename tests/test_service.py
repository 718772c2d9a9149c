"""The real service on an ephemeral port, driven by the transcript-faithful Asterisk double."""

from __future__ import annotations

import asyncio
import time

import pytest

from edgefilter import cli
from edgefilter.asterisk.callsim import CallSpec, load_transcript, place_call, transcript_env
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.service import Service

from .conftest import FIXTURES


async def add(svc: Service, list_name: str, text: str, **kw) -> None:
    await svc.store.put_entry(Entry(list_name, parse_pattern(text, "CN"), created_at=time.time(), **kw))
    await svc.follower.poll()


async def call(svc: Service, callerid="+8613800138000", **kw):
    result = await place_call("127.0.0.1", svc.port, CallSpec(callerid=callerid, **kw), timeout=3.0)
    assert result.closed_by_server and not result.timed_out, result
    assert result.pipelined == 0, "the server must never pipeline commands"
    return result


async def test_blocked_exact_prefix_and_mask_are_rejected_unknown_allowed(service):
    await add(service, "block", "+8613800138000")
    await add(service, "block", "+86170*")
    await add(service, "block", "+4121560####")
    for caller in ("+8613800138000", "013800138000", "+8617012345678", "+41215601234"):
        r = await call(service, caller)
        assert r.variables["EDGEFILTER_ACTION"] == "reject", (caller, r.variables)
        assert r.variables["EDGEFILTER_RULES"] == "LIST_BLOCKED"
        assert r.agistatus == "SUCCESS"
    r = await call(service, "+8613900139000")
    assert r.variables["EDGEFILTER_ACTION"] == "allow"
    assert r.variables["EDGEFILTER_RULES"] == ""


async def test_one_round_trip_then_close(service):
    await add(service, "block", "+86170*")
    r = await call(service, "+8617012345678")
    assert len(r.commands) == 1 and r.commands[0].startswith(b'EXEC MSet "EDGEFILTER_ACTION=reject,')
    assert r.replies[0] == b"200 result=0\n"
    assert r.variables == {
        "EDGEFILTER_ACTION": "reject",
        "EDGEFILTER_SCORE": "20",
        "EDGEFILTER_RULES": "LIST_BLOCKED",
        "EDGEFILTER_POLICY": "default",
        "EDGEFILTER_REJECT_CAUSE": "21",
        "EDGEFILTER_REJECT_SIT": "0",
        "EDGEFILTER_APPEAL_ID": "",  # always with a reject: empty unless an appeal is offered
        "TIMEOUT(absolute)": "0",  # the subroutine's wait, ended in the same round trip
    }


async def test_allow_beats_block(service):
    await add(service, "block", "+86170*")
    await add(service, "allow", "+8617012345678")
    assert (await call(service, "+8617012345678")).variables["EDGEFILTER_ACTION"] == "allow"
    assert (await call(service, "+8617012345679")).variables["EDGEFILTER_ACTION"] == "reject"


@pytest.mark.parametrize(
    "callerid,action,rule",
    [
        ("anonymous", "challenge", "CLI_WITHHELD"),
        ("Restricted", "challenge", "CLI_WITHHELD"),
        ("", "challenge", "CLI_WITHHELD"),
        ("unknown", "challenge", "CLI_WITHHELD"),
        ("138", "challenge", "CLI_INVALID"),
        ("hello world", "voicemail", "CLI_GARBAGE"),
        (b"\xc9\xa7\xc8\xc5", "voicemail", "CLI_GARBAGE"),  # raw GBK in the user part (09h)
        ("1234567890" * 30, "voicemail", "CLI_GARBAGE"),  # cut to 79 bytes by Asterisk
    ],
)
async def test_withheld_invalid_and_garbage_have_defined_actions(service, callerid, action, rule):
    r = await call(service, callerid)
    assert r.variables["EDGEFILTER_ACTION"] == action
    assert rule in r.variables["EDGEFILTER_RULES"].split()


async def test_presentation_restricted_with_a_number_still_hits_lists(service):
    await add(service, "block", "+8613900139000")
    r = await call(service, "+8613900139000", callingpres=32)
    assert r.variables["EDGEFILTER_ACTION"] == "reject"
    assert set(r.variables["EDGEFILTER_RULES"].split()) == {"LIST_BLOCKED", "CLI_WITHHELD"}


async def test_connection_closed_mid_env_does_not_stall_other_calls(service):
    # Regression: panoramisk's reader spins at 100% CPU on an early close and freezes the loop.
    env = CallSpec().__class__()
    from edgefilter.asterisk.callsim import build_env

    half = build_env(env, port=service.port)[:150]
    for _ in range(20):
        r, w = await asyncio.open_connection("127.0.0.1", service.port)
        w.write(half)
        await w.drain()
        w.close()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(call(service, "+8613900139000") for _ in range(10)))
    assert all(r.variables["EDGEFILTER_ACTION"] == "allow" for r in results)
    assert time.perf_counter() - t0 < 5.0  # a frozen loop never answers; a loaded one does
    # the spin itself: CPU time of this process while idle (a loaded machine does not inflate it)
    cpu0 = time.process_time()
    await asyncio.sleep(0.3)
    assert time.process_time() - cpu0 < 0.1, "something is spinning on the event loop"


async def test_garbage_instead_of_env_is_closed_with_a_log_line(service, caplog):
    r, w = await asyncio.open_connection("127.0.0.1", service.port)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    assert await asyncio.wait_for(r.read(), 2) == b""
    assert "garbage instead of an env block" in caplog.text
    assert (await call(service, "+8613900139000")).variables["EDGEFILTER_ACTION"] == "allow"


async def test_silent_peer_times_out_without_blocking_others(make_settings):
    # A read timeout long enough that "answered well before it" is a bound a loaded machine keeps.
    svc = Service(make_settings(agi={"read_timeout": "2s"}), port=0)
    await svc.start()
    try:
        t0 = time.perf_counter()
        idle = [await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(50)]
        r = await call(svc, "+8613900139000")
        assert r.variables["EDGEFILTER_ACTION"] == "allow"
        assert r.elapsed < 1.0, "the call waited for the silent peers"
        assert await asyncio.wait_for(idle[0][0].read(), 10) == b""  # closed by the read timeout ...
        assert time.perf_counter() - t0 >= 1.9  # ... and not before it
        for _, w in idle:
            w.close()
    finally:
        await svc.stop()


async def test_max_sessions_closes_extra_connections_at_once(make_settings):
    # Sessions past their env block (here: peers that never answer our command) count against
    # max_sessions and cannot be evicted; the next connection is closed at once (fails open).
    from edgefilter.asterisk.callsim import build_env

    svc = Service(make_settings(agi={"max_sessions": 5, "read_timeout": "2s"}), port=0)
    await svc.start()
    try:
        stuck = []
        for _ in range(5):
            r, w = await asyncio.open_connection("127.0.0.1", svc.port)
            w.write(build_env(CallSpec(), port=svc.port))
            await r.readuntil(b"\n")  # our MSet arrived; never answered
            stuck.append(w)
        r = await place_call("127.0.0.1", svc.port, CallSpec(), timeout=2.0)
        assert r.closed_by_server and r.variables == {}  # dial plan fails open
        assert svc.server.refused >= 1 and svc.server.evicted == 0
        for w in stuck:
            w.close()
    finally:
        await svc.stop()


async def test_hangup_before_our_command_is_handled(service):
    r = await call(service, "+8613900139000", hangup_before_commands=True)
    assert r.channel_dead
    # GET/SET/EXEC are still answered on a dead channel, so the MSet lands and the session ends cleanly
    assert r.commands and r.closed_by_server
    assert (await call(service, "+8613900139000")).variables["EDGEFILTER_ACTION"] == "allow"


async def test_hangup_while_the_command_runs(service):
    r = await call(service, "+8613900139000", hangup_during_command=1)
    assert r.closed_by_server


async def test_200_concurrent_sessions_all_answered_correctly(service):
    await add(service, "block", "+86170*")
    callers = [f"+8617{i:09d}" if i % 2 else f"+8613{i:09d}" for i in range(200)]
    results = await asyncio.gather(*(call(service, c) for c in callers))
    for c, r in zip(callers, results, strict=True):
        expected = "reject" if c.startswith("+86170") else "allow"
        assert r.variables["EDGEFILTER_ACTION"] == expected, c


async def test_cli_changes_reach_the_running_service_within_a_second(backend_settings, tmp_path):
    # The same number calls in a tight loop: keep the behaviour rules (RATE_BURST) out of it.
    svc = Service(backend_settings(store={"poll_interval": "250ms"}, behaviour={"enabled": False}), port=0)
    await svc.start()
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[store]\npath = "{svc.settings.store.path}"\nurl = "{svc.settings.store.url}"\n')
    try:
        assert (await call(svc, "+8613700137000")).variables["EDGEFILTER_ACTION"] == "allow"
        assert await asyncio.to_thread(cli.main, ["block", "+86137*", "--config", str(cfg)]) == 0
        # "within a second" is a benchmark figure (make bench-lists: < 0.5 s with the CLI's start);
        # these bounds only catch a change the service never sees, and hold on a loaded machine
        t0 = time.perf_counter()
        while (await call(svc, "+8613700137000")).variables["EDGEFILTER_ACTION"] != "reject":
            assert time.perf_counter() - t0 < 10.0, "change not seen within 10 s"
            await asyncio.sleep(0.02)
        assert await asyncio.to_thread(cli.main, ["remove", "+86137*", "--config", str(cfg)]) == 0
        t0 = time.perf_counter()
        while (await call(svc, "+8613700137000")).variables["EDGEFILTER_ACTION"] != "allow":
            assert time.perf_counter() - t0 < 10.0, "removal not seen within 10 s"
            await asyncio.sleep(0.02)
    finally:
        await svc.stop()


def _fixture_stream(name: str) -> bytes:
    """The whole Asterisk->server byte stream of a callerid case, up to the env block's real end."""
    entries = load_transcript(FIXTURES / "callerid" / name)
    out = bytearray()
    for direction, data in entries:
        if direction != "A":
            continue
        out += data
        if data.startswith(b"agi_threadid:"):
            break
    return bytes(out) + b"\n"


@pytest.mark.parametrize(
    "fixture",
    ["callerid-09g-pct0A0A-user-env-terminator.agi-stream.txt", "callerid-09d-pct0A-user.txt"],
)
async def test_forged_env_blocks_from_the_fixtures_are_hostile_and_stay_in_step(service, fixture, caplog):
    await add(service, "allow", "+86138*")  # even an allowlisted-looking number must not buy an allow
    stream = _fixture_stream(fixture)
    assert stream.count(b"agi_threadid:") == 1
    r = await place_call("127.0.0.1", service.port, CallSpec(raw_env=stream), timeout=3.0)
    assert r.closed_by_server
    assert r.variables["EDGEFILTER_ACTION"] == "reject"
    assert "CLI_FORGED" in r.variables["EDGEFILTER_RULES"].split()
    assert len(r.commands) == 1 and r.replies[0] == b"200 result=0\n"  # in step
    assert "forged FastAGI env block" in caplog.text
    assert (await call(service, "+8613900139000")).variables["EDGEFILTER_ACTION"] == "allow"


@pytest.mark.parametrize(
    "callerid,not_action",
    [
        (b"138\n\n200 result=1 (allow)", "allow"),  # LF (09g, built by the double)
        (b"138\r00138000", "allow"),  # CR (09f)
        (b"138\x0000138000", "allow"),  # NUL truncates (09e)
        (b"138\n00138000", "allow"),  # single LF (09d)
        (b"+8613800138000\nagi_calleridname: x", "allow"),
    ],
)
async def test_injection_variants_never_allow(service, callerid, not_action):
    await add(service, "allow", "+86138*")
    r = await call(service, callerid)
    assert r.variables["EDGEFILTER_ACTION"] != not_action, r.variables
    assert len(r.commands) == 1


async def test_real_transcript_env_blocks_are_accepted(service):
    await add(service, "block", "+86170*")
    for name in ("fastagi-sip-reject21.txt", "fastagi-basic.txt", "fastagi-args.txt"):
        env = transcript_env(load_transcript(FIXTURES / name))
        r = await call(service, raw_env=env)
        assert r.variables["EDGEFILTER_ACTION"] == "reject", name
        assert "CLI_FORGED" not in r.variables["EDGEFILTER_RULES"]


async def test_unknown_route_closes_without_variables(service):
    r = await call(service, script="nosuchroute")
    assert r.variables == {} and r.commands == []



async def test_store_records_every_call(backend_service):
    service = backend_service
    await add(service, "block", "+86170*")
    await call(service, "+8617012345678")
    await call(service, "anonymous")
    for _ in range(50):
        if service.calllog.written >= 2:
            break
        await asyncio.sleep(0.02)
    rows = await service.store.recent_calls(0)
    assert [(r.caller, r.action, r.rules) for r in rows] == [
        ("+8617012345678", "reject", "LIST_BLOCKED"),
        ("anonymous", "challenge", "CLI_WITHHELD"),
    ]

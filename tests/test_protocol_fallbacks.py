"""Second defences of the FastAGI protocol, each driven through a real socket or the real
launcher: the ``SET VARIABLE`` fallback for an Asterisk without ``MSet`` (its sanitising, and its
refusal of a reply that is out of step), and the env-key order check on its own (a planted
``agi_network_script`` line that duplicates nothing: the classic launcher, and a FastAGI URL
without a script, where Asterisk sends no such line)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefilter.asterisk import agi, callsim
from edgefilter.asterisk.callsim import CallSpec, _separate_args, build_env, parse_agi_args, place_call
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.service import Service

from .conftest import behaviour_off

LAUNCHER = Path(__file__).resolve().parents[1] / "agi" / "edgefilter-agi"
FRIEND = "+8613800138000"  # allowlisted in these tests: what a forger wants to look like


@pytest.fixture
def make_settings(make_settings):
    return behaviour_off(make_settings)


@pytest.fixture
def without_mset(monkeypatch):
    """The Asterisk double without app MSet: ``EXEC MSet`` answers ``200 result=-2`` as
    res_agi does for an application it cannot find."""
    monkeypatch.delitem(callsim._APPS, b"mset")


async def allow(svc: Service, text: str = FRIEND) -> None:
    await svc.store.put_entry(Entry("allow", parse_pattern(text, "CN"), created_at=time.time()))
    await svc.follower.poll()


async def block(svc: Service, text: str) -> None:
    await svc.store.put_entry(Entry("block", parse_pattern(text, "CN"), created_at=time.time()))
    await svc.follower.poll()


async def screened(svc: Service, spec: CallSpec, **kw):
    r = await place_call("127.0.0.1", svc.port, spec, timeout=3.0, **kw)
    assert r.closed_by_server and not r.timed_out and r.pipelined == 0, r
    return r


def set_variable(name: str, value: str) -> bytes:
    """The exact fallback command, spelled out by hand (not built by the code under test)."""
    return f'SET VARIABLE {name} "{value}"\n'.encode()


# ------------------------------------------------------------------ SET VARIABLE fallback
async def test_without_mset_the_verdict_arrives_one_set_variable_at_a_time(service, without_mset):
    await block(service, "+86170*")
    r = await screened(service, CallSpec(callerid="+8617012345678"))
    assert r.commands[0].startswith(b'EXEC MSet "EDGEFILTER_ACTION=reject,') and r.replies[0] == b"200 result=-2\n"
    expected = {"EDGEFILTER_ACTION": "reject", "EDGEFILTER_SCORE": "20", "EDGEFILTER_RULES": "LIST_BLOCKED",
                "EDGEFILTER_POLICY": "default", "EDGEFILTER_REJECT_CAUSE": "21", "EDGEFILTER_REJECT_SIT": "0",
                "EDGEFILTER_APPEAL_ID": "",
                "TIMEOUT(absolute)": "0"}  # the subroutine's wait: a function write, as MSet's
    assert r.commands[1:] == [set_variable(k, v) for k, v in expected.items()]
    assert r.replies[1:1 + len(expected)] == [b"200 result=1\n"] * len(expected)
    assert r.variables == expected


async def test_without_mset_a_challenge_carries_its_id_and_digit(service, without_mset):
    r = await screened(service, CallSpec(callerid="anonymous"))
    v = r.variables
    assert v["EDGEFILTER_ACTION"] == "challenge" and v["EDGEFILTER_CHALLENGE_DIGIT"] in "123456789"
    assert v["EDGEFILTER_CHALLENGE_ID"] in service.challenges.pending
    assert all(c.startswith((b"SET VARIABLE EDGEFILTER_", b"SET VARIABLE TIMEOUT(absolute) ")) for c in r.commands[1:])
    assert len(r.commands) == 1 + len(v) and v["TIMEOUT(absolute)"] == "0"


HOSTILE_VALUES = {
    "quote and command": 'x" EXEC Hangup 21 "',
    "backslash escapes": 'a\\"b\\\\',
    "LF and a command": "x\nEXEC Hangup 21",
    "CR and NUL": "x\r\x00y",
    "dollar expansion": "${SHELL(id)}",
    "unbalanced bracket": "[SPAM?",
}


@contextlib.asynccontextmanager
async def one_route_server(handler):
    """The real FastAGI listener with one test route (what a route would write, made hostile)."""
    server = agi.AgiServer({"screen": handler}, port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.mark.parametrize("value", HOSTILE_VALUES.values(), ids=HOSTILE_VALUES.keys())
async def test_the_fallback_sanitises_every_value_it_writes(without_mset, value):
    """Values reach SET VARIABLE through agi.safe_value, as they reach MSet: one line, one
    quoted argument of the safe character set, whatever the value held."""
    done = asyncio.get_running_loop().create_future()

    async def handler(session: agi.AgiSession) -> None:
        try:
            reply = await session.set_variables({"EDGEFILTER_TAG": value, "EDGEFILTER_ACTION": "tag"})
            done.set_result(reply)
        except Exception as e:  # the test asserts on it
            done.set_exception(e)
        finally:
            agi.close_writer(session.writer)

    async with one_route_server(handler) as server:
        r = await place_call("127.0.0.1", server.port, CallSpec(), timeout=3.0)
    reply = await done
    assert reply.code == 200 and reply.result == 1
    assert r.closed_by_server and not r.timed_out and r.pipelined == 0
    assert len(r.commands) == 3 and r.commands[0].startswith(b"EXEC MSet ")
    clean = agi.safe_value(value)
    assert r.commands[1:] == [set_variable("EDGEFILTER_TAG", clean), set_variable("EDGEFILTER_ACTION", "tag")]
    assert r.variables == {"EDGEFILTER_TAG": clean, "EDGEFILTER_ACTION": "tag"}  # nothing else set, nothing run
    assert not r.channel_dead and r.hangup_cause is None
    for cmd in r.commands[1:]:
        argv = parse_agi_args(cmd)
        assert len(argv) == 4 and argv[:2] == [b"SET", b"VARIABLE"], argv
        assert agi._SAFE_VALUE.search(argv[3].decode()) is None


async def _fake_asterisk(port: int, spec: CallSpec, replies: list[bytes]) -> list[bytes]:
    """A peer that answers the commands with ``replies`` in order (no reply once they run out)
    and returns every command line the server wrote until it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_env(spec, port=port))
        got: list[bytes] = []
        async with asyncio.timeout(5):
            while line := await reader.readline():
                got.append(line)
                if replies:
                    writer.write(replies.pop(0))
        return got
    finally:
        writer.close()


async def test_an_out_of_step_reply_to_set_variable_is_answered_as_forged(service, caplog):
    """A reply that is not SET VARIABLE's (a line planted earlier in the stream, read where the
    reply should be) stops the fallback: the call is re-decided as forged and that verdict sent
    without waiting for anything more."""
    caplog.set_level(logging.WARNING)
    await allow(service)
    got = await _fake_asterisk(service.port, CallSpec(callerid=FRIEND), [b"200 result=-2\n", b"200 result=0\n"])
    assert got[0].startswith(b'EXEC MSet "EDGEFILTER_ACTION=allow,') and got[1] == set_variable("EDGEFILTER_ACTION", "allow")
    assert len(got) == 3, got  # the fallback stopped at the odd reply: the forged verdict, then the close
    argv = parse_agi_args(got[2])
    assert argv[:2] == [b"EXEC", b"MSet"]
    v = dict(_separate_args(p, 0x3D, 2) for p in _separate_args(argv[2], 0x2C, 24))
    assert v[b"EDGEFILTER_ACTION"] == b"reject" and b"CLI_FORGED" in v[b"EDGEFILTER_RULES"].split()
    assert "unexpected reply to SET VARIABLE" in caplog.text and "answering as forged" in caplog.text


async def test_a_dead_channel_during_the_fallback_is_no_forgery(service, caplog):
    """511 (the channel hung up) is a reply SET VARIABLE may get: not out of step."""
    await allow(service)
    got = await _fake_asterisk(service.port, CallSpec(callerid=FRIEND),
                               [b"200 result=-2\n"] + [b"511 Command Not Permitted on a dead channel or intercept routine\n"] * 5)
    assert [c.split(b" ")[:3] for c in got[1:]] == [[b"SET", b"VARIABLE", n] for n in
                                                    (b"EDGEFILTER_ACTION", b"EDGEFILTER_SCORE", b"EDGEFILTER_RULES", b"EDGEFILTER_POLICY",
                                                     b"TIMEOUT(absolute)")]
    assert "answering as forged" not in caplog.text


# ------------------------------------------------------------------ env key order on its own
def classic_env(callerid: bytes) -> bytes:
    """What Asterisk writes to a classic AGI's stdin: no agi_network lines (the planted one, inside
    the caller ID, stays: the filter is on the real keys, not on the text)."""
    return build_env(CallSpec(callerid=callerid, script=str(LAUNCHER), extra={"agi_network": None, "agi_network_script": None}),
                     truncate=False)


PLANTED = {  # what the caller ID carries after the number, and why the block is forged
    "agi_network_script": (b"\nagi_network_script: screen", b"agi_network_script out of order"),
    "agi_network": (b"\nagi_network: yes", b"agi_network out of order"),
    "agi_request": (b"\nagi_request: agi://127.0.0.1/screen", b"duplicate agi_request"),  # a duplicate too
}


@pytest.mark.parametrize("planted,reason", PLANTED.values(), ids=PLANTED.keys())
def test_the_classic_launcher_calls_a_key_planted_out_of_order_forged(tmp_path, planted, reason):
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "e.db"}"\n')
    from edgefilter import cli

    assert cli.main(["allow", FRIEND, "--config", str(cfg)]) == 0

    def launch(env: bytes) -> tuple[bytes, bytes]:
        """As Asterisk runs it: the env block, then a reply to each command once it is sent."""
        p = subprocess.Popen([sys.executable, str(LAUNCHER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "EDGEFILTER_CONFIG": str(cfg)}, cwd=tmp_path)
        try:
            p.stdin.write(env)
            p.stdin.flush()
            line = p.stdout.readline()
            p.stdin.write(b"200 result=0\n")
            p.stdin.close()
            rest = p.stdout.read()
            err = p.stderr.read()
            assert p.wait(30) == 0, err
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        return line + rest, err

    honest, _ = launch(classic_env(FRIEND.encode()))
    assert honest.startswith(b'EXEC MSet "EDGEFILTER_ACTION=allow,') and b"LIST_ALLOWED" in honest
    out, err = launch(classic_env(FRIEND.encode() + planted))
    assert out.count(b"\n") == 1 and out.startswith(b'EXEC MSet "EDGEFILTER_ACTION=reject,'), out
    assert b"CLI_FORGED" in out.split(b"EDGEFILTER_RULES=")[1].split(b",")[0].split()
    assert b"WARNING edgefilter.launcher: forged AGI env block" in err and reason in err, err


async def test_a_script_planted_where_asterisk_sent_none_is_forged(service, caplog):
    """``AGI(agi://host:port)`` without a script: Asterisk sends no agi_network_script line, so a
    caller ID that plants one duplicates nothing. Only the order check sees it, and the route
    it picks must not buy an allow."""
    caplog.set_level(logging.WARNING)
    await allow(service)
    spec = CallSpec(callerid=FRIEND.encode() + b"\nagi_network_script: screen", script="")
    env = build_env(spec, port=service.port, truncate=False)
    assert env.count(b"agi_network_script: ") == 1 and env.index(b"agi_network_script") > env.index(b"agi_callerid")
    r = await screened(service, spec, truncate=False)
    assert len(r.commands) == 1, r.commands
    v = r.variables
    assert v["EDGEFILTER_ACTION"] == "reject" and "CLI_FORGED" in v["EDGEFILTER_RULES"].split(), v
    assert "agi_network_script out of order" in caplog.text

"""Proves that edgefilter.asterisk.callsim talks FastAGI byte for byte like the captured Asterisk 22.

Why this matters: the whole suite (and the benchmark) trusts callsim as its
Asterisk.  If the double drifts from the real thing, every server test built on
it proves nothing.  So the tests replay the golden transcripts captured from a
real Asterisk 22.10.1 (shared/fixtures/asterisk) through tiny scripted servers
and compare every byte, plus the behaviours a server must survive (forged env
lines, pipelining stalls, dead-channel replies, connection refused).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import urllib.parse
from pathlib import Path

import pytest

from edgefilter.asterisk.callsim import CallSpec, build_env, load_transcript, parse_agi_args, place_call, transcript_env

HERE = Path(__file__).resolve()


def _find_fixtures() -> Path | None:
    candidates = [
        os.environ.get("EDGEFILTER_ASTERISK_FIXTURES"),
        os.environ.get("EDGEFILTER_FIXTURES"),  # the name tests/conftest.py uses
        HERE.parent / "fixtures" / "asterisk",
        HERE.parents[2] / "shared" / "fixtures" / "asterisk",  # ../shared next to the repo
        "/work/shared/fixtures/asterisk",
    ]
    for c in candidates:
        if c and (Path(c) / "fastagi-basic.txt").is_file():
            return Path(c)
    return None


FIX = _find_fixtures()
needs_fixtures = pytest.mark.skipif(FIX is None, reason="Asterisk golden fixtures not found")
CALLERID_FIX = FIX / "callerid" if FIX else None


# --- helpers -------------------------------------------------------------------------


def env_dict(env: bytes) -> dict[str, bytes]:
    """A clean env block as {key: value} (values raw)."""
    out = {}
    for line in env.split(b"\n"):
        if line:
            key, _, value = line.partition(b": ")
            out[key.decode()] = value
    return out


def spec_from_fixture_env(env: bytes, **overrides) -> CallSpec:
    """The CallSpec that makes callsim send exactly this captured env block."""
    d = env_dict(env)
    args = [d[k] for k in sorted((k for k in d if k.startswith("agi_arg_")), key=lambda k: int(k[8:]))]
    return CallSpec(
        callerid=d["agi_callerid"],
        calleridname=d["agi_calleridname"],
        dnid=d["agi_dnid"],
        rdnis=d["agi_rdnis"],
        extension=d["agi_extension"],
        context=d["agi_context"],
        channel=d["agi_channel"],
        uniqueid=d["agi_uniqueid"],
        threadid=int(d["agi_threadid"]),
        script=d["agi_request"].decode(),  # the dial-plan URL, whatever port we really use
        args=args,
        **overrides,
    )


async def serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_env(reader: asyncio.StreamReader) -> bytes:
    """A naive server's env reader: everything up to the first blank line."""
    env = bytearray()
    while True:
        line = await reader.readline()
        env += line
        if line in (b"\n", b""):
            return bytes(env)


async def replay(entries, spec: CallSpec, timeout: float = 3.0):
    """Play the server side of a transcript; collect what the simulator sent.

    After each server line, exactly as many lines are read as the capture shows
    Asterisk sending before the server's next line; then the server closes.
    """
    env = transcript_env(entries)
    rest = entries[env.count(b"\n") :]
    seen: dict = {"env": b"", "lines": []}

    async def handler(reader, writer):
        seen["env"] = await read_env(reader)
        for direction, data in rest:
            if direction == "S":
                writer.write(data)
                await writer.drain()
                seen["lines"].append(("S", data))
            else:
                seen["lines"].append(("A", await reader.readline()))
        writer.close()

    server, port = await serve(handler)
    async with server:
        result = await place_call("127.0.0.1", port, spec, timeout=timeout)
    return result, seen, env, rest


# --- parse_args --------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"GET VARIABLE CALLERID(num)\n", [b"GET", b"VARIABLE", b"CALLERID(num)"]),
        (b'SET VARIABLE X "a b  c"\n', [b"SET", b"VARIABLE", b"X", b"a b  c"]),
        (b'SET VARIABLE X "say \\"hi\\" \\\\ ok"', [b"SET", b"VARIABLE", b"X", b'say "hi" \\ ok']),
        (b'STREAM FILE silence/1 ""', [b"STREAM", b"FILE", b"silence/1", b""]),
        (b'a"b c"d', [b"ab cd"]),  # quotes toggle mid-word and vanish
        (b"a\\ b \\x", [b"a b", b"x"]),  # backslash works outside quotes too
        (b"  NOOP \t  \n", [b"NOOP"]),
        (b"NOOP\r\n", [b"NOOP\r"]),  # CR is an ordinary byte: CRLF servers get 510
        (b"", []),
        (b"A\0B C", [b"A"]),  # C string
    ],
)
def test_parse_agi_args_follows_res_agi(line, expected):
    assert parse_agi_args(line) == expected


def test_parse_agi_args_keeps_at_most_127_words():
    assert len(parse_agi_args(b" ".join([b"w"] * 200))) == 127


# --- environment block ----------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize(
    "name, spec_kwargs",
    [
        (
            "fastagi-basic.txt",
            dict(channel="Local/1000@local-test-00000001;2", uniqueid="1795896437.3", threadid=139964547000000),
        ),
        (
            "fastagi-args.txt",
            dict(
                channel="Local/1000@args-test-00000006;2",
                uniqueid="1795896633.20",
                threadid=139964546488000,
                context="args-test",
                script="screen?mode=test&x=1",
                args=["first arg", "second", b"1000"],
            ),
        ),
    ],
)
def test_build_env_equals_captured_env(name, spec_kwargs):
    spec = CallSpec(callerid="+8617012345678", calleridname="Spam", dnid="unknown", **spec_kwargs)
    assert build_env(spec, "127.0.0.1", 4573) == transcript_env(load_transcript(FIX / name))


def test_env_defaults_and_missing_values():
    env = build_env(CallSpec(callerid=None, calleridname="", dnid=b"", script=""), "10.0.0.1", 4573)
    d = env_dict(env)
    assert d["agi_callerid"] == d["agi_calleridname"] == d["agi_dnid"] == b"unknown"
    assert "agi_network_script" not in d and d["agi_request"] == b"agi://10.0.0.1:4573"
    assert b"agi_accountcode: \n" in env and env.endswith(b"\n\n")
    assert d["agi_type"] == b"PJSIP"
    spec = CallSpec(extra={"agi_priority": 7, "agi_language": None})
    d = env_dict(build_env(spec))
    assert d["agi_priority"] == b"7" and "agi_language" not in d


def test_uniqueid_is_unique_per_call():
    assert env_dict(build_env(CallSpec()))["agi_uniqueid"] != env_dict(build_env(CallSpec()))["agi_uniqueid"]


def _callerid_cases():
    if CALLERID_FIX is None:
        return []
    cases = []
    for case in ["01", "02a", "02b", "03", "04-", "04b", "05a", "05b", "05c", "05d",
                 "09a", "09b", "09c", "09e", "09f", "09h", "10-", "10c", "10e", "10f"]:
        (invite,) = CALLERID_FIX.glob(f"callerid-{case}*.invite.txt")
        cases.append(pytest.param(invite, id=invite.name.split(".")[0]))
    return cases


@needs_fixtures
@pytest.mark.parametrize("invite", _callerid_cases())
def test_callerid_normalisation_matches_asterisk(invite: Path):
    """NUL cut, U+FFFD repair, 79-byte cuts: the From header in, the captured env out."""
    raw = invite.read_bytes()
    m = re.search(rb'\r\nFrom: "(.*)" <sip:([^@]*)@', raw)
    assert m, invite
    name, user = m.group(1), urllib.parse.unquote_to_bytes(m.group(2))
    transcript = invite.with_name(invite.name.replace(".invite.txt", ".txt"))
    captured = env_dict(transcript_env(load_transcript(transcript)))
    env = env_dict(build_env(CallSpec(callerid=user, calleridname=name)))
    assert env["agi_callerid"] == captured["agi_callerid"]
    assert env["agi_calleridname"] == captured["agi_calleridname"]


# --- replaying the golden FastAGI transcripts ----------------------------------------------

REPLAYS = {
    "fastagi-basic.txt": ({}, "SUCCESS"),
    "fastagi-sip-basic.txt": ({}, "SUCCESS"),
    "fastagi-args.txt": ({}, "SUCCESS"),
    "fastagi-reply-formats.txt": ({}, "SUCCESS"),
    "fastagi-silent-close.txt": ({}, "SUCCESS"),
    "fastagi-sip-allow.txt": ({}, "SUCCESS"),
    "fastagi-allow-ami-originate.txt": ({}, "SUCCESS"),
    "fastagi-sip-reject21.txt": ({}, "HANGUP"),
    "fastagi-sip-reject17.txt": ({}, "HANGUP"),
    "fastagi-sip-reject21close.txt": ({}, "HANGUP"),
    "fastagi-reject21-ami-originate.txt": ({}, "HANGUP"),
    "fastagi-hangup-during-session.txt": ({"hangup_before_commands": True}, "HANGUP"),
    "fastagi-sip-cancel-during-agi.txt": ({"hangup_before_commands": True}, "HANGUP"),
    "fastagi-basic-local-wait1-hangup-during-playback.txt": ({"hangup_during_command": 3}, "HANGUP"),
}


@needs_fixtures
@pytest.mark.parametrize("name", sorted(REPLAYS))
async def test_replay_golden_transcript_byte_for_byte(name):
    overrides, agistatus = REPLAYS[name]
    entries = load_transcript(FIX / name)
    spec = spec_from_fixture_env(transcript_env(entries), **overrides)
    result, seen, env, rest = await replay(entries, spec)
    assert seen["env"] == env
    assert seen["lines"] == rest
    assert result.agistatus == agistatus
    assert result.closed_by_server and not result.timed_out
    assert result.pipelined == 0
    assert result.commands == [data for d, data in rest if d == "S"]
    # Same byte stream (one write may span lines, e.g. the 520 usage text); what the
    # server never read is only HANGUP lines: the inline one (reject21close) and the
    # one res_agi always writes after the server closed.
    sent = b"".join(result.replies)
    read = b"".join(data for d, data in rest if d == "A")
    assert sent.startswith(read)
    assert result.replies[-1] == b"HANGUP\n"
    assert sent[len(read) :] in (b"HANGUP\n", b"HANGUP\nHANGUP\n")


@needs_fixtures
async def test_reject21_records_cause_and_variables():
    entries = load_transcript(FIX / "fastagi-sip-reject21.txt")
    result, *_ = await replay(entries, spec_from_fixture_env(transcript_env(entries)))
    assert result.hangup_cause == 21
    assert result.variables == {"EDGEFILTER_ACTION": "reject"}
    assert result.channel_dead


@needs_fixtures
@pytest.mark.parametrize("case", ["09d-pct0A-user", "09g-pct0A0A-user-env-terminator"])
async def test_forged_callerid_stream_is_exactly_asterisks(case):
    """callerid-09d/09g: the LF in the number goes out raw, and fools a naive server."""
    stream = load_transcript(CALLERID_FIX / f"callerid-{case}.agi-stream.txt")
    a_stream = b"".join(d for k, d in stream if k == "A")
    s_lines = [d for k, d in stream if k == "S"]
    naive_view = load_transcript(CALLERID_FIX / f"callerid-{case}.txt")
    captured_env = transcript_env(naive_view)  # what a naive reader took for the env
    naive_replies = [d for k, d in naive_view[captured_env.count(b"\n") :] if k == "A"]
    d = env_dict(a_stream.split(b"agi_threadid: ")[0] + b"agi_threadid: 0\n")
    number = a_stream.split(b"agi_callerid: ", 1)[1].split(b"\nagi_calleridname", 1)[0]
    spec = CallSpec(
        callerid=number,
        calleridname="Pct",
        channel=d["agi_channel"],
        uniqueid=d["agi_uniqueid"],
        threadid=140354748692160,
        script="agi://127.0.0.1:4573/screen",
    )
    got: dict = {}

    async def handler(reader, writer):
        got["env"] = await read_env(reader)
        got["replies"] = []
        for line in s_lines:  # one command, then "its reply", like the logger did
            writer.write(line)
            await writer.drain()
            got["replies"].append(await reader.readline())
        writer.write_eof()
        got["rest"] = await reader.read()
        writer.close()

    server, port = await serve(handler)
    async with server:
        result = await place_call("127.0.0.1", port, spec, timeout=3)
    assert got["env"] == captured_env
    assert got["replies"] == naive_replies  # 09g: "200 result=1 (allow)" came from the caller
    everything = got["env"] + b"".join(got["replies"]) + got["rest"]
    # The capture lacks the final HANGUP only because the logger's close reset the socket.
    assert everything == a_stream + b"HANGUP\n"
    assert result.env == a_stream[: len(result.env)]


# --- command semantics ------------------------------------------------------------------


async def run_script(commands: list[bytes], spec: CallSpec | None = None, timeout: float = 3.0):
    """A well-behaved server: one command, read the full reply, next; then close.

    A reply is one line, except 520 (until ``520 End``) and an unsolicited
    ``HANGUP`` (read the real reply after it).
    """
    replies: list[list[bytes]] = []

    async def handler(reader, writer):
        await read_env(reader)
        for cmd in commands:
            writer.write(cmd)
            await writer.drain()
            lines = [await reader.readline()]
            while lines[-1] == b"HANGUP\n" or (lines[-1].startswith(b"520-") or (
                lines[0].startswith(b"520-") and not lines[-1].startswith(b"520 "))):
                lines.append(await reader.readline())
            replies.append(lines)
        writer.close()

    server, port = await serve(handler)
    async with server:
        result = await place_call("127.0.0.1", port, spec or CallSpec(), timeout=timeout)
    return result, replies


async def test_set_get_mset_and_usage():
    result, r = await run_script(
        [
            b'EXEC MSet "A=1,B=x y z,R="X,Y"",NOPE\n',
            b"SET VARIABLE REASON score 0.9\n",  # unquoted spaces: usage, nothing set
            b'SET VARIABLE REASON "score 0.97 (spam \\"list\\")"\n',
            b"GET VARIABLE REASON\n",
            b"GET VARIABLE B\n",
            b"GET VARIABLE UNSET\n",
            b"GET VARIABLE CALLERID(name)\n",
            b"GET FULL VARIABLE ${CALLERID(all)}|${B:2:1}\n",
            b'EXEC Set "S=1,2"\n',
            b"EXEC Mset C=3 D=4\n",
            b"EXEC NoSuchApp x\n",
            b"NOOP\n",
            b"ANSWER\n",
            b"CHANNEL STATUS\n",
            b"VERBOSE \"hi\" 1\n",
            b"NOOP\r\n",
        ]
    )
    assert r[0] == [b"200 result=0\n"]
    assert r[1][0] == b"520-Invalid command syntax.  Proper usage follows:\n"
    assert r[1][1] == b"Sets a variable to the current channel.\n"
    assert r[1][-1] == b"520 End of proper usage.\n"
    assert r[2] == [b"200 result=1\n"]
    assert r[3] == [b'200 result=1 (score 0.97 (spam "list"))\n']
    assert r[4] == [b"200 result=1 (x y z)\n"]
    assert r[5] == [b"200 result=0\n"]
    assert r[6] == [b"200 result=1 ()\n"]  # no display name: () here, 'unknown' in the env
    assert r[7] == [b'200 result=1 ("" <+8613800138000>|y)\n']
    assert [x[0] for x in r[8:]] == [
        b"200 result=0\n", b"200 result=0\n", b"200 result=-2\n", b"200 result=0\n",
        b"200 result=0\n", b"200 result=6\n", b"200 result=1\n", b"510 Invalid or unknown command\n",
    ]
    assert result.variables == {
        "A": "1", "B": "x y z", "R": "X", "REASON": 'score 0.97 (spam "list")', "S": "1,2", "C": "3",
    }
    assert result.agistatus == "SUCCESS" and result.hangup_cause is None


async def test_dtmf_digits():
    spec = CallSpec(digits=b"12#9*")
    _, r = await run_script(
        [
            b'STREAM FILE prompt ""\n',  # no escape digits: nothing consumed
            b"STREAM FILE prompt 1\n",
            b"GET DATA prompt 3000 4\n",  # '2', then '#' ends it
            b"WAIT FOR DIGIT 100\n",
            b"GET DATA prompt 3000 4\n",  # '*' then no more keys: timeout
            b"WAIT FOR DIGIT -1\n",
            b"WAIT FOR DIGIT\n",
        ],
        spec,
    )
    assert [x[0] for x in r[:6]] == [
        b"200 result=0 endpos=8000\n",
        b"200 result=49 endpos=1600\n",
        b"200 result=2\n",
        b"200 result=57\n",
        b"200 result=* (timeout)\n",
        b"200 result=0\n",
    ]
    assert r[6][0].startswith(b"520-")


async def test_hangup_after_commands_then_dead_channel_rules():
    spec = CallSpec(hangup_after_commands=1, digits=b"5")
    result, r = await run_script(
        [b"NOOP\n", b"ANSWER\n", b"WAIT FOR DIGIT 10\n", b"EXEC Playback x\n", b"EXEC Set \"Z=1\"\n",
         b"GET VARIABLE Z\n", b"HANGUP\n"],
        spec,
    )
    dead = b"511 Command Not Permitted on a dead channel or intercept routine\n"
    assert r[0] == [b"200 result=0\n"]
    assert r[1] == [b"HANGUP\n", dead]  # HANGUP arrives unsolicited, before the next reply
    assert r[2] == [dead]
    assert r[3] == [b"200 result=-1\n"]
    assert r[4] == [b"200 result=0\n"]  # Set still runs on a dead channel (pbx_exec has no check)
    assert r[5] == [b"200 result=1 (1)\n"]
    assert r[6] == [dead]
    assert result.agistatus == "HANGUP" and result.hangup_cause is None
    assert result.replies.count(b"HANGUP\n") == 2  # one when it died, one at the end


async def test_exec_hangup_then_immediate_close():
    result, r = await run_script([b"SET VARIABLE EDGEFILTER_ACTION reject\n", b"EXEC Hangup CALL_REJECTED\n"])
    assert r[1] == [b"200 result=-1\n"]
    assert result.hangup_cause == 21 and result.agistatus == "HANGUP"
    assert result.replies[-2:] == [b"HANGUP\n", b"HANGUP\n"]


async def test_pipelined_commands_stall_until_more_bytes_arrive():
    got: dict = {}

    async def handler(reader, writer):
        await read_env(reader)
        writer.write(b"NOOP\nGET VARIABLE CALLERID(num)\n")  # two commands, one write
        got["first"] = await reader.readline()
        try:
            got["second"] = await asyncio.wait_for(reader.readline(), 0.15)
        except TimeoutError:
            got["second"] = None  # stalled, like res_agi
        writer.write(b"VERBOSE x 1\n")
        got["after"] = [await reader.readline(), await reader.readline()]
        writer.close()

    server, port = await serve(handler)
    async with server:
        result = await place_call("127.0.0.1", port, CallSpec(), timeout=3)
    assert got["first"] == b"200 result=0\n"
    assert got["second"] is None
    assert got["after"] == [b"200 result=1 (+8613800138000)\n", b"200 result=1\n"]
    # Counted twice: NOOP was followed by GET..., and GET... (stalled) by VERBOSE.
    assert result.pipelined == 2


async def test_connection_refused_is_failure():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    result = await place_call("127.0.0.1", port, CallSpec(), timeout=2)
    assert result.agistatus == "FAILURE"
    assert not result.closed_by_server and result.replies == [] and result.error


async def test_silent_close_is_success_without_variables():
    async def handler(reader, writer):
        await read_env(reader)
        writer.close()

    server, port = await serve(handler)
    async with server:
        result = await place_call("127.0.0.1", port, timeout=2)
    assert result.agistatus == "SUCCESS" and result.closed_by_server
    assert result.variables == {} and result.commands == []
    assert result.replies == [b"HANGUP\n"]
    assert 0 < result.elapsed < 1


async def test_overall_timeout_when_server_never_closes():
    async def handler(reader, writer):
        await read_env(reader)
        await reader.read()  # never answers; returns when the simulator gives up
        writer.close()

    server, port = await serve(handler)
    async with server:
        result = await place_call("127.0.0.1", port, timeout=0.2)
    assert result.timed_out and not result.closed_by_server


async def test_exit_on_hangup_and_hostile_raw_env():
    got: dict = {}

    async def handler(reader, writer):
        got["all"] = await reader.read()  # Asterisk closes first with AGIEXITONHANGUP
        writer.close()

    server, port = await serve(handler)
    async with server:
        result = await place_call(
            "127.0.0.1", port, CallSpec(raw_env=b"agi_x: 1\n\n", hangup_before_commands=True, exit_on_hangup=True)
        )
    assert got["all"] == b"agi_x: 1\n\nHANGUP\nHANGUP\n"
    assert result.agistatus == "HANGUP" and not result.closed_by_server

"""Hostile callers and hostile peers, through the real server and the Asterisk double.

The caller ID, the caller name and (when the dial plan passes ${EXTEN}) the Request-URI are
written by whoever places the call. These tests plant what a caller can plant (the captured
%0A%0A attack, CR, NUL, forged keys in every caller-reachable value, a blank line inside an AGI
argument, quotes, backslashes, 8 KiB values, GBK and Latin-1 bytes) and check the exact bytes
the service writes back: one `EXEC MSet` as res_agi would parse it, never an `allow` for a forged
block, never a reply read out of step, always a log line.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from pathlib import Path

import pytest

from edgefilter.asterisk import agi
from edgefilter.asterisk.callsim import CallSpec, _separate_args, build_env, load_transcript, parse_agi_args, place_call
from edgefilter.core.config import settings_from_dict
from edgefilter.core.errors import ConfigError
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.service import Service

from .conftest import FIXTURES, behaviour_off


@pytest.fixture
def make_settings(make_settings):
    """This module's calls come from many numbers of one block in a row: keep the behaviour
    rules (RANGE_CAMPAIGN, RATE_*) out, so each test sees only the protection it is about."""
    return behaviour_off(make_settings)


#: What a value the service writes may contain (agi.safe_value's set).
SAFE = re.compile(rb"^[A-Za-z0-9_ .:+\-\[\]?!#/@*]*\Z")
NAMES = {b"EDGEFILTER_ACTION", b"EDGEFILTER_SCORE", b"EDGEFILTER_RULES", b"EDGEFILTER_POLICY",
         b"EDGEFILTER_CATEGORY", b"EDGEFILTER_WOULD", b"EDGEFILTER_TAG", b"EDGEFILTER_REJECT_CAUSE",
         b"EDGEFILTER_REJECT_SIT", b"EDGEFILTER_VOICEMAIL_BOX", b"EDGEFILTER_CHALLENGE_DIGIT",
         b"EDGEFILTER_CHALLENGE_ID", b"EDGEFILTER_CHALLENGE_TIMEOUT", b"EDGEFILTER_APPEAL_ID",
         b"EDGEFILTER_APPEAL_DIGIT", b"EDGEFILTER_APPEAL_TIMEOUT", b"EDGEFILTER_APPEAL_SECONDS",
         b"TIMEOUT(absolute)"}  # the one function written: ends the subroutine's wait (always "0")


async def add(svc: Service, list_name: str, text: str, **kw) -> None:
    await svc.store.put_entry(Entry(list_name, parse_pattern(text, "CN"), created_at=time.time(), **kw))
    await svc.follower.poll()


def mset(action: str, score: str, rules: str = "", policy: str = "default", **extra: str) -> bytes:
    """The exact command line we expect, spelled out by hand (not built by the code under test)."""
    if action == "reject":
        extra.setdefault("reject_cause", "21")  # [actions] reject_cause, shipped default
        extra.setdefault("reject_sit", "0")
        extra.setdefault("appeal_id", "")  # always with a reject: empty unless an appeal is offered
    if action in ("voicemail", "challenge"):
        extra.setdefault("voicemail_box", "1000@default")  # the called extension's box
    pairs = [f"EDGEFILTER_ACTION={action}", f"EDGEFILTER_SCORE={score}", f"EDGEFILTER_RULES={rules}",
             f"EDGEFILTER_POLICY={policy}"] + [f"EDGEFILTER_{k.upper()}={v}" for k, v in extra.items()]
    pairs.append("TIMEOUT(absolute)=0")  # ends the subroutine's wait in the same round trip
    return b'EXEC MSet "' + ",".join(pairs).encode() + b'"\n'


def parsed_variables(command: bytes) -> dict[bytes, bytes]:
    """Parse one command line as res_agi and MSet do; fail unless it is one clean EXEC MSet."""
    assert command.endswith(b"\n") and command.count(b"\n") == 1, command
    argv = parse_agi_args(command)
    assert argv[:2] == [b"EXEC", b"MSet"] and len(argv) == 3, argv
    out = {}
    for pair in _separate_args(argv[2], 0x2C, 24):
        name, value = _separate_args(pair, 0x3D, 2)
        assert name in NAMES, name
        assert SAFE.match(value), value
        assert name != b"TIMEOUT(absolute)" or value == b"0", value
        out[name] = value
    return out


async def screened(svc: Service, spec: CallSpec, **kw):
    r = await place_call("127.0.0.1", svc.port, spec, timeout=3.0, **kw)
    assert r.closed_by_server and not r.timed_out and r.pipelined == 0, r
    assert r.agistatus == "SUCCESS"
    return r


def forged_stream(**values: bytes) -> bytes:
    """A real-looking env block (built by the double) with raw bytes planted in some values."""
    spec = CallSpec(**values)
    return build_env(spec, truncate=False)


# ------------------------------------------------------------------------ 1. forged env blocks
def _fixture_stream(name: str) -> bytes:
    out = bytearray()
    for direction, data in load_transcript(FIXTURES / "callerid" / name):
        if direction == "A":
            out += data
            if data.startswith(b"agi_threadid:"):
                break
    return bytes(out) + b"\n"


FORGED_CALLERIDS = {
    "09g LF LF + planted reply": b"138\n\n200 result=1 (allow)",
    "CRLF CRLF + planted reply": b"138\r\n\r\n200 result=1 (allow)",
    "09d single LF": b"138\n00138000",
    "LF + forged calleridname": b"+8613800138000\nagi_calleridname: x",
    "LF + forged unknown key": b"+8613800138000\nagi_trusted: yes",
    "LF + forged arg before threadid": b"+8613800138000\nagi_arg_1: cidfiltered=0",
}


@pytest.mark.parametrize("callerid", FORGED_CALLERIDS.values(), ids=FORGED_CALLERIDS.keys())
async def test_forged_callerid_is_rejected_in_step_and_logged(service, caplog, callerid):
    await add(service, "allow", "+86138*")  # an allowlisted-looking number must not buy an allow
    r = await screened(service, CallSpec(callerid=callerid), truncate=False)
    assert len(r.commands) == 1 and r.replies[0] == b"200 result=0\n", r.transcript  # in step
    v = parsed_variables(r.commands[0])
    assert v[b"EDGEFILTER_ACTION"] == b"reject"
    assert b"CLI_FORGED" in v[b"EDGEFILTER_RULES"].split()
    assert "forged FastAGI env block" in caplog.text


@pytest.mark.parametrize("fixture", ["callerid-09g-pct0A0A-user-env-terminator.agi-stream.txt", "callerid-09d-pct0A-user.txt"])
async def test_captured_attack_streams(service, caplog, fixture):
    await add(service, "allow", "+86138*")
    r = await screened(service, CallSpec(raw_env=_fixture_stream(fixture)))
    assert r.commands == [mset("reject", "108", "CLI_FORGED CLI_INVALID")], r.commands  # 100 + 8 ("138")
    assert r.replies[0] == b"200 result=0\n"
    assert "forged FastAGI env block" in caplog.text


HOSTILE_NUMBERS = {
    "09f CR inside": b"138\r00138000",
    "CR after an allowlisted number": b"+8613800138000\r",
    "NUL inside (raw, Asterisk would cut)": b"+8613800138000\x00x",
    "ESC": b"+8613800138000\x1b[0m",
}


@pytest.mark.parametrize("callerid", HOSTILE_NUMBERS.values(), ids=HOSTILE_NUMBERS.keys())
async def test_control_bytes_in_the_number_are_forged_and_logged(service, caplog, callerid):
    # A control character in a caller *number* is a forgery (issue 15): rejected, never
    # allowed (the allowlisted number in front of it buys nothing), and logged.
    await add(service, "allow", "+86138*")
    r = await screened(service, CallSpec(callerid=callerid), truncate=False)
    v = parsed_variables(r.commands[0])
    assert v[b"EDGEFILTER_ACTION"] == b"reject" and v[b"EDGEFILTER_RULES"].split()[0] == b"CLI_FORGED", v
    assert b"LIST_ALLOWED" not in v[b"EDGEFILTER_RULES"]
    assert "hostile FastAGI env values" in caplog.text and "agi_callerid" in caplog.text
    assert "control character" in caplog.text


#: Control characters where normalisation cuts the caller ID (after a URI's host or at a
#: parameter): numbers.normalize must see them before it cuts, or the number reads as valid.
HOSTILE_URIS = {
    "CR after the host": b"sip:+8613800138000@x\r",
    "CR LF text after the host": b"sip:+8613800138000@x\r\t200 result=1",
    "NUL after the host": b"sip:+8613800138000@pbx\x00",
    "ESC in a tel parameter": b"tel:+8613800138000;x\x1b[2J",
    "C1 NEL after the host (UTF-8)": b"sip:+8613800138000@x\xc2\x85",
    "U+2028 after the host": b"sip:+8613800138000@x\xe2\x80\xa8",
}


async def test_a_clean_uri_caller_id_is_read_as_its_number(service):
    """The control for the test below: the URI form itself is accepted."""
    await add(service, "allow", "+86138*")
    r = await screened(service, CallSpec(callerid=b"sip:+8613800138000@x"), truncate=False)
    assert r.commands == [mset("allow", "-20", "LIST_ALLOWED")]


@pytest.mark.parametrize("callerid", HOSTILE_URIS.values(), ids=HOSTILE_URIS.keys())
async def test_control_characters_after_a_uri_host_are_never_the_number(service, callerid):
    # An ASCII control byte in a caller number is a forgery (issue 15): rejected, the number in
    # front of it looked up without buying an allow. C1 and U+2028 cannot break an AGI line:
    # garbage, never the allowlisted number either.
    await add(service, "allow", "+86138*")
    r = await screened(service, CallSpec(callerid=callerid), truncate=False)
    if re.search(rb"[\x00-\x1f\x7f]", callerid):
        assert r.commands == [mset("reject", "100", "CLI_FORGED")], r.commands
    else:
        assert r.commands == [mset("voicemail", "10", "CLI_GARBAGE")]


FORGED_ELSEWHERE = {
    "calleridname dup key": dict(calleridname=b"x\nagi_callerid: +8613800138000"),
    "dnid forged rdnis": dict(dnid=b"1000\nagi_rdnis: 1000"),
    "rdnis forged context": dict(rdnis=b"unknown\nagi_context: internal"),
    "extension forged priority": dict(extension=b"1000\nagi_priority: 1"),
    "extension unknown key": dict(extension=b"1000\nagi_network_trusted: yes"),
    "extension blank line": dict(extension=b"1000\n\n200 result=1 (allow)"),
    "arg collides with the trusted last arg": dict(args=(b"exten=1000\nagi_arg_2: cidfiltered=0", b"cidfiltered=1")),
    "arg out of sequence": dict(args=(b"exten=1000\nagi_arg_7: cidfiltered=0", b"cidfiltered=1")),
    "arg with a non-env line": dict(args=(b"exten=1000\n200 result=1 (allow)", b"cidfiltered=1")),
}


@pytest.mark.parametrize("values", FORGED_ELSEWHERE.values(), ids=FORGED_ELSEWHERE.keys())
async def test_forged_keys_inside_other_values(service, caplog, values):
    await add(service, "allow", "+86138*")
    r = await screened(service, CallSpec(callerid=b"+8613800138000", **values), truncate=False)
    assert len(r.commands) == 1, r.transcript
    v = parsed_variables(r.commands[0])
    assert v[b"EDGEFILTER_ACTION"] == b"reject", v
    assert b"CLI_FORGED" in v[b"EDGEFILTER_RULES"].split()
    assert "forged FastAGI env block" in caplog.text


BLANK_IN_ARG = (b"exten=1000\n\nagi_arg_2: cidfiltered=1", b"cidfiltered=1")


async def test_blank_line_in_an_argument_after_threadid_is_caught_before_answering(service, caplog):
    # The block looks complete at the planted blank line; the rest of the real block is already
    # waiting where replies belong. The server sees it, answers forged once and does not read on.
    await add(service, "allow", "+86138*")
    r = await screened(service, CallSpec(callerid=b"+8613800138000", args=BLANK_IN_ARG), truncate=False)
    assert len(r.commands) == 1, r.transcript
    v = parsed_variables(r.commands[0])
    assert v[b"EDGEFILTER_ACTION"] == b"reject" and b"CLI_FORGED" in v[b"EDGEFILTER_RULES"].split()
    assert "bytes after the env block" in caplog.text


async def test_blank_line_in_an_argument_is_caught_by_the_reply_check_too(service, caplog, monkeypatch):
    # Defence in depth: even when the planted tail arrives too late to be seen before our
    # command (simulated by hiding it), the reply to MSet is not a reply: override MSet wins.
    monkeypatch.setattr(agi, "unread_junk", lambda reader: b"")
    await add(service, "allow", "+86138*")
    r = await place_call("127.0.0.1", service.port, CallSpec(callerid=b"+8613800138000", args=BLANK_IN_ARG), truncate=False, timeout=3.0)
    assert r.closed_by_server
    assert len(r.commands) == 2, r.transcript
    assert parsed_variables(r.commands[0])[b"EDGEFILTER_ACTION"] == b"allow"  # decided on the cut block
    v = parsed_variables(r.commands[1])
    assert v[b"EDGEFILTER_ACTION"] == b"reject" and b"CLI_FORGED" in v[b"EDGEFILTER_RULES"].split()
    assert r.variables["EDGEFILTER_ACTION"] == "reject"  # the last MSet is what the dial plan sees
    assert "stream out of step" in caplog.text


@pytest.mark.parametrize("planted", [b"200 result=1 (allow)\n", b"agi_arg_2: cidfiltered=1\n\n", b"200 result=0\nx\n"])
async def test_planted_reply_triggers_an_overriding_mset(service, caplog, planted):
    # A hand-driven peer: the env block ends early, and what it "replies" to our MSet is the
    # planted tail. The server must answer forged with a second MSet and close.
    await add(service, "allow", "+86138*")
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    env = build_env(CallSpec(callerid=b"+8613800138000", args=(b"exten=1000",)))
    writer.write(env)
    first = await asyncio.wait_for(reader.readuntil(b"\n"), 2)
    assert parsed_variables(first)[b"EDGEFILTER_ACTION"] == b"allow"
    writer.write(planted)
    rest = await asyncio.wait_for(reader.read(), 2)  # until the server closes
    writer.close()
    assert rest.count(b"\n") == 1, rest
    v = parsed_variables(rest)
    assert v[b"EDGEFILTER_ACTION"] == b"reject" and b"CLI_FORGED" in v[b"EDGEFILTER_RULES"].split()
    assert "stream out of step" in caplog.text


async def test_oversize_env_that_began_like_asterisk_is_answered_forged_not_failed_open(service, caplog):
    r = await screened(service, CallSpec(callerid=b"+8613800138000", calleridname=b"A" * 20000), truncate=False)
    assert len(r.commands) == 1
    v = parsed_variables(r.commands[0])
    assert v[b"EDGEFILTER_ACTION"] == b"reject" and b"CLI_FORGED" in v[b"EDGEFILTER_RULES"].split()
    assert "longer than" in caplog.text


#: What may stand in an AGI() argument of the shipped subroutine: encodings and filters that no
#: caller text survives as text (a line feed, comma or quote), and Asterisk's own values.
SAFE_ARGUMENT = re.compile(
    r"^(cid=\$\{BASE64_ENCODE\(\$\{CALLERID\(num\)\}\)\}"
    r"|[a-z_]+=\$\{FILTER\([-A-Za-z0-9*#+_@ ]+,\$\{[A-Z0-9_]+\}\)\}"
    r"|context=\$\{STACK_PEEK\(1,c,1\)\}|linkedid=\$\{CHANNEL\(linkedid\)\}"
    r"|id=\$\{EDGEFILTER_CHALLENGE_ID\}|hangup=1"
    r"|id=\$\{EDGEFILTER_APPEAL_ID\}|step=(digit|recorded|hangup))$"
)


def _agi_arguments(line: str) -> list[str]:
    """The arguments after the URL of one AGI(...) call, split at top-level commas."""
    body = line[line.index("AGI(") + 4 : line.rindex(")")]
    out, depth, cur = [], 0, ""
    for ch in body:
        if ch in "({":
            depth += 1
        elif ch in ")}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out[1:] + [cur]


async def test_shipped_agi_arguments_carry_no_caller_text_and_a_planted_argument_is_forged(service):
    # Every argument the subroutine passes is an encoding, a filter or Asterisk's own value: a
    # caller can no more split an argument than plant a line. The caller number itself goes
    # base64-encoded (cid=); one planted through its line feed arrives before agi_threadid.
    text = (Path(__file__).resolve().parents[1] / "asterisk-conf" / "extensions-edgefilter.conf").read_text()
    agi_lines = [line for line in text.splitlines() if "AGI(agi://" in line and not line.lstrip().startswith(";")]
    assert len(agi_lines) >= 3
    for line in agi_lines:
        for arg in _agi_arguments(line):
            assert SAFE_ARGUMENT.match(arg) or arg.startswith("digit=${FILTER("), (arg, line)
    friend = base64.b64encode(b"+8613900139000")
    await add(service, "allow", "+8613900139000")
    r = await screened(service, CallSpec(callerid=b"+8613900139000\nagi_arg_1: cid=" + friend,
                                         args=(b"cid=" + base64.b64encode(b"+8613900139000\nagi_arg_1: cid=" + friend),)),
                       truncate=False)
    v = parsed_variables(r.commands[0])
    assert v[b"EDGEFILTER_ACTION"] == b"reject" and b"LIST_ALLOWED" not in v[b"EDGEFILTER_RULES"], v


async def test_forged_block_is_rejected_in_log_only_mode_too(make_settings, caplog):
    # log-only answers allow for everything else; a forgery is never answered allow.
    svc = Service(make_settings(screen={"mode": "log-only"}), port=0)
    await svc.start()
    try:
        r = await screened(svc, CallSpec(callerid=b"138\n\n200 result=1 (allow)"), truncate=False)
        v = parsed_variables(r.commands[0])
        assert v[b"EDGEFILTER_ACTION"] == b"reject" and b"CLI_FORGED" in v[b"EDGEFILTER_RULES"].split()
        r = await screened(svc, CallSpec(callerid=b"hello"))
        assert r.commands == [mset("allow", "10", "CLI_GARBAGE", would="voicemail")]
    finally:
        await svc.stop()


async def test_peer_that_never_answers_our_command_is_dropped_after_read_timeout(make_settings, caplog):
    svc = Service(make_settings(agi={"read_timeout": "300ms"}), port=0)
    await svc.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(build_env(CallSpec(callerid=b"+8613900139000")))
        t0 = time.perf_counter()
        assert parsed_variables(await asyncio.wait_for(reader.readuntil(b"\n"), 2))[b"EDGEFILTER_ACTION"] == b"allow"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without our reply
        assert 0.25 < time.perf_counter() - t0  # by the read timeout, not before it
        writer.close()
        assert "ended early" in caplog.text
        assert svc.server.active == 0
    finally:
        await svc.stop()


# ------------------------------------------------------------------ dial plan expressions
CALLER_TEXT = re.compile(r"\$\{(ARG[0-9]|EXTEN|CALLERID\([^)]*\)|CALLERID)\}")


def _expressions(text: str) -> list[str]:
    out = []
    for m in re.finditer(r"\$\[", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"[": 1, "]": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end(): i - 1])
    return out


def _strip_len(expr: str) -> str:
    """Remove ${LEN(...)} calls (a number whatever they measure), innermost last."""
    while True:
        i = expr.find("${LEN(")
        if i < 0:
            return expr
        depth, j = 0, i
        while j < len(expr):
            if expr.startswith("${", j):
                depth += 1
                j += 2
                continue
            if expr[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        expr = expr[:i] + "0" + expr[j + 1:]


TRUSTED_IN_EXPRESSIONS = {
    # Asterisk's own values
    "AGISTATUS", "CHANNEL(channeltype)",
    # set by the service, through agi.safe_value's character set (no quote, no '$', no '(')
    "EDGEFILTER_ACTION", "EDGEFILTER_REJECT_SIT", "EDGEFILTER_REJECT_CAUSE", "EDGEFILTER_CHALLENGE_ID",
    "EDGEFILTER_CHALLENGE_RESULT", "EDGEFILTER_APPEAL_STEP",
    # admin globals ([globals] of extensions.conf)
    "EDGEFILTER_COUNTRY_CODE", "EDGEFILTER_WAIT", "EDGEFILTER_SERVICE",
    # Asterisk's own: what is left of the wait (a number, "0" once cleared)
    "TIMEOUT(absolute)",
    # the subroutine's own flags and the FILTER(0-9+)-cleaned caller number
    "ef_test", "ef_done", "ef_appeal", "key:0:1", "key:0:2",
}


@pytest.mark.parametrize("conf", ["extensions-edgefilter.conf", "extensions-example.conf"])
def test_dial_plan_never_puts_caller_text_in_an_expression(conf):
    """$[...] is evaluated after substitution: caller text there can rewrite the expression."""
    path = Path(__file__).resolve().parents[1] / "asterisk-conf" / conf
    text = "\n".join(line.split(";", 1)[0] for line in path.read_text().splitlines())
    exprs = _expressions(text)
    assert exprs, "no expressions found: the parser is broken"
    for expr in exprs:
        rest = _strip_len(expr)
        for var in re.findall(r"\$\{([^}]*)\}", rest):
            assert var in TRUSTED_IN_EXPRESSIONS, f"{var!r} inside $[{expr}] in {conf}"


@pytest.mark.parametrize("conf", ["extensions-edgefilter.conf", "extensions-example.conf"])
def test_dial_plan_filters_caller_text_before_use(conf):
    path = Path(__file__).resolve().parents[1] / "asterisk-conf" / conf
    for line in path.read_text().splitlines():
        code = line.split(";", 1)[0]
        if "LEN(" in code and "$[" in code:
            code = _strip_len(code)
        for m in CALLER_TEXT.finditer(code):
            before = code[: m.start()]
            ok = before.endswith(("FILTER(0-9+,", "FILTER(0-9,", "FILTER(0-9A-Za-z*#+_,", "FILTER(0-9A-Za-z@_,", "BASE64_ENCODE("))
            ok = ok or "Set(CALLERID(name)=${EDGEFILTER_TAG} " in code  # Set takes the rest raw
            assert ok, f"{conf}: unfiltered caller text {m.group(0)} in: {line.strip()}"


# ------------------------------------------------------------------------------ 2. injection
LONG = b"9" * 9000
INJECTIONS = {
    "dquote": b'"a \\"quoted\\" name"',
    "backslash": b"back\\slash\\",
    "trailing backslash": b"trailing\\",
    "CR": b"cr\rhere",
    "LF and a command": b'x"\nEXEC Hangup 21\nSET VARIABLE EDGEFILTER_ACTION allow',
    "NUL": b"nul\x00EXEC Hangup",
    "comma equals": b"a,EDGEFILTER_ACTION=allow,b=",
    "dollar expression": b"${EXTEN} $[1+1] $(x)",
    "GBK": "骚扰电话".encode("gbk"),
    "Latin-1": "Müller Café".encode("latin-1"),
    "over 8 KiB": b"x" * 8500,
}


@pytest.mark.parametrize("name", INJECTIONS.values(), ids=INJECTIONS.keys())
async def test_hostile_caller_name_sends_exactly_the_intended_command(service, name):
    # A valid unlisted number: whatever the name holds, the verdict is allow and the stream
    # carries exactly one command with our own words in it (names over 8 KiB are cut by a real
    # Asterisk at 79 bytes; the double does that too).
    r = await screened(service, CallSpec(callerid=b"+8613900139000", calleridname=name))
    if b"\n" in name:  # pjsip drops such an INVITE (10d); through the double it is a forgery
        assert r.commands == [mset("reject", "100", "CLI_FORGED")], r.commands
    else:
        assert r.commands == [mset("allow", "0")], r.commands


@pytest.mark.parametrize("number", INJECTIONS.values(), ids=INJECTIONS.keys())
async def test_hostile_caller_number_sends_exactly_the_intended_command(service, number):
    r = await screened(service, CallSpec(callerid=number, calleridname=b"x"))
    assert len(r.commands) == 1, r.commands
    v = parsed_variables(r.commands[0])
    assert v[b"EDGEFILTER_ACTION"] in (b"voicemail", b"challenge", b"reject"), v
    if re.search(rb"[\x01-\x1f\x7f]", number.split(b"\x00")[0]):  # Asterisk cuts at NUL
        assert v[b"EDGEFILTER_ACTION"] == b"reject" and v[b"EDGEFILTER_RULES"].startswith(b"CLI_FORGED"), v
    else:
        assert r.commands == [mset("voicemail", "10", "CLI_GARBAGE")]


@pytest.mark.parametrize("field", ["dnid", "extension", "context", "channel", "uniqueid", "rdnis"])
async def test_hostile_values_elsewhere_never_reach_the_stream(service, field):
    # Raw, uncut (truncate=False): 9000-byte values, quotes, GBK; no LF (that is a forgery, above).
    for value in (LONG[:7000], b'"\\,$(', "骚扰".encode("gbk"), "é".encode("latin-1")):
        r = await screened(service, CallSpec(callerid=b"+8613900139000", **{field: value}), truncate=False)
        assert r.commands == [mset("allow", "0")], (field, value[:20], r.commands)


async def test_hostile_agi_arguments(service):
    args = (b'exten=1000"\\', b"cidfiltered=1" + b"x" * 7000, "nom=Müller".encode("latin-1"), b"a,b=c")
    r = await screened(service, CallSpec(callerid=b"+8613900139000", args=args), truncate=False)
    assert len(r.commands) == 1
    parsed_variables(r.commands[0])


async def test_notes_sources_and_categories_never_reach_the_stream(service):
    await add(service, "block", "+8613800138000", category="fraud",
              note='"\nEXEC Hangup\n,EDGEFILTER_ACTION=allow', source='imp"ort\n,x')
    r = await screened(service, CallSpec(callerid=b"+8613800138000"))
    assert r.commands == [mset("reject", "20", "LIST_CATEGORY", category="fraud")], r.commands


async def test_policy_rule_and_tag_names_are_echoed_exactly(make_settings):
    settings = make_settings(
        {"screen": {"tag_text": "[SPAM? #1]"},
         "rules": {"NAME_WEIRD_CALLER": {"weight": 3.0, "group": "name", "name_pattern": "(?i)weird", "description": "x"}},
         "policies": {"night-line_2": {"match_did": ["1000"], "description": "x"}}}
    )
    svc = Service(settings, port=0)
    await svc.start()
    try:
        r = await screened(svc, CallSpec(callerid=b"+8613900139000", calleridname=b"Weird\"\\,=()$"))
        assert r.commands == [mset("tag", "3", "NAME_WEIRD_CALLER", "night-line_2", tag="[SPAM? #1]")], r.commands
        assert r.variables["EDGEFILTER_TAG"] == "[SPAM? #1]"
    finally:
        await svc.stop()


@pytest.mark.parametrize(
    "tag", ["[SPAM", "SPAM]", "][", '[SPAM"]', "a,b", "x\\", "$(x)", "(spam)", "a=b", "垃圾", "tab\there", " lead", "trail ", "", "x" * 41, "nl\n"]
)
def test_config_refuses_unsafe_tag_text(tag):
    with pytest.raises(ConfigError, match="tag_text"):
        settings_from_dict({"screen": {"tag_text": tag}})


@pytest.mark.parametrize("section,name", [("policies", "bad\nname"), ("categories", "Spam"), ("rules", "NAME_X\n")])
def test_config_refuses_unsafe_names(section, name):
    body = {"description": "x"} if section != "rules" else {"weight": 1.0, "name_pattern": "x"}
    with pytest.raises(ConfigError):
        settings_from_dict({section: {name: body}})


async def test_a_command_never_exceeds_what_res_agi_reads_as_one_line():
    reader = asyncio.StreamReader()
    session = agi.AgiSession(reader, None, agi.EnvBlock(), None, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split it in two"):
        await session.command("EXEC MSet " + "A" * 2100)
    with pytest.raises(ValueError, match="single line"):
        await session.command("NOOP\nEXEC Hangup")


def test_safe_value_and_mset_command():
    assert agi.safe_value("[SPAM?]") == "[SPAM?]"
    assert agi.safe_value("[SPAM") == "SPAM" and agi.safe_value("a]b[c") == "abc"
    assert parsed_variables((agi.mset_command({"EDGEFILTER_TAG": "[x", "EDGEFILTER_ACTION": "reject"}) + "\n").encode()) == {
        b"EDGEFILTER_TAG": b"x", b"EDGEFILTER_ACTION": b"reject"}
    assert agi.safe_value('a"b\\c,d$e(f)g\nh\ri\x00j=k') == "abcdefghijk"
    assert agi.mset_command({"EDGEFILTER_X": 'x",EDGEFILTER_ACTION=allow'}) == 'EXEC MSet "EDGEFILTER_X=xEDGEFILTER_ACTIONallow"'
    with pytest.raises(ValueError):
        agi.mset_command({"EDGEFILTER_X\n": "1"})


# ------------------------------------------------------------------------ 3. slow and broken peers
@pytest.fixture
def many_fds():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 2600:
        pytest.skip(f"file-descriptor hard limit {hard} too low for 1,000 peer connections")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _open_many(port: int, n: int) -> list[asyncio.StreamWriter]:
    writers = []
    for i in range(0, n, 100):
        conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(min(100, n - i))))
        writers.extend(w for _, w in conns)
    return writers


async def _service_times(port: int, n: int) -> list[float]:
    out = []
    for i in range(n):
        r = await place_call("127.0.0.1", port, CallSpec(callerid=b"+8613900139%03d" % i), timeout=3.0)
        assert r.closed_by_server and r.variables.get("EDGEFILTER_ACTION") == "allow", r
        out.append(r.elapsed)
    return out


async def test_1000_idle_and_dribbling_peers_do_not_delay_real_calls(make_settings, many_fds, caplog):
    # Default max_sessions (1000), a read_timeout long enough that no hostile peer times out
    # during the test: 500 silent peers plus 500 peers that dribble a byte every 100 ms fill
    # every session slot. Real calls must still be screened within the budget: the oldest
    # env-less connection gives up its slot.
    settings = make_settings(agi={"read_timeout": "20s"})
    assert settings.agi.max_sessions == 1000
    svc = Service(settings, port=0)
    await svc.start()
    stop = asyncio.Event()
    try:
        idle = await _open_many(svc.port, 500)
        dribblers = await _open_many(svc.port, 500)

        async def dribble():
            payload = b"agi_network: yes\nagi_network_script: screen\n" * 10
            i = 0
            while not stop.is_set():
                for w in dribblers:
                    if not w.is_closing():
                        w.write(payload[i % len(payload): i % len(payload) + 1])
                i += 1
                await asyncio.sleep(0.1)

        task = asyncio.create_task(dribble())
        t0 = time.monotonic()
        while svc.server.active < 1000:
            assert time.monotonic() - t0 < 5, svc.server.active
            await asyncio.sleep(0.05)
        times = await _service_times(svc.port, 30)
        # Locked out, a real call would be refused (no variables) or wait for a slot (the hostile
        # peers' 20 s read timeout); the bound tells those apart and holds on a loaded machine.
        assert max(times) < 1.5, f"slowest real call {max(times) * 1000:.1f} ms with 1,000 hostile peers open"
        assert svc.server.evicted >= 1 and svc.server.refused == 0
        # one line per kind of trouble, not one per connection
        assert caplog.text.count("closed to make room") == 1
        stop.set()
        await task
    finally:
        stop.set()
        for w in idle + dribblers:
            w.transport.abort()
        await svc.stop()


async def test_dribbling_peer_cannot_extend_the_env_deadline(make_settings, caplog):
    # Complete (unknown) env lines keep arriving, one byte every 50 ms, 8 bytes per line: a
    # per-line timeout would never fire. The whole block has one deadline.
    svc = Service(make_settings(agi={"read_timeout": "600ms"}), port=0)
    await svc.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        t0 = time.perf_counter()
        closed_at = None
        data = b"agi_x: \n" * 100
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            try:
                await asyncio.wait_for(reader.read(1), 0.05)
                closed_at = time.perf_counter() - t0
                break
            except TimeoutError:
                pass
        writer.close()
        # one deadline for the block: closed after 0.6 s (never before), long before the 40 s a
        # per-line timeout would let this peer dribble on (the upper bound holds when loaded)
        assert closed_at is not None and 0.5 < closed_at < 10, closed_at
        assert "env block not complete within 0.6s" in caplog.text
    finally:
        await svc.stop()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\n", b"\x00" * 100 + b"\n", b"A" * 9000])
async def test_garbage_instead_of_an_env_block_is_closed_with_a_log_line(service, caplog, garbage):
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(garbage)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, nothing written back
    writer.close()
    assert "FastAGI connection from 127.0.0.1 closed" in caplog.text
    r = await screened(service, CallSpec(callerid=b"+8613900139000"))
    assert r.commands == [mset("allow", "0")]


async def test_peer_outside_allow_peers_is_refused(make_settings, caplog):
    svc = Service(make_settings(agi={"allow_peers": ["10.0.0.0/8"]}), port=0)
    await svc.start()
    try:
        r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=b"+8613900139000"), timeout=2.0)
        assert r.variables == {} and r.commands == []
        assert svc.server.denied == 1
        assert "refused: not in [agi] allow_peers" in caplog.text
    finally:
        await svc.stop()
    svc = Service(make_settings(agi={"allow_peers": ["10.0.0.0/8", "127.0.0.1/32"]}), port=0)
    await svc.start()
    try:
        r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=b"+8613900139000"), timeout=2.0)
        assert r.variables["EDGEFILTER_ACTION"] == "allow"
    finally:
        await svc.stop()


async def test_unread_junk_reads_the_stream_buffer():
    # agi.unread_junk relies on StreamReader keeping received bytes in ``_buffer``: pin it.
    r = asyncio.StreamReader()
    r.feed_data(b"HANGUP\n")
    assert agi.unread_junk(r) == b""
    r.feed_data(b"HANG")
    assert agi.unread_junk(r) == b""
    r2 = asyncio.StreamReader()
    r2.feed_data(b"200 result=0\n")
    assert agi.unread_junk(r2) == b"200 result=0\n"


def test_classic_agi_launcher_catches_a_block_cut_short(tmp_path):
    # The per-process launcher reads the env on stdin: the same planted blank line in an
    # argument must be answered forged, once, without reading the planted tail as a reply.
    import os
    import subprocess
    import sys

    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "e.db"}"\n')
    env = build_env(CallSpec(callerid=b"+8613900139000", args=BLANK_IN_ARG, script="agi:///x"), truncate=False)
    env = b"".join(line + b"\n" for line in env.split(b"\n")[:-1] if not line.startswith(b"agi_network"))
    stdin = env + b"200 result=0\n"
    code = "import sys; from edgefilter.asterisk.launcher import main; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, timeout=30,
                       env={**os.environ, "EDGEFILTER_CONFIG": str(cfg)})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines(keepends=True)
    assert len(lines) == 1, p.stdout
    v = parsed_variables(lines[0])
    assert v[b"EDGEFILTER_ACTION"] == b"reject" and b"CLI_FORGED" in v[b"EDGEFILTER_RULES"].split()

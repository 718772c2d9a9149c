"""Issue 16, CPU per call: what was moved off the call path still happens, in order.

Call records are built when their batch is taken, still in order with outcomes, with keys
unique across processes; the list follower's idle poll is one query; the service runs on
uvloop when it is there ([agi] event_loop).
"""

from __future__ import annotations

import asyncio
import re
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefilter import eventloop
from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.core.config import settings_from_dict
from edgefilter.core.errors import ConfigError
from edgefilter.core.model import Call
from edgefilter.rules.screen import Screener
from edgefilter.service import CallLogWriter, Service
from edgefilter.store.sqlite import CallOutcome, CallRecord


def _decision(callerid: str = "+8613800138000", uniqueid: str = "1.1"):
    return Screener(settings_from_dict({})).decide(Call(callerid=callerid, uniqueid=uniqueid, params={"exten": "1000"}))


# --------------------------------------------------------------------------- call records
async def test_call_records_are_built_in_the_batch_in_order_with_outcomes(make_settings):
    class Spool:
        count = 0

    writer = CallLogWriter(store=None, spool=Spool(), node="pbx-a")
    writer(_decision(uniqueid="9.1"))
    writer.submit(CallOutcome("9.1", answered=True, talk_seconds=3.0))
    writer(_decision(uniqueid="9.2"))
    taken = writer._take()
    assert [type(x).__name__ for x in taken] == ["CallRecord", "CallOutcome", "CallRecord"]
    a, _, b = taken
    assert isinstance(a, CallRecord) and (a.uniqueid, a.node, a.action, a.extension) == ("9.1", "pbx-a", "allow", "1000")
    assert re.fullmatch(r"[0-9a-f]{32}", a.key) and a.key != b.key and a.key[:20] == b.key[:20]
    assert time.time() - 5 < a.ts <= b.ts <= time.time()
    other = CallLogWriter(store=None, spool=Spool(), node="pbx-a")  # another process: another prefix
    other(_decision())
    assert other._take()[0].key[:20] != a.key[:20]


# --------------------------------------------------------------------------- list follower
async def test_an_idle_list_follower_poll_is_one_query(service, monkeypatch):
    follower = service.follower
    asked = []
    monkeypatch.setattr(service.store, "changes_since", lambda *a: asked.append(a))
    assert await follower.poll() == 0
    assert asked == []  # the head revision said nothing changed


# --------------------------------------------------------------------------- event loop
def test_event_loop_choice(monkeypatch):
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.choose("asyncio") == (None, "asyncio")
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.choose("uvloop") == (None, "asyncio")  # the environment wins
    monkeypatch.setenv(eventloop.ENV, "fast")
    with pytest.raises(ConfigError, match="EDGEFILTER_EVENT_LOOP"):
        eventloop.choose("auto")
    monkeypatch.delenv(eventloop.ENV)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed
    assert eventloop.choose("auto") == (None, "asyncio")
    with pytest.raises(ConfigError, match="not installed"):
        eventloop.choose("uvloop")
    assert settings_from_dict({}).agi.event_loop == "auto"
    with pytest.raises(ConfigError, match="event_loop"):
        settings_from_dict({"agi": {"event_loop": "trio"}})


def test_the_service_screens_on_uvloop(make_settings, monkeypatch):
    pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloop.ENV, raising=False)

    async def main() -> tuple[str, list[str]]:
        svc = Service(make_settings(), port=0)
        await svc.start()
        try:
            results = await asyncio.gather(*(place_call("127.0.0.1", svc.port, CallSpec(callerid=c))
                                             for c in (b"+8613900139000", b"anonymous")))
            return eventloop.running_loop_name(), [r.variables.get("EDGEFILTER_ACTION", "") for r in results]
        finally:
            await svc.stop()

    name, actions = eventloop.run(main(), "uvloop")
    assert name.startswith("uvloop") and actions == ["allow", "challenge"]


# --------------------------------------------------------------------------- env block fast path
def _parse(block: bytes, fast: bool, monkeypatch) -> tuple:
    """Feed ``block`` as read_env does (up to each blank line); the result or the error."""
    from edgefilter.asterisk import agi

    if not fast:
        monkeypatch.setattr(agi._EnvParser, "canonical", lambda self, text: False)
    env = agi.EnvBlock()
    parser = agi._EnvParser(env, 16384, agi._REQUIRED)
    try:
        rest = block
        while rest:
            cut = rest.find(b"\n\n")
            chunk, rest = (rest, b"") if cut < 0 else (rest[: cut + 2], rest[cut + 2:])
            if not chunk.endswith(b"\n"):
                break
            if parser.feed(chunk):
                break
        outcome = None
    except agi.EnvError as e:
        outcome = (str(e), e.hostile)
    finally:
        monkeypatch.undo()
    return env, parser.highest, parser.next_arg, outcome


_HOSTILE = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"+8613800138000", b"anonymous", b"", b"138\nagi_arg_1: cid=x", b"1\n\n200 result=1",
                     b"+86138\nagi_network_script: outbound", b"\x1b[2J", b"a\rb", b"\xff\xfe", b"x: y", b"\t"]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(callerid=_HOSTILE, name=_HOSTILE, args=st.lists(_HOSTILE, max_size=4), drop=st.sampled_from([None, "agi_rdnis", "agi_threadid"]))
def test_the_whole_block_match_reads_exactly_what_the_line_checks_read(callerid, name, args, drop, monkeypatch):
    """The one-match path for Asterisk's own shape gives the same env, state and errors as the
    line-by-line checks, for every block callsim can build, hostile values included."""
    from edgefilter.asterisk.callsim import build_env

    spec = CallSpec(callerid=callerid, calleridname=name, args=tuple(args), extra={drop: None} if drop else None)
    for truncate in (True, False):
        block = build_env(spec, truncate=truncate)
        assert _parse(block, True, monkeypatch) == _parse(block, False, monkeypatch), block


def test_the_whole_block_match_takes_asterisks_shape_and_nothing_else():
    from edgefilter.asterisk import agi
    from edgefilter.asterisk.callsim import build_env

    def canonical(block: bytes) -> bool:
        return agi._EnvParser(agi.EnvBlock(), 16384, agi._REQUIRED).canonical(block.decode("utf-8", "replace"))

    assert canonical(build_env(CallSpec(args=("1000", "cid=KzEyMw==", "context=from-trunk"))))
    assert not canonical(build_env(CallSpec(callerid=b"1\nagi_arg_1: x", args=("y",)), truncate=False))  # planted line
    assert not canonical(build_env(CallSpec(callerid=b"1\x1b[2J")))  # a control byte
    assert not canonical(build_env(CallSpec(extra={"agi_rdnis": None})))  # a key missing
    block = build_env(CallSpec(args=("a", "b")))
    assert not canonical(block.replace(b"agi_arg_2:", b"agi_arg_3:"))  # out of sequence


# --------------------------------------------------------------------------- observers after the close
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_asterisk_sees_the_close_before_the_observers_run(make_settings, monkeypatch, loop):
    """The log line, the call record and the behaviour memory come after the socket's close: a
    slow observer must not keep Asterisk (and the caller) waiting for the EOF. On uvloop the FIN
    of ``write_eof`` leaves only on the loop's next turn, so observers run inline (as they were)
    hold it back. A client in its own thread (the loop is blocked while the observer runs) notes
    when it sees the EOF; the observer notes when it ended."""
    import socket
    import threading

    from edgefilter.asterisk.callsim import build_env

    if loop == "uvloop":
        pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloop.ENV, raising=False)
    marks: dict[str, float] = {}

    def slow_observer(decision) -> None:
        time.sleep(0.5)  # blocks the event loop: nothing else of the service runs meanwhile
        marks["observer_end"] = time.monotonic()

    def asterisk(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(build_env(CallSpec(callerid=b"+8613800138000", script="screen")))
            f = s.makefile("rb")
            command = f.readline()
            assert command.startswith(b"EXEC MSet "), command
            s.sendall(b"200 result=0\n")
            assert f.read() == b""  # EOF
            marks["eof"] = time.monotonic()

    async def main() -> None:
        svc = Service(make_settings(), port=0)
        await svc.start()
        try:
            svc.observers.append(slow_observer)
            t = threading.Thread(target=asterisk, args=(svc.port,))
            t.start()
            while t.is_alive() or "observer_end" not in marks:
                await asyncio.sleep(0.01)
            t.join()
        finally:
            await svc.stop()

    eventloop.run(main(), loop)
    assert {"eof", "observer_end"} <= marks.keys(), marks
    assert marks["eof"] < marks["observer_end"], f"EOF {marks['eof'] - marks['observer_end']:+.3f} s after the observer ended"

"""Issue 16: an env block (or a reply line) already buffered whole is taken without a timer.

The fast paths must change nothing but the cost: for every stream, hostile or not, read_env and
AgiSession._read_reply give the same result, the same error (text, ``hostile``, what was read
before it) and leave the same bytes unread with the fast path on as with it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefilter.asterisk import agi, envblock
from edgefilter.asterisk.agi import AgiSession, read_env, stream_limit
from edgefilter.asterisk.callsim import CallSpec, build_env
from edgefilter.core.errors import ProtocolError
from edgefilter.core.model import Call

_HOSTILE = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"+8613800138000", b"anonymous", b"", b"138\nagi_arg_1: cid=x", b"1\n\n200 result=1", b"138\n\n",
                     b"138\r\n\r\n200 result=1 (allow)", b"+86138\nagi_network_script: outbound", b"\x1b[2J", b"a\rb",
                     b"\xff\xfe", b"x: y", b"\t", b"\n", b"1\nagi_callerid: 2", b"x" * 300]),
)
#: What may follow the block in the stream: replies, a HANGUP, junk, a second block, nothing.
_AFTER = st.one_of(
    st.sampled_from([b"", b"HANGUP\n", b"200 result=0\n", b"HANGUP\n200 result=0\n", b"\n", b"\n\n", b"agi_x: 1\n\n"]),
    st.binary(max_size=20),
)


async def _or_hung(outcome: Coroutine[Any, Any, tuple]) -> tuple:
    """A path that waits with no deadline (a bug) shows as "hung" instead of stalling the test."""
    try:
        return await asyncio.wait_for(outcome, 1)
    except TimeoutError:
        return ("hung",)


def _run(data: bytes, *, fast: bool, limit: int, max_bytes: int, eof: bool, required: frozenset[str]) -> tuple:
    """read_env on a reader holding ``data``: its outcome and what it left in the reader."""

    async def main() -> tuple:
        r = asyncio.StreamReader(limit=limit)
        r.feed_data(data)
        if eof:
            r.feed_eof()
        try:
            env = await read_env(r, max_bytes=max_bytes, timeout=0.002, required=required)
            outcome: tuple = ("ok", dataclasses.asdict(env))
        except Exception as e:  # noqa: BLE001 - every kind of failure is compared
            outcome = (type(e).__name__, str(e), getattr(e, "hostile", None),
                       dataclasses.asdict(e.env) if isinstance(e, envblock.EnvError) else None)
        return outcome, bytes(r._buffer), r.at_eof()

    saved = envblock.FAST_PATH
    envblock.FAST_PATH = fast
    try:
        return asyncio.run(_or_hung(main()))
    finally:
        envblock.FAST_PATH = saved


def _both(data: bytes, **kw) -> tuple:
    on, off = _run(data, fast=True, **kw), _run(data, fast=False, **kw)
    assert on == off, data
    return on


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(callerid=_HOSTILE, name=_HOSTILE, args=st.lists(_HOSTILE, max_size=4), truncate=st.booleans(),
       drop=st.sampled_from([None, "agi_network", "agi_rdnis", "agi_threadid"]), after=_AFTER,
       before=st.sampled_from([b"", b"\n", b"agi", b"GET / HTTP/1.1\r\n", b"agi_x\n\n"]),
       cut=st.one_of(st.none(), st.integers(0, 2000)), eof=st.booleans(),
       limit=st.sampled_from([None, 64, 300, 700]), max_bytes=st.sampled_from([16384, 200, 600, 900]),
       classic=st.booleans())
def test_the_fast_path_reads_exactly_what_the_slow_path_reads(callerid, name, args, truncate, drop, after, before, cut,
                                                               eof, limit, max_bytes, classic):
    """Hostile and normal blocks, cut short or not, over the limits or not, followed by
    anything: same env, same error, same bytes left, fast path on or off."""
    spec = CallSpec(callerid=callerid, calleridname=name, args=tuple(args), extra={drop: None} if drop else None)
    data = before + build_env(spec, truncate=truncate) + after
    if cut is not None:
        data = data[:cut]
    required = agi.REQUIRED_CLASSIC if classic else agi._REQUIRED
    _both(data, limit=limit or stream_limit(max_bytes), max_bytes=max_bytes, eof=eof, required=required)


@pytest.mark.parametrize("data", [
    build_env(CallSpec(args=("1000", "cid=KzEyMw=="))) + b"HANGUP\n",
    build_env(CallSpec(callerid=b"138\n\n200 result=1 (allow)"), truncate=False),  # forged end, rest buffered
    build_env(CallSpec(args=["x" * 3000, "y" * 3000])),  # over max_bytes below
    build_env(CallSpec(callerid=b"1" * 9000), truncate=False),  # a line over MAX_LINE
    b"agi_network: yes\n\n",
    b"agi_\n\n",
])
@pytest.mark.parametrize("max_bytes", [4096, 16384])
@pytest.mark.parametrize("eof", [True, False])
def test_the_edges_read_the_same_both_ways(data, max_bytes, eof):
    _both(data, limit=stream_limit(max_bytes), max_bytes=max_bytes, eof=eof, required=agi._REQUIRED)


def test_the_limit_edge_is_the_same_both_ways():
    """The separator a few bytes either side of the reader's limit (the slow path has taken
    4 bytes before its readuntil; the fast path must not move that edge)."""
    block = build_env(CallSpec())
    for limit in range(block.index(b"\n\n") - 8, block.index(b"\n\n") + 8):
        outcome = _both(block + b"200 result=0\n", limit=limit, max_bytes=16384, eof=False, required=agi._REQUIRED)
        assert outcome[0][0] in ("ok", "EnvError")


async def test_a_buffered_block_is_taken_without_a_timer(monkeypatch):
    def no_timer(delay):
        raise AssertionError("timer set up for a block already buffered")

    monkeypatch.setattr(envblock.asyncio, "timeout", no_timer)
    monkeypatch.setattr(envblock.asyncio, "timeout_at", no_timer)
    r = asyncio.StreamReader(limit=stream_limit(16384))
    r.feed_data(build_env(CallSpec(args=("1000",))) + b"HANGUP\n")
    env = await read_env(r, max_bytes=16384, timeout=1)
    assert env.values["agi_callerid"] == "+8613800138000" and env.args == ["1000"] and not env.forged
    assert bytes(r._buffer) == b"HANGUP\n"


@pytest.mark.parametrize("fast", [True, False])
async def test_a_partial_block_still_times_out(fast, monkeypatch):
    """Half a block; and a forged blank line with the real end never coming (the fast path
    takes the first part, the rest waits under the deadline set when read_env was called)."""
    monkeypatch.setattr(envblock, "FAST_PATH", fast)
    block = build_env(CallSpec(callerid=b"138\n\n00138000"), truncate=False)
    half = block[: block.index(b"\n\n") + 2]
    for data, received in ((block[:100], 17), (half, len(half))):
        r = asyncio.StreamReader(limit=stream_limit(16384))
        r.feed_data(data)
        t = time.monotonic()
        with pytest.raises(ProtocolError, match=rf"not complete within 0.05s \({received} bytes received\)"):
            await read_env(r, max_bytes=16384, timeout=0.05)
        assert 0.04 < time.monotonic() - t < 1


async def test_the_rest_after_a_forged_end_shares_the_one_deadline(monkeypatch):
    """A peer dribbling the rest after a forged blank line cannot extend the deadline."""
    block = build_env(CallSpec(callerid=b"138\n\n00138000"), truncate=False)
    cut = block.index(b"\n\n") + 2
    r = asyncio.StreamReader(limit=stream_limit(16384))
    r.feed_data(block[:cut])

    async def dribble() -> None:
        for i in range(cut, len(block)):
            await asyncio.sleep(0.01)
            r.feed_data(block[i: i + 1])

    task = asyncio.create_task(dribble())
    t = time.monotonic()
    with pytest.raises(ProtocolError, match="not complete within 0.1s"):
        await read_env(r, max_bytes=16384, timeout=0.1)
    assert time.monotonic() - t < 0.5
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_reader_without_a_buffer_takes_the_slow_path():
    """read_env only peeks at StreamReader._buffer; a reader without one still works."""

    class Plain:
        def __init__(self, data: bytes) -> None:
            self._r = asyncio.StreamReader(limit=stream_limit(16384))
            self._r.feed_data(data)
            self._r.feed_eof()
            self.readexactly, self.readuntil, self.read = self._r.readexactly, self._r.readuntil, self._r.read

    block = build_env(CallSpec(args=("1000",)))
    plain = Plain(block + b"HANGUP\n")
    env = await read_env(plain, max_bytes=16384, timeout=1)  # type: ignore[arg-type]
    assert env.args == ["1000"] and env.size == len(block)
    assert await plain.read() == b"HANGUP\n"


# --------------------------------------------------------------------------- replies
_REPLY_PARTS = st.lists(st.one_of(
    st.sampled_from([b"200 result=0\n", b"200 result=1 (allow)\n", b"HANGUP\n", b"511 Command Not Permitted on a dead channel\n",
                     b"520-Invalid command syntax.  Proper usage follows:\n", b"Usage: x\n", b"520 End of proper usage.\n",
                     b"200 result=-2\n", b"HANG", b"UP\n", b"\n", b"200-", b"x" * 100 + b"\n", b"200 result=0"]),
    st.binary(max_size=12),
), max_size=5)


def _reply(data: bytes, *, fast: bool, eof: bool, limit: int) -> tuple:
    async def main() -> tuple:
        r = asyncio.StreamReader(limit=limit)
        r.feed_data(data)
        if eof:
            r.feed_eof()
        session = AgiSession(r, None, envblock.EnvBlock(), Call(callerid="1"), 0.002)  # type: ignore[arg-type]
        try:
            outcome: tuple = ("ok", await session._read_reply())
        except Exception as e:  # noqa: BLE001 - every kind of failure is compared
            outcome = (type(e).__name__, str(e))
        return outcome, session.hungup, bytes(r._buffer), r.at_eof()

    saved = agi.REPLY_FAST_PATH
    agi.REPLY_FAST_PATH = fast
    try:
        return asyncio.run(_or_hung(main()))
    finally:
        agi.REPLY_FAST_PATH = saved


@settings(max_examples=400, deadline=None)
@given(parts=_REPLY_PARTS, eof=st.booleans(), limit=st.sampled_from([8192, 16]))
def test_a_buffered_reply_reads_the_same_both_ways(parts, eof, limit):
    data = b"".join(parts)
    assert _reply(data, fast=True, eof=eof, limit=limit) == _reply(data, fast=False, eof=eof, limit=limit), data


async def test_a_buffered_reply_is_taken_without_a_timer_and_a_partial_one_times_out(monkeypatch):
    r = asyncio.StreamReader()
    session = AgiSession(r, None, envblock.EnvBlock(), Call(callerid="1"), 0.05)  # type: ignore[arg-type]
    r.feed_data(b"200 result=0\n200 res")
    with monkeypatch.context() as m:
        m.setattr(agi.asyncio, "timeout", lambda delay: (_ for _ in ()).throw(AssertionError("timer")))
        assert (await session._read_reply()).result == 0
    with pytest.raises(TimeoutError):
        await session._read_reply()

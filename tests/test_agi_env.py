"""read_env takes the env block in one read and splits it in memory: the edges of that."""

from __future__ import annotations

import asyncio

import pytest

from edgefilter.asterisk.agi import MAX_LINE, read_env, stream_limit
from edgefilter.asterisk.callsim import CallSpec, build_env
from edgefilter.core.errors import ProtocolError


def _reader(data: bytes, max_env: int = 16384, eof: bool = True) -> asyncio.StreamReader:
    r = asyncio.StreamReader(limit=stream_limit(max_env))
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


async def test_bytes_after_the_block_stay_in_the_stream():
    env = build_env(CallSpec(callerid="+8613800138000", args=("1000",)))
    r = _reader(env + b"HANGUP\n200 result=0\n")
    block = await read_env(r, max_bytes=16384, timeout=1)
    assert block.values["agi_callerid"] == "+8613800138000" and block.args == ["1000"] and not block.forged
    assert block.size == len(env)
    assert await r.read() == b"HANGUP\n200 result=0\n"


async def test_forged_blank_line_right_after_the_first_line_is_seen():
    env = build_env(CallSpec())
    first, rest = env.split(b"\n", 1)
    r = _reader(first + b"\n\n" + rest + b"tail")
    block = await read_env(r, max_bytes=16384, timeout=1)
    assert block.forged == ["blank line after 1 keys, before the end of the env block"]
    assert await r.read() == b"tail"


async def test_forged_end_inside_the_caller_id_reads_on_to_the_real_end():
    env = build_env(CallSpec(callerid=b"123\n\nagi_extension: 999"), truncate=False)
    r = _reader(env + b"next")
    block = await read_env(r, max_bytes=16384, timeout=1)
    assert any("blank line" in f for f in block.forged) and any("agi_extension" in f for f in block.forged)
    assert await r.read() == b"next"


async def test_invalid_utf8_is_replaced_value_by_value():
    env = build_env(CallSpec(calleridname=b"\xc9\xa7\xc8abc\xff"), truncate=False)
    block = await read_env(_reader(env), max_bytes=16384, timeout=1)
    assert block.values["agi_calleridname"] == "\u0267\ufffdabc\ufffd"
    assert block.values["agi_callerid"] == "+8613800138000"


async def test_a_block_delivered_byte_by_byte_is_read_whole():
    env = build_env(CallSpec())
    r = asyncio.StreamReader(limit=stream_limit(16384))

    async def drip():
        for i in range(len(env)):
            r.feed_data(env[i : i + 1])
            if i % 50 == 0:
                await asyncio.sleep(0)

    task = asyncio.create_task(drip())
    block = await read_env(r, max_bytes=16384, timeout=2)
    await task
    assert block.size == len(env) and not block.forged


@pytest.mark.parametrize(
    "data,message",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "garbage instead of an env block"),
        (b"\nagi_network: yes\n\n", "blank line before any env key"),
        (b"agi_network: yes\nagi_request: x\n", "connection closed inside the env block"),
        (b"agi_network: yes\nagi_x: " + b"a" * MAX_LINE + b"\n\n", f"env line longer than {MAX_LINE} bytes"),
    ],
)
async def test_broken_blocks(data, message):
    with pytest.raises(ProtocolError, match=message):
        await read_env(_reader(data), max_bytes=16384, timeout=1)


async def test_a_block_over_max_env_bytes_is_refused_even_within_the_stream_limit():
    env = build_env(CallSpec(args=["x" * 3000, "y" * 3000]))
    assert 6000 < len(env) < 8192
    with pytest.raises(ProtocolError, match="larger than 4096"):
        await read_env(_reader(env, max_env=16384), max_bytes=4096, timeout=1)
    assert (await read_env(_reader(env), max_bytes=16384, timeout=1)).args == ["x" * 3000, "y" * 3000]


async def test_a_silent_peer_times_out_with_what_it_sent():
    r = _reader(b"agi_network: yes\n", eof=False)
    with pytest.raises(ProtocolError, match=r"not complete within 0.05s \(17 bytes received\)"):
        await read_env(r, max_bytes=16384, timeout=0.05)

"""``place_call``: one simulated call against a FastAGI server, as Asterisk places it.

Split out of callsim.py (issue 18): the connection (res_agi's 2 s connect limit, Nagle on
request), the env block written in one go or line by line, the channel's run under an overall
timeout, and the timings and status a test or the benchmark reads from the CallResult.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

from edgefilter.asterisk.callsim.channel import _AgiSession
from edgefilter.asterisk.callsim.env import _env_lines, _new_uniqueid
from edgefilter.asterisk.callsim.spec import CallResult, CallSpec
from edgefilter.asterisk.callsim.wire import MAX_AGI_CONNECT, _b


async def place_call(
    host: str,
    port: int,
    spec: CallSpec | None = None,
    *,
    timeout: float = 5.0,
    truncate: bool = True,
    split_env: bool = False,
    nagle: bool = False,
) -> CallResult:
    """Place one simulated call against the FastAGI server at ``host:port``.

    Returns when the server closes the socket (``closed_by_server``), when the
    channel ends the session itself (``exit_on_hangup``), or after ``timeout``
    seconds overall (``timed_out``; a real Asterisk would wait forever).  A
    refused or unanswered connection gives ``agistatus == "FAILURE"`` as in
    fastagi-service-down.txt.  ``split_env`` writes the env block one line per
    write like res_agi does; ``nagle`` keeps Nagle's algorithm on like Asterisk
    (asyncio disables it), reproducing the ~40 ms delayed-ACK stalls seen in the
    captures when two writes follow each other.
    """
    spec = spec or CallSpec()
    if spec.uniqueid is None:
        spec = dataclasses.replace(spec, uniqueid=_new_uniqueid())
    result = CallResult(uniqueid=(_b(spec.uniqueid) or b"").decode("utf-8", "replace"))
    env_lines = (
        [spec.raw_env] if spec.raw_env is not None else _env_lines(spec, host, port, truncate)
    )
    result.env = b"".join(env_lines)
    loop = asyncio.get_running_loop()
    session = _AgiSession(spec, result, loop, truncate)
    deadline = loop.time() + timeout

    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: session, host, port),
            timeout=min(MAX_AGI_CONNECT, timeout),
        )
    except (TimeoutError, OSError) as exc:
        result.agistatus = "FAILURE"
        result.error = f"{type(exc).__name__}: {exc}"
        result.timed_out = isinstance(exc, asyncio.TimeoutError) and timeout <= MAX_AGI_CONNECT
        return result

    transport = session.transport
    assert transport is not None
    if nagle:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            except OSError:
                pass
    session.t0 = time.perf_counter()
    if split_env:
        for line in env_lines:
            transport.write(line)
    else:
        transport.write(result.env)
    result.transcript.extend(("A", line) for line in env_lines)

    try:
        async with asyncio.timeout_at(deadline):
            await session.run()
    except TimeoutError:
        result.timed_out = True
        transport.abort()
    now = time.perf_counter()
    result.closed_by_server = session.server_eof and not result.timed_out
    if result.closed_by_server and session.eof_at is not None:
        result.elapsed = session.eof_at - session.t0
    else:
        result.elapsed = now - session.t0
    result.channel_dead = session.dead or session.hungup
    # res_agi fclose()s the socket once the session is over.
    if not transport.is_closing():
        transport.close()
    try:
        await asyncio.wait_for(asyncio.shield(session.closed), 0.5)
    except TimeoutError:
        transport.abort()
    return result

"""The floor: the cheapest FastAGI server that still answers like edgefilter, deciding nothing.

It reads the env block up to its blank line, sends the same kind of ``EXEC MSet`` line edgefilter
sends (fixed values), waits for Asterisk's reply and closes. Whatever it costs is the price of
FastAGI itself (accept, two round trips, close); edgefilter's overhead is measured against it,
in the same run, so that the machine's noise cancels out.

    python bench/floor.py --port 4599
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

REPLY = b'EXEC MSet "EDGEFILTER_ACTION=allow,EDGEFILTER_SCORE=0,EDGEFILTER_RULES=,EDGEFILTER_POLICY=default"\n'


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\n\n")
        writer.write(REPLY)
        await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def start(host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False) -> asyncio.AbstractServer:
    """Start the floor server in the running loop (tests use it in-process)."""
    return await asyncio.start_server(handle, host, port, backlog=1024, reuse_port=reuse_port or None)


async def main(host: str, port: int) -> None:
    server = await start(host, port)
    print(f"floor listening on {host}:{server.sockets[0].getsockname()[1]} pid {os.getpid()}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=4599)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (to compare with edgefilter on uvloop)")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main(a.host, a.port))
    else:
        asyncio.run(main(a.host, a.port))

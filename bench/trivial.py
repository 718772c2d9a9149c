"""The trivial FastAGI server of `make bench-asterisk`: read the env block, one SET VARIABLE, close.

What any FastAGI screening costs a real Asterisk at the least: accept, the env block, one
command and its reply, the close (Asterisk sends the SIP response only after it). It looks at
nothing but the caller number's last digit (even: reject, odd: allow), so that the dial plan
takes both branches in the same proportion as with edgefilter, whose bench callers are chosen
that way (bench/asterisk.py: blocked numbers end in an even digit, unknown ones in an odd one).

    python bench/trivial.py --port 4598
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

ALLOW = b'SET VARIABLE EDGEFILTER_ACTION "allow"\n'
REJECT = b'SET VARIABLE EDGEFILTER_ACTION "reject"\n'


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        env = await reader.readuntil(b"\n\n")
        i = env.find(b"agi_callerid: ")
        last = env[env.find(b"\n", i) - 1] if i >= 0 else 0x31
        writer.write(REJECT if last in b"02468" else ALLOW)
        await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, backlog=1024)
    print(f"trivial FastAGI on {host}:{server.sockets[0].getsockname()[1]} pid {os.getpid()}", flush=True)
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
    ap.add_argument("--port", type=int, default=4598)
    a = ap.parse_args()
    asyncio.run(main(a.host, a.port))

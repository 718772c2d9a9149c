"""Call latency with observability outputs off, pointed at a live collector, and at a dead port.

Run: .venv/bin/python bench/outputs_latency.py [calls]
Places calls one after another through the FastAGI double against a real service on loopback
and prints p50/p90/p99/max of the whole FastAGI exchange, as the caller (Asterisk) sees it.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import tempfile
import time

import asyncio_dgram

from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.core.config import settings_from_dict
from edgefilter.service import Service


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]


async def run(label: str, outputs: dict, n: int, tmp: str) -> None:
    s = settings_from_dict({"store": {"path": f"{tmp}/{label}.db"}, "agi": {"listen": "127.0.0.1:0"}, "outputs": outputs})
    svc = Service(s, port=0)
    await svc.start()
    try:
        for i in range(50):
            await place_call("127.0.0.1", svc.port, CallSpec(callerid=f"+86139{i:08d}"))
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            r = await place_call("127.0.0.1", svc.port, CallSpec(callerid="anonymous" if i % 3 == 0 else f"+86139{i:08d}"))
            lat.append((time.perf_counter() - t0) * 1000)
            assert r.variables.get("EDGEFILTER_ACTION")
        await asyncio.sleep(0.2)
        stats = svc.output_stats()
    finally:
        await svc.stop()
    print(
        f"{label:<14} n={n}  p50 {statistics.median(lat):.3f} ms  p90 {pct(lat, 90):.3f}  p99 {pct(lat, 99):.3f}  "
        f"max {max(lat):.3f}   {stats}"
    )


async def main(n: int) -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    live = await asyncio_dgram.bind(("127.0.0.1", 0))
    got = 0

    async def drain():
        nonlocal got
        while True:
            await live.recv()
            got += 1

    task = asyncio.create_task(drain())
    live_addr = f"{live.sockname[0]}:{live.sockname[1]:d}"
    with tempfile.TemporaryDirectory() as tmp:
        await run("off", {}, n, tmp)
        await run("live", {"statsd": live_addr, "syslog": live_addr, "prometheus": "127.0.0.1:0"}, n, tmp)
        await run("dead-port", {"statsd": f"127.0.0.1:{dead_port}", "syslog": f"127.0.0.1:{dead_port}"}, n, tmp)
        await run("off-again", {}, n, tmp)
    task.cancel()
    print(f"live collector received {got} datagrams")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))

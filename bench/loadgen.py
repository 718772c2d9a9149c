"""The load generator: many FastAGI calls, each exactly as Asterisk places it, timed as Asterisk sees it.

The env blocks come from ``edgefilter.asterisk.callsim.build_env`` (byte for byte what res_agi writes),
built before the clock starts. Each call then is a lean asyncio Protocol doing what Asterisk does
on a screening call: connect, write the env block in one write, answer every command line with
``200 result=0`` (what MSet returns), and wait for the server to close. Service time runs from
the env block's first byte written to the server's EOF (Asterisk sends the SIP response then).

Two ways to load a server:

* open loop (``--rate R``): calls start on a fixed or Poisson schedule whatever the server does,
  at most ``--concurrency`` in flight (a late start is counted, never silently skipped);
* closed loop (``--rate 0``): ``--concurrency`` sessions each place calls back to back, which
  measures throughput at saturation.

Run it in its own process (``bench/run.py`` pins it to another core than the server under test)
so that the client's CPU never counts as the server's. It prints one JSON object.

    python bench/loadgen.py --port 4573 --size 10000 --rate 200 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import population  # noqa: E402

OK_REPLY = b"200 result=0\n"


class _Call(asyncio.Protocol):
    """One FastAGI session from the Asterisk side, reduced to what a screening call does."""

    __slots__ = ("env", "done", "t0", "t_eof", "buf", "commands", "action", "transport")

    def __init__(self, env: bytes, done: asyncio.Future) -> None:
        self.env = env
        self.done = done
        self.t0 = 0.0
        self.t_eof = 0.0
        self.buf = b""
        self.commands = 0
        self.action = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.t0 = time.perf_counter()
        transport.write(self.env)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                return
            line, self.buf = self.buf[:nl], self.buf[nl + 1 :]
            self.commands += 1
            i = line.find(b"EDGEFILTER_ACTION=")
            if i >= 0:
                end = line.find(b",", i)
                self.action = line[i + 18 : end if end > 0 else len(line)].rstrip(b'"')
            self.transport.write(OK_REPLY)  # Asterisk answers each command, one at a time

    def eof_received(self) -> bool:
        self.t_eof = time.perf_counter()
        return False  # close our side too, as res_agi does

    def connection_lost(self, exc) -> None:
        if not self.t_eof:
            self.t_eof = time.perf_counter()
        if not self.done.done():
            self.done.set_result(exc)


async def one_call(loop: asyncio.AbstractEventLoop, host: str, port: int, env: bytes, timeout: float) -> tuple[float, bytes, str | None]:
    """Place one call; returns (service time in ms, EDGEFILTER_ACTION sent, error or None)."""
    done = loop.create_future()
    proto = _Call(env, done)
    try:
        await asyncio.wait_for(loop.create_connection(lambda: proto, host, port), timeout)
    except (TimeoutError, OSError) as e:
        return 0.0, b"", f"connect: {type(e).__name__}"
    try:
        exc = await asyncio.wait_for(done, timeout)
    except TimeoutError:
        proto.transport.abort()
        return 0.0, b"", "timeout"
    if exc is not None:
        return 0.0, b"", f"{type(exc).__name__}"
    if proto.commands == 0:
        return (proto.t_eof - proto.t0) * 1000.0, b"", "closed without a command"
    return (proto.t_eof - proto.t0) * 1000.0, proto.action, None


async def run(
    host: str,
    port: int,
    calls: list[tuple[str, bytes]],
    *,
    rate: float,
    duration: float,
    concurrency: int,
    poisson: bool = False,
    timeout: float = 5.0,
    max_calls: int | None = None,
    seed: int = 10,
) -> dict:
    """Drive the server for ``duration`` seconds (or ``max_calls`` calls); return the raw results."""
    loop = asyncio.get_running_loop()
    times: list[float] = []
    kinds: list[str] = []
    actions: Counter = Counter()
    errors: Counter = Counter()
    state = {"next": 0, "inflight": 0, "max_inflight": 0, "late": 0}
    limit = max_calls if max_calls is not None else 10**9

    def take() -> tuple[str, bytes] | None:
        i = state["next"]
        if i >= limit:
            return None
        state["next"] = i + 1
        return calls[i % len(calls)]

    async def place(kind: str, env: bytes) -> None:
        state["inflight"] += 1
        state["max_inflight"] = max(state["max_inflight"], state["inflight"])
        try:
            ms, action, err = await one_call(loop, host, port, env, timeout)
        finally:
            state["inflight"] -= 1
        if err:
            errors[err] += 1
            return
        times.append(ms)
        kinds.append(kind)
        actions[f"{kind}:{action.decode('ascii', 'replace') or '-'}"] += 1

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t_start = time.perf_counter()
    end = t_start + duration
    if rate > 0:
        rng = random.Random(seed)
        sem = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task] = set()

        async def guarded(kind: str, env: bytes) -> None:
            try:
                await place(kind, env)
            finally:
                sem.release()

        t_next = t_start
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if t_next > now:
                await asyncio.sleep(t_next - now)
            item = take()
            if item is None:
                break
            if sem.locked():
                state["late"] += 1
            await sem.acquire()
            task = asyncio.create_task(guarded(*item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            t_next += rng.expovariate(rate) if poisson else 1.0 / rate
        if tasks:
            await asyncio.wait(tasks, timeout=timeout + 1)
    else:

        async def worker() -> None:
            while time.perf_counter() < end:
                item = take()
                if item is None:
                    return
                await place(*item)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t_start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "mode": "open" if rate > 0 else "closed",
        "rate": rate,
        "poisson": poisson,
        "concurrency": concurrency,
        "wall_s": wall,
        "completed": len(times),
        "errors": dict(errors),
        "late_starts": state["late"],
        "max_inflight": state["max_inflight"],
        "client_cpu_share": client_cpu / wall if wall else 0.0,
        "throughput": len(times) / wall if wall else 0.0,
        "times_ms": times,
        "kinds": kinds,
        "actions": dict(sorted(actions.items())),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--size", type=int, default=10000, help="list size the callers are drawn against")
    ap.add_argument("--rate", type=float, default=200.0, help="calls per second (open loop); 0 = closed loop at saturation")
    ap.add_argument("--poisson", action="store_true", help="Poisson arrivals instead of a fixed interval")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of load")
    ap.add_argument("--calls", type=int, default=None, help="stop after this many calls")
    ap.add_argument("--concurrency", type=int, default=64, help="sessions in flight at most (closed loop: exactly)")
    ap.add_argument("--pool", type=int, default=4096, help="distinct env blocks prepared before the clock starts")
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=5.0)
    a = ap.parse_args(argv)
    calls = population.envs(a.size, a.pool, seed=a.seed, host=a.host, port=a.port)
    result = asyncio.run(
        run(a.host, a.port, calls, rate=a.rate, duration=a.duration, concurrency=a.concurrency,
            poisson=a.poisson, timeout=a.timeout, max_calls=a.calls, seed=a.seed)
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: per-call screening latency on SQLite vs PostgreSQL, and change propagation between
two nodes sharing one PostgreSQL (NOTIFY, and the poll alone for comparison).

    EDGEFILTER_TEST_PG_URL=postgresql://... .venv/bin/python bench/store_latency.py [--calls 2000]

Calls go through the transcript-faithful Asterisk double (callsim) over loopback, one at a
time, so the numbers are the FastAGI round trip plus the decision. The database is reset.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.core.config import settings_from_dict
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.service import Service


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


def settings(tmp: Path, name: str, **store):
    return settings_from_dict({
        "store": {"path": str(tmp / f"{name}.db"), "spool_path": str(tmp / f"{name}-spool.db"), "node": name, **store},
        "agi": {"listen": "127.0.0.1:0"},
        "log": {"level": "warning"},
    })


async def call_latency(svc: Service, n: int, entries: int) -> list[float]:
    await svc.store.put_entries(
        Entry("block", parse_pattern(f"+86138{i:08d}", "CN"), created_at=time.time()) for i in range(entries)
    )
    await svc.follower.poll()
    out = []
    for i in range(n):
        caller = f"+86138{(i * 7919) % (entries * 2):08d}"  # half blocked, half unknown
        r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=caller), timeout=3.0)
        out.append(r.elapsed * 1000)
    return out


async def propagation(a: Service, b: Service, n: int) -> list[float]:
    out = []
    for i in range(n):
        before = b.screener.index.size
        await a.store.put_entry(Entry("block", parse_pattern(f"+86139{i:08d}", "CN"), created_at=time.time()))
        t0 = time.perf_counter()
        while b.screener.index.size == before:
            await asyncio.sleep(0.0005)
            if time.perf_counter() - t0 > 5:
                raise SystemExit("change never arrived")
        out.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.02)
    return out


def show(name: str, ms: list[float]) -> None:
    print(f"{name:<44} n={len(ms):<5} p50 {statistics.median(ms):7.2f} ms  p95 {pct(ms, 0.95):7.2f} ms  "
          f"p99 {pct(ms, 0.99):7.2f} ms  max {max(ms):7.2f} ms")


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--changes", type=int, default=100)
    args = ap.parse_args()
    url = os.environ.get("EDGEFILTER_TEST_PG_URL")
    if not url:
        print("set EDGEFILTER_TEST_PG_URL (see docs/postgresql.md, CI/dev setup)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for backend, extra in (("sqlite", {}), ("postgresql", {"url": url})):
            if extra:
                await reset(url)
            svc = Service(settings(tmp, backend, **extra), port=0)
            await svc.start()
            try:
                show(f"per-call latency, {backend}", await call_latency(svc, args.calls, args.entries))
            finally:
                await svc.stop()
        for label, poll in (("NOTIFY (poll 30s as fallback only)", "30s"), ("poll 250ms alone (NOTIFY off)", "250ms")):
            await reset(url)
            a = Service(settings(tmp, "pbx-a", url=url, poll_interval=poll), port=0)
            b = Service(settings(tmp, "pbx-b", url=url, poll_interval=poll), port=0)
            await a.start()
            await b.start()
            if "alone" in label:
                b.tasks[1].cancel()  # the LISTEN task: what a node sees when notices are lost
            else:
                while not b.store.listening:
                    await asyncio.sleep(0.01)
            try:
                show(f"propagation a->b, {label}", await propagation(a, b, args.changes))
            finally:
                await a.stop()
                await b.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""The benchmark harness keeps working: its load generator against the real service and the floor.

Small and fast (100 calls): the benchmark itself is `make bench`, never a test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from edgefilter.service import Service

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import floor  # noqa: E402
import loadgen  # noqa: E402
import population  # noqa: E402
import run  # noqa: E402

# What the default config answers each kind of caller of the mix (a blocked number with the
# "marketing" category scores 8 through LIST_CATEGORY: challenge; "+8617000000001" is allowed
# inside a blocked prefix).
EXPECTED = {
    "blocked_exact": {"reject", "challenge", "allow"},
    "blocked_prefix": {"reject", "allow"},
    "allowed": {"allow"},
    "unknown": {"allow"},
    "withheld": {"challenge"},
    "invalid": {"challenge"},
}


async def test_load_generator_against_the_service_and_the_floor(make_settings):
    settings = make_settings()
    await population.build_database_async(settings.store.path, 300)
    svc = Service(settings, port=0)
    await svc.start()
    fl = await floor.start()
    try:
        assert svc.screener.index.size == 300 + len(population.NAMED)
        calls = population.envs(300, 100, port=svc.port)
        r = await loadgen.run("127.0.0.1", svc.port, calls, rate=0, duration=10, concurrency=4, max_calls=100)
        assert r["completed"] == 100 and r["errors"] == {}, r["errors"]
        assert all(t > 0 for t in r["times_ms"])
        for key, count in r["actions"].items():
            kind, action = key.split(":")
            assert action in EXPECTED[kind], (key, count)
        assert r["actions"].get("blocked_exact:reject", 0) > 0 and r["actions"].get("unknown:allow", 0) > 0
        assert len({k.split(":")[0] for k in r["actions"]}) == len(population.MIX)

        port = fl.sockets[0].getsockname()[1]
        f = await loadgen.run("127.0.0.1", port, calls, rate=1000, duration=10, concurrency=8, max_calls=50)
        assert f["completed"] == 50 and f["errors"] == {}
        assert {k.split(":")[1] for k in f["actions"]} == {"allow"}  # the floor decides nothing
    finally:
        fl.close()
        await fl.wait_closed()
        await svc.stop()


async def test_a_server_that_closes_without_answering_is_an_error_not_a_fast_call():
    import asyncio

    async def rude(reader, writer):
        await reader.readuntil(b"\n\n")
        writer.close()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        r = await loadgen.run("127.0.0.1", port, population.envs(100, 5, port=port), rate=0, duration=5, concurrency=1, max_calls=5)
        assert r["completed"] == 0 and r["errors"] == {"closed without a command": 5}
    finally:
        server.close()


def test_mix_callers_are_what_they_claim():
    import random

    from edgefilter.core.numbers import normalize

    rng = random.Random(1)
    for _ in range(200):
        assert normalize(population.caller("unknown", 10_000, rng)[0], "CN").kind.value == "valid"
        assert normalize(population.caller("blocked_exact", 10_000, rng)[0], "CN").kind.value == "valid"
        assert normalize(population.caller("invalid", 10_000, rng)[0], "CN").kind.value == "invalid"
    rows = list(population.rows(10_000))
    assert len(rows) == 10_000 and len({(r[0], r[1]) for r in rows}) == 10_000


def test_report_percentiles_ratios_and_targets():
    assert run.pct([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and run.pct([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    assert math.isnan(run.pct([], 0.5))
    ef = {"p50": 0.33, "p90": 0.5, "p99": 0.6, "max": 2.0, "throughput": 2100.0, "cpu_ms_per_call": 0.4, "capacity_per_core": 2500}
    fl = {"p50": 0.30, "p90": 0.4, "p99": 0.55, "max": 1.0, "throughput": 4000.0, "cpu_ms_per_call": 0.1}
    result = {
        "date": "2026-11-28 21:00 UTC", "cores": 2, "cpu_model": "x", "python": "3.11.7", "command": "make bench",
        "runs": [run.row(1_000_000, "open", 200, 64, ef, fl, rss_mb=400.0), run.row(1_000_000, "saturation", 0, 16, ef, fl, rss_mb=400.0)],
    }
    assert result["runs"][0]["ratio_p50"] == 1.1 and result["runs"][0]["ratio_p99"] == 1.09
    result["checks"] = run.checks(result)
    assert [c["met"] for c in result["checks"]] == [True, True, True, True, True]
    table = run.markdown(result)
    assert "| 1,000,000 | open | 200 | 64 | 0.33 / 0.50 / 0.60 / 2.00 | 0.30 / 0.55 | 1.10 | 1.09 | 2100 (4000) |" in table
    assert "make bench" in table
    slow = {**ef, "p99": 0.9, "throughput": 1500.0}
    result["runs"] = [run.row(1_000_000, "open", 200, 64, slow, fl), run.row(1_000_000, "saturation", 0, 16, slow, fl)]
    assert [c["met"] for c in run.checks(result)] == [True, False, False, True, True]

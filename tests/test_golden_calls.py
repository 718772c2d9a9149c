"""Golden call cases (tests/data/calls/*.toml) through the real path: FastAGI server, lists, scoring.

Each case holds the AGI env, the list state, the time, optional config and the expected action with
the exact set of rules. Adding a case is adding a file.
"""

from __future__ import annotations

import time
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.service import Service

CASES = sorted((Path(__file__).parent / "data" / "calls").glob("*.toml"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
async def test_golden_call(path, make_settings):
    case = tomllib.loads(path.read_text())
    settings = make_settings(case.get("config", {}))
    svc = Service(settings, port=0)
    when = datetime.strptime(case["time"], "%Y-%m-%d %H:%M")
    svc.screener.wallclock = lambda s: when
    await svc.start()
    try:
        for item in case.get("lists", []):
            entry = Entry(
                item["list"], parse_pattern(item["pattern"], settings.default_region),
                category=item.get("category", ""), note=item.get("note", ""), source=item.get("source", "test"),
                created_at=time.time(),
            )
            await svc.store.put_entry(entry)
        await svc.follower.poll()
        env = case["env"]
        spec = CallSpec(
            callerid=env.get("callerid", "+8613800138000").encode(),
            calleridname=env.get("calleridname", "unknown").encode(),
            dnid=env.get("dnid", "1000"),
            extension=env.get("extension", "1000"),
            context=env.get("context", "from-trunk"),
            callingpres=env.get("callingpres", 0),
            args=tuple(env.get("args", ())),
        )
        r = await place_call("127.0.0.1", svc.port, spec, timeout=3.0)
        expect = case["expect"]
        assert r.closed_by_server and r.pipelined == 0
        assert r.variables["EDGEFILTER_ACTION"] == expect["action"], (case["description"], r.variables)
        assert set(r.variables["EDGEFILTER_RULES"].split()) == set(expect["rules"]), case["description"]
        if "policy" in expect:
            assert r.variables["EDGEFILTER_POLICY"] == expect["policy"]
        if "would" in expect:
            assert r.variables["EDGEFILTER_WOULD"] == expect["would"]
    finally:
        await svc.stop()

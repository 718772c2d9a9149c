"""`[agi] workers`: several serve processes on one port, each following the change feed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import pytest

from edgefilter import cli
from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.core.config import settings_from_dict
from edgefilter.core.errors import EdgefilterError
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.store.sqlite import Store
from edgefilter.workers import WorkerPool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


async def _listening(port: int, proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.returncode is None, "the pool exited"
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("pool never listened")


async def test_two_workers_share_the_port_and_follow_list_changes(tmp_path):
    port = _free_port()
    db = tmp_path / "edgefilter.db"
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[agi]\nlisten = "127.0.0.1:{port}"\nworkers = 2\n[store]\npath = "{db}"\npoll_interval = "50ms"\n')
    async with Store.open(str(db)) as store:
        await store.put_entry(Entry("block", parse_pattern("+86170*", "CN"), created_at=time.time()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgefilter", "serve", "--config", str(cfg), stderr=asyncio.subprocess.PIPE
    )
    try:
        await _listening(port, proc)
        deadline = time.monotonic() + 15
        while True:  # both workers listening (a loaded machine may take a while)
            workers = _children(proc.pid)
            if len(workers) == 2 and all(f"127.0.0.1:{port}" in _listen_sockets(w) for w in workers):
                break
            assert time.monotonic() < deadline, f"workers {workers} never both listened"
            await asyncio.sleep(0.05)

        async def actions(caller: str) -> set[str]:
            results = await asyncio.gather(*(place_call("127.0.0.1", port, CallSpec(callerid=caller), timeout=5) for _ in range(24)))
            return {r.variables.get("EDGEFILTER_ACTION") for r in results}

        assert await actions("+8617012345678") == {"reject"}
        async with Store.open(str(db)) as store:  # as `edgefilter allow` would, while serving
            await store.put_entry(Entry("allow", parse_pattern("+8617012345678", "CN"), created_at=time.time()))
        deadline = time.monotonic() + 10
        while (seen := await actions("+8617012345678")) != {"allow"}:  # every worker sees the change
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.1)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert err.count(b"FastAGI listening on") == 2
    assert err.count(b"maintenance") == 0
    for w in workers:
        assert not os.path.exists(f"/proc/{w}") or open(f"/proc/{w}/stat").read().split()[2] == "Z"


def _listen_sockets(pid: int) -> str:
    """Local addresses of the TCP sockets the process has open in LISTEN state."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:
                ip, port = parts[1].split(":")
                addr = ".".join(str(int(ip[i : i + 2], 16)) for i in (6, 4, 2, 0))
                out.append(f"{addr}:{int(port, 16)}")
    return " ".join(out)


def test_workers_need_a_fixed_port():
    with pytest.raises(EdgefilterError, match="fixed port"):
        WorkerPool(None, 2, ("127.0.0.1", 0))


def test_workers_key_is_validated(tmp_path):
    assert settings_from_dict({}).agi.workers == 1
    assert settings_from_dict({"agi": {"workers": 4}}).agi.workers == 4
    with pytest.raises(Exception, match="workers"):
        settings_from_dict({"agi": {"workers": 0}})
    with pytest.raises(Exception, match="worker"):
        settings_from_dict({"agi": {"worker": 2}})  # unknown key, with a suggestion


def test_serve_rejects_a_silly_worker_count(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--workers", "0"])
    assert "--workers must be between 1 and 64" in capsys.readouterr().err


# ------------------------------------------------------------------ behaviour across workers
@pytest.fixture
async def two_workers(make_settings):
    """Workers 0 and 1 of one pool, in process: one SQLite file, one node name (the host's)."""
    from edgefilter.service import Service

    started = []
    try:
        for w in (0, 1):
            svc = Service(make_settings(), port=0, worker=w)
            await svc.start()
            started.append(svc)
        assert started[0].settings.store.node == started[1].settings.store.node
        yield started
    finally:
        for svc in started:
            await svc.stop()


async def _rules(svc, callerid: str, exten: str = "1000") -> list[str]:
    r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=callerid, args=[f"exten={exten}"]), timeout=3.0)
    return r.variables.get("EDGEFILTER_RULES", "").split()


async def _eventually(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_burst_spread_over_the_workers_escalates(two_workers):
    """The kernel spreads one caller's calls over the workers: each must see the others' calls."""
    a, b = two_workers
    burster = "+8613512345678"
    for svc in (a, b, a, b):  # 2 calls per worker: neither alone reaches burst_calls = 5
        assert "RATE_BURST" not in await _rules(svc, burster)

    async def b_sees_four() -> bool:
        return len(list(b.behaviour.history.from_caller(burster, 0))) >= 4

    await _eventually(b_sees_four, 3.0, "worker 1 never saw worker 0's calls")
    assert len(list(b.behaviour.history.from_caller(burster, 0))) == 4  # each call once
    assert "RATE_BURST" in await _rules(b, burster)


async def test_a_refusal_on_one_worker_reaches_the_other(two_workers):
    a, b = two_workers
    pest = "+8613612345678"
    assert "REFUSED_BEFORE" not in await _rules(a, pest)

    async def b_knows_the_caller() -> bool:
        last = b.behaviour.history.last_by_target.get("1000")
        return last is not None and last.caller == pest

    # the callee hangs up and dials *60 a moment later; the star code lands on worker 1
    await _eventually(b_knows_the_caller, 3.0, "worker 1 never learnt worker 0's last caller")
    r = await place_call("127.0.0.1", b.port, CallSpec(callerid="1000", script="refuse", args=["callee=1000"]), timeout=3.0)
    # the star code reached worker 1, which never screened the call: it must know the last caller
    assert r.variables == {"EDGEFILTER_RESULT": "ok", "EDGEFILTER_NUMBER": pest}

    async def refused_on_a() -> bool:
        return "REFUSED_BEFORE" in await _rules(a, pest)

    await _eventually(refused_on_a, 3.0, "worker 1's refusal never reached worker 0")

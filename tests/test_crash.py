"""kill -9 of the real `edgefilter serve`: at most the in-flight call records are lost.

The service is started as admins start it (a subprocess with a config file on a temporary
database and port), screened through the Asterisk double, killed with SIGKILL in the middle of
traffic and started again: the lists are all there, the call history goes on from where the
last committed batch left it, the database passes an integrity check.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from edgefilter import cli
from edgefilter.asterisk.callsim import CallSpec, place_call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, cfg: Path, log: Path) -> None:
        self.cfg, self.log = cfg, log
        self.proc: subprocess.Popen | None = None

    async def start(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefilter", "serve", "--config", str(self.cfg)],
            stdout=subprocess.DEVNULL, stderr=self.log.open("ab"),
        )
        t0 = time.monotonic()
        while True:
            r = await place_call("127.0.0.1", port, CallSpec(callerid=b"+8613900139000"), timeout=2.0)
            if r.agistatus != "FAILURE":
                return
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() - t0 < 15, "service did not start"
            await asyncio.sleep(0.05)


def rows(db: Path, sql: str):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def wait_rows(db: Path, n: int, timeout: float = 5.0) -> int:
    t0 = time.monotonic()
    while True:
        count = rows(db, "SELECT COUNT(*) FROM calls")[0][0]
        if count >= n:
            return count
        assert time.monotonic() - t0 < timeout, f"{count} call records, expected {n}"
        await asyncio.sleep(0.05)


async def action(port: int, caller: bytes) -> str:
    r = await place_call("127.0.0.1", port, CallSpec(callerid=caller), timeout=3.0)
    assert r.closed_by_server, r
    return r.variables.get("EDGEFILTER_ACTION", "")


async def test_kill_9_loses_at_most_in_flight_records_and_restart_picks_up(tmp_path):
    port = free_port()
    db = tmp_path / "edgefilter.db"
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[agi]\nlisten = "127.0.0.1:{port}"\n[store]\npath = "{db}"\npoll_interval = "50ms"\n[behaviour]\nenabled = false\n')
    assert await asyncio.to_thread(cli.main, ["block", "+86170*", "--config", str(cfg)]) == 0
    daemon = Daemon(cfg, tmp_path / "serve.log")
    await daemon.start(port)
    try:
        # traffic, committed
        callers = [b"+8617012345%03d" % i if i % 2 else b"+8613800138%03d" % i for i in range(20)]
        results = await asyncio.gather(*(action(port, c) for c in callers))
        assert results == ["reject" if c.startswith(b"+86170") else "allow" for c in callers]
        committed = await wait_rows(db, 21)  # + the start-up probe call
        # a list change made while it runs
        assert await asyncio.to_thread(cli.main, ["block", "+8613700137000", "--config", str(cfg)]) == 0
        t0 = time.monotonic()
        while await action(port, b"+8613700137000") != "reject":
            assert time.monotonic() - t0 < 10, "the block never reached the daemon"  # typically < 0.3 s
        committed = await wait_rows(db, committed + 1)
        # kill -9 in the middle of traffic
        in_flight = [asyncio.create_task(action(port, b"+8613800138%03d" % i)) for i in range(30)]
        await asyncio.sleep(0.01)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(5)
        await asyncio.gather(*in_flight, return_exceptions=True)  # whatever happened to them
        before = rows(db, "SELECT COUNT(*) FROM calls")[0][0]
        assert committed <= before <= committed + 30

        # restart: lists and history where they were
        await daemon.start(port)
        assert await action(port, b"+8617099999999") == "reject"
        assert await action(port, b"+8613700137000") == "reject"
        assert await action(port, b"+8613800138000") == "allow"
        after = await wait_rows(db, before + 4)  # probe + 3 calls
        assert after == before + 4
        ids = [r[0] for r in rows(db, "SELECT id FROM calls ORDER BY id")]
        assert ids == sorted(set(ids)) and len(ids) == after
        assert rows(db, "PRAGMA integrity_check") == [("ok",)]
        patterns = {r[0] for r in rows(db, "SELECT pattern FROM entries")}
        assert patterns == {"+86170*", "+8613700137000"}
        # and a clean stop still works after the crash
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(5)

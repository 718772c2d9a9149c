"""SIGHUP reload: a valid change applies without dropping calls; an invalid one leaves the old config."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.core.config import load_settings
from edgefilter.service import Service

ROOT = Path(__file__).resolve().parents[1]


def write_cfg(path: Path, db: Path, port: int, extra: str = "") -> None:
    path.write_text(f'[agi]\nlisten = "127.0.0.1:{port}"\n[store]\npath = "{db}"\npoll_interval = "50ms"\n{extra}')


async def action(port: int, caller: str = "anonymous") -> str:
    r = await place_call("127.0.0.1", port, CallSpec(callerid=caller), timeout=3.0)
    return r.variables.get("EDGEFILTER_ACTION", "")


async def test_reload_applies_valid_and_refuses_invalid_config(tmp_path, caplog):
    cfg = tmp_path / "edgefilter.toml"
    write_cfg(cfg, tmp_path / "db.sqlite", 0)
    svc = Service(load_settings(cfg), config_path=str(cfg), port=0)
    await svc.start()
    try:
        assert await action(svc.port) == "challenge"
        write_cfg(cfg, tmp_path / "db.sqlite", 0, "[rules.CLI_WITHHELD]\nweight = 11.0\n")
        # calls in flight while the config is swapped are all answered with a valid action
        calls = [asyncio.create_task(action(svc.port)) for _ in range(100)]
        await asyncio.sleep(0)
        assert svc.reload() is True
        results = await asyncio.gather(*calls)
        assert set(results) <= {"challenge", "voicemail"} and len(results) == 100
        assert await action(svc.port) == "voicemail"
        cfg.write_text(cfg.read_text() + "[screen]\nbudgett = \"1s\"\n")
        assert svc.reload() is False
        assert "reload refused, old config stays in force" in caplog.text and "budgett" in caplog.text
        assert await action(svc.port) == "voicemail"
    finally:
        await svc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_real_sighup_and_sigterm_on_the_daemon(tmp_path):
    port = free_port()
    cfg = tmp_path / "edgefilter.toml"
    write_cfg(cfg, tmp_path / "db.sqlite", port)
    proc = subprocess.Popen([sys.executable, "-m", "edgefilter", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            r = await place_call("127.0.0.1", port, CallSpec(callerid="anonymous"), timeout=2.0)
            if r.agistatus != "FAILURE":
                break
            assert time.monotonic() < deadline, "service did not start"
            await asyncio.sleep(0.1)
        assert r.variables["EDGEFILTER_ACTION"] == "challenge"
        write_cfg(cfg, tmp_path / "db.sqlite", port, "[screen]\nmode = \"log-only\"\n")
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while (r := await place_call("127.0.0.1", port, CallSpec(callerid="anonymous"))).variables.get("EDGEFILTER_WOULD") != "challenge":
            assert time.monotonic() < deadline, "SIGHUP not applied"
            await asyncio.sleep(0.05)
        assert r.variables["EDGEFILTER_ACTION"] == "allow"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        err = proc.stderr.read().decode()
        assert "config reloaded" in err and "stopping" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_reload_applies_agi_peer_and_session_limits(tmp_path, caplog):
    """[agi] allow_peers, read_timeout and max_sessions are read per connection: a SIGHUP that
    narrows allow_peers must shut the old peers out at once, not after a restart."""
    cfg = tmp_path / "edgefilter.toml"
    write_cfg(cfg, tmp_path / "db.sqlite", 0)
    svc = Service(load_settings(cfg), config_path=str(cfg), port=0)
    await svc.start()
    try:
        assert await action(svc.port) == "challenge"  # 127.0.0.1 allowed, and its verdict cached
        cfg.write_text(cfg.read_text().replace(
            'listen = "127.0.0.1:0"\n', 'listen = "127.0.0.1:0"\nallow_peers = ["10.0.0.0/8"]\nread_timeout = "1s"\nmax_sessions = 7\n'))
        assert svc.reload() is True
        r = await place_call("127.0.0.1", svc.port, CallSpec(callerid="+8613900139000"), timeout=2.0)
        assert r.variables == {} and r.commands == []
        assert svc.server.denied == 1
        assert (svc.server.read_timeout, svc.server.max_sessions) == (1.0, 7)
    finally:
        await svc.stop()


async def test_reload_names_the_start_only_keys_it_cannot_apply(tmp_path, caplog):
    """[mirror] enabled, [store] node and busy_timeout are read once at start: a reload that
    changes them must say so instead of logging a silent 'config reloaded'."""
    cfg = tmp_path / "edgefilter.toml"
    write_cfg(cfg, tmp_path / "db.sqlite", 0)
    svc = Service(load_settings(cfg), config_path=str(cfg), port=0)
    await svc.start()
    try:
        for extra in ('[mirror]\nenabled = false\n', 'node = "pbx-other"\n', 'busy_timeout = "9s"\n'):
            caplog.clear()
            write_cfg(cfg, tmp_path / "db.sqlite", 0, extra)
            assert svc.reload() is True
            assert "take effect only after a restart" in caplog.text, extra
    finally:
        await svc.stop()

"""sd_notify readiness and watchdog through the real entry point (`edgefilter serve` as a process).

A wedged service (its loop stopped, its socket still accepting) must stop pinging systemd's
watchdog so that systemd restarts it; SIGSTOP is the wedge.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from edgefilter.systemd import Notifier, child_environment


def _serve(tmp_path, env_extra: dict) -> subprocess.Popen:
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[agi]\nlisten = "127.0.0.1:0"\n[store]\npath = "{tmp_path / "db"}"\n')
    return subprocess.Popen([sys.executable, "-m", "edgefilter", "serve", "--config", str(cfg)],
                            env={**os.environ, **env_extra}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _messages(sock: socket.socket, seconds: float) -> list[str]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


def _drain(sock: socket.socket) -> list[str]:
    """What is waiting on the socket now, without waiting (nor letting an event loop turn)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.setblocking(True)


def test_ready_then_watchdog_pings_which_stop_when_the_loop_is_wedged(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    proc = _serve(tmp_path, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    try:
        sock.settimeout(20.0)  # the service's start (imports, the store) on a loaded machine
        assert sock.recv(4096).decode() == "READY=1"
        pings = _messages(sock, 1.0)
        assert pings.count("WATCHDOG=1") >= 5, pings  # every 100 ms
        os.killpg(proc.pid, signal.SIGSTOP)
        _messages(sock, 0.15)  # one may have been on its way
        assert _messages(sock, 0.6) == []  # wedged: systemd would kill and restart it
        os.killpg(proc.pid, signal.SIGCONT)
        assert "WATCHDOG=1" in _messages(sock, 1.0)
        proc.terminate()
        sock.settimeout(10.0)
        while (msg := sock.recv(4096).decode()) != "STOPPING=1":
            assert msg == "WATCHDOG=1", msg
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        sock.close()


def test_abstract_socket_address_and_pid_check():
    n = Notifier({"NOTIFY_SOCKET": "@edgefilter-test", "WATCHDOG_USEC": "10000000"})
    assert n.address == "\0edgefilter-test" and n.interval == 5.0
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}).interval is None
    off = Notifier({})
    assert not off.enabled and off.notify("READY=1") is False
    assert "NOTIFY_SOCKET" not in child_environment({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "A": "b"})


async def test_the_pings_come_from_the_event_loop_itself(tmp_path):
    """A loop blocked by a runaway call (not the whole process) must stop the pings too: a
    pinger on a thread of its own would keep a wedged service alive."""
    import asyncio

    path = str(tmp_path / "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    task = asyncio.get_running_loop().create_task(n.watchdog())
    try:
        await asyncio.sleep(0.3)
        assert _drain(sock).count("WATCHDOG=1") >= 3
        time.sleep(0.5)  # the loop wedged: nothing may be sent meanwhile
        assert _drain(sock) == []
        await asyncio.sleep(0.15)
        assert "WATCHDOG=1" in _drain(sock)  # and it pings again once the loop turns
    finally:
        task.cancel()
        n.close()
        sock.close()

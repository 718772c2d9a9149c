"""systemd readiness and watchdog (sd_notify), so that a wedged service is restarted.

Why: a stopped or wedged process still has its listening socket, and the kernel goes on
accepting FastAGI connections that nobody answers. The shipped dial plan bounds each call's wait
(``EDGEFILTER_WAIT``) and fails open, but every call then pays that wait, and a hang-up handler
(which runs on a dead channel, where no timeout applies) waits until the socket closes. With
``Type=notify`` and ``WatchdogSec=`` in the unit, the event loop proves it is alive every half
period; a loop that stops turning is killed and restarted by systemd.

The protocol is a datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET`` (``@`` = the abstract
namespace). No library: it is one ``sendto``. Outside systemd (no ``NOTIFY_SOCKET``) it does
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("edgefilter.systemd")


class Notifier:
    """Where and how often to tell systemd we are alive, from the environment it gave us."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if self.address and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.interval = int(usec) / 2e6  # ping twice per period, as sd_watchdog_enabled(3) advises
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, state: str) -> bool:
        """Send one state (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``); never raises."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(state.encode(), self.address)
            return True
        except OSError as e:
            log.warning("sd_notify %s to %s failed: %s", state, self.address.replace("\0", "@"), e)
            return False

    async def watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` from the event loop itself: if the loop wedges, the pings stop."""
        if self.interval is None:
            return
        log.info("systemd watchdog: pinging every %.1f s", self.interval)
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def child_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for worker processes: the notify socket is the parent's alone (a worker
    pinging for the whole pool would hide a wedged sibling)."""
    return {k: v for k, v in environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}

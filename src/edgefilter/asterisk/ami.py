"""The Asterisk Manager (AMI) listener: call outcomes for the behaviour rules, actions for others.

Built on panoramisk's ``Manager`` (message parsing, action/response matching, event dispatch),
with the parts DESIGN.md found unsound replaced by one supervisor task:

* panoramisk reconnects at a fixed interval and never checks its Ping replies, so a silently
  dead connection (a NAT dropping state, a frozen Asterisk) is never noticed. Here a watchdog
  pings whenever nothing arrived for ``ping_interval`` and reopens the connection when no reply
  comes within ``ping_timeout``; every reconnect (refused, wrong secret, dropped) backs off
  exponentially from ``backoff_initial`` to ``backoff_max``.
* panoramisk queues actions sent while disconnected and re-sends them only after a
  ``FullyBooted`` event (which needs the ``system`` read class): they may hang for ever. Here
  ``send_action`` fails fast when not connected, and actions in flight when the connection
  drops fail with AmiError (at most once; the caller decides whether to retry).
* a login refused by Asterisk is reported once per streak, clearly, and retried with backoff.

Nothing here is on the screening path: the Screener never awaits AMI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Mapping

from panoramisk import Manager
from panoramisk.ami_protocol import AMIProtocol

from edgefilter.core.config import AmiSettings
from edgefilter.core.errors import AmiError, ConfigError

log = logging.getLogger("edgefilter.ami")


def load_secret(cfg: AmiSettings, environ: Mapping[str, str] = os.environ) -> str:
    """The AMI secret from ``secret_file`` (refused when group/world accessible) or ``secret_env``."""
    if cfg.secret_file:
        path = cfg.secret_file
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ConfigError(f"[ami] secret_file {path}: file not found") from None
        except OSError as e:
            raise ConfigError(f"[ami] secret_file {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"[ami] secret_file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"[ami] secret_file {path}: readable or writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"refusing to use it: run `chmod 600 {path}`"
            )
        try:
            with open(path, encoding="utf-8") as f:
                secret = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"[ami] secret_file {path}: cannot read it ({e})") from None
    else:
        name = cfg.secret_env
        secret = environ.get(name, "").strip()
        if not secret:
            raise ConfigError(f"[ami] secret_env: environment variable {name} is not set or empty")
    if not secret or "\n" in secret or "\r" in secret:
        raise ConfigError("[ami] the secret is empty or spans several lines")
    return secret


class _Protocol(AMIProtocol):
    """panoramisk's protocol, noting when bytes last arrived (the watchdog's liveness signal)."""

    def data_received(self, data: bytes) -> None:
        listener = getattr(self.factory, "listener", None)
        if listener is not None:
            listener.last_rx = asyncio.get_running_loop().time()
        super().data_received(data)


class _Manager(Manager):
    """panoramisk's Manager with reconnection and pinging handed to AmiListener's supervisor."""

    def __init__(self, listener: AmiListener, **config) -> None:
        super().__init__(**config)
        self.listener = listener

    def ping(self) -> None:  # the supervisor's watchdog pings, and checks the reply
        pass

    def connection_lost(self, exc) -> None:  # called by the protocol; no call_later(connect)
        self._connected = False
        self.authenticated = False
        self.listener._connection_lost(exc)


class AmiListener:
    """One supervised AMI connection. ``start()`` spawns the supervisor; ``close()`` ends it."""

    def __init__(
        self,
        cfg: AmiSettings,
        secret: str,
        on_event: Callable[[Mapping[str, str]], None] | None = None,
        *,
        on_login: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self._secret = secret
        self.on_event = on_event
        self.on_login = on_login
        self.manager = _Manager(self, host=cfg.host, port=cfg.port, events="on", encoding="utf8",
                                forgetable_actions=("ping", "login", "logoff"))
        self.manager.register_event("*", self._dispatch)
        self.state = "down"
        self.last_rx = 0.0
        self.connects = 0
        self.auth_failures = 0
        self.watchdog_trips = 0
        self.events = 0
        self.last_error = ""
        self._transport: asyncio.Transport | None = None
        self._lost: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.connected_event = asyncio.Event()  # set while logged in (tests and callers may wait)

    @property
    def connected(self) -> bool:
        return self.state == "up"

    def start(self) -> asyncio.Task:
        self._task = asyncio.create_task(self.run(), name="ami-supervisor")
        return self._task

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._drop()

    # -- supervisor -----------------------------------------------------------------------
    async def run(self) -> None:
        delay = self.cfg.backoff_initial
        where = f"{self.cfg.host}:{self.cfg.port}"
        while not self._closing:
            up_for = 0.0
            try:
                up_for = await self._session()
                if not self._closing:
                    log.warning("AMI connection to %s lost after %.0f s; reconnecting", where, up_for)
            except AmiError as e:  # login refused
                self.auth_failures += 1
                self.last_error = str(e)
                self.state = "auth-failed"
                level = logging.ERROR if self.auth_failures == 1 or self.auth_failures % 20 == 0 else logging.DEBUG
                log.log(level, "AMI login to %s as %r refused (%s): check [ami] user and the secret against "
                        "manager.conf (asterisk-conf/manager-edgefilter.conf); retrying in %.1f s",
                        where, self.cfg.user, e, delay)
            except (TimeoutError, OSError, ConnectionError, EOFError) as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("AMI at %s unreachable (%s); retrying in %.1f s", where, self.last_error, delay)
            finally:
                self._drop()
            if self._closing:
                break
            if up_for >= max(self.cfg.backoff_max, 2 * self.cfg.ping_interval):
                delay = self.cfg.backoff_initial  # it worked for a good while: start over
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.backoff_max)

    async def _session(self) -> float:
        """Connect, log in, then watch the connection; returns how long it was up."""
        loop = asyncio.get_running_loop()
        self.state = "connecting"
        self._lost = loop.create_future()
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(_Protocol, self.cfg.host, self.cfg.port), self.cfg.connect_timeout
        )
        self._transport = transport
        m = self.manager
        m.protocol = protocol
        protocol.queue = deque()
        protocol.factory = m
        protocol.log = m.log
        protocol.config = m.config
        protocol.encoding = m.encoding = "utf8"
        m.responses = protocol.responses = {}
        m._connected = True
        self.last_rx = loop.time()
        login = m.send_action({"Action": "Login", "Username": self.cfg.user, "Secret": self._secret, "Events": "on"})
        await asyncio.wait({login, self._lost}, timeout=self.cfg.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        if not login.done():
            login.cancel()
            if self._lost.done():
                raise ConnectionError("connection closed before the login reply")
            raise TimeoutError(f"no login reply within {self.cfg.connect_timeout:g} s")
        resp = login.result()
        if not resp.success:
            raise AmiError(str(resp.get("Message", "")) or "login refused")
        m.authenticated = True
        self.state = "up"
        self.connects += 1
        self.last_error = ""
        self.connected_event.set()
        started = loop.time()
        log.info("AMI connected to %s:%d as %r", self.cfg.host, self.cfg.port, self.cfg.user)
        if self.on_login is not None:
            try:
                self.on_login()
            except Exception:
                log.exception("AMI on_login hook failed")
        await self._watch(loop)
        return loop.time() - started

    async def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Return when the connection is lost, or after closing a silently dead one."""
        assert self._lost is not None
        while not self._lost.done():
            idle = loop.time() - self.last_rx
            if idle < self.cfg.ping_interval:
                await asyncio.wait({self._lost}, timeout=self.cfg.ping_interval - idle)
                continue
            ping = self.manager.send_action({"Action": "Ping"})
            await asyncio.wait({ping, self._lost}, timeout=self.cfg.ping_timeout, return_when=asyncio.FIRST_COMPLETED)
            if self._lost.done():
                ping.cancel()
                return
            if not ping.done():
                ping.cancel()
                self.watchdog_trips += 1
                log.warning("AMI connection silent: no reply to Ping within %g s after %.0f s of quiet; reconnecting",
                            self.cfg.ping_timeout, idle)
                return

    def _connection_lost(self, exc) -> None:
        if self.state in ("up", "connecting"):
            self.state = "down"  # keep "auth-failed" visible after Asterisk closes on us
        self.connected_event.clear()
        self._fail_pending("AMI connection lost before Asterisk replied")
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(exc)

    def _fail_pending(self, why: str) -> None:
        m = self.manager
        pending = list(m.awaiting_actions) + list(getattr(m.protocol, "responses", {}).values() if m.protocol else [])
        m.awaiting_actions.clear()
        for action in pending:
            fut = getattr(action, "future", None)
            if fut is not None and not fut.done():
                fut.set_exception(AmiError(why))
                fut.exception()  # retrieved: no "never retrieved" noise for forgotten pings

    def _drop(self) -> None:
        if self.state == "up" or self.state == "connecting":
            self.state = "down"
        self.connected_event.clear()
        self.manager.authenticated = False
        self.manager._connected = False
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        self._fail_pending("AMI connection closed")

    def _dispatch(self, manager, event) -> None:
        self.events += 1
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("AMI event handler failed on %s", str(event.get("Event", ""))[:40])

    # -- actions --------------------------------------------------------------------------
    async def send_action(self, action: dict) -> dict:
        """Send one action and return Asterisk's response as a dict; fail fast with AmiError
        when not connected, on timeout, or when the connection drops before the reply.

        Header values must be single lines (a CR or LF would let text forge AMI headers).
        A list response (EventList) comes back as ``{"Response": ..., "Events": [...]}``.
        """
        if not self.connected:
            raise AmiError(f"AMI is not connected ({self.state}{': ' + self.last_error if self.last_error else ''})")
        clean: dict = {}
        for k, v in action.items():
            text = str(v)
            if any(ch in text or ch in str(k) for ch in "\r\n\0"):
                raise ValueError(f"AMI action header {k!r} holds a line break")
            clean[str(k)] = text
        if "Action" not in clean:
            raise ValueError("an AMI action needs an 'Action' header")
        fut = self.manager.send_action(clean)
        try:
            resp = await asyncio.wait_for(fut, self.cfg.action_timeout)
        except TimeoutError:
            raise AmiError(f"no AMI reply to {clean['Action']} within {self.cfg.action_timeout:g} s") from None
        if isinstance(resp, list):
            head = dict(resp[0].items()) if resp else {}
            head["Events"] = [dict(r.items()) for r in resp[1:]]
            return head
        return dict(resp.items())

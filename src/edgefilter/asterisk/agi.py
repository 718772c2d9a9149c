"""FastAGI protocol adapter: our own connection loop, because every byte Asterisk sends is hostile.

panoramisk's FastAGI reader spins forever when a peer closes mid env block, crashes on non-UTF-8
and mis-orders replies after an inline HANGUP (DESIGN.md), so this module owns the socket:
it reads the env block with a size limit and a timeout, checks its shape (a caller can plant
lines through ``%0A`` in the SIP From user part), sends one command at a time (Asterisk stalls
on pipelined commands) and closes at once, because Asterisk sends the SIP response only after the
close. Only values from a strict character set are ever written back into the command stream.

The env block's reading and checks (``read_env``, ``build_call``) live in envblock.py; this
module keeps the session, the server and the commands we write, and re-exports envblock's names.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

# The env block's side (issue 18 split it out); every name stays importable from here, the
# private ones too (tests build an _EnvParser through this module).
from edgefilter.asterisk.envblock import _REQUIRED as _REQUIRED
from edgefilter.asterisk.envblock import ENV_KEYS as ENV_KEYS
from edgefilter.asterisk.envblock import MAX_LINE as MAX_LINE
from edgefilter.asterisk.envblock import REQUIRED_CLASSIC as REQUIRED_CLASSIC
from edgefilter.asterisk.envblock import EnvBlock, EnvError, build_call, read_env, stream_limit
from edgefilter.asterisk.envblock import _EnvParser as _EnvParser
from edgefilter.asterisk.envblock import caller_number as caller_number
from edgefilter.core.errors import ProtocolError
from edgefilter.core.model import Call

log = logging.getLogger("edgefilter.agi")

_REPLY = re.compile(rb"^(\d{3})([ -])(.*)\n\Z", re.S)
_RESULT = re.compile(rb"^result=(-?\d+)(?: \((.*)\))?(?: (.*))?$", re.S)
#: Characters allowed in any value we write into an AGI command. No quote, backslash, comma,
#: '$', parentheses or control byte: nothing can end the argument, split MSet or expand.
_SAFE_VALUE = re.compile(r"[^A-Za-z0-9_ .:+\-\[\]?!#/@*]")
_SAFE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}\Z")  # not "$": it accepts a trailing LF
#: The one dial plan function we write: MSet writes functions too (pbx_builtin_setvar_helper), so
#: the answer that carries the verdict also clears the wait the subroutine armed.
CLEAR_WAIT = {"TIMEOUT(absolute)": "0"}
#: res_agi reads a command with fgets() into a 2048-byte buffer: a longer line would be split
#: into two commands on the Asterisk side, so we never send one (line plus LF <= 2047 bytes).
MAX_COMMAND = 2046
#: What Asterisk may legitimately have sent between the env block and our first command.
_HANGUP = b"HANGUP\n"
#: AgiSession takes a reply line already buffered without a timer (tests turn it off to compare).
REPLY_FAST_PATH = True


def _decode(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def unread_junk(reader: asyncio.StreamReader) -> bytes:
    """Bytes already received that no command asked for (HANGUP lines aside).

    Asterisk writes nothing between the env block and our first command, nor after the reply
    to a command, except an unsolicited ``HANGUP``. Anything else there was planted through a
    caller-controlled value (a blank line inside an AGI argument ends the block early and
    pushes the rest of the real block into the reply stream). asyncio's StreamReader has no
    public peek, so this reads its buffer (a bytearray in CPython 3.8-3.13, pinned by a test).
    """
    pending = bytes(getattr(reader, "_buffer", b""))
    while pending.startswith(_HANGUP):
        pending = pending[len(_HANGUP):]
    if _HANGUP.startswith(pending):  # nothing, or a HANGUP line still arriving
        return b""
    return pending


def safe_value(text: str, limit: int = 200) -> str:
    """Strip every character that could break out of an AGI argument or split MSet.

    Brackets are kept only when balanced: MSet splits its pairs with Asterisk's
    separate_args, where an open '[' hides every later comma (the next variables would be
    swallowed into this value).
    """
    out = _SAFE_VALUE.sub("", text)[:limit]
    if "[" in out or "]" in out:
        if not brackets_balanced(out):
            out = out.replace("[", "").replace("]", "")
    return out


def brackets_balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def mset_command(variables: dict[str, str]) -> str:
    """``EXEC MSet "A=1,B=x y"``: several variables in one round trip, values made safe."""
    pairs = []
    for name, value in variables.items():
        if not _SAFE_NAME.match(name) and name not in CLEAR_WAIT:
            raise ValueError(f"unsafe channel variable name {name!r}")
        pairs.append(f"{name}={safe_value(value)}")
    return f'EXEC MSet "{",".join(pairs)}"'


@dataclass(frozen=True)
class Reply:
    code: int
    result: int | None = None
    data: str = ""
    hangup: bool = False  # an unsolicited HANGUP line arrived before this reply

    @property
    def ok(self) -> bool:
        return self.code == 200


class AgiWriter(Protocol):
    """What a session writes through: an asyncio.StreamWriter, or the classic launcher's stdout.

    ``can_write_eof``/``write_eof`` are only called when the writer has a transport (close_writer).
    """

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...


class AgiSession:
    """One FastAGI connection after its env block: send commands one at a time, read replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: AgiWriter, env: EnvBlock, call: Call, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.env = env
        self.call = call
        self.timeout = timeout
        self.hungup = False
        self.commands: list[str] = []
        #: Set when bytes nobody asked for were found after the env block: the block was forged
        #: and replies can no longer be trusted, so the route answers and closes without reading.
        self.out_of_step = False

    async def command(self, line: str) -> Reply:
        """Send one command line and wait for its reply (never pipelined)."""
        if "\n" in line or "\r" in line or "\0" in line:
            raise ValueError("AGI command must be a single line")
        if len(line.encode("utf-8")) > MAX_COMMAND:
            raise ValueError(f"AGI command longer than {MAX_COMMAND} bytes: Asterisk would split it in two")
        self.commands.append(line)
        self.writer.write(line.encode("utf-8") + b"\n")
        await self.writer.drain()
        return await self._read_reply()

    async def _read_reply(self) -> Reply:
        buffered = getattr(self.reader, "_buffer", None)
        if REPLY_FAST_PATH and buffered is not None and b"\n" in buffered and buffered[3:4] != b"-" and not buffered.startswith(_HANGUP):
            # One complete reply line is already here and it is neither HANGUP nor the start of
            # a multi-line reply: _read_reply_lines takes it in one readuntil that cannot
            # suspend, so no deadline could fire and the timer is skipped (same reply, same
            # errors, same bytes left).
            return await self._read_reply_lines()
        async with asyncio.timeout(self.timeout):
            return await self._read_reply_lines()

    async def _read_reply_lines(self) -> Reply:
        hangup = False
        while True:
            line = await self.reader.readuntil(b"\n")
            if line == b"HANGUP\n":
                hangup = self.hungup = True
                continue
            m = _REPLY.match(line)
            if m is None:
                raise ProtocolError(f"reply out of step: {line[:80]!r}")
            code, sep, rest = int(m.group(1)), m.group(2), m.group(3)
            if sep == b"-":  # multi-line 520 usage: read to its last line
                while not (await self.reader.readuntil(b"\n")).startswith(b"%d " % code):
                    pass
                return Reply(code, hangup=hangup)
            if code == 511:
                self.hungup = True
            r = _RESULT.match(rest)
            if r is None:
                return Reply(code, data=_decode(rest), hangup=hangup)
            return Reply(code, int(r.group(1)), _decode(r.group(2) or b""), hangup=hangup)

    def unread_junk(self) -> bytes:
        return unread_junk(self.reader)

    async def set_variables(self, variables: dict[str, str]) -> Reply:
        """Set every variable in one round trip with ``EXEC MSet``; fall back to SET VARIABLE.

        The reply must be the one MSet gives (``200 result=0``; -2 when MSet is missing; 511 on
        a dead channel): anything else, such as a planted ``200 result=1 (allow)``, means the
        stream is out of step and raises ProtocolError.
        """
        reply = await self.command(mset_command(variables))
        if reply.code == 200 and reply.result == -2:  # MSet missing (very old Asterisk)
            for name, value in variables.items():
                reply = await self.command(f'SET VARIABLE {name} "{safe_value(value)}"')
                if not (reply.code == 200 and reply.result == 1) and reply.code != 511:
                    raise ProtocolError(f"unexpected reply to SET VARIABLE: {reply.code} result={reply.result}")
            return reply
        if not (reply.code == 200 and reply.result == 0) and reply.code != 511:
            raise ProtocolError(f"unexpected reply to EXEC MSet: {reply.code} result={reply.result} ({safe_value(reply.data, 40)})")
        return reply


Handler = Callable[[AgiSession], Awaitable[None]]


class _Throttle:
    """At most one log line per reason every ``interval`` seconds, with a count of the rest.

    A thousand idle or garbage connections must not become a thousand log lines; the first one
    of each kind is always logged at once.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, reason: str, msg: str, *args) -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last[reason] = now
        n = self._suppressed.pop(reason, 0)
        if n and last is not None:  # a count is only kept while an earlier line is in the window
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, n, now - last)
        log.warning(msg, *args)


class AgiServer:
    """The FastAGI listener: accepts, guards and dispatches connections to route handlers.

    One broken connection never affects another: each runs in its own task and every error is
    caught and logged at the connection boundary. Connections still waiting for their env block
    are tracked oldest first: when ``max_sessions`` is reached, the oldest of them is closed to
    make room (a real Asterisk sends its block in well under a millisecond), so idle or dribbling
    peers cannot lock real calls out.
    """

    def __init__(
        self,
        routes: dict[str, Handler],
        *,
        host: str = "127.0.0.1",
        port: int = 4573,
        read_timeout: float = 2.0,
        max_env_bytes: int = 16384,
        max_sessions: int = 1000,
        allow_peers: tuple = (),
        reuse_port: bool = False,
    ) -> None:
        self.routes = routes
        self.host, self.port = host, port
        self.read_timeout = read_timeout
        self.max_env_bytes = max_env_bytes
        self.max_sessions = max_sessions
        self.allow_peers = allow_peers
        self.reuse_port = reuse_port  # several worker processes on one port (SO_REUSEPORT)
        self.active = 0
        self.refused = 0
        self.evicted = 0
        self.denied = 0
        self._peer_verdicts: dict = {}  # peer address -> allowed? (cleared when allow_peers changes)
        self.server: asyncio.AbstractServer | None = None
        self._waiting: dict[asyncio.StreamWriter, float] = {}  # insertion order = oldest first
        self._evicting: set[asyncio.StreamWriter] = set()
        self._throttle = _Throttle()

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=stream_limit(self.max_env_bytes), backlog=1024,
            reuse_port=self.reuse_port or None,
        )
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("FastAGI listening on %s:%d", sock[0], sock[1])

    def set_limits(self, *, allow_peers: tuple, read_timeout: float, max_sessions: int) -> None:
        """A reload's new [agi] limits; every later connection obeys them (max_env_bytes sizes
        the listener's buffers and needs a restart)."""
        if allow_peers != self.allow_peers:
            self.allow_peers = allow_peers
            self._peer_verdicts = {}
        self.read_timeout = read_timeout
        self.max_sessions = max_sessions

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _peer_allowed(self, peer) -> bool:
        if not self.allow_peers:
            return True
        host = peer[0] if isinstance(peer, tuple) and peer else None
        known = self._peer_verdicts.get(host)
        if known is None:
            known = self._check_peer(peer)
            if len(self._peer_verdicts) >= 1024:  # bounded: a scan of many addresses cannot grow it
                self._peer_verdicts.clear()
            self._peer_verdicts[host] = known
        return known

    def _check_peer(self, peer) -> bool:
        import ipaddress

        try:
            addr = ipaddress.ip_address(peer[0])
        except (ValueError, TypeError, IndexError):
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == n.version and addr in n for n in self.allow_peers)

    def _make_room(self) -> bool:
        """Close the oldest connection still waiting for its env block; False if there is none."""
        for writer in self._waiting:
            if writer not in self._evicting:
                self._evicting.add(writer)
                self.evicted += 1
                writer.transport.abort()
                return True
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        if not self._peer_allowed(peer):
            self.denied += 1
            self._throttle.warning("denied", "FastAGI connection from %s refused: not in [agi] allow_peers", peer[0])
            writer.transport.abort()
            return
        if self.active - len(self._evicting) >= self.max_sessions and not self._make_room():
            self.refused += 1
            self._throttle.warning(
                "full", "FastAGI connection from %s closed: %d sessions already open ([agi] max_sessions)", peer[0], self.active
            )
            writer.close()
            return
        self.active += 1
        try:
            await self._session(reader, writer, peer)
        except Exception:
            log.exception("FastAGI session from %s failed", peer[0])
        finally:
            self.active -= 1
            self._waiting.pop(writer, None)
            self._evicting.discard(writer)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer) -> None:
        self._waiting[writer] = time.monotonic()
        out_of_step = ""
        try:
            env = await read_env(reader, max_bytes=self.max_env_bytes, timeout=self.read_timeout)
        except EnvError as e:
            if writer in self._evicting:
                self._throttle.warning(
                    "evicted", "FastAGI connection from %s closed to make room: no env block after %.0f ms ([agi] max_sessions)",
                    peer[0], (time.monotonic() - self._waiting.get(writer, time.monotonic())) * 1000,
                )
                return
            if not (e.hostile and "agi_network_script" in e.env.values):
                self._throttle.warning(" ".join(str(e).split()[:3]), "FastAGI connection from %s closed: %s", peer[0], e)
                return
            # It began like Asterisk's block, then broke its limits: answer it as forged rather
            # than fail open, and do not read on (the stream cannot be trusted any more).
            env = e.env
            env.forged.append(str(e))
            out_of_step = str(e)
        finally:
            self._waiting.pop(writer, None)
        if not out_of_step:
            junk = unread_junk(reader)
            if junk:
                out_of_step = f"{len(junk)} bytes after the env block before any command"
                env.forged.append(out_of_step)
        call = build_call(env)
        if call.forged:
            log.warning(
                "forged FastAGI env block from %s uniqueid=%s: %s", peer[0], safe_value(call.uniqueid, 40), call.forged
            )
        if env.hostile:
            log.warning(
                "hostile FastAGI env values from %s uniqueid=%s: %s", peer[0], safe_value(call.uniqueid, 40),
                "; ".join(dict.fromkeys(env.hostile)),
            )
        handler = self.routes.get(call.route)
        if handler is None:
            log.warning("FastAGI request for unknown route %r from %s: closed (dial plan fails open)", safe_value(call.route, 40), peer[0])
            return
        session = AgiSession(reader, writer, env, call, self.read_timeout)
        session.out_of_step = bool(out_of_step)
        try:
            await handler(session)
        except (TimeoutError, ProtocolError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            log.warning("FastAGI session %s from %s ended early: %s", safe_value(call.uniqueid, 40), peer[0], e or type(e).__name__)


def close_writer(writer: AgiWriter) -> None:
    """End the session now; Asterisk sends the SIP response only after our close.

    ``write_eof`` sends the FIN at once (a plain ``close`` only sends it on the next turn of
    the event loop), so Asterisk is released before the decision's log line and call record
    are written; then the transport is closed and its teardown left to the loop.
    """
    try:
        transport = getattr(writer, "transport", None)  # the classic launcher's stdout has none
        if transport is not None and not transport.is_closing() and writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        pass
    writer.close()


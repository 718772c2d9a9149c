"""FastAGI protocol adapter: our own connection loop, because every byte Asterisk sends is hostile.

panoramisk's FastAGI reader spins forever when a peer closes mid env block, crashes on non-UTF-8
and mis-orders replies after an inline HANGUP (DESIGN.md), so this module owns the socket:
it reads the env block with a size limit and a timeout, checks its shape (a caller can plant
lines through ``%0A`` in the SIP From user part), sends one command at a time (Asterisk stalls
on pipelined commands) and closes at once, because Asterisk sends the SIP response only after the
close. Only values from a strict character set are ever written back into the command stream.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import parse_qsl

from .errors import ProtocolError
from .model import Call

log = logging.getLogger("edgefilter.agi")

#: Keys a real Asterisk always sends, in the order it sends them (22.x; same since 1.8 but for
#: agi_network and agi_enhanced placement). The block is complete only when all have arrived.
ENV_KEYS = (
    "agi_network",
    "agi_network_script",
    "agi_request",
    "agi_channel",
    "agi_language",
    "agi_type",
    "agi_uniqueid",
    "agi_version",
    "agi_callerid",
    "agi_calleridname",
    "agi_callingpres",
    "agi_callingani2",
    "agi_callington",
    "agi_callingtns",
    "agi_dnid",
    "agi_rdnis",
    "agi_context",
    "agi_extension",
    "agi_priority",
    "agi_enhanced",
    "agi_accountcode",
    "agi_threadid",
)
_ORDER = {k: i for i, k in enumerate(ENV_KEYS)}
_REQUIRED = frozenset(ENV_KEYS)
#: A classic (stdin) AGI gets no agi_network / agi_network_script lines.
REQUIRED_CLASSIC = _REQUIRED - {"agi_network", "agi_network_script"}
_ENV_KEY = re.compile(r"agi_[a-z0-9_]{1,40}\Z")
_ARG_KEY = re.compile(r"^agi_arg_([1-9][0-9]{0,2})$")
_REPLY = re.compile(rb"^(\d{3})([ -])(.*)\n\Z", re.S)
_RESULT = re.compile(rb"^result=(-?\d+)(?: \((.*)\))?(?: (.*))?$", re.S)
#: Characters allowed in any value we write into an AGI command. No quote, backslash, comma,
#: '$', parentheses or control byte: nothing can end the argument, split MSet or expand.
_SAFE_VALUE = re.compile(r"[^A-Za-z0-9_ .:+\-\[\]?!#/@*]")
_SAFE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
MAX_LINE = 8192


def stream_limit(max_env_bytes: int) -> int:
    """StreamReader limit that lets read_env take a whole env block in one readuntil."""
    return max(MAX_LINE, max_env_bytes) + 2


@dataclass
class EnvBlock:
    """The FastAGI env block as received: decoded values plus the verdict on its shape."""

    values: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    forged: list[str] = field(default_factory=list)
    size: int = 0

    @property
    def script(self) -> str:
        return self.values.get("agi_network_script", "")


def _decode(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


async def read_env(
    reader: asyncio.StreamReader, *, max_bytes: int, timeout: float, required: frozenset[str] = _REQUIRED
) -> EnvBlock:
    """Read one env block; raise ProtocolError on EOF, timeout, oversize or garbage.

    A blank line before every always-sent key has arrived, a line that is not ``agi_key: value``,
    a duplicate or an out-of-order key mean the block was forged through a caller-controlled
    value: the block is read on to its real end (so later replies stay in step) and marked.

    After its first line, the block is taken from the stream up to its blank line in one
    ``readuntil`` under one deadline and split in memory: reading it line by line under
    ``wait_for`` cost a task and an event-loop turn per line (22 of them, about 0.7 ms a call,
    the biggest item in the profile). The reader's limit must exceed ``max_bytes``
    (``stream_limit``; AgiServer and the launcher set it so).
    """
    env = EnvBlock()
    parser = _EnvParser(env, max_bytes, required)
    try:
        async with asyncio.timeout(timeout):
            sep = b"\n"  # the first line alone, so that a non-FastAGI client is turned away at once
            while True:
                try:
                    chunk = await reader.readuntil(sep)
                except asyncio.IncompleteReadError as e:
                    raise ProtocolError(f"connection closed inside the env block ({env.size + len(e.partial)} bytes received)") from None
                except asyncio.LimitOverrunError:
                    raise ProtocolError(f"env block larger than {max_bytes} bytes (or a line longer than {MAX_LINE})") from None
                if parser.feed(chunk):
                    return env
                sep = b"\n\n"
    except TimeoutError:
        raise ProtocolError(f"env block not complete within {timeout:g}s ({env.size} bytes received)") from None


class _EnvParser:
    """Checks env lines in order exactly as they arrive; ``feed`` says when the block is complete."""

    __slots__ = ("env", "max_bytes", "required", "highest")

    def __init__(self, env: EnvBlock, max_bytes: int, required: frozenset[str]) -> None:
        self.env, self.max_bytes, self.required, self.highest = env, max_bytes, required, -1

    def feed(self, chunk: bytes) -> bool:
        """Take bytes ending in a newline; True once the block is complete.

        The blank line that completes a block is always the chunk's last line: a blank line at
        the start of a chunk can only follow an incomplete block, so nothing read past the
        block's real end is ever consumed. The chunk is decoded once (invalid UTF-8 becomes
        U+FFFD exactly as a value-by-value decode would, since a newline ends any sequence).
        """
        env = self.env
        size = env.size + len(chunk)
        if size > self.max_bytes:
            raise ProtocolError(f"env block larger than {self.max_bytes} bytes")
        if len(chunk) > MAX_LINE and any(len(line) >= MAX_LINE for line in chunk.split(b"\n")):
            raise ProtocolError(f"env line longer than {MAX_LINE} bytes")
        env.size = size
        values = env.values
        order_get = _ORDER.get
        lines = chunk.decode("utf-8", errors="replace").split("\n")
        lines.pop()  # the chunk ends with a newline: nothing after it
        for line in lines:
            key, sep, value = line.partition(": ")
            order = order_get(key)
            if order is not None and order > self.highest and sep and key not in values:
                self.highest = order  # the usual case: the next known key, in order, once
                values[key] = value
            elif self._unusual(line, key, sep, value, order):
                return True
        return False

    def _unusual(self, line: str, key: str, sep: str, value: str, order: int | None) -> bool:
        """Every line that is not the next known key: blank lines, arguments, forgeries."""
        env = self.env
        values = env.values
        if not line:
            if self.required.issubset(values):
                return True
            if not values:
                raise ProtocolError("blank line before any env key: not a FastAGI client")
            env.forged.append(f"blank line after {len(values)} keys, before the end of the env block")
            return False
        if not sep or (order is None and _ENV_KEY.match(key) is None):
            if not values:
                raise ProtocolError("garbage instead of an env block")
            env.forged.append("a line that is not 'agi_key: value' inside the env block")
            return False
        if key in values:
            env.forged.append(f"duplicate {key}")
        if order is not None:
            if order < self.highest:
                env.forged.append(f"{key} out of order")
            if order > self.highest:
                self.highest = order
        elif key.startswith("agi_arg_") and _ARG_KEY.match(key) is not None:
            if "agi_threadid" not in values:
                env.forged.append(f"{key} before agi_threadid")
            env.args.append(value)
        values[key] = value
        return False


def build_call(env: EnvBlock) -> Call:
    """Turn an env block into the domain Call (route, params and positional args split out)."""
    v = env.values
    script = env.script
    route, _, query = script.partition("?")
    params: dict[str, str] = {}
    for k, val in parse_qsl(query, keep_blank_values=True):
        params.setdefault(k.lower()[:32], val[:256])
    args: list[str] = []
    for a in env.args:
        k, eq, val = a.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", k):
            params[k.lower()] = val[:256]
        else:
            args.append(a[:256])
    if args and "exten" not in params and args[0]:
        params["exten"] = args[0]
    try:
        pres = int(v.get("agi_callingpres", "0"))
    except ValueError:
        pres = 0
    return Call(
        callerid=v.get("agi_callerid", ""),
        calleridname=v.get("agi_calleridname", ""),
        dnid=v.get("agi_dnid", ""),
        extension=v.get("agi_extension", ""),
        context=v.get("agi_context", ""),
        uniqueid=v.get("agi_uniqueid", ""),
        channel=v.get("agi_channel", ""),
        callingpres=pres,
        args=tuple(args),
        params=params,
        forged="; ".join(dict.fromkeys(env.forged)),
        route=route.strip("/").lower(),
    )


def safe_value(text: str, limit: int = 200) -> str:
    """Strip every character that could break out of an AGI argument or split MSet."""
    return _SAFE_VALUE.sub("", text)[:limit]


def mset_command(variables: dict[str, str]) -> str:
    """``EXEC MSet "A=1,B=x y"``: several variables in one round trip, values made safe."""
    pairs = []
    for name, value in variables.items():
        if not _SAFE_NAME.match(name):
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


class AgiSession:
    """One FastAGI connection after its env block: send commands one at a time, read replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, env: EnvBlock, call: Call, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.env = env
        self.call = call
        self.timeout = timeout
        self.hungup = False
        self.commands: list[str] = []

    async def command(self, line: str) -> Reply:
        """Send one command line and wait for its reply (never pipelined)."""
        if "\n" in line or "\r" in line or "\0" in line:
            raise ValueError("AGI command must be a single line")
        self.commands.append(line)
        self.writer.write(line.encode("utf-8") + b"\n")
        await self.writer.drain()
        return await self._read_reply()

    async def _read_reply(self) -> Reply:
        # One deadline for the whole reply (asyncio.timeout, not a wait_for task per line).
        async with asyncio.timeout(self.timeout):
            return await self._reply_lines()

    async def _reply_lines(self) -> Reply:
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

    async def set_variables(self, variables: dict[str, str]) -> Reply:
        """Set every variable in one round trip with ``EXEC MSet``; fall back to SET VARIABLE."""
        reply = await self.command(mset_command(variables))
        if reply.code == 200 and reply.result == -2:  # MSet missing (very old Asterisk)
            for name, value in variables.items():
                reply = await self.command(f'SET VARIABLE {name} "{safe_value(value)}"')
        return reply


Handler = Callable[[AgiSession], Awaitable[None]]


class AgiServer:
    """The FastAGI listener: accepts, guards and dispatches connections to route handlers.

    One broken connection never affects another: each runs in its own task and every error is
    caught and logged at the connection boundary.
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
        self._peer_verdicts: dict = {}  # peer address -> allowed? (allow_peers is fixed per server)
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=stream_limit(self.max_env_bytes), backlog=1024,
            reuse_port=self.reuse_port or None,
        )
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("FastAGI listening on %s:%d", sock[0], sock[1])

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

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        if not self._peer_allowed(peer):
            log.warning("FastAGI connection from %s refused: not in [agi] allow_peers", peer[0])
            writer.close()
            return
        if self.active >= self.max_sessions:
            self.refused += 1
            log.warning("FastAGI connection from %s closed: %d sessions already open ([agi] max_sessions)", peer[0], self.active)
            writer.close()
            return
        self.active += 1
        try:
            await self._session(reader, writer, peer)
        except Exception:
            log.exception("FastAGI session from %s failed", peer[0])
        finally:
            self.active -= 1
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer) -> None:
        try:
            env = await read_env(reader, max_bytes=self.max_env_bytes, timeout=self.read_timeout)
        except ProtocolError as e:
            log.warning("FastAGI connection from %s closed: %s", peer[0], e)
            return
        call = build_call(env)
        if call.forged:
            log.warning(
                "forged FastAGI env block from %s uniqueid=%s: %s", peer[0], safe_value(call.uniqueid, 40), call.forged
            )
        handler = self.routes.get(call.route)
        if handler is None:
            log.warning("FastAGI request for unknown route %r from %s: closed (dial plan fails open)", safe_value(call.route, 40), peer[0])
            return
        session = AgiSession(reader, writer, env, call, self.read_timeout)
        try:
            await handler(session)
        except (ProtocolError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
            log.warning("FastAGI session %s from %s ended early: %s", safe_value(call.uniqueid, 40), peer[0], e or type(e).__name__)


async def close_writer(writer: asyncio.StreamWriter) -> None:
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


def monotonic_ms() -> float:
    return time.perf_counter() * 1000.0

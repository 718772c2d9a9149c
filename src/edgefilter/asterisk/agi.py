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
import base64
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from edgefilter.core.errors import ProtocolError
from edgefilter.core.model import Call

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
_SAFE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}\Z")  # not "$": it accepts a trailing LF
#: The one dial plan function we write: MSet writes functions too (pbx_builtin_setvar_helper), so
#: the answer that carries the verdict also clears the wait the subroutine armed.
CLEAR_WAIT = {"TIMEOUT(absolute)": "0"}
MAX_LINE = 8192
#: res_agi reads a command with fgets() into a 2048-byte buffer: a longer line would be split
#: into two commands on the Asterisk side, so we never send one (line plus LF <= 2047 bytes).
MAX_COMMAND = 2046
#: Control bytes no real caller ID or name should carry (TAB is kept: pjsip passes it, 10/10b).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: _CONTROL but for the line feed: a control byte anywhere in a chunk of env lines.
_CONTROL_NOT_LF = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
#: The block exactly as a real Asterisk writes it to a FastAGI server: every key in order, once,
#: then its arguments, then the blank line. One match takes it whole (_EnvParser.canonical).
_CANONICAL = re.compile(
    "".join(f"{k}: ([^\n]*)\n" for k in ENV_KEYS) + r"((?:agi_arg_[1-9][0-9]{0,2}: [^\n]*\n)*)\n"
)
#: Control bytes in a caller *number* (TAB included: no number carries one).
_NUMBER_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A named AGI argument (``name=value``), as build_call splits them into params.
_PARAM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
#: An Asterisk context name as the dial plan passes it (context=); anything else is ignored.
_CONTEXT_NAME = re.compile(r"[A-Za-z0-9_\-.]{1,79}\Z")
#: What Asterisk may legitimately have sent between the env block and our first command.
_HANGUP = b"HANGUP\n"


def stream_limit(max_env_bytes: int) -> int:
    """StreamReader limit that lets read_env take a whole env block in one readuntil."""
    return max(MAX_LINE, max_env_bytes) + 2


@dataclass
class EnvBlock:
    """The FastAGI env block as received: decoded values plus the verdict on its shape."""

    values: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    forged: list[str] = field(default_factory=list)
    hostile: list[str] = field(default_factory=list)  # odd but in-step values (control bytes)
    size: int = 0

    @property
    def script(self) -> str:
        return self.values.get("agi_network_script", "")


def _decode(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


class EnvError(ProtocolError):
    """The env block could not be read; ``hostile`` when its shape (not the network) is to blame.

    ``env`` holds what was read before the failure, so that an oversize block that started
    like a real Asterisk one can still be answered (as forged) instead of failing open.
    """

    def __init__(self, message: str, env: EnvBlock, *, hostile: bool = False) -> None:
        super().__init__(message)
        self.env = env
        self.hostile = hostile


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


async def read_env(
    reader: asyncio.StreamReader, *, max_bytes: int, timeout: float, required: frozenset[str] = _REQUIRED
) -> EnvBlock:
    """Read one env block; raise EnvError (a ProtocolError) on EOF, timeout, oversize or garbage.

    ``timeout`` is one deadline for the whole block, not per read: a peer dribbling bytes cannot
    extend it. The first bytes must spell ``agi_`` (a TLS or HTTP client is refused at once).
    A blank line before every always-sent key has arrived, a line that is not ``agi_key: value``,
    a duplicate, out-of-order or unknown key, or an ``agi_arg_N`` out of sequence mean the block
    was forged through a caller-controlled value: the block is read on to its real end (so later
    replies stay in step) and marked. Control bytes in values are noted in ``hostile``.

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
            head = b""
            while head != b"agi_":  # buffered bytes: no event-loop turn unless the peer is slow
                head += await reader.readexactly(1)
                if head == b"\n":
                    raise EnvError("blank line before any env key: not a FastAGI client", env)
                if not b"agi_".startswith(head):
                    raise EnvError("garbage instead of an env block", env)
            # The first line alone, so that a non-FastAGI client is turned away at once; but when
            # the whole block is already here (the usual case: Asterisk writes it in one go), all
            # of it in one read.
            sep = b"\n\n" if b"\n\n" in getattr(reader, "_buffer", b"") else b"\n"
            while True:
                try:
                    chunk = head + await reader.readuntil(sep)
                except asyncio.LimitOverrunError as e:
                    # Keep what did arrive (its complete lines), so that a block that began like
                    # Asterisk's and then broke the limits can be answered as forged.
                    data = head + await reader.read(max(e.consumed, 1))
                    parser.salvage(data[: data.rfind(b"\n") + 1])
                    raise EnvError(f"env block larger than {max_bytes} bytes (or a line longer than {MAX_LINE})", env, hostile=True) from None
                head = b""
                if parser.feed(chunk):
                    return env
                sep = b"\n\n"
    except asyncio.IncompleteReadError as e:
        raise EnvError(f"connection closed inside the env block ({env.size + len(e.partial)} bytes received)", env) from None
    except TimeoutError:
        raise EnvError(f"env block not complete within {timeout:g}s ({env.size} bytes received)", env) from None


class _EnvParser:
    """Checks env lines in order exactly as they arrive; ``feed`` says when the block is complete."""

    __slots__ = ("env", "max_bytes", "required", "highest", "next_arg")

    def __init__(self, env: EnvBlock, max_bytes: int, required: frozenset[str]) -> None:
        self.env, self.max_bytes, self.required, self.highest, self.next_arg = env, max_bytes, required, -1, 1

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
            raise EnvError(f"env block larger than {self.max_bytes} bytes", env, hostile=True)
        if len(chunk) > MAX_LINE and any(len(line) >= MAX_LINE for line in chunk.split(b"\n")):
            raise EnvError(f"env line longer than {MAX_LINE} bytes", env, hostile=True)
        env.size = size
        return self._lines(chunk)

    def salvage(self, chunk: bytes) -> None:
        """Record the complete lines of a block that broke the limits (no size checks)."""
        try:
            self._lines(chunk)
        except ProtocolError:
            pass

    def _lines(self, chunk: bytes) -> bool:
        env = self.env
        values = env.values
        text = chunk.decode("utf-8", errors="replace")
        if not values and self.canonical(text):
            return True
        order_get = _ORDER.get
        control = _CONTROL.search
        lines = text.split("\n")
        lines.pop()  # the chunk ends with a newline: nothing after it
        for line in lines:
            key, sep, value = line.partition(": ")
            order = order_get(key)
            if order is not None and order > self.highest and sep and key not in values and not control(value):
                self.highest = order  # the usual case: the next known key, in order, once, clean
                values[key] = value
            elif self._unusual(line, key, sep, value, order):
                return True
        return False

    def canonical(self, text: str) -> bool:
        """Take a whole block of the one shape a real Asterisk sends, in one regex match.

        Line by line, the checks below cost a loop turn per line (about 25 of them, the largest
        part of reading a block). A block with every key in Asterisk's order, each once, its
        arguments numbered from 1 in sequence, a single blank line at its end and no control
        byte anywhere is exactly what they accept without a remark: the same values and
        arguments result. Anything else (missing keys, a classic AGI's block, an odd line, a
        control byte) answers False and goes through the line-by-line checks.
        """
        m = _CANONICAL.fullmatch(text)
        if m is None or _CONTROL_NOT_LF.search(text) is not None:
            return False
        groups = m.groups()
        args: list[tuple[str, str]] = []
        if groups[-1]:
            for n, line in enumerate(groups[-1].split("\n")[:-1], 1):
                key, _, value = line.partition(": ")
                if key != f"agi_arg_{n}":
                    return False  # out of sequence: the line-by-line checks say how
                args.append((key, value))
        values = self.env.values
        values.update(zip(ENV_KEYS, groups))
        for key, value in args:
            values[key] = value
            self.env.args.append(value)
        self.highest = len(ENV_KEYS) - 1
        self.next_arg = len(args) + 1
        return True

    def _unusual(self, line: str, key: str, sep: str, value: str, order: int | None) -> bool:
        """Every line that is not the next known clean key: blank lines, arguments, forgeries."""
        env = self.env
        values = env.values
        if not line:
            if self.required.issubset(values):
                return True
            if not values:
                raise EnvError("blank line before any env key: not a FastAGI client", env)
            env.forged.append(f"blank line after {len(values)} keys, before the end of the env block")
            return False
        if not sep or (order is None and _ENV_KEY.match(key) is None):
            if not values:
                raise EnvError("garbage instead of an env block", env)
            env.forged.append("a line that is not 'agi_key: value' inside the env block")
            return False
        if key in values:
            env.forged.append(f"duplicate {key}")
        arg = _ARG_KEY.match(key) if order is None else None
        if order is not None:
            if order < self.highest:
                env.forged.append(f"{key} out of order")
            if order > self.highest:
                self.highest = order
        elif arg is None:
            env.forged.append(f"unexpected key {key}")  # Asterisk sends no other keys
        else:
            if "agi_threadid" not in values:
                env.forged.append(f"{key} before agi_threadid")
            if int(arg.group(1)) != self.next_arg:
                env.forged.append(f"{key} out of sequence (expected agi_arg_{self.next_arg})")
            self.next_arg += 1
            env.args.append(value)
        if _CONTROL.search(value):
            env.hostile.append(f"control characters in {key}")
        values[key] = value
        return False


def build_call(env: EnvBlock) -> Call:
    """Turn an env block into the domain Call (route, params and positional args split out)."""
    v = env.values
    script = env.script
    route, _, query = script.partition("?")
    params: dict[str, str] = {}
    if query:
        for k, val in parse_qsl(query, keep_blank_values=True):
            params.setdefault(k.lower()[:32], val[:256])
    args: list[str] = []
    for a in env.args:
        k, eq, val = a.partition("=")
        if eq and _PARAM_NAME.fullmatch(k):
            params[k.lower()] = val[:256]
        else:
            args.append(a[:256])
    if args and "exten" not in params and args[0]:
        params["exten"] = args[0]
    try:
        pres = int(v.get("agi_callingpres", "0"))
    except ValueError:
        pres = 0
    forged = list(env.forged)
    callerid = caller_number(v.get("agi_callerid", ""), params.pop("cid", None), forged)
    context = v.get("agi_context", "")
    # The shipped subroutine passes the caller's context (inside a Gosub, agi_context is the
    # subroutine's own): policies match on the context the call came in on.
    given = params.get("context", "")
    if given and _CONTEXT_NAME.match(given):
        context = given
    return Call(
        callerid=callerid,
        calleridname=v.get("agi_calleridname", ""),
        dnid=v.get("agi_dnid", ""),
        extension=v.get("agi_extension", ""),
        context=context,
        uniqueid=v.get("agi_uniqueid", ""),
        channel=v.get("agi_channel", ""),
        callingpres=pres,
        args=tuple(args),
        params=params,
        forged="; ".join(dict.fromkeys(forged)),
        route=route.strip("/").lower(),
    )


def caller_number(env_value: str, encoded: str | None, forged: list[str]) -> str:
    """The caller number to judge, from the env block and the dial plan's ``cid=`` argument.

    ``cid`` is ``${BASE64_ENCODE(${CALLERID(num)})}``: the caller number exactly as Asterisk has
    it, which no caller text can split or forge on its way here (the env block's
    ``agi_callerid`` is written raw and ends at the first line feed). A number that carries a
    control character (a line feed planted through ``%0A`` in the SIP From user part, a CR, a
    TAB) is forged: the reason goes into ``forged`` (always rejected) and the number is cut in
    front of that character, so that a blocked number still meets its own block.
    """
    raw = env_value
    if encoded is not None and encoded != "":
        try:
            raw = base64.b64decode(encoded.encode("ascii"), validate=True).decode("utf-8", errors="replace")
        except (ValueError, UnicodeEncodeError):
            forged.append("cid argument is not base64")
    elif encoded == "" and env_value not in ("", "unknown"):
        # CALLERID(num) was empty, yet the env block names a number: the env line was planted.
        forged.append("cid argument empty but agi_callerid is not")
    bad = _NUMBER_CONTROL.search(raw)
    if bad is None:
        return raw
    head = raw[: bad.start()]
    forged.append(f"control character {ord(bad.group()):#04x} in the caller ID after {len(head)} characters")
    return head


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
        if n:
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


def close_writer(writer: asyncio.StreamWriter) -> None:
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


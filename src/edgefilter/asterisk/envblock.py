"""The FastAGI env block: reading it off the socket and judging its shape, caller text included.

Split out of agi.py (issue 18): everything here works on what Asterisk sends before the first
command, all of it hostile (a caller can plant lines through ``%0A`` in the SIP From user part).
``read_env`` takes the block under one size limit and one deadline, ``_EnvParser`` checks each
line's key, order and bytes, and ``build_call`` turns the block into the domain Call, cutting
the caller number at any control character (``caller_number``). agi.py (the session, the
server and the commands we write back) imports from here and re-exports every name.
"""

from __future__ import annotations

import asyncio
import base64
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from edgefilter.core.errors import ProtocolError
from edgefilter.core.model import Call

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
MAX_LINE = 8192
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


#: read_env takes a block already buffered whole without a timer (tests turn it off to compare).
FAST_PATH = True


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


class EnvError(ProtocolError):
    """The env block could not be read; ``hostile`` when its shape (not the network) is to blame.

    ``env`` holds what was read before the failure, so that an oversize block that started
    like a real Asterisk one can still be answered (as forged) instead of failing open.
    """

    def __init__(self, message: str, env: EnvBlock, *, hostile: bool = False) -> None:
        super().__init__(message)
        self.env = env
        self.hostile = hostile



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
    (``stream_limit``; AgiServer and the launcher set it so). When the block is already in the
    reader's buffer up to a blank line (Asterisk writes it in one go), nothing awaited suspends:
    it is taken by the same calls without the timer (issue 16; ``FAST_PATH``).
    """
    env = EnvBlock()
    parser = _EnvParser(env, max_bytes, required)
    buffered = getattr(reader, "_buffer", None)
    try:
        if FAST_PATH and buffered is not None and buffered[:4] == b"agi_" and b"\n\n" in buffered:
            # The usual case: Asterisk wrote the block in one go and it is all here, up to a
            # blank line. The calls below are the slow path's own, minus the per-byte loop, and
            # none of them suspends (4 bytes are buffered; so is the separator), so no deadline
            # can fire: the timer (scheduled, cancelled) is skipped. If that blank line was a
            # forged one, the rest is read under the deadline that started with this call.
            deadline = asyncio.get_running_loop().time() + timeout
            if await _take(reader, parser, await reader.readexactly(4), b"\n\n", max_bytes):
                return env
            async with asyncio.timeout_at(deadline):
                while not await _take(reader, parser, b"", b"\n\n", max_bytes):
                    pass
                return env
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
            while not await _take(reader, parser, head, sep, max_bytes):
                head, sep = b"", b"\n\n"
            return env
    except asyncio.IncompleteReadError as e:
        raise EnvError(f"connection closed inside the env block ({env.size + len(e.partial)} bytes received)", env) from None
    except TimeoutError:
        raise EnvError(f"env block not complete within {timeout:g}s ({env.size} bytes received)", env) from None


async def _take(reader: asyncio.StreamReader, parser: _EnvParser, head: bytes, sep: bytes, max_bytes: int) -> bool:
    """Read up to ``sep`` (``head`` already taken) and feed the parser; True once the block is complete."""
    try:
        chunk = head + await reader.readuntil(sep)
    except asyncio.LimitOverrunError as e:
        # Keep what did arrive (its complete lines), so that a block that began like Asterisk's
        # and then broke the limits can be answered as forged.
        data = head + await reader.read(max(e.consumed, 1))
        parser.salvage(data[: data.rfind(b"\n") + 1])
        raise EnvError(f"env block larger than {max_bytes} bytes (or a line longer than {MAX_LINE})", parser.env, hostile=True) from None
    return parser.feed(chunk)


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
        values.update(zip(ENV_KEYS, groups, strict=False))  # the last group is the arguments
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

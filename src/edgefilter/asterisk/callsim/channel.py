"""The simulated channel and res_agi's ``run_agi`` loop for one FastAGI connection (``_AgiSession``).

Split out of callsim.py (issue 18): the asyncio Protocol that emulates res_agi's reads (the
kernel buffer and the stdio buffer, which is why pipelined commands stall), the inline and
final ``HANGUP`` lines, dead mode, and the channel's state: variables, functions, CALLERID,
``${...}`` substitution and queued DTMF. Commands are dispatched through commands.py's table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from edgefilter.asterisk.callsim.commands import _USAGE, _find_command
from edgefilter.asterisk.callsim.env import _normalize_name, _normalize_number
from edgefilter.asterisk.callsim.spec import CallResult, CallSpec
from edgefilter.asterisk.callsim.wire import (
    AGI_BUF_LEN,
    DEAD_REPLY,
    HANGUP_LINE,
    RESULT_FAILURE,
    RESULT_SHOWUSAGE,
    RESULT_SUCCESS,
    STATE_RING,
    STDIO_BUFSIZ,
    UNKNOWN_REPLY,
    USAGE_HEAD,
    USAGE_NONE,
    USAGE_TAIL,
    _atoi,
    _b,
    _cstr,
    parse_agi_args,
)

_PRESENTATIONS = {
    0: b"allowed_not_screened",
    1: b"allowed_passed_screen",
    2: b"allowed_failed_screen",
    3: b"allowed",
    32: b"prohib_not_screened",
    33: b"prohib_passed_screen",
    34: b"prohib_failed_screen",
    35: b"prohib",
    67: b"unavailable",
}


class _AgiSession(asyncio.Protocol):
    """One FastAGI connection, run like res_agi's ``run_agi`` loop.

    I/O model (why the buffers): res_agi polls the *socket* for readability,
    then reads one line with ``fgets`` from a stdio stream on top of it.
    ``kbuf`` holds bytes still "in the kernel" (readable), ``sbuf`` the stdio
    buffer.  A line already in ``sbuf`` is only taken after the socket becomes
    readable again, which is exactly why pipelined commands stall.
    """

    def __init__(
        self, spec: CallSpec, result: CallResult, loop: asyncio.AbstractEventLoop, truncate: bool = True
    ) -> None:
        self.spec = spec
        self.result = result
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.kbuf = bytearray()
        self.sbuf = bytearray()
        self.server_eof = False  # the socket reports EOF (server closed or reset)
        self.feof = False  # the stdio stream has seen EOF (sticky)
        self.wake = asyncio.Event()
        self.closed = loop.create_future()
        self.t0 = 0.0
        self.eof_at: float | None = None  # perf_counter() when the server's close was seen
        # channel state
        self.cid_num = _normalize_number(_b(spec.callerid), truncate)
        self.cid_name = _normalize_name(_b(spec.calleridname), truncate)
        self.state = STATE_RING
        self.hungup = False  # the channel has hung up (soft hangup pending or gone)
        self.dead = False  # res_agi switched to dead mode (HANGUP already written)
        self.vars: dict[bytes, bytes] = {}
        self.funcs: dict[bytes, bytes] = {}  # values written to functions other than CALLERID
        self.astdb: dict[tuple[bytes, bytes], bytes] = {}
        self.digits = bytearray(spec.digits)
        self.hangupcause = 0
        self.exten = _b(spec.extension) or b""
        self.context = _b(spec.context) or b""
        self.priority = 2
        for k, v in (spec.channel_vars or {}).items():
            self.vars[_b(k) or b""] = _b(v) or b""

    # asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.kbuf += data
        self.wake.set()

    def eof_received(self) -> bool:
        self._mark_eof()
        return True  # keep our half open: Asterisk still writes HANGUP after the close

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_eof()
        if not self.closed.done():
            self.closed.set_result(None)

    def _mark_eof(self) -> None:
        if not self.server_eof:
            self.server_eof = True
            self.eof_at = time.perf_counter()
        self.wake.set()

    # output ---------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """One ast_agi_send(): recorded even when the peer is gone (the write just fails)."""
        self.result.replies.append(data)
        self.result.transcript.append(("A", data))
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    # input: emulate fgets() on the non-blocking socket ----------------------------

    async def _wait(self) -> None:
        self.wake.clear()
        await self.wake.wait()

    async def _fgets(self, limit: int) -> bytes:
        """Up to ``limit`` bytes through the next LF, from the stdio buffer first.

        Reads more from the "socket" only when the buffer holds no full line,
        one stdio buffer (4096 bytes) at a time, waiting like res_agi's busy
        loop on EAGAIN when nothing is there yet.
        """
        while True:
            nl = self.sbuf.find(b"\n", 0, limit)
            if nl >= 0:
                return self._take(nl + 1)
            if len(self.sbuf) >= limit or self.feof:
                return self._take(min(limit, len(self.sbuf)))
            if self.kbuf:
                self.sbuf += self.kbuf[:STDIO_BUFSIZ]
                del self.kbuf[:STDIO_BUFSIZ]
                continue
            if self.server_eof:
                self.feof = True
                continue
            await self._wait()

    def _take(self, n: int) -> bytes:
        data = bytes(self.sbuf[:n])
        del self.sbuf[:n]
        return data

    async def read_command(self) -> bytes | None:
        """run_agi's read loop: one command line, or None when the server closed.

        Like the C code, a NUL inside a line makes the next fgets() overwrite
        from the NUL on (strlen-based appends), and a line starting with NUL
        counts as "program terminated".
        """
        buf = b""
        raw = b""
        while AGI_BUF_LEN - len(buf) > 1:
            piece = await self._fgets(AGI_BUF_LEN - len(buf) - 1)
            raw += piece
            buf = _cstr(buf + piece)
            if self.feof:
                break
            if buf.endswith(b"\n"):
                break
        if not buf:
            if raw:
                self.result.commands.append(raw)
            return None
        self.result.commands.append(raw)
        self.result.transcript.append(("S", raw))
        if self.sbuf or self.kbuf:
            self.result.pipelined += 1
        return buf

    # the run_agi loop ------------------------------------------------------------

    def hang_up(self) -> None:
        """The channel goes away; res_agi notices it on its next loop turn."""
        if not self.hungup:
            self.hungup = True
            self.wake.set()

    async def run(self) -> None:
        spec = self.spec
        if spec.hangup_before_commands:
            self.hang_up()
        timer = None
        if spec.hangup_after_seconds is not None:
            timer = self.loop.call_later(spec.hangup_after_seconds, self.hang_up)
        answered = 0
        try:
            while True:
                if self.hungup and not self.dead:
                    # needhup: switch to dead mode and tell the server inline.
                    self.dead = True
                    if self.result.agistatus == "SUCCESS":
                        self.result.agistatus = "HANGUP"
                    self.send(HANGUP_LINE)
                    if spec.exit_on_hangup:
                        break
                if not (self.kbuf or self.server_eof):
                    await self._wait()
                    continue
                line = await self.read_command()
                if line is None:
                    break
                answered += 1
                if spec.hangup_during_command == answered:
                    self.hang_up()
                status = self.handle_command(line)
                if status == RESULT_FAILURE and (self.dead or not self.hungup):
                    self.result.agistatus = "FAILURE"
                if spec.hangup_after_commands is not None and answered >= spec.hangup_after_commands:
                    self.hang_up()
        finally:
            if timer is not None:
                timer.cancel()
        # res_agi always writes HANGUP when the session ends, even to a closed socket.
        self.send(HANGUP_LINE)

    # command dispatch (agi_handle_command) --------------------------------------

    def handle_command(self, line: bytes) -> int:
        argv = parse_agi_args(line)
        found = _find_command(argv)
        if found is None:
            self.send(UNKNOWN_REPLY)
            return RESULT_SUCCESS
        words, handler, dead_ok = found
        if self.dead and not dead_ok:
            self.send(DEAD_REPLY)
            return RESULT_SUCCESS
        res = handler(self, argv)
        if res == RESULT_SHOWUSAGE:
            usage = _USAGE.get(words)
            if usage is None:
                self.send(USAGE_NONE)
            else:
                self.send(USAGE_HEAD)
                self.send(usage + b"\n")
                self.send(USAGE_TAIL)
            return RESULT_SUCCESS
        return res

    def reply(self, text: bytes | str) -> None:
        self.send((text.encode() if isinstance(text, str) else text) + b"\n")

    # variables -----------------------------------------------------------------

    def set_var(self, name: bytes, value: bytes) -> None:
        """pbx_builtin_setvar_helper(): variables, or a function write for ``NAME(...)``."""
        if name.endswith(b")"):
            self.write_func(name, value)
            key = name
        else:
            key = name[1:] if name.startswith(b"_") else name
            key = key[1:] if key.startswith(b"_") else key
            self.vars[key] = value
        self.result.raw_variables[key] = value
        self.result.variables[key.decode("utf-8", "surrogateescape")] = value.decode(
            "utf-8", "surrogateescape"
        )

    def write_func(self, name: bytes, value: bytes) -> None:
        fname, _, arg = name[:-1].partition(b"(")
        arg = arg.strip().lower()
        if fname.strip().upper() == b"CALLERID":
            if arg in (b"num", b"number"):
                self.cid_num = value
                return
            if arg == b"name":
                self.cid_name = value
                return
        self.funcs[name] = value

    def read_func(self, name: bytes) -> bytes | None:
        """ast_func_read(): None when the function or its argument is unknown."""
        if name in self.funcs:
            return self.funcs[name]
        fname, _, arg = name[:-1].partition(b"(")
        fname = fname.strip().upper()
        arg = arg.strip().lower()
        if fname == b"CALLERID":
            if arg in (b"num", b"number"):
                return self.cid_num
            if arg == b"name":
                return self.cid_name
            if arg == b"all":
                return b'"' + self.cid_name + b'" <' + self.cid_num + b">"
            if arg in (b"num-pres", b"number-pres", b"name-pres", b"pres"):
                return _PRESENTATIONS.get(self.spec.callingpres, b"unknown")
            if arg in (b"ton", b"num-plan", b"number-plan"):
                return b"0"
            if arg == b"dnid":
                return _b(self.spec.dnid) or b""
            if arg == b"rdnis":
                rdnis = _b(self.spec.rdnis) or b""
                return b"" if rdnis == b"unknown" else rdnis
            return None
        return None

    def retrieve_var(self, name: bytes) -> bytes | None:
        """pbx_retrieve_variable(): builtins first, then channel variables."""
        builtins: dict[bytes, Callable[[], bytes]] = {
            b"EXTEN": lambda: self.exten,
            b"CONTEXT": lambda: self.context,
            b"PRIORITY": lambda: str(self.priority).encode(),
            b"CHANNEL": lambda: _b(self.spec.channel) or b"",
            b"UNIQUEID": lambda: self.result.uniqueid.encode(),
            b"HANGUPCAUSE": lambda: str(self.hangupcause).encode(),
            b"CALLINGPRES": lambda: str(self.spec.callingpres).encode(),
            b"CALLINGANI2": lambda: b"0",
            b"CALLINGTON": lambda: b"0",
            b"CALLINGTNS": lambda: b"0",
            b"EPOCH": lambda: str(int(time.time())).encode(),
        }
        if name in builtins:
            return builtins[name]()
        return self.vars.get(name)

    def lookup(self, name: bytes) -> bytes | None:
        if name.endswith(b")"):
            return self.read_func(name)
        return self.retrieve_var(name)

    def substitute(self, text: bytes) -> bytes:
        """pbx_substitute_variables: ``${VAR}``, ``${FUNC(arg)}``, ``${VAR:off:len}``, nested."""
        out = bytearray()
        i = 0
        while i < len(text):
            j = text.find(b"${", i)
            if j < 0:
                out += text[i:]
                break
            out += text[i:j]
            depth, k = 1, j + 2
            while k < len(text) and depth:
                if text.startswith(b"${", k):
                    depth += 1
                    k += 2
                    continue
                if text[k] == 0x7D:
                    depth -= 1
                k += 1
            if depth:  # unterminated: copied as is
                out += text[j:]
                break
            inner = text[j + 2 : k - 1]
            if b"${" in inner:
                inner = self.substitute(inner)
            out += self._eval_expr(inner)
            i = k
        return bytes(out)

    def _eval_expr(self, expr: bytes) -> bytes:
        name, offset, length = expr, None, None
        depth = 0
        for pos, c in enumerate(expr):
            if c == 0x28:
                depth += 1
            elif c == 0x29:
                depth -= 1
            elif c == 0x3A and depth == 0:
                name = expr[:pos]
                parts = expr[pos + 1 :].split(b":", 1)
                offset = _atoi(parts[0])
                length = _atoi(parts[1]) if len(parts) > 1 and parts[1] else None
                break
        value = self.lookup(name) or b""
        if offset is not None:
            value = value[offset:] if offset >= 0 else value[offset:]
            if length is not None:
                value = value[:length] if length >= 0 else value[:length]
        return value

    # DTMF -----------------------------------------------------------------------

    def next_digit(self) -> int:
        return self.digits.pop(0) if self.digits else 0

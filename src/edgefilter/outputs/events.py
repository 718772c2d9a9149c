"""Metrics and decision events over UDP: StatsD lines and RFC 5424 syslog messages.

Both are fire-and-forget. The decision observer (called after the FastAGI socket is closed) only
formats a few bytes and ``put_nowait``s them into a bounded queue; a full queue drops the event and
counts it. One background task per output drains the queue and sends datagrams with asyncio-dgram.
A collector that is absent (ICMP port unreachable -> ECONNREFUSED on a later send), slow (UDP never
waits for the receiver) or unresolvable therefore costs a call nothing, and memory stays bounded
by ``[outputs] queue_size`` items per output.

This module sits in layer 2 (outputs): it sees a decision only through ``DecisionLike`` (the
attributes of ``screen.Decision``) and imports nothing above the model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import asyncio_dgram

from edgefilter.core.config import SYSLOG_FACILITIES, OutputsSettings
from edgefilter.core.model import Action, Call, Number, Verdict

log = logging.getLogger("edgefilter.events")

#: StatsD payload limit: fits one Ethernet frame with room for IPv6/tunnel headers (the size
#: the StatsD docs recommend for intranets). Several metrics go into one datagram up to this.
STATSD_MAX_DATAGRAM = 1432
#: RFC 5426: receivers SHOULD accept 2048-octet syslog messages over UDP; we never send more.
SYSLOG_MAX_MESSAGE = 2048
#: Longest caller-controlled text kept in an event, after escaping.
MAX_FIELD = 128
#: Most rules listed in one syslog event (a decision rarely has more than 5).
MAX_RULES = 32
#: RFC 5424 SD-ID of decision events; 32473 is the enterprise number reserved for documentation
#: and examples (RFC 5612). Collectors match it as an opaque name.
SD_ID = "decision@32473"
BLOCKING = frozenset({Action.CHALLENGE, Action.VOICEMAIL, Action.REJECT})
SEV_WARNING, SEV_NOTICE, SEV_INFO = 4, 5, 6
RECONNECT_AFTER = 5.0  # seconds before retrying an address that failed to resolve/connect


class DecisionLike(Protocol):
    """What outputs read from a decision (``screen.Decision`` has these attributes)."""

    # read-only properties: frozen dataclasses (screen.Decision) have them
    @property
    def call(self) -> Call: ...

    @property
    def number(self) -> Number: ...

    @property
    def verdict(self) -> Verdict: ...

    @property
    def elapsed_ms(self) -> float: ...


class Output(Protocol):
    """What the service runs: a decision observer with a lifecycle (StatsD, syslog, Prometheus)."""

    name: str

    async def start(self) -> None: ...

    def __call__(self, d: DecisionLike) -> None: ...  # must never block or raise

    def gauges(self, lists: dict[str, int], outputs: dict[str, dict[str, int]]) -> None: ...

    def stats(self) -> dict[str, int]: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- the UDP sender
class UdpSender:
    """A bounded queue of payloads and the one task that sends them as datagrams to host:port.

    Items are tuples of lines. With ``batch`` set, consecutive items are packed into one datagram
    joined by LF up to ``max_datagram`` bytes (StatsD); without it, each line is one datagram
    (syslog over UDP carries exactly one message per datagram).
    """

    def __init__(
        self,
        name: str,
        address: tuple[str, int],
        *,
        queue_size: int = 10000,
        batch: bool = False,
        max_datagram: int = STATSD_MAX_DATAGRAM,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.address = address
        self.queue: asyncio.Queue[tuple[bytes, ...]] = asyncio.Queue(queue_size)
        self.batch = batch
        self.max_datagram = max_datagram
        self.clock = clock
        self.sent = 0  # datagrams handed to the kernel
        self.dropped = 0  # items refused because the queue was full, or lost while unreachable
        self.refused = 0  # ICMP port unreachable reported by the kernel (nothing listening)
        self.errors = 0  # other send/resolve failures
        self._carry: list[bytes] = []
        self._stream: asyncio_dgram.aio.DatagramClient | None = None
        self._retry_at = 0.0
        self._task: asyncio.Task | None = None
        self._healthy = True
        self._clean = 0

    @property
    def label(self) -> str:
        host, port = self.address
        return f"{self.name} collector {'[' + host + ']' if ':' in host else host}:{port}"

    def stats(self) -> dict[str, int]:
        return {
            "queued": self.queue.qsize(),
            "sent": self.sent,
            "dropped": self.dropped,
            "refused": self.refused,
            "errors": self.errors,
        }

    def offer(self, lines: tuple[bytes, ...]) -> bool:
        """Queue one item without ever waiting; False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait(lines)
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10000 == 0:
                log.warning("%s: queue full, %d events dropped so far (sender behind)", self.label, self.dropped)
            return False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"edgefilter-{self.name}-sender")

    async def close(self, linger: float = 0.5) -> None:
        """Send what is queued (for at most ``linger`` seconds), then stop the task and the socket."""
        if self._task is not None and not self._task.done():
            deadline = time.monotonic() + linger
            while (not self.queue.empty() or self._carry) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # pragma: no cover - run() catches everything it expects
                log.exception("%s sender ended with an error", self.name)
            self._task = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def run(self) -> None:
        while True:
            first = tuple(self._carry) if self._carry else await self.queue.get()
            self._carry = []
            for datagram in self._datagrams(first):
                try:
                    await self._send(datagram)
                except Exception:  # never let the sender die: the queue would only fill and drop
                    self.errors += 1
                    log.exception("%s: unexpected send failure", self.label)
                # queue.get() and a drained send never suspend: yield so a burst of events
                # cannot hold the event loop while calls wait.
                await asyncio.sleep(0)

    def _datagrams(self, first: tuple[bytes, ...]) -> Iterable[bytes]:
        if not self.batch:
            yield from (ln[: self.max_datagram] for ln in first)
            return
        out: list[bytes] = []
        size = 0
        pending = list(first)
        while True:
            while pending:
                ln = pending[0][: self.max_datagram]
                add = len(ln) + (1 if out else 0)
                if out and size + add > self.max_datagram:
                    self._carry = pending  # starts the next datagram
                    yield b"\n".join(out)
                    return
                out.append(ln)
                size += add
                pending.pop(0)
            if self.queue.empty():
                break
            pending = list(self.queue.get_nowait())
        if out:
            yield b"\n".join(out)

    async def _connect(self) -> bool:
        if self._stream is not None:
            return True
        if self.clock() < self._retry_at:
            return False
        try:
            stream = await asyncio_dgram.connect(self.address)
        except (OSError, ValueError) as e:
            self.errors += 1
            self._retry_at = self.clock() + RECONNECT_AFTER
            self._unhealthy(f"cannot reach it ({e}); retrying every {RECONNECT_AFTER:g} s")
            return False
        # We never read from a collector. Stop the transport reading so nothing a peer sends
        # back can pile up in asyncio-dgram's unbounded receive queue (the kernel's socket buffer
        # bounds it instead). ICMP errors still surface on the next send().
        transport = getattr(stream, "_transport", None)
        if transport is not None and hasattr(transport, "pause_reading"):
            transport.pause_reading()
        self._stream = stream
        return True

    def _drain_errors(self) -> None:
        """Consume the errors the kernel reported since the last send (asyncio-dgram queues them)."""
        assert self._stream is not None
        for _ in range(1000):
            try:
                _ = self._stream.exception  # raises the first unconsumed error, if any
            except ConnectionRefusedError:
                self.refused += 1
                self._unhealthy("nothing listening (ICMP port unreachable); events are being lost")
                continue
            except OSError as e:
                self.errors += 1
                self._unhealthy(f"send failed ({e})")
                continue
            break

    async def _send(self, datagram: bytes) -> None:
        if not await self._connect():
            self.dropped += 1
            return
        assert self._stream is not None
        refused_before, errors_before = self.refused, self.errors
        self._drain_errors()
        try:
            await self._stream.send(datagram)
        except asyncio_dgram.TransportClosed:
            self.errors += 1
            self._stream = None
            return
        except OSError as e:
            self.errors += 1
            self._unhealthy(f"send failed ({e})")
            return
        self.sent += 1
        if (self.refused, self.errors) != (refused_before, errors_before):
            self._clean = 0
            return
        self._clean += 1
        if not self._healthy and self._clean >= 16:
            # ICMP errors come back within a round trip, so a run of sends that raised none
            # means the collector is accepting datagrams again.
            self._healthy = True
            log.info("%s: sending again", self.label)

    def _unhealthy(self, why: str) -> None:
        if self._healthy:
            log.warning("%s: %s", self.label, why)
        self._healthy = False


# --------------------------------------------------------------------------- StatsD
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def metric_name(*parts: str) -> str:
    """Dot-joined metric path; characters StatsD reserves (':', '|', '@', LF...) become '_'."""
    return ".".join(_METRIC_UNSAFE.sub("_", p)[:64] for p in parts if p)


def statsd_lines(d: DecisionLike, prefix: str) -> tuple[bytes, ...]:
    """The StatsD metrics of one decision: action counter, one counter per rule, latency timer."""
    v = d.verdict
    lines = [f"{metric_name(prefix, 'calls', v.action.value)}:1|c"]
    if v.would is not None:
        lines.append(f"{metric_name(prefix, 'would', v.would.value)}:1|c")
    lines.extend(f"{metric_name(prefix, 'rules', rule)}:1|c" for rule in dict.fromkeys(v.rules))
    lines.append(f"{metric_name(prefix, 'screen', 'latency')}:{max(d.elapsed_ms, 0.0):.3f}|ms")
    return tuple(ln.encode("ascii") for ln in lines)


def statsd_gauges(prefix: str, lists: dict[str, int], outputs: dict[str, dict[str, int]]) -> tuple[bytes, ...]:
    """List sizes, and each output's running total of dropped events, as gauges."""
    lines = [f"{metric_name(prefix, 'lists', name)}:{int(n)}|g" for name, n in sorted(lists.items())]
    lines.extend(f"{metric_name(prefix, 'outputs', name, 'dropped')}:{int(s.get('dropped', 0))}|g" for name, s in sorted(outputs.items()))
    return tuple(ln.encode("ascii") for ln in lines)


class StatsdOutput:
    """``[outputs] statsd``: counters per action and rule, a latency timer, list-size gauges."""

    name = "statsd"

    def __init__(self, settings: OutputsSettings) -> None:
        assert settings.statsd is not None
        self.prefix = settings.statsd_prefix
        self.sender = UdpSender("statsd", settings.statsd, queue_size=settings.queue_size, batch=True)

    async def start(self) -> None:
        self.sender.start()

    def __call__(self, d: DecisionLike) -> None:
        self.sender.offer(statsd_lines(d, self.prefix))

    def gauges(self, lists: dict[str, int], outputs: dict[str, dict[str, int]]) -> None:
        self.sender.offer(statsd_gauges(self.prefix, lists, outputs))

    def appeal(self, event: str) -> None:
        """An appeal event (appeals.py: offered, declined, hangup, recorded): <prefix>.appeals.<event>."""
        self.sender.offer((f"{metric_name(self.prefix, 'appeals', event)}:1|c".encode("ascii"),))

    def stats(self) -> dict[str, int]:
        return self.sender.stats()

    async def close(self) -> None:
        await self.sender.close()


# --------------------------------------------------------------------------- syslog (RFC 5424)
def sd_escape(text: str, limit: int = MAX_FIELD) -> str:
    """An RFC 5424 PARAM-VALUE: '"', '\\' and ']' backslash-escaped as the RFC requires.

    Anything not printable (control bytes, CR/LF, bidi and other format characters, lone
    surrogates) becomes a visible ``\\xNN``/``\\uNNNN``; receivers keep a backslash followed by
    another character literally, and a caller's own backslash is doubled, so this cannot be
    confused with the caller's text. Printable Unicode stays as UTF-8 (allowed in PARAM-VALUE).
    The result is at most ``limit`` characters, then "...".
    """
    out: list[str] = []
    n = 0
    for ch in text:
        if ch in '"\\]':
            piece = "\\" + ch
        elif ch.isprintable():
            piece = ch
        else:
            o = ord(ch)
            piece = f"\\x{o:02x}" if o < 0x100 else (f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        if n + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        n += len(piece)
    return "".join(out)


def _ascii_text(text: str, limit: int = MAX_FIELD) -> str:
    """Free-text (MSG) form: printable ASCII only, everything else escaped, bounded."""
    return "".join(c if c.isascii() else c.encode("unicode_escape").decode("ascii") for c in sd_escape(text, limit))


def _header_token(text: str, limit: int) -> str:
    """HOSTNAME / APP-NAME / PROCID: PRINTUSASCII without spaces, or the NILVALUE '-'."""
    s = re.sub(r"[^\x21-\x7e]", "", text)[:limit]
    return s or "-"


def severity(v: Verdict) -> int:
    """warning for forged env blocks and screening failures, notice for blocked calls, else info."""
    rules = set(v.rules)
    if rules & {"CLI_FORGED", "SCREEN_ERROR", "SCREEN_TIMEOUT"}:
        return SEV_WARNING
    if v.action in BLOCKING or v.would in BLOCKING:
        return SEV_NOTICE
    return SEV_INFO


def syslog_message(
    d: DecisionLike,
    *,
    facility: int,
    app_name: str = "edgefilter",
    hostname: str = "-",
    procid: int | str = "-",
    now: datetime | None = None,
) -> bytes:
    """One RFC 5424 message for one decision; at most SYSLOG_MAX_MESSAGE bytes."""
    v = d.verdict
    now = now or datetime.now(UTC)
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"
    rules = [f"{h.rule}({h.weight:+g})" for h in v.hits[:MAX_RULES]] + (["..."] if len(v.hits) > MAX_RULES else [])
    params = [
        ("action", v.action.value),
        ("would", v.would.value if v.would else ""),
        ("score", f"{v.score:g}"),
        ("caller", d.call.callerid),
        ("e164", d.number.e164 or ""),
        ("kind", d.number.kind.value),
        ("name", d.call.calleridname),
        ("called", d.call.called),
        ("context", d.call.context),
        ("rules", " ".join(rules)),
        ("policy", v.policy),
        ("elapsed_ms", f"{d.elapsed_ms:.3f}"),
        ("uniqueid", d.call.uniqueid),
    ]
    sd = "[" + SD_ID + "".join(f' {k}="{sd_escape(val)}"' for k, val in params if val != "" or k == "caller") + "]"
    header = (
        f"<{facility * 8 + severity(v)}>1 {stamp} {_header_token(hostname, 255)} {_header_token(app_name, 48)} "
        f"{_header_token(str(procid), 128)} decision "
    )
    who = d.number.e164 or _ascii_text(d.call.callerid, 40) or "(no caller ID)"
    msg = (f"{v.action.value} {who} -> {_ascii_text(d.call.called, 40)} score={v.score:g} "
           f"rules={','.join(v.rules[:MAX_RULES]) or '-'} elapsed_ms={d.elapsed_ms:.3f}")
    out = (header + sd + " " + msg).encode("utf-8", "backslashreplace")
    if len(out) > SYSLOG_MAX_MESSAGE:  # only with absurd rule lists: keep the SD whole, cut the MSG
        out = (header + sd).encode("utf-8", "backslashreplace")[:SYSLOG_MAX_MESSAGE]
    return out


class SyslogOutput:
    """``[outputs] syslog``: one RFC 5424 message per decision over UDP (RFC 5426)."""

    name = "syslog"

    def __init__(self, settings: OutputsSettings, *, hostname: str | None = None, procid: int | None = None) -> None:
        assert settings.syslog is not None
        self.facility = SYSLOG_FACILITIES[settings.syslog_facility]
        self.app_name = settings.syslog_app_name
        self.hostname = hostname if hostname is not None else socket.gethostname()  # no DNS lookup
        self.procid = procid if procid is not None else os.getpid()
        self.sender = UdpSender("syslog", settings.syslog, queue_size=settings.queue_size, batch=False, max_datagram=SYSLOG_MAX_MESSAGE)

    async def start(self) -> None:
        self.sender.start()

    def __call__(self, d: DecisionLike) -> None:
        msg = syslog_message(d, facility=self.facility, app_name=self.app_name, hostname=self.hostname, procid=self.procid)
        self.sender.offer((msg,))

    def gauges(self, lists: dict[str, int], outputs: dict[str, dict[str, int]]) -> None:
        """Syslog carries events, not gauges."""

    def stats(self) -> dict[str, int]:
        return self.sender.stats()

    async def close(self) -> None:
        await self.sender.close()


# --------------------------------------------------------------------------- parsing (collectors, tests)
_SYSLOG = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) (?P<rest>.*)\Z",
    re.S,
)


def parse_syslog(data: bytes) -> dict:
    """Parse one RFC 5424 message with a single SD element (what we send) into a dict.

    Used by the tests' collector and handy for anyone checking a capture; strict enough that a
    framing mistake (an unescaped quote or bracket) fails.
    """
    m = _SYSLOG.match(data)
    if not m:
        raise ValueError(f"not an RFC 5424 message: {data[:80]!r}")
    rest = m.group("rest").decode("utf-8")
    if not rest.startswith("["):
        raise ValueError("no structured data")
    i = rest.index(" ")
    sd_id = rest[1:i]
    params: dict[str, str] = {}
    pos = i
    while rest[pos] == " ":
        eq = rest.index("=", pos)
        name = rest[pos + 1 : eq]
        if not re.fullmatch(r"[\x21-\x7e]{1,32}", name) or any(c in name for c in '="] '):
            raise ValueError(f"bad PARAM-NAME {name!r}")
        if rest[eq + 1] != '"':
            raise ValueError("PARAM-VALUE not quoted")
        j = eq + 2
        val: list[str] = []
        while True:
            c = rest[j]
            if c == "\\" and rest[j + 1] in '"\\]':
                val.append(rest[j + 1])
                j += 2
            elif c == '"':
                break
            elif c == "]":
                raise ValueError("unescaped ']' inside PARAM-VALUE")
            else:
                val.append(c)
                j += 1
        params[name] = "".join(val)
        pos = j + 1
    if rest[pos] != "]":
        raise ValueError("SD element not closed")
    msg = rest[pos + 1 :]
    pri = int(m.group("pri"))
    return {
        "facility": pri // 8,
        "severity": pri % 8,
        "timestamp": m.group("ts").decode(),
        "hostname": m.group("host").decode(),
        "app_name": m.group("app").decode(),
        "procid": m.group("procid").decode(),
        "msgid": m.group("msgid").decode(),
        "sd_id": sd_id,
        "params": params,
        "msg": msg[1:] if msg.startswith(" ") else msg,
    }


def parse_statsd(data: bytes) -> list[tuple[str, float, str]]:
    """``name:value|type`` lines of one datagram -> [(name, value, type)]."""
    out = []
    for line in data.split(b"\n"):
        if not line:
            continue
        name, _, rest = line.decode("ascii").partition(":")
        value, _, kind = rest.partition("|")
        out.append((name, float(value), kind.split("|")[0]))
    return out


def build_udp_outputs(settings: OutputsSettings) -> list[Output]:
    """The UDP outputs the config turns on (none by default)."""
    outs: list[Output] = []
    if settings.statsd is not None:
        outs.append(StatsdOutput(settings))
    if settings.syslog is not None:
        outs.append(SyslogOutput(settings))
    return outs


__all__: Sequence[str] = (
    "DecisionLike",
    "Output",
    "UdpSender",
    "StatsdOutput",
    "SyslogOutput",
    "statsd_lines",
    "statsd_gauges",
    "syslog_message",
    "sd_escape",
    "parse_syslog",
    "parse_statsd",
    "build_udp_outputs",
)

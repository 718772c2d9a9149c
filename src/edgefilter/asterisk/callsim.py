"""A FastAGI *client* that talks to a FastAGI server the way Asterisk 22 does.

Why this exists: the screening server must be tested against what Asterisk
really sends, not what a hand-written fake assumes.  Every behaviour here is
taken from the golden captures in ``shared/fixtures/asterisk`` (a real
Asterisk 22.10.1) and from ``res/res_agi.c`` (``setup_env``, ``run_agi``,
``parse_args``, ``agi_handle_command`` and the command handlers), including the
uncomfortable parts a server has to survive:

* the environment block is written raw: a caller id holding ``\\n`` really
  breaks lines and can forge the end of the block (callerid-09g);
* commands are answered one at a time; several commands arriving in one
  write are *not* answered until more bytes arrive (res_agi reads through a
  stdio buffer but polls the socket), so a pipelining server stalls;
* when the channel dies an unsolicited ``HANGUP\\n`` line is written, the
  session goes on in "dead" mode (``511`` for media commands), and
  ``HANGUP\\n`` is written once more when the server closes the socket;
* Asterisk never closes the socket first: the session ends when the server
  closes it (or when our overall timeout fires, which we report).

It is used three ways: as the Asterisk test double in the test suite, by the
``edgefilter try-call`` CLI command, and by the load benchmark.  Hence: stdlib
asyncio only, no sleeps on the hot path (prompts "play" instantly, DTMF comes
from a queue), one asyncio Protocol per call.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import dataclasses
import itertools
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CallSpec",
    "CallResult",
    "place_call",
    "build_env",
    "parse_agi_args",
    "load_transcript",
    "transcript_env",
    "ASTERISK_VERSION",
    "subroutine_call",
]

# --- constants mirrored from res_agi.c / Asterisk -------------------------------------

ASTERISK_VERSION = "22.10.1"
MAX_ARGS = 128  # res_agi MAX_ARGS: parse_args keeps at most 127 words
AGI_BUF_LEN = 2048  # run_agi's line buffer: a command is at most 2047 bytes
STDIO_BUFSIZ = 4096  # one read() of the stdio stream res_agi reads commands through
MAX_CALLERID_BYTES = 79  # AST_CHANNEL_NAME (80) minus the NUL: name and number are cut here
MAX_AGI_CONNECT = 2.0  # res_agi gives up connecting after 2000 ms -> AGISTATUS=FAILURE
GETVAR_BUF = 1024  # GET VARIABLE copies the value into char tempstr[1024]
DEFAULT_THREADID = 139964546488000  # a plausible pthread_self() as seen in the captures

HANGUP_LINE = b"HANGUP\n"
DEAD_REPLY = b"511 Command Not Permitted on a dead channel or intercept routine\n"
UNKNOWN_REPLY = b"510 Invalid or unknown command\n"
USAGE_HEAD = b"520-Invalid command syntax.  Proper usage follows:\n"
USAGE_TAIL = b"520 End of proper usage.\n"
USAGE_NONE = b"520 Invalid command syntax.  Proper usage not available.\n"

# Handler return codes (asterisk/cli.h).
RESULT_SUCCESS, RESULT_SHOWUSAGE, RESULT_FAILURE = 0, 1, 2

# Channel states (enum ast_channel_state) reported by CHANNEL STATUS.
STATE_RING, STATE_UP = 4, 6

# Synthetic end positions: nothing is really played, but the reply format
# (``200 result=0 endpos=N``) must be right.  1 s of 8 kHz audio.
STREAM_ENDPOS = 8000
STREAM_INTERRUPTED_ENDPOS = 1600

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

# ast_str2cause(): a case-insensitive *prefix* match on these names.
_CAUSES = {
    b"UNALLOCATED": 1,
    b"NO_ROUTE_TRANSIT_NET": 2,
    b"NO_ROUTE_DESTINATION": 3,
    b"CHANNEL_UNACCEPTABLE": 6,
    b"CALL_AWARDED_DELIVERED": 7,
    b"NORMAL_CLEARING": 16,
    b"USER_BUSY": 17,
    b"NO_USER_RESPONSE": 18,
    b"NO_ANSWER": 19,
    b"SUBSCRIBER_ABSENT": 20,
    b"CALL_REJECTED": 21,
    b"NUMBER_CHANGED": 22,
    b"REDIRECTED_TO_NEW_DESTINATION": 23,
    b"ANSWERED_ELSEWHERE": 26,
    b"DESTINATION_OUT_OF_ORDER": 27,
    b"INVALID_NUMBER_FORMAT": 28,
    b"FACILITY_REJECTED": 29,
    b"RESPONSE_TO_STATUS_ENQUIRY": 30,
    b"NORMAL_UNSPECIFIED": 31,
    b"NORMAL_CIRCUIT_CONGESTION": 34,
    b"NETWORK_OUT_OF_ORDER": 38,
    b"NORMAL_TEMPORARY_FAILURE": 41,
    b"SWITCH_CONGESTION": 42,
    b"BEARERCAPABILITY_NOTAVAIL": 58,
    b"INTERWORKING": 127,
}

# Usage texts sent between the 520 lines: the <para>s of each command's XML
# description, whitespace collapsed, one line per <para>.  GET VARIABLE's text is
# verified byte for byte against fastagi-reply-formats.txt; the others follow the
# same rendering rule from the same XML.
_USAGE = {
    ("get", "variable"): (
        b"Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set. "
        b"Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set and returns "
        b"the variable in parentheses.\n"
        b"Example return code: 200 result=1 (testvariable)"
    ),
    ("get", "full", "variable"): (
        b"Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set or channel "
        b"does not exist. Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set "
        b"and returns the variable in parenthesis. Understands complex variable names and builtin "
        b"variables, unlike GET VARIABLE.\n"
        b"Example return code: 200 result=1 (testvariable)"
    ),
    ("set", "variable"): b"Sets a variable to the current channel.",
    ("exec",): (
        b"Executes <replaceable>application</replaceable> with given <replaceable>options</replaceable>.\n"
        b"Returns whatever the <replaceable>application</replaceable> returns, or <literal>-2</literal> "
        b"on failure to find <replaceable>application</replaceable>."
    ),
    ("verbose",): (
        b"Sends <replaceable>message</replaceable> to the console via verbose message system. "
        b"<replaceable>level</replaceable> is the verbose level (1-4). Always returns <literal>1</literal>"
    ),
    ("wait", "for", "digit"): (
        b"Waits up to <replaceable>timeout</replaceable> milliseconds for channel to receive a DTMF "
        b"digit. Returns <literal>-1</literal> on channel failure, <literal>0</literal> if no digit is "
        b"received in the timeout, or the numerical value of the ascii of the digit if one is received. "
        b"Use <literal>-1</literal> for the <replaceable>timeout</replaceable> value if you desire the "
        b"call to block indefinitely."
    ),
    ("stream", "file"): (
        b"Send the given file, allowing playback to be interrupted by the given digits, if any. "
        b"Returns <literal>0</literal> if playback completes without a digit being pressed, or the "
        b"ASCII numerical value of the digit if one was pressed, or <literal>-1</literal> on error or "
        b"if the channel was disconnected. If musiconhold is playing before calling stream file it "
        b"will be automatically stopped and will not be restarted after completion."
    ),
    ("get", "data"): (
        b"Stream the given <replaceable>file</replaceable>, and receive DTMF data.\n"
        b"Returns the digits received from the channel at the other end."
    ),
    ("hangup",): (
        b"Hangs up the specified channel. If no channel name is given, hangs up the current channel"
    ),
    ("channel", "status"): (
        b"Returns the status of the specified <replaceable>channelname</replaceable>. If no channel "
        b"name is given then returns the status of the current channel.\n"
        b"Return values:"
    ),
    ("set", "context"): b"Sets the context for continuation upon exiting the application.",
    ("set", "extension"): b"Changes the extension for continuation upon exiting the application.",
    ("set", "priority"): (
        b"Changes the priority for continuation upon exiting the application. The priority must be "
        b"a valid priority or label."
    ),
    ("database", "get"): (
        b"Retrieves an entry in the Asterisk database for a given <replaceable>family</replaceable> "
        b"and <replaceable>key</replaceable>.\n"
        b"Returns <literal>0</literal> if <replaceable>key</replaceable> is not set. Returns "
        b"<literal>1</literal> if <replaceable>key</replaceable> is set and returns the variable in "
        b"parenthesis.\n"
        b"Example return code: 200 result=1 (testvariable)"
    ),
}


# --- public data types ----------------------------------------------------------------


@dataclass
class CallSpec:
    """What Asterisk would send for one call, plus how the simulated channel behaves.

    Defaults look like an inbound PJSIP call.  ``bytes`` values are written to
    the wire untouched (after Asterisk's own normalisation when ``truncate`` is
    on), ``str`` values are UTF-8 encoded.  A name of ``None``/``""``/``"unknown"``
    means "no display name": ``agi_calleridname: unknown`` in the environment
    but ``200 result=1 ()`` from ``GET VARIABLE CALLERID(name)``, as on the real
    Asterisk (callerid README finding 7).
    """

    callerid: bytes | str | None = b"+8613800138000"
    calleridname: bytes | str | None = b"unknown"
    dnid: bytes | str | None = b"1000"
    extension: bytes | str = b"1000"
    context: bytes | str = b"from-trunk"
    channel: bytes | str = b"PJSIP/trunk-00000001"
    uniqueid: bytes | str | None = None  # generated unique per call ("<epoch>.<n>") when None
    script: str = "screen"  # path after host:port, may carry ?query; or a whole agi:// URL
    args: Sequence[bytes | str] = ()  # AGI(url,arg1,arg2) -> agi_arg_1, agi_arg_2
    callingpres: int = 0
    rdnis: bytes | str | None = b"unknown"
    extra: dict | None = None  # {"agi_priority": 3} overrides; value None drops the line
    raw_env: bytes | None = None  # sent verbatim instead of the env block (hostile tests)
    digits: bytes = b""  # DTMF the caller "presses", consumed by WAIT FOR DIGIT/STREAM FILE/GET DATA
    hangup_after_commands: int | None = None  # channel dies (idle) after answering N commands
    hangup_before_commands: bool = False  # channel dies right after the env block
    hangup_during_command: int | None = None  # channel dies while running command N (1-based)
    hangup_after_seconds: float | None = None  # channel dies N s after the env block was sent
    threadid: int | None = None  # agi_threadid; DEFAULT_THREADID when None
    channel_vars: dict | None = None  # channel variables set before the AGI ran (e.g. AGIEXECFULL)
    exit_on_hangup: bool = False  # AGIEXITONHANGUP=yes: Asterisk closes the socket after HANGUP


@dataclass
class CallResult:
    """What happened on one simulated call.

    ``replies`` holds every write Asterisk made after the env block, in order,
    one entry per ``ast_agi_send`` (a 520 usage reply is three entries), and
    includes the unsolicited ``HANGUP\\n`` lines and the final one written after
    the server closed (which a real server never reads).
    ``pipelined`` counts command lines that, when read, already had more server
    bytes waiting behind them (the server sent before getting the reply); a
    correct server keeps it at 0.  Those commands also stall, as on Asterisk.
    ``agistatus`` is what the dial plan sees next; ``elapsed`` runs from the
    env block's first byte to the server's close (or to the timeout).
    """

    variables: dict[str, str] = field(default_factory=dict)
    raw_variables: dict[bytes, bytes] = field(default_factory=dict)
    commands: list[bytes] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)
    transcript: list[tuple[str, bytes]] = field(default_factory=list)
    env: bytes = b""
    hangup_cause: int | None = None
    closed_by_server: bool = False
    timed_out: bool = False
    pipelined: int = 0
    elapsed: float = 0.0
    agistatus: str = "SUCCESS"
    channel_dead: bool = False
    uniqueid: str = ""
    error: str | None = None


# --- small C-semantics helpers ----------------------------------------------------------


def _b(value: bytes | str | int | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def _cstr(value: bytes) -> bytes:
    """C strings end at the first NUL: Asterisk never writes past one (09e, 10e)."""
    return value.split(b"\0", 1)[0]


def _scan_int(value: bytes | None) -> int | None:
    """sscanf("%30d"): optional blanks and sign, then digits; None when no digit."""
    if value is None:
        return None
    m = re.match(rb"[ \t\n\r\f\v]*([+-]?\d{1,30})", value)
    return int(m.group(1)) if m else None


def _atoi(value: bytes | None) -> int:
    n = _scan_int(value)
    return 0 if n is None else n


def _cut_utf8(value: bytes, limit: int) -> bytes:
    """Cut valid UTF-8 to at most ``limit`` bytes without splitting a character (05d)."""
    if len(value) <= limit:
        return value
    i = limit
    while i > 0 and (value[i] & 0xC0) == 0x80:
        i -= 1
    return value[:i]


def _is_true(value: bytes | None) -> bool:
    """ast_true()."""
    return (value or b"").strip().lower() in (b"yes", b"true", b"y", b"t", b"1", b"on")


def parse_agi_args(line: bytes) -> list[bytes]:
    """Split one command line exactly like res_agi's ``parse_args``.

    Why not shlex: res_agi's rules differ.  Words split on space/TAB only (a
    ``\\r`` is an ordinary byte, so ``NOOP\\r`` is an unknown command); a ``"``
    toggles quoting anywhere in a word and is dropped (``a"b c"d`` -> ``ab cd``);
    a backslash, quoted or not, makes the next byte literal and is dropped;
    ``""`` yields an empty argument; at most 127 words are kept.  One trailing
    ``\\n`` is removed first, as run_agi does, and the line ends at a NUL.
    """
    if line.endswith(b"\n"):
        line = line[:-1]
    line = _cstr(line)
    argv: list[bytearray] = []
    cur: bytearray | None = None
    quoted = escaped = False
    whitespace = True
    for byte in line:
        if byte == 0x22 and not escaped:  # '"'
            quoted = not quoted
            if quoted and whitespace:
                cur = bytearray()
                argv.append(cur)
                whitespace = False
            escaped = False
            continue
        if byte in (0x20, 0x09) and not quoted and not escaped:
            whitespace = True
            continue
        if byte == 0x5C and not escaped:  # '\\'
            escaped = True
            continue
        # "normal": a literal byte
        if whitespace:
            if len(argv) >= MAX_ARGS - 1:
                continue  # "Too many arguments, truncating"
            cur = bytearray()
            argv.append(cur)
            whitespace = False
        assert cur is not None
        cur.append(byte)
        escaped = False
    return [bytes(a) for a in argv]


def _separate_args(buf: bytes, delim: int, maxargs: int) -> list[bytes]:
    """``__ast_app_separate_args(buf, delim, remove_chars=1, ...)``.

    This is how MSet and friends split their data: parentheses and brackets
    nest, ``"`` quotes and is removed, ``\\`` makes the next byte literal and is
    removed, and the last slot takes the unscanned remainder.
    """
    out: list[bytes] = []
    s = bytearray(buf)
    n = len(s)
    i = 0
    wasdelim = -1
    paren = bracket = 0
    quote = False
    while i < n and len(out) < maxargs - 1:
        arg = bytearray()
        while i < n:
            c = s[i]
            if c == 0x28:
                paren += 1
            elif c == 0x29:
                paren = max(0, paren - 1)
            elif c == 0x5B:
                bracket += 1
            elif c == 0x5D:
                bracket = max(0, bracket - 1)
            elif c == 0x22 and delim != 0x22:
                quote = not quote
                i += 1
                continue
            elif c == 0x5C:
                i += 1  # drop the backslash, keep the next byte verbatim
                if i < n:
                    arg.append(s[i])
                    i += 1
                continue
            elif c == delim and not paren and not quote and not bracket:
                wasdelim = i
                i += 1
                break
            arg.append(c)
            i += 1
        out.append(bytes(arg))
    if i < n or (i > 0 and i - 1 == wasdelim):
        out.append(bytes(s[i:]))
    return out


# --- environment block ------------------------------------------------------------------

_UNIQUE_COUNTER = itertools.count(1)


def _new_uniqueid() -> bytes:
    return f"{int(time.time())}.{next(_UNIQUE_COUNTER)}".encode()


def _normalize_number(raw: bytes | None, truncate: bool) -> bytes:
    """The caller number as Asterisk stores it: cut at NUL, then raw at 79 bytes (05b)."""
    if not raw:
        return b""
    if truncate:
        raw = _cstr(raw)[:MAX_CALLERID_BYTES]
    return raw


def _normalize_name(raw: bytes | None, truncate: bool) -> bytes:
    """The caller name as Asterisk stores it (empty = no name).

    Cut at NUL (10e), each invalid UTF-8 sequence replaced by U+FFFD (04, 04b:
    GBK ``C9 A7`` survives because it happens to be valid UTF-8), then cut to
    79 bytes on a character boundary (05a, 05d).
    """
    if not raw or raw == b"unknown":
        return b""
    if truncate:
        raw = _cstr(raw)
        raw = raw.decode("utf-8", "replace").encode("utf-8")
        raw = _cut_utf8(raw, MAX_CALLERID_BYTES)
    return raw


def _request_parts(script: str, host: str, port: int) -> tuple[bytes, bytes]:
    """(agi_request, agi_network_script) for a script like ``screen?mode=test``.

    launch_netscript keeps everything after the first ``/`` behind host:port
    (query string included) as ``agi_network_script`` and omits that line when
    it is empty; ``agi_request`` is the URL as written in the dial plan.
    """
    if script.lower().startswith("agi://"):
        url = script
        rest = script[6:]
        script_part = rest.split("/", 1)[1] if "/" in rest else ""
    else:
        hostpart = f"[{host}]" if ":" in host else host
        script_part = script.lstrip("/")
        url = f"agi://{hostpart}:{port}/{script_part}" if script_part else f"agi://{hostpart}:{port}"
    return url.encode("utf-8"), script_part.encode("utf-8")


def _env_lines(spec: CallSpec, host: str, port: int, truncate: bool) -> list[bytes]:
    """One ``agi_key: value\\n`` line per variable, in setup_env's order."""
    fix = _cstr if truncate else (lambda v: v)
    request, net_script = _request_parts(spec.script, host, port)
    channel = fix(_b(spec.channel) or b"")
    number = _normalize_number(_b(spec.callerid), truncate)
    name = _normalize_name(_b(spec.calleridname), truncate)
    dnid = fix(_b(spec.dnid) or b"")
    rdnis = fix(_b(spec.rdnis) or b"")
    uniqueid = _b(spec.uniqueid) or _new_uniqueid()
    pairs: list[tuple[str, bytes | None]] = [
        ("agi_network", b"yes"),
        ("agi_network_script", net_script or None),
        ("agi_request", request),
        ("agi_channel", channel),
        ("agi_language", b"en"),
        ("agi_type", channel.split(b"/", 1)[0]),
        ("agi_uniqueid", uniqueid),
        ("agi_version", ASTERISK_VERSION.encode()),
        ("agi_callerid", number or b"unknown"),
        ("agi_calleridname", name or b"unknown"),
        ("agi_callingpres", str(spec.callingpres).encode()),
        ("agi_callingani2", b"0"),
        ("agi_callington", b"0"),
        ("agi_callingtns", b"0"),
        ("agi_dnid", dnid or b"unknown"),
        ("agi_rdnis", rdnis or b"unknown"),
        ("agi_context", fix(_b(spec.context) or b"")),
        ("agi_extension", fix(_b(spec.extension) or b"")),
        ("agi_priority", b"2"),
        ("agi_enhanced", b"0.0"),
        ("agi_accountcode", b""),
        ("agi_threadid", str(spec.threadid if spec.threadid is not None else DEFAULT_THREADID).encode()),
    ]
    for i, arg in enumerate(spec.args, 1):
        pairs.append((f"agi_arg_{i}", fix(_b(arg) or b"")))
    if spec.extra:
        index = {k: n for n, (k, _) in enumerate(pairs)}
        for key, value in spec.extra.items():
            key = key if key.startswith("agi_") else f"agi_{key}"
            val = _b(value)
            if key in index:
                pairs[index[key]] = (key, val)
            else:  # unknown keys go after agi_threadid, before the arguments
                pos = index["agi_threadid"] + 1
                pairs.insert(pos, (key, val))
                index = {k: n for n, (k, _) in enumerate(pairs)}
    lines = [k.encode() + b": " + v + b"\n" for k, v in pairs if v is not None]
    lines.append(b"\n")
    return lines


def _dialplan_filter(allowed: bytes, value: bytes) -> bytes:
    """Asterisk's FILTER(allowed,value) for the ranges the shipped subroutine uses."""
    keep = set()
    i = 0
    while i < len(allowed):
        if i + 2 < len(allowed) and allowed[i + 1] == 0x2D:  # a-b
            keep.update(range(allowed[i], allowed[i + 2] + 1))
            i += 3
        else:
            keep.add(allowed[i])
            i += 1
    return bytes(b for b in value if b in keep)


def subroutine_call(
    callerid: bytes | str | None = b"+8613800138000",
    *,
    exten: bytes | str = b"1000",
    vmbox: bytes | str = b"",
    inbound_context: bytes | str = b"from-trunk",
    stir: bytes | str = b"",
    stir_verify: bytes | str = b"",
    **spec: object,
) -> CallSpec:
    """A call as the shipped ``edgefilter-screen`` subroutine sends it (Gosub from
    ``inbound_context`` with ``ARG1=exten``, ``ARG2=vmbox``).

    Recorded from Asterisk 22.10.1 (tests/data/asterisk/subroutine-*.txt): inside the Gosub
    ``agi_context`` is ``edgefilter-screen``, ``agi_extension`` ``s`` and ``agi_priority`` 3; the
    arguments are ``cid=`` (the caller number base64-encoded), ``exten=`` and ``vmbox=`` through
    FILTER(), ``context=`` (the caller's context, STACK_PEEK), ``linkedid=`` (the uniqueid of
    the first channel), ``stir=`` and ``stir_verify=``. The caller number itself still reaches
    ``agi_callerid`` raw, line feeds and all.
    """
    number = _normalize_number(_b(callerid), True)
    uniqueid = _b(spec.pop("uniqueid", None)) or _new_uniqueid()  # type: ignore[arg-type]
    args = (
        b"cid=" + base64.b64encode(number),
        b"exten=" + _dialplan_filter(b"0-9A-Za-z*#+_", _b(exten) or b""),
        b"vmbox=" + _dialplan_filter(b"0-9A-Za-z@_", _b(vmbox) or b""),
        b"context=" + (_b(inbound_context) or b""),
        b"linkedid=" + uniqueid,
        b"stir=" + _dialplan_filter(b"A-Za-z0-9_", _b(stir) or b""),
        b"stir_verify=" + _dialplan_filter(b"A-Z a-z0-9_", _b(stir_verify) or b""),
    )
    extra = dict(spec.pop("extra", None) or {})  # type: ignore[arg-type]
    extra.setdefault("agi_priority", b"3")
    return CallSpec(callerid=callerid, context=b"edgefilter-screen", extension=b"s", uniqueid=uniqueid, args=args,
                    extra=extra, **spec)  # type: ignore[arg-type]


def build_env(spec: CallSpec, host: str = "127.0.0.1", port: int = 4573, truncate: bool = True) -> bytes:
    """The exact environment block Asterisk writes for ``spec`` (or ``spec.raw_env``).

    Values are raw bytes, never escaped: an LF inside the caller id ends the
    line early, so the block a server sees can be forged (callerid-09g).
    ``truncate=False`` skips Asterisk's NUL/UTF-8/79-byte normalisation to
    send hostile bytes a real Asterisk would not.
    """
    if spec.raw_env is not None:
        return spec.raw_env
    return b"".join(_env_lines(spec, host, port, truncate))


# --- transcripts ----------------------------------------------------------------------

_TRANSCRIPT_LINE = re.compile(r"^([AS])>\s*(?:\[\s*[-\d.]+\s*ms\]\s*)?(b(['\"]).*\3)\s*$")


def load_transcript(path: str | Path) -> list[tuple[str, bytes]]:
    """Parse the ``A>``/``S>`` lines of a golden transcript into (direction, bytes).

    ``A`` = bytes Asterisk sent, ``S`` = bytes the server sent; timestamps,
    comments (``#``) and event lines (``--``) are skipped.  Works for the
    ``fastagi-*.txt``, ``callerid-*.txt`` and ``*.agi-stream.txt`` formats.
    """
    out: list[tuple[str, bytes]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = _TRANSCRIPT_LINE.match(line)
        if m:
            out.append((m.group(1), ast.literal_eval(m.group(2))))
    return out


def transcript_env(entries: Sequence[tuple[str, bytes]]) -> bytes:
    """The env block of a transcript: the leading ``A`` lines up to the first blank line."""
    env = bytearray()
    for direction, data in entries:
        if direction != "A":
            break
        env += data
        if data == b"\n":
            break
    return bytes(env)


# --- the session ------------------------------------------------------------------------


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


# --- command handlers (agi commands table) ------------------------------------------


def _h_answer(s: _AgiSession, argv: list[bytes]) -> int:
    res = 0
    if s.state != STATE_UP:
        if s.hungup:
            res = -1
        else:
            s.state = STATE_UP
    s.reply(f"200 result={res}")
    return RESULT_SUCCESS if res >= 0 else RESULT_FAILURE


def _h_channel_status(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) == 2:
        s.reply(f"200 result={s.state}")
    elif len(argv) == 3:
        ours = argv[2] == (_b(s.spec.channel) or b"")
        s.reply(f"200 result={s.state}" if ours else "200 result=-1")
    else:
        return RESULT_SHOWUSAGE
    return RESULT_SUCCESS


def _h_exec(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 2:
        return RESULT_SHOWUSAGE
    app = _APPS.get(argv[1].lower())
    if app is None:
        res = -2  # "Could not find application"
    else:
        data = argv[2] if len(argv) > 2 else b""
        if len(argv) > 2 and _is_true(s.vars.get(b"AGIEXECFULL")):
            data = s.substitute(data)
        res = app(s, data)
    s.reply(f"200 result={res}")
    return RESULT_SUCCESS  # handle_exec returns the app's result; never RESULT_FAILURE (2)


def _h_get_data(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 3:
        return RESULT_SHOWUSAGE
    maxlen = _atoi(argv[4]) if len(argv) >= 5 else 1024
    maxlen = min(maxlen, 1023)
    if s.hungup or maxlen <= 0:
        s.reply("200 result=-1")
        return RESULT_SUCCESS
    got = bytearray()
    while True:
        d = s.next_digit()
        if d == 0:  # no more key presses: the inter-digit timeout expires
            s.reply(b"200 result=" + bytes(got) + b" (timeout)")
            return RESULT_SUCCESS
        if d == 0x23:  # '#' ends input and is not returned
            break
        got.append(d)
        if len(got) >= maxlen:
            break
    s.reply(b"200 result=" + bytes(got))
    return RESULT_SUCCESS


def _h_get_full_variable(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) not in (4, 5):
        return RESULT_SHOWUSAGE
    if len(argv) == 5 and argv[4] != (_b(s.spec.channel) or b""):
        s.reply("200 result=0")
        return RESULT_SUCCESS
    s.reply(b"200 result=1 (" + s.substitute(argv[3]) + b")")
    return RESULT_SUCCESS


def _h_get_variable(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    value = s.lookup(argv[2]) if argv[2] else None
    if value is None:
        s.reply("200 result=0")
    else:
        s.reply(b"200 result=1 (" + _cstr(value)[: GETVAR_BUF - 1] + b")")
    return RESULT_SUCCESS


def _h_hangup(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) == 1:
        s.hang_up()
        s.reply("200 result=1")
    elif len(argv) == 2:
        if argv[1] == (_b(s.spec.channel) or b""):
            s.hang_up()
            s.reply("200 result=1")
        else:
            s.reply("200 result=-1")
    else:
        return RESULT_SHOWUSAGE
    return RESULT_SUCCESS


def _h_noop(s: _AgiSession, argv: list[bytes]) -> int:
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_set_variable(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 4:  # an unquoted value with spaces lands here: nothing is set
        return RESULT_SHOWUSAGE
    s.set_var(argv[2], argv[3])
    s.reply("200 result=1")
    return RESULT_SUCCESS


def _h_stream_file(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 4 or len(argv) > 5:
        return RESULT_SHOWUSAGE
    offset = 0
    if len(argv) > 4:
        scanned = _scan_int(argv[4])
        if scanned is None:
            return RESULT_SHOWUSAGE
        offset = scanned
    if s.hungup:
        s.reply(f"200 result=-1 endpos={offset}")
        return RESULT_FAILURE
    # Only a pressed escape digit interrupts; others stay queued for the next command.
    if s.digits and s.digits[0] in argv[3]:
        d = s.next_digit()
        s.reply(f"200 result={d} endpos={offset + STREAM_INTERRUPTED_ENDPOS}")
    else:
        s.reply(f"200 result=0 endpos={offset + STREAM_ENDPOS}")
    return RESULT_SUCCESS


def _h_get_option(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 4 or len(argv) > 5:
        return RESULT_SHOWUSAGE
    if s.hungup:
        s.reply("200 result=-1 endpos=0")
        return RESULT_FAILURE
    d = s.next_digit() if s.digits and s.digits[0] in argv[3] else 0
    s.reply(f"200 result={d} endpos={STREAM_INTERRUPTED_ENDPOS if d else STREAM_ENDPOS}")
    return RESULT_SUCCESS


def _h_verbose(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 2:
        return RESULT_SHOWUSAGE
    s.reply("200 result=1")
    return RESULT_SUCCESS


def _h_wait_for_digit(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 4 or _scan_int(argv[3]) is None:
        return RESULT_SHOWUSAGE
    if s.hungup:
        s.reply("200 result=-1")
        return RESULT_FAILURE
    s.reply(f"200 result={s.next_digit()}")  # 0 = timeout, never actually waited for
    return RESULT_SUCCESS


def _h_set_callerid(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) > 2:
        m = re.match(rb'\s*(?:"?([^"<]*?)"?\s*)?<([^>]*)>', argv[2])
        if m:
            s.cid_name, s.cid_num = (m.group(1) or b"").strip(), m.group(2)
        else:
            s.cid_num, s.cid_name = argv[2], b""
    s.reply("200 result=1")
    return RESULT_SUCCESS


def _h_set_context(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    s.context = argv[2]
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_set_extension(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    s.exten = argv[2]
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_set_priority(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    pri = _scan_int(argv[2])
    if pri is None or pri < 1:
        return RESULT_SHOWUSAGE  # labels are not modelled
    s.priority = pri
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_db_get(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 4:
        return RESULT_SHOWUSAGE
    value = s.astdb.get((argv[2], argv[3]))
    s.reply("200 result=0" if value is None else b"200 result=1 (" + value + b")")
    return RESULT_SUCCESS


def _h_db_put(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 5:
        return RESULT_SHOWUSAGE
    s.astdb[(argv[2], argv[3])] = argv[4]
    s.reply("200 result=1")
    return RESULT_SUCCESS


def _h_db_del(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 4:
        return RESULT_SHOWUSAGE
    found = s.astdb.pop((argv[2], argv[3]), None) is not None
    s.reply("200 result=1" if found else "200 result=0")
    return RESULT_SUCCESS


def _h_db_deltree(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) not in (3, 4):
        return RESULT_SHOWUSAGE
    keys = [k for k in s.astdb if k[0] == argv[2] and (len(argv) == 3 or k[1].startswith(argv[3]))]
    for k in keys:
        del s.astdb[k]
    s.reply("200 result=0" if keys else "200 result=1")  # sic: res_agi inverts this one
    return RESULT_SUCCESS


def _h_say(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 4:
        return RESULT_SHOWUSAGE
    if s.hungup:
        s.reply("200 result=-1")
        return RESULT_FAILURE
    d = s.next_digit() if s.digits and s.digits[0] in argv[3] else 0
    s.reply(f"200 result={d}")
    return RESULT_SUCCESS


def _h_zero(s: _AgiSession, argv: list[bytes]) -> int:
    """Commands whose only visible effect here is ``200 result=0``."""
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_receive_char(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    s.reply("200 result=0 (timeout)")
    return RESULT_SUCCESS


def _h_receive_text(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    s.reply("200 result=-1")
    return RESULT_SUCCESS


def _h_record_file(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 6 or _scan_int(argv[5]) is None:
        return RESULT_SHOWUSAGE
    if s.hungup:
        s.reply("200 result=-1 (hangup) endpos=0")
        return RESULT_FAILURE
    s.reply(f"200 result=0 (timeout) endpos={STREAM_ENDPOS}")
    return RESULT_SUCCESS


# In res_agi's table order: find_command returns the first entry whose words all match.
_Handler = Callable[[_AgiSession, list[bytes]], int]
_COMMANDS: list[tuple[tuple[str, ...], _Handler, bool]] = [
    (("answer",), _h_answer, False),
    (("asyncagi", "break"), _h_zero, True),
    (("channel", "status"), _h_channel_status, False),
    (("database", "del"), _h_db_del, True),
    (("database", "deltree"), _h_db_deltree, True),
    (("database", "get"), _h_db_get, True),
    (("database", "put"), _h_db_put, True),
    (("exec",), _h_exec, True),
    (("get", "data"), _h_get_data, False),
    (("get", "full", "variable"), _h_get_full_variable, True),
    (("get", "option"), _h_get_option, False),
    (("get", "variable"), _h_get_variable, True),
    (("hangup",), _h_hangup, False),
    (("noop",), _h_noop, True),
    (("receive", "char"), _h_receive_char, False),
    (("receive", "text"), _h_receive_text, False),
    (("record", "file"), _h_record_file, False),
    (("say", "alpha"), _h_say, False),
    (("say", "digits"), _h_say, False),
    (("say", "number"), _h_say, False),
    (("say", "phonetic"), _h_say, False),
    (("say", "date"), _h_say, False),
    (("say", "time"), _h_say, False),
    (("say", "datetime"), _h_say, False),
    (("send", "image"), _h_zero, False),
    (("send", "text"), _h_zero, False),
    (("set", "autohangup"), _h_zero, False),
    (("set", "callerid"), _h_set_callerid, False),
    (("set", "context"), _h_set_context, False),
    (("set", "extension"), _h_set_extension, False),
    (("set", "music"), _h_zero, False),
    (("set", "priority"), _h_set_priority, False),
    (("set", "variable"), _h_set_variable, True),
    (("stream", "file"), _h_stream_file, False),
    (("control", "stream", "file"), _h_zero, False),
    (("tdd", "mode"), _h_zero, False),
    (("verbose",), _h_verbose, True),
    (("wait", "for", "digit"), _h_wait_for_digit, False),
    (("speech", "create"), _h_zero, False),
    (("speech", "set"), _h_zero, False),
    (("speech", "destroy"), _h_zero, True),
    (("speech", "load", "grammar"), _h_zero, False),
    (("speech", "unload", "grammar"), _h_zero, True),
    (("speech", "activate", "grammar"), _h_zero, False),
    (("speech", "deactivate", "grammar"), _h_zero, False),
    (("speech", "recognize"), _h_zero, False),
    (("gosub",), _h_zero, False),
]


def _find_command(argv: list[bytes]) -> tuple[tuple[str, ...], _Handler, bool] | None:
    """find_command(argv, 0): all words of the command must match, case-insensitively."""
    lowered = [a.lower() for a in argv[:3]]
    for words, handler, dead_ok in _COMMANDS:
        if len(lowered) >= len(words) and all(
            lowered[i] == w.encode() for i, w in enumerate(words)
        ):
            return words, handler, dead_ok
    return None


# --- dial plan applications reachable through EXEC -----------------------------------


def _app_set(s: _AgiSession, data: bytes) -> int:
    """Set(name=value): one pair, split on the first '=' (so commas stay in the value)."""
    name, eq, value = data.partition(b"=")
    if data and eq:
        s.set_var(name, value)
    return 0


def _app_mset(s: _AgiSession, data: bytes) -> int:
    """MSet(a=1,b=2): separate_args on ',' (24 slots), then each pair on the first '='."""
    if not data:
        return 0
    for pair in _separate_args(data, 0x2C, 24):
        parts = _separate_args(pair, 0x3D, 2)
        if len(parts) == 2:
            s.set_var(parts[0], parts[1])
    return 0


def _parse_cause(data: bytes) -> int:
    cause = 0
    upper = data.strip().upper()
    for name, code in _CAUSES.items():
        if upper.startswith(name):
            cause = code
            break
    if cause <= 0:
        scanned = _scan_int(data)
        cause = scanned if scanned is not None and scanned > 0 else 0
    return cause


def _app_hangup(s: _AgiSession, data: bytes) -> int:
    cause = _parse_cause(data) if data else 0
    if cause <= 0:
        cause = s.hangupcause if s.hangupcause > 0 else 16  # AST_CAUSE_NORMAL_CLEARING
    s.hangupcause = cause
    s.result.hangup_cause = cause
    s.hang_up()
    return -1


def _hangup_with_indication(cause: int) -> Callable[[_AgiSession, bytes], int]:
    """Busy()/Congestion(): modelled as the caller hanging up on hearing the tone."""

    def app(s: _AgiSession, data: bytes) -> int:
        if s.state != STATE_UP and not s.hungup:
            s.hangupcause = cause
            s.result.hangup_cause = cause
        s.hang_up()
        return -1

    return app


def _app_media(answers: bool) -> Callable[[_AgiSession, bytes], int]:
    """Playback/Wait/Answer: -1 once the channel is gone, else 0 (no time passes)."""

    def app(s: _AgiSession, data: bytes) -> int:
        if s.hungup:
            return -1
        if answers and b"noanswer" not in data.lower():
            s.state = STATE_UP
        return 0

    return app


def _app_noop(s: _AgiSession, data: bytes) -> int:
    return 0


_APPS: dict[bytes, Callable[[_AgiSession, bytes], int]] = {
    b"set": _app_set,
    b"mset": _app_mset,
    b"hangup": _app_hangup,
    b"busy": _hangup_with_indication(17),
    b"congestion": _hangup_with_indication(34),
    b"playback": _app_media(answers=True),
    b"answer": _app_media(answers=True),
    b"wait": _app_media(answers=False),
    b"noop": _app_noop,
    b"verbose": _app_noop,
    b"log": _app_noop,
}


# --- entry point --------------------------------------------------------------------


async def place_call(
    host: str,
    port: int,
    spec: CallSpec | None = None,
    *,
    timeout: float = 5.0,
    truncate: bool = True,
    split_env: bool = False,
    nagle: bool = False,
) -> CallResult:
    """Place one simulated call against the FastAGI server at ``host:port``.

    Returns when the server closes the socket (``closed_by_server``), when the
    channel ends the session itself (``exit_on_hangup``), or after ``timeout``
    seconds overall (``timed_out``; a real Asterisk would wait forever).  A
    refused or unanswered connection gives ``agistatus == "FAILURE"`` as in
    fastagi-service-down.txt.  ``split_env`` writes the env block one line per
    write like res_agi does; ``nagle`` keeps Nagle's algorithm on like Asterisk
    (asyncio disables it), reproducing the ~40 ms delayed-ACK stalls seen in the
    captures when two writes follow each other.
    """
    spec = spec or CallSpec()
    if spec.uniqueid is None:
        spec = dataclasses.replace(spec, uniqueid=_new_uniqueid())
    result = CallResult(uniqueid=(_b(spec.uniqueid) or b"").decode("utf-8", "replace"))
    env_lines = (
        [spec.raw_env] if spec.raw_env is not None else _env_lines(spec, host, port, truncate)
    )
    result.env = b"".join(env_lines)
    loop = asyncio.get_running_loop()
    session = _AgiSession(spec, result, loop, truncate)
    deadline = loop.time() + timeout

    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: session, host, port),
            timeout=min(MAX_AGI_CONNECT, timeout),
        )
    except (TimeoutError, OSError) as exc:
        result.agistatus = "FAILURE"
        result.error = f"{type(exc).__name__}: {exc}"
        result.timed_out = isinstance(exc, asyncio.TimeoutError) and timeout <= MAX_AGI_CONNECT
        return result

    transport = session.transport
    assert transport is not None
    if nagle:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            except OSError:
                pass
    session.t0 = time.perf_counter()
    if split_env:
        for line in env_lines:
            transport.write(line)
    else:
        transport.write(result.env)
    result.transcript.extend(("A", line) for line in env_lines)

    try:
        async with asyncio.timeout_at(deadline):
            await session.run()
    except TimeoutError:
        result.timed_out = True
        transport.abort()
    now = time.perf_counter()
    result.closed_by_server = session.server_eof and not result.timed_out
    if result.closed_by_server and session.eof_at is not None:
        result.elapsed = session.eof_at - session.t0
    else:
        result.elapsed = now - session.t0
    result.channel_dead = session.dead or session.hungup
    # res_agi fclose()s the socket once the session is over.
    if not transport.is_closing():
        transport.close()
    try:
        await asyncio.wait_for(asyncio.shield(session.closed), 0.5)
    except TimeoutError:
        transport.abort()
    return result

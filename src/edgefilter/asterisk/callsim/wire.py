"""What callsim mirrors from res_agi.c: its constants and its C-string and argument-splitting rules.

Split out of callsim.py (issue 18). Every other module of the double builds on these: the env
block builder cuts caller IDs like Asterisk (``_cstr``, ``_cut_utf8``), the command loop splits
lines like ``parse_args`` (``parse_agi_args``) and MSet splits its pairs like
``__ast_app_separate_args`` (``_separate_args``). Stdlib only, no I/O.
"""

from __future__ import annotations

import re

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


"""The environment block as res_agi's ``setup_env`` writes it, the shipped subroutine's calls, and
golden transcripts.

Split out of callsim.py (issue 18): everything a test or the benchmark needs to produce the
bytes Asterisk writes before the first command, without opening a connection (``build_env``,
``subroutine_call``), and to read those bytes back from the captures (``load_transcript``,
``transcript_env``). Caller IDs are normalised as Asterisk stores them unless ``truncate`` is off.
"""

from __future__ import annotations

import ast
import base64
import itertools
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefilter.asterisk.callsim.spec import CallSpec
from edgefilter.asterisk.callsim.wire import ASTERISK_VERSION, DEFAULT_THREADID, MAX_CALLERID_BYTES, _b, _cstr, _cut_utf8

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
    keep: set[int] = set()
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
    **spec: Any,  # any other CallSpec field, passed through as given
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
    uniqueid = _b(spec.pop("uniqueid", None)) or _new_uniqueid()
    args = (
        b"cid=" + base64.b64encode(number),
        b"exten=" + _dialplan_filter(b"0-9A-Za-z*#+_", _b(exten) or b""),
        b"vmbox=" + _dialplan_filter(b"0-9A-Za-z@_", _b(vmbox) or b""),
        b"context=" + (_b(inbound_context) or b""),
        b"linkedid=" + uniqueid,
        b"stir=" + _dialplan_filter(b"A-Za-z0-9_", _b(stir) or b""),
        b"stir_verify=" + _dialplan_filter(b"A-Z a-z0-9_", _b(stir_verify) or b""),
    )
    extra = dict(spec.pop("extra", None) or {})
    extra.setdefault("agi_priority", b"3")
    return CallSpec(callerid=callerid, context=b"edgefilter-screen", extension=b"s", uniqueid=uniqueid, args=args,
                    extra=extra, **spec)


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

"""One structured line per decision, safe to print whatever the caller put in their caller ID.

Caller-controlled text (number, name) is escaped so that it can neither forge a log line (CR, LF),
nor drive a terminal (ESC), nor break the key=value or JSON framing that log shippers parse.
"""

from __future__ import annotations

import json
import logging
import re
import sys

from edgefilter.rules.screen import Decision

log = logging.getLogger("edgefilter.decision")
_MAX_TEXT = 120
#: A value printed bare in key=value lines: printable ASCII without space, '"', '=' or '\\'.
#: Anything else (empty included) is quoted and escaped. One regex per value: this runs per call.
_PLAIN = re.compile(r'[!#-<>-\[\]-~]+\Z')


def escape_text(text: str, limit: int = _MAX_TEXT) -> str:
    """Printable ASCII stays; everything else becomes a \\xNN / \\uNNNN escape; cut at ``limit``."""
    out = []
    for ch in text[:limit]:
        o = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    if len(text) > limit:
        out.append("...")
    return "".join(out)


def decision_fields(d: Decision) -> dict:
    """The facts of one decision, as plain values (also used by JSON logs and event outputs)."""
    v = d.verdict
    return {
        "uniqueid": d.call.uniqueid[:64],
        "caller": d.call.callerid,
        "caller_name": d.call.calleridname,
        "e164": d.number.e164 or "",
        "kind": d.number.kind.value,
        "called": d.call.called[:64],
        "context": d.call.context[:64],
        "action": v.action.value,
        "would": v.would.value if v.would else "",
        "score": v.score,
        "policy": v.policy,
        "rules": [f"{h.rule}({h.weight:+g})" for h in v.hits],
        "forced_by": v.forced_by or "",
        "capped": [f"{g}:{raw:g}>{cap:g}" for g, raw, cap in v.capped],
        "elapsed_ms": round(d.elapsed_ms, 3),
    }


def format_kv(d: Decision) -> str:
    f = decision_fields(d)
    parts = ["decision"]
    for k, val in f.items():
        if isinstance(val, list):
            val = ",".join(val)
        if val == "" and k in ("would", "forced_by", "capped"):
            continue
        text = str(val)
        if isinstance(val, str) and (len(text) > _MAX_TEXT or _PLAIN.match(text) is None):
            text = f'"{escape_text(val)}"'
        parts.append(f"{k}={text}")
    return " ".join(parts)


def format_json(d: Decision) -> str:
    f = decision_fields(d)
    f["caller"] = f["caller"][:_MAX_TEXT]
    f["caller_name"] = f["caller_name"][:_MAX_TEXT]
    return json.dumps({"event": "decision", **f}, ensure_ascii=True, separators=(",", ":"))


class DecisionLogger:
    def __init__(self, fmt: str = "kv") -> None:
        self.fmt = fmt

    def __call__(self, d: Decision) -> None:
        if log.isEnabledFor(logging.INFO):  # the line is built only when it will be written
            log.info(format_json(d) if self.fmt == "json" else format_kv(d))


def setup_logging(level: str = "info", stream=None) -> None:
    """Plain lines on stderr (journald adds the timestamp when run under systemd).

    The format uses none of the caller/thread/process fields, so logging is told not to collect
    them (the "Optimization" switches of the logging docs): one decision line per call made
    logging about a tenth of the service's CPU, most of it in building the record.
    """
    logging._srcfile = None  # no stack walk (findCaller) per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())

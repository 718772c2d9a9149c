"""`edgefilter evidence`: the timeline of every call from one number, for a complaint or a court.

Regulators (12321 in China, the FTC in the US) and courts ask the same things: when did the
number call, whom, how long, what happened, when did the callee say no, and how often did it
call after that. This module turns the call log and the refusal ledger into that timeline, with
totals, as CSV (for spreadsheets) or one self-contained HTML page (a calls-per-day chart as
inline SVG, no script, no external resource). Pure rendering: the CLI reads the store. Every
text that came from a caller or Asterisk is HTML-escaped, and in CSV neutralised against
spreadsheet formula injection.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo

from edgefilter.outputs.decisionlog import escape_text
from edgefilter.store.sqlite import Refusal

CSV_COLUMNS = (
    "event", "time_local", "time_utc", "callee", "did", "action", "score", "rules", "answered",
    "talk_seconds", "hangup_cause", "hangup_text", "after_refusal", "caller_as_presented",
    "caller_name", "uniqueid", "note",
)


@dataclass
class Evidence:
    number: str
    since: float
    until: float
    tz: tzinfo
    rows: list[dict] = field(default_factory=list)  # CSV_COLUMNS keys, plus "ts"
    totals: dict[str, str] = field(default_factory=dict)
    per_day: dict[date, int] = field(default_factory=dict)


def _t(ts: float, tz: tzinfo) -> tuple[str, str]:
    local = datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")
    utc = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return local, utc


def _in_force(r: Refusal, callee: str, ts: float, scope: str) -> bool:
    if r.ts >= ts or (r.undone_at is not None and r.undone_at <= ts):
        return False
    return scope == "anyone" or r.callee == callee


def build(number: str, calls: list[dict], refusals: list[Refusal], *, since: float, until: float,
          tz: tzinfo, scope: str = "callee", appeals: Sequence = ()) -> Evidence:
    """The timeline (calls, refusals, undos in time order) and its totals."""
    ev = Evidence(number, since, until, tz)
    rows: list[dict] = []
    after = answered = unknown = 0
    talk = 0.0
    actions: dict[str, int] = {}
    callees: set[str] = set()
    for c in calls:
        ts = c["ts"]
        callee = c["extension"] or c["called"]
        callees.add(callee)
        violation = any(_in_force(r, callee, ts, scope) for r in refusals)
        after += violation
        a = c.get("answered")
        if a is None:
            unknown += 1
        elif a:
            answered += 1
        talk += c.get("talk_seconds") or 0.0
        actions[c["action"]] = actions.get(c["action"], 0) + 1
        local, utc = _t(ts, tz)
        day = datetime.fromtimestamp(ts, tz).date()
        ev.per_day[day] = ev.per_day.get(day, 0) + 1
        rows.append({
            "ts": ts, "event": "call", "time_local": local, "time_utc": utc, "callee": callee,
            "did": c["called"], "action": c["action"] + (f" (would {c['would']})" if c.get("would") else ""),
            "score": f"{c['score']:g}", "rules": c["rules"],
            "answered": "" if a is None else ("yes" if a else "no"),
            "talk_seconds": "" if c.get("talk_seconds") is None else f"{c['talk_seconds']:.0f}",
            "hangup_cause": "" if c.get("hangup_cause") is None else str(c["hangup_cause"]),
            "hangup_text": escape_text(c.get("hangup_text") or "", 64),
            "after_refusal": "yes" if violation else "no",
            "caller_as_presented": escape_text(c["caller"], 80), "caller_name": escape_text(c["caller_name"], 80),
            "uniqueid": escape_text(c["uniqueid"], 64), "note": "call after refusal" if violation else "",
        })
    for r in refusals:
        local, utc = _t(r.ts, tz)
        what = {"refuse": "refused by callee", "block": "blocked by callee", "report": f"reported by callee ({r.category})"}[r.kind]
        rows.append({**dict.fromkeys(CSV_COLUMNS, ""), "ts": r.ts, "event": r.kind, "time_local": local, "time_utc": utc,
                     "callee": r.callee, "uniqueid": r.call_uniqueid, "note": f"{what} via {r.source}"})
        if r.undone_at is not None:
            local, utc = _t(r.undone_at, tz)
            rows.append({**dict.fromkeys(CSV_COLUMNS, ""), "ts": r.undone_at, "event": "undo", "time_local": local,
                         "time_utc": utc, "callee": r.callee, "note": f"{r.kind} of {_t(r.ts, tz)[0]} undone by callee"})
    for a in appeals:  # store.Appeal: the caller said "wrong number" from the call (issue 17)
        local, utc = _t(a.ts, tz)
        secs = "" if a.recording_bytes is None else f", {max(0.0, (a.recording_bytes - 44) / 16000):.0f} s recorded"
        rows.append({**dict.fromkeys(CSV_COLUMNS, ""), "ts": a.ts, "event": "appeal", "time_local": local, "time_utc": utc,
                     "callee": a.called, "rules": a.rules, "uniqueid": escape_text(a.uniqueid, 64),
                     "note": f"appeal {a.code} left by the caller{secs}" + (f" against {a.entry_pattern} ({a.entry_source})" if a.entry_pattern else "")})
        if a.decided_at is not None:
            local, utc = _t(a.decided_at, tz)
            rows.append({**dict.fromkeys(CSV_COLUMNS, ""), "ts": a.decided_at, "event": f"appeal {a.status}", "time_local": local,
                         "time_utc": utc, "note": f"appeal {a.code} {a.status}" + (f": allowed {a.grant_pattern}" if a.grant_pattern else "")
                         + (f" ({escape_text(a.note, 200)})" if a.note else "")})
    rows.sort(key=lambda x: (x["ts"], x["event"] != "call"))
    ev.rows = rows
    first, last = (calls[0]["ts"], calls[-1]["ts"]) if calls else (None, None)
    ev.totals = {
        "number": number,
        "period_from": _t(since, tz)[0],
        "period_to": _t(until, tz)[0],
        "calls": str(len(calls)),
        "first_call": _t(first, tz)[0] if first is not None else "",
        "last_call": _t(last, tz)[0] if last is not None else "",
        "distinct_callees": str(len(callees)),
        "answered": str(answered),
        "not_answered": str(len(calls) - answered - unknown),
        "outcome_unknown": str(unknown),
        "talk_seconds": f"{talk:.0f}",
        "refusals": str(sum(1 for r in refusals if r.undone_at is None)),
        "refusals_undone": str(sum(1 for r in refusals if r.undone_at is not None)),
        "calls_after_refusal": str(after),
        "appeals": str(len(appeals)),
        "appeals_granted": str(sum(1 for a in appeals if a.status == "granted")),
        **{f"action_{k}": str(v) for k, v in sorted(actions.items())},
    }
    return ev


def _cell(v: str) -> str:
    """Spreadsheet formula injection: text starting with = + - @ (or a control) gets a quote,
    except our own E.164 numbers (a '+' and digits only), which stay exact."""
    if v and v[0] in "=+-@\t\r" and not (v[0] == "+" and v[1:].isdigit()):
        return "'" + v
    return v


def to_csv(ev: Evidence) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in ev.rows:
        w.writerow([_cell(str(r.get(k, ""))) for k in CSV_COLUMNS])
    w.writerow([])
    w.writerow(["total", "value"])
    for k, v in ev.totals.items():
        w.writerow([k, _cell(v)])
    return buf.getvalue()


def _chart(per_day: dict[date, int], since: float, until: float, tz: tzinfo) -> str:
    """Calls per day as an inline SVG bar chart (no script, no external resource)."""
    if not per_day:
        return "<p>No calls in this period.</p>"
    start, end = min(per_day), max(per_day)
    start = max(start, datetime.fromtimestamp(since, tz).date())
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    peak = max(per_day.values())
    bw, gap, h, pad = 14, 2, 160, 30
    width = pad + len(days) * (bw + gap) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 50}" role="img" '
             f'aria-label="calls per day">']
    parts.append(f'<line x1="{pad}" y1="{h + 5}" x2="{width - 5}" y2="{h + 5}" stroke="#444"/>')
    parts.append(f'<text x="2" y="14" font-size="11">{peak}</text>')
    for i, d in enumerate(days):
        n = per_day.get(d, 0)
        bh = 0 if not peak else round(n * h / peak)
        x = pad + i * (bw + gap)
        title = html.escape(f"{d.isoformat()}: {n} call{'s' if n != 1 else ''}")
        parts.append(f'<rect x="{x}" y="{h + 5 - bh}" width="{bw}" height="{bh}" fill="#b22"><title>{title}</title></rect>')
        if i == 0 or i == len(days) - 1 or d.day == 1:
            parts.append(f'<text x="{x}" y="{h + 20}" font-size="10">{html.escape(d.strftime("%m-%d"))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(ev: Evidence, *, generated: float, version: str) -> str:
    e = html.escape
    head_cols = ("time_local", "event", "callee", "did", "action", "answered", "talk_seconds",
                 "hangup_cause", "hangup_text", "after_refusal", "caller_as_presented", "caller_name", "rules", "note")
    rows = []
    for r in ev.rows:
        cls = "refusal" if r["event"] != "call" else ("violation" if r["after_refusal"] == "yes" else "")
        cells = "".join(f"<td>{e(str(r.get(k, '')))}</td>" for k in head_cols)
        rows.append(f'<tr class="{cls}">{cells}</tr>')
    totals = "".join(f"<tr><th>{e(k.replace('_', ' '))}</th><td>{e(v)}</td></tr>" for k, v in ev.totals.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Call evidence for {e(ev.number)}</title>
<style>
body{{font-family:sans-serif;margin:2em;color:#111}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #bbb;padding:3px 6px;text-align:left;vertical-align:top}}
tr.violation td{{background:#fdd}} tr.refusal td{{background:#ffd;font-weight:bold}} .meta{{color:#555}}
</style></head><body>
<h1>Call evidence: {e(ev.number)}</h1>
<p class="meta">Every call this number placed to this telephone system from {e(ev.totals['period_from'])} to
{e(ev.totals['period_to'])}, as recorded by the call filter at the time of each call, with the refusals
the called users recorded (star code or in-call key). Times are local ({e(ev.totals['period_from'][-6:])}) with UTC
in the CSV export. Generated {e(_t(generated, ev.tz)[0])} by edgefilter {e(version)}.</p>
<h2>Totals</h2><table>{totals}</table>
<h2>Calls per day</h2>{_chart(ev.per_day, ev.since, ev.until, ev.tz)}
<h2>Timeline</h2>
<table><tr>{''.join(f'<th>{e(k.replace("_", " "))}</th>' for k in head_cols)}</tr>
{''.join(rows)}
</table>
<p class="meta">Rows in red: calls placed after the callee had refused this number. Yellow: refusals, undos and appeals.</p>
</body></html>
"""

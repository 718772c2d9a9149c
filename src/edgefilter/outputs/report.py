"""Rendering of ``stats.Stats``: the one-screen text of `edgefilter stats` and the HTML report.

The HTML report is one self-contained file (inline CSS, inline SVG charts drawn here, no script,
no external resource) that a manager can open in any browser or attach to a mail. Caller IDs are
caller-controlled: every piece of text goes through ``html.escape`` (and the text output through
``decisionlog.escape_text``), so a caller ID such as ``<script>`` shows as text and runs nothing.
"""

from __future__ import annotations

import html
from datetime import datetime, tzinfo

from edgefilter.outputs.decisionlog import escape_text
from edgefilter.outputs.stats import ACTIONS, BLOCKED, AppealStats, Precision, Stats

COLORS = {
    "allow": "#43a047",
    "tag": "#fdd835",
    "challenge": "#fb8c00",
    "voicemail": "#8e24aa",
    "reject": "#e53935",
}
OTHER_COLOR = "#9e9e9e"
SPARK = " ▁▂▃▄▅▆▇█"


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.0f}")


def _when(ts: float, tz: tzinfo | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.fromtimestamp(ts, tz).strftime(fmt)


def _bucket_label(start: datetime, seconds: int) -> str:
    return start.strftime("%H:00") if seconds < 86400 else start.strftime("%m-%d")


def period_text(s: Stats, tz: tzinfo | None) -> str:
    return f"{_when(s.since, tz)} .. {_when(s.until, tz)}"


# --------------------------------------------------------------------------- text
def render_text(s: Stats, tz: tzinfo | None = None) -> str:
    """The answer to "what happened today", in one terminal screen."""
    out = [f"edgefilter stats {period_text(s, tz)}: {s.total} calls"]
    if not s.total:
        out.append("(no calls in this period)")
        return "\n".join(out)
    w = max(len(str(s.total)), 5)
    for action, n in s.by_action.items():
        out.append(f"  {action:<10} {n:>{w}}  {_pct(s.share(n)):>6}")
    out.append(f"  {'blocked':<10} {s.blocked:>{w}}  {_pct(s.blocked_share):>6}  ({' + '.join(BLOCKED)})")
    if s.log_only:
        would = ", ".join(f"{a} {n}" for a, n in s.would_by_action.items())
        out.append(f"  log-only mode: {s.log_only} calls answered allow; would have been: {would} ({s.would_blocked} blocked)")
    lat = s.latency_ms
    out.append(
        "screening latency (ms): "
        + "  ".join(f"{k} {_ms(lat[k])}" for k in ("p50", "p90", "p99", "max"))
    )
    if s.buckets:
        unit = "hour" if s.bucket_seconds < 86400 else "day"
        peak = max(b.total for b in s.buckets)
        spark = "".join(SPARK[0 if not b.total else max(1, round(b.total / peak * 8))] for b in s.buckets)
        busiest = max(s.buckets, key=lambda b: b.total)
        out.append(f"calls per {unit}: |{spark}| peak {peak} at {_bucket_label(busiest.start, s.bucket_seconds)}")
    if s.top_rules:
        out.append("top rules:")
        rw = max(len(r) for r, _ in s.top_rules)
        for rule, n in s.top_rules:
            out.append(f"  {rule:<{rw}} {n:>{w}}  {_pct(s.share(n)):>6}")
    if s.top_blocked_callers:
        out.append("top blocked callers:")
        texts = [escape_text(c.caller, 40) for c in s.top_blocked_callers]
        cw = max(len(t) for t in texts)
        for c, t in zip(s.top_blocked_callers, texts, strict=True):
            out.append(f"  {t:<{cw}} {c.calls:>{w}}  last {_when(c.last_ts, tz)} {c.last_action}")
    if s.appeals is not None and s.appeals.appealed:
        out.extend(appeals_text(s.appeals))
    return "\n".join(out)


def _share(x: float | None) -> str:
    return "-" if x is None else _pct(x)


def appeals_text(a: AppealStats) -> list[str]:
    """Rule precision from appeals: per rule and per list source, then the suggestions."""
    out = [f"appeals: {a.appealed} ({a.granted} granted, {a.denied} denied, {a.appealed - a.granted - a.denied} pending)"]
    rows: list[tuple[str, Precision]] = [("rule", p) for p in a.rules] + [("source", p) for p in a.sources]
    kw = max(len(f"{kind} {escape_text(p.key, 40)}") for kind, p in rows)
    out.append(f"  {'':<{kw}} {'refused':>8} {'appealed':>8} {'granted':>8} {'denied':>7} {'pending':>8} "
               f"{'granted/decided':>15} {'wrongly refused (at least)':>26}")
    for kind, p in rows:
        refused = "-" if p.refused is None else str(p.refused)
        out.append(f"  {kind + ' ' + escape_text(p.key, 40):<{kw}} {refused:>8} {p.appealed:>8} {p.granted:>8} {p.denied:>7} "
                   f"{p.pending:>8} {_share(p.decided_share):>15} {_share(p.false_positive):>26}")
    out.extend(f"  suggestion: {escape_text(t, 300)}" for t in a.suggestions)
    return out


# --------------------------------------------------------------------------- SVG charts
def _nice_max(n: int) -> int:
    if n <= 5:
        return max(n, 1)
    mag = 10 ** (len(str(n)) - 1)
    for m in (1, 2, 2.5, 5, 10):
        if n <= m * mag:
            return int(m * mag)
    return n  # pragma: no cover


def svg_calls_per_bucket(s: Stats, width: int = 900, height: int = 260) -> str:
    """Stacked bars: calls per hour (or day), one colour per action, with a legend and y axis."""
    left, right, top, bottom = 44, 10, 24, 36
    pw, ph = width - left - right, height - top - bottom
    n = max(len(s.buckets), 1)
    ymax = _nice_max(max((b.total for b in s.buckets), default=0))
    bw = pw / n
    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="chart-buckets" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Calls per {"hour" if s.bucket_seconds < 86400 else "day"} by action">'
    ]
    for i in range(5):  # grid and y labels
        v = ymax * i / 4
        y = top + ph - ph * i / 4
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{v:g}</text>')
    step = max(1, round(n / 12))
    for i, b in enumerate(s.buckets):
        x = left + i * bw
        y = top + ph
        for action, count in b.counts.items():
            if not count:
                continue
            h = ph * count / ymax
            y -= h
            label = f"{_bucket_label(b.start, s.bucket_seconds)} {action}: {count}"
            parts.append(
                f'<rect x="{x + bw * 0.1:.2f}" y="{y:.2f}" width="{max(bw * 0.8, 1):.2f}" height="{h:.2f}" '
                f'fill="{COLORS.get(action, OTHER_COLOR)}" data-bucket="{e(b.start.isoformat())}" data-action="{e(action)}" '
                f'data-count="{count}"><title>{e(label)}</title></rect>'
            )
        if i % step == 0:
            parts.append(
                f'<text x="{x + bw / 2:.1f}" y="{top + ph + 16}" text-anchor="middle" class="axis">'
                f"{e(_bucket_label(b.start, s.bucket_seconds))}</text>"
            )
    lx = left
    for action in [a for a in s.by_action if a in COLORS or s.by_action[a]]:
        parts.append(f'<rect x="{lx}" y="6" width="10" height="10" fill="{COLORS.get(action, OTHER_COLOR)}"/>')
        parts.append(f'<text x="{lx + 14}" y="15" class="axis">{e(action)}</text>')
        lx += 24 + 7 * len(action)
    parts.append("</svg>")
    return "".join(parts)


def svg_top_rules(s: Stats, width: int = 900) -> str:
    """Horizontal bars: how many calls each of the top rules fired on."""
    rows = s.top_rules or []
    bar_h, gap, label_w, top = 20, 6, 230, 6
    height = top * 2 + max(len(rows), 1) * (bar_h + gap)
    pw = width - label_w - 110
    vmax = max((n for _, n in rows), default=1)
    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="chart-rules" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Top rules">'
    ]
    for i, (rule, n) in enumerate(rows):
        y = top + i * (bar_h + gap)
        w = pw * n / vmax
        parts.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" class="label">{e(rule)}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{max(w, 1):.2f}" height="{bar_h}" fill="#1e88e5" '
            f'data-rule="{e(rule)}" data-count="{n}"><title>{e(rule)}: {n}</title></rect>'
        )
        parts.append(f'<text x="{label_w + w + 6:.2f}" y="{y + 15}" class="label">{n} ({_pct(s.share(n))})</text>')
    if not rows:
        parts.append(f'<text x="{label_w}" y="{top + 15}" class="label">no rule fired</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- HTML
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;margin:24px auto;max-width:940px;color:#212121;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #e0e0e0;padding-bottom:4px}
.period{color:#616161;margin:0 0 16px}
.tiles{display:flex;gap:12px;flex-wrap:wrap}.tile{flex:1;min-width:150px;border:1px solid #e0e0e0;border-radius:8px;padding:10px 14px}
.tile .v{font-size:24px;font-weight:600;white-space:nowrap}.tile .k{color:#616161}
table{border-collapse:collapse;min-width:420px}td,th{padding:3px 12px 3px 0;text-align:left}td.n,th.n{text-align:right}
tr+tr td{border-top:1px solid #f0f0f0}.swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
svg{max-width:100%;height:auto}svg .grid{stroke:#eeeeee}svg .axis{font-size:11px;fill:#757575}svg .label{font-size:12px;fill:#212121}
.note{color:#757575;font-size:12px;margin-top:24px}code{font-size:12px}
"""


def render_html(s: Stats, *, tz: tzinfo | None = None, title: str = "edgefilter call report", generated: datetime | None = None) -> str:
    """One self-contained HTML page (no script, no external resource)."""
    e = html.escape
    generated = generated or datetime.now(tz)
    lat = s.latency_ms
    tiles = [
        ("calls", str(s.total), "tile-total"),
        ("blocked", f"{s.blocked} ({_pct(s.blocked_share)})", "tile-blocked"),
        ("rejected", str(s.by_action.get("reject", 0)), "tile-reject"),
        ("latency p50 / p99 (ms)", f"{_ms(lat.get('p50'))} / {_ms(lat.get('p99'))}", "tile-latency"),
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # belt and braces: even if something slipped through escaping, nothing may load or run
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="period" id="period">{e(period_text(s, tz))} &middot; generated {e(generated.strftime("%Y-%m-%d %H:%M"))}</p>',
        '<div class="tiles">',
    ]
    for label, value, ident in tiles:
        out.append(f'<div class="tile" id="{ident}"><div class="v">{e(value)}</div><div class="k">{e(label)}</div></div>')
    out.append("</div>")
    if s.log_only:
        would = ", ".join(f"{a} {n}" for a, n in s.would_by_action.items())
        out.append(
            f'<p id="log-only">Log-only mode: {s.log_only} calls were answered allow; they would have been: {e(would)} '
            f"({s.would_blocked} blocked).</p>"
        )

    unit = "hour" if s.bucket_seconds < 86400 else "day"
    out.append(f"<h2>Calls per {unit}</h2>")
    out.append(svg_calls_per_bucket(s))

    out.append('<h2>Calls by action</h2><table id="actions"><tr><th>action</th><th class="n">calls</th><th class="n">share</th></tr>')
    for action, n in s.by_action.items():
        sw = f'<span class="swatch" style="background:{COLORS.get(action, OTHER_COLOR)}"></span>'
        out.append(f'<tr data-action="{e(action)}"><td>{sw}{e(action)}</td><td class="n">{n}</td><td class="n">{_pct(s.share(n))}</td></tr>')
    out.append(
        f'<tr data-action="blocked"><td><b>blocked</b> ({" + ".join(BLOCKED)})</td><td class="n"><b>{s.blocked}</b></td>'
        f'<td class="n"><b>{_pct(s.blocked_share)}</b></td></tr></table>'
    )

    out.append("<h2>Top rules</h2>")
    out.append(svg_top_rules(s))

    out.append("<h2>Top blocked callers</h2>")
    if s.top_blocked_callers:
        out.append('<table id="callers"><tr><th>caller</th><th class="n">blocked calls</th><th>last call</th><th>last action</th></tr>')
        for c in s.top_blocked_callers:
            out.append(
                f'<tr><td><code>{e(c.caller[:80])}</code></td><td class="n">{c.calls}</td>'
                f"<td>{e(_when(c.last_ts, tz))}</td><td>{e(c.last_action)}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>No call was blocked in this period.</p>")

    if s.appeals is not None and s.appeals.appealed:
        a = s.appeals
        out.append("<h2>Appeals and rule precision</h2>")
        out.append(f'<p id="appeals-total">{a.appealed} appeals from refused callers: {a.granted} granted, {a.denied} denied, '
                   f"{a.appealed - a.granted - a.denied} pending.</p>")
        out.append('<table id="appeals"><tr><th></th><th class="n">refused</th><th class="n">appealed</th><th class="n">granted</th>'
                   '<th class="n">denied</th><th class="n">granted of decided</th><th class="n">wrongly refused (at least)</th></tr>')
        for kind, p in [("rule", p) for p in a.rules] + [("source", p) for p in a.sources]:
            refused = "-" if p.refused is None else str(p.refused)
            out.append(f'<tr data-{kind}="{e(p.key)}"><td>{e(kind)} <code>{e(p.key[:80])}</code></td><td class="n">{refused}</td>'
                       f'<td class="n">{p.appealed}</td><td class="n">{p.granted}</td><td class="n">{p.denied}</td>'
                       f'<td class="n">{_share(p.decided_share)}</td><td class="n">{_share(p.false_positive)}</td></tr>')
        out.append("</table>")
        if a.suggestions:
            out.append('<ul id="appeal-suggestions">' + "".join(f"<li>{e(t)}</li>" for t in a.suggestions) + "</ul>")
    out.append('<h2>Screening latency</h2><table id="latency"><tr><th>percentile</th><th class="n">ms</th></tr>')
    for k in ("p50", "p90", "p99", "max"):
        out.append(f'<tr data-stat="{k}"><td>{k}</td><td class="n" id="latency-{k}">{_ms(lat.get(k))}</td></tr>')
    out.append("</table>")
    out.append(
        '<p class="note">Blocked = answered challenge, voicemail or reject (the call did not ring through directly); '
        "tagged calls ring with a label. Latency is the time edgefilter took to decide, from its call log. "
        f"Actions: {e(', '.join(ACTIONS))}. Generated by <code>edgefilter stats --html</code>.</p>"
    )
    out.append("</body></html>")
    return "\n".join(out)

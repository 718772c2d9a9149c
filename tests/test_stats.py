"""`edgefilter stats` and the HTML report, from a known call log."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from datetime import datetime
from html.parser import HTMLParser
from zoneinfo import ZoneInfo

import pytest

from edgefilter import cli
from edgefilter.outputs.report import render_html, render_text
from edgefilter.outputs.stats import compute, percentile
from edgefilter.store.sqlite import CallRecord, Store

SH = ZoneInfo("Asia/Shanghai")
HOSTILE = '<script>alert("x")</script>\x1b[2J'


def rec(ts, action, caller="+8613800138000", rules="", elapsed=1.0, would=None, e164=True, kind="valid"):
    return CallRecord(
        ts=ts, uniqueid="", caller=caller, caller_e164=caller if e164 else None, caller_kind=kind,
        caller_name="", called="1000", extension="1000", context="from-trunk", action=action,
        would=would, score=0.0, rules=rules, policy="default", elapsed_ms=elapsed,
    )


def known_log(now: float) -> list[CallRecord]:
    """100 calls in the last 24 h with known figures, plus 5 older ones that must not count.

    allow 60, tag 10, challenge 8, voicemail 7, reject 15 -> blocked 30 (30 %).
    Latencies are 1..100 ms, so p50 = 50, p90 = 90, p99 = 99, max = 100 (nearest rank).
    """
    rows: list[CallRecord] = []
    plan = ["allow"] * 60 + ["tag"] * 10 + ["challenge"] * 8 + ["voicemail"] * 7 + ["reject"] * 15
    for i, action in enumerate(plan):
        ts = now - 3600 * 20 + i * 60
        if action == "reject":
            caller = "+8617000000001" if i < 60 + 10 + 8 + 7 + 9 else "+8617000000002"  # 9 and 6
            rows.append(rec(ts, action, caller, "LIST_BLOCKED", elapsed=i + 1))
        elif action == "voicemail":
            rows.append(rec(ts, action, HOSTILE, "CLI_GARBAGE", elapsed=i + 1, e164=False, kind="garbage"))
        elif action == "challenge":  # withheld callers, however they are spelt, count as one
            withheld = ("anonymous", "Restricted", "")[i % 3]
            rows.append(rec(ts, action, withheld, "CLI_WITHHELD", elapsed=i + 1, e164=False, kind="withheld"))
        elif action == "tag":
            rows.append(rec(ts, action, "+8613900139000", "NAME_DIGITS_ONLY CLI_FILTERED", elapsed=i + 1))
        else:
            rows.append(rec(ts, action, f"+86138{i:08d}", "", elapsed=i + 1))
    rows += [rec(now - 3 * 86400 + i, "reject", "+8617000000009", "LIST_BLOCKED", elapsed=5000) for i in range(5)]
    return rows


def check_known(s: dict) -> None:
    assert s["total"] == 100
    assert s["by_action"] == {"allow": 60, "tag": 10, "challenge": 8, "voicemail": 7, "reject": 15}
    assert s["blocked"] == 30 and s["blocked_share"] == 0.3
    assert s["latency_ms"] == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert [(c["caller"], c["calls"], c["last_action"]) for c in s["top_blocked_callers"]] == [
        ("+8617000000001", 9, "reject"),
        ("(withheld)", 8, "challenge"),
        (HOSTILE, 7, "voicemail"),
        ("+8617000000002", 6, "reject"),
    ]
    assert [(r["rule"], r["calls"]) for r in s["top_rules"]] == [
        ("LIST_BLOCKED", 15),
        ("CLI_FILTERED", 10),
        ("NAME_DIGITS_ONLY", 10),
        ("CLI_WITHHELD", 8),
        ("CLI_GARBAGE", 7),
    ]


@pytest.fixture
def config_with_log(tmp_path):
    db = tmp_path / "ef.db"
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[store]\npath = "{db}"\n[screen]\ntimezone = "Asia/Shanghai"\n')

    async def fill():
        async with Store.open(str(db)) as store:
            await store.record_calls(known_log(time.time()))

    asyncio.run(fill())
    return cfg


def test_stats_json_matches_the_known_call_log(config_with_log, capsys):
    assert cli.main(["stats", "--json", "--config", str(config_with_log)]) == 0
    check_known(json.loads(capsys.readouterr().out))


def test_stats_text_answers_what_happened_in_one_screen(config_with_log, capsys):
    assert cli.main(["stats", "--config", str(config_with_log)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) <= 25
    assert lines[0].endswith(": 100 calls")
    assert "  reject        15   15.0%" in lines
    assert "  blocked       30   30.0%  (challenge + voicemail + reject)" in lines
    assert "screening latency (ms): p50 50  p90 90  p99 99  max 100" in lines
    assert "\x1b" not in out and "<script>alert(\\\"x\\\")</script>\\x1b[2J" in out  # escaped, not executed
    assert out.index("+8617000000001") < out.index("+8617000000002")


def test_stats_since_limits_the_period(config_with_log, capsys):
    assert cli.main(["stats", "--json", "--since", "4d", "--config", str(config_with_log)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["total"] == 105 and s["by_action"]["reject"] == 20
    assert s["bucket_seconds"] == 86400  # longer than 72 h: per day
    assert sum(b["reject"] for b in s["buckets"]) == 20


def test_stats_without_a_database_and_bad_arguments(tmp_path, capsys):
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "none.db"}"\n')
    assert cli.main(["stats", "--config", str(cfg)]) == 0
    assert "(no calls in this period)" in capsys.readouterr().out
    assert not (tmp_path / "none.db").exists()  # stats never creates the database
    assert cli.main(["stats", "--since", "yesterday", "--config", str(cfg)]) == 1
    assert "--since" in capsys.readouterr().err
    assert cli.main(["stats", "--html", str(tmp_path / "no" / "such" / "dir.html"), "--config", str(cfg)]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_percentile_nearest_rank():
    v = [float(x) for x in range(1, 11)]
    assert [percentile(v, p) for p in (10, 50, 90, 99, 100)] == [1, 5, 9, 10, 10]
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_hourly_buckets_follow_the_configured_time_zone():
    since = datetime(2026, 11, 28, 8, 30, tzinfo=SH).timestamp()
    until = since + 4 * 3600
    rows = [
        rec(datetime(2026, 11, 28, 8, 59, tzinfo=SH).timestamp(), "allow"),
        rec(datetime(2026, 11, 28, 9, 0, tzinfo=SH).timestamp(), "reject"),
        rec(datetime(2026, 11, 28, 9, 59, tzinfo=SH).timestamp(), "reject"),
        rec(datetime(2026, 11, 28, 12, 10, tzinfo=SH).timestamp(), "tag"),
        rec(since - 1, "reject"),  # before the period
        rec(until, "reject"),  # the period is half-open
    ]
    s = compute(rows, since=since, until=until, tz=SH)
    assert s.total == 4 and s.bucket_seconds == 3600
    assert [b.start.strftime("%H:%M") for b in s.buckets] == ["08:00", "09:00", "10:00", "11:00", "12:00"]
    assert [(b.counts["allow"], b.counts["reject"], b.counts["tag"]) for b in s.buckets] == [
        (1, 0, 0), (0, 2, 0), (0, 0, 0), (0, 0, 0), (0, 0, 1),
    ]


def test_log_only_rows_count_what_would_have_happened():
    now = 1_800_000_000.0
    rows = [rec(now - 10, "allow", would="reject", rules="LIST_BLOCKED"), rec(now - 5, "allow", would="tag"), rec(now - 1, "allow")]
    s = compute(rows, since=now - 3600, until=now)
    assert s.by_action["allow"] == 3 and s.blocked == 0
    assert s.would_by_action == {"tag": 1, "reject": 1} and s.would_blocked == 1
    assert "would have been: tag 1, reject 1 (1 blocked)" in render_text(s)


# --------------------------------------------------------------------------- the HTML report
class Page(HTMLParser):
    """Collects what a browser would build: tags with attributes, text per element id, all text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str | None] = []
        self.text_by_id: dict[str, str] = {}
        self.text: list[str] = []
        self.open_ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in ("meta", "line", "br", "img", "link", "input"):
            return
        self.stack.append(a.get("id"))
        if a.get("id"):
            self.open_ids.append(a["id"])

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in ("meta", "line", "br", "img", "link", "input"):
            return
        ident = self.stack.pop() if self.stack else None
        if ident:
            self.open_ids.remove(ident)

    def handle_data(self, data):
        self.text.append(data)
        for ident in self.open_ids:
            self.text_by_id[ident] = self.text_by_id.get(ident, "") + data


def test_html_report_renders_the_figures_and_is_self_contained(config_with_log, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert cli.main(["stats", "--html", str(out), "--config", str(config_with_log)]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    page = Page()
    page.feed(out.read_text(encoding="utf-8"))
    page.close()
    assert not page.stack, "unbalanced tags"
    tags = page.tags
    # self-contained: no script, no external stylesheet, image or link of any kind
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "img", "object")]
    assert not [a for _, a in tags if any(k in a for k in ("src", "href")) or any(k.startswith("on") for k in a)]

    assert page.text_by_id["tile-total"].startswith("100")
    assert page.text_by_id["tile-blocked"].startswith("30 (30.0%)")
    assert page.text_by_id["tile-latency"].startswith("50 / 99")
    actions = {a["data-action"]: a for t, a in tags if t == "tr" and "data-action" in a}
    assert set(actions) == {"allow", "tag", "challenge", "voicemail", "reject", "blocked"}
    assert "reject15" in page.text_by_id["actions"].replace(" ", "").replace("\n", "")

    # the stacked chart: one rect per (hour, action) with calls; they add up to the log
    bars = [a for t, a in tags if t == "rect" and "data-action" in a]
    per_action: dict[str, int] = {}
    for a in bars:
        per_action[a["data-action"]] = per_action.get(a["data-action"], 0) + int(a["data-count"])
    assert per_action == {"allow": 60, "tag": 10, "challenge": 8, "voicemail": 7, "reject": 15}
    hours = {a["data-bucket"] for a in bars}
    assert all(h.endswith("+08:00") for h in hours)  # the configured zone
    rules = [(a["data-rule"], int(a["data-count"])) for t, a in tags if t == "rect" and "data-rule" in a]
    assert rules[0] == ("LIST_BLOCKED", 15) and len(rules) == 5

    # the hostile caller is text in the callers table, never markup
    assert HOSTILE[:-4] in page.text_by_id["callers"]
    assert "+8617000000001" in page.text_by_id["callers"]
    assert [page.text_by_id[f"latency-{k}"] for k in ("p50", "p90", "p99", "max")] == ["50", "90", "99", "100"]


def test_html_escapes_every_caller_text():
    now = 1_800_000_000.0
    nasty = '"><svg onload=alert(1)><!--'
    s = compute([rec(now - 1, "reject", nasty, "LIST_BLOCKED", e164=False)], since=now - 3600, until=now)
    doc = render_html(s, title="<b>t</b>")
    assert nasty not in doc and "onload=alert" not in doc.replace("onload=alert(1)&gt;", "")
    assert "&lt;b&gt;t&lt;/b&gt;" in doc
    page = Page()
    page.feed(doc)
    assert sum(1 for t, _ in page.tags if t == "svg") == 2  # only our two charts
    assert nasty in "".join(page.text)


def test_empty_period_renders():
    s = compute([], since=0, until=3600)
    assert "no calls" in render_text(s)
    page = Page()
    page.feed(render_html(s))
    assert "No call was blocked" in "".join(page.text)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no Chromium to render with")
def test_report_renders_in_a_real_browser(config_with_log, tmp_path):
    out = tmp_path / "report.html"
    assert cli.main(["stats", "--html", str(out), "--config", str(config_with_log)]) == 0
    shot = tmp_path / "report.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,1400", f"--screenshot={shot}", out.as_uri()],
        capture_output=True, timeout=60, check=False,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000  # a page with charts, not a blank one

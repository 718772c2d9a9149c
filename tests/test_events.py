"""Observability outputs over real sockets: StatsD and syslog to a UDP listener, Prometheus over HTTP.

Calls go through the running service with the Asterisk double; the collectors are real UDP
sockets on 127.0.0.1 (asyncio-dgram), the scrape is a real HTTP GET.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import statistics
import time
import urllib.request

import asyncio_dgram
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from edgefilter.core.config import settings_from_dict
from edgefilter.core.errors import ConfigError
from edgefilter.core.model import Call
from edgefilter.lists.index import ListIndex
from edgefilter.outputs.decisionlog import DecisionLogger, format_json, format_kv
from edgefilter.outputs.events import (
    SD_ID,
    STATSD_MAX_DATAGRAM,
    SYSLOG_MAX_MESSAGE,
    UdpSender,
    parse_statsd,
    parse_syslog,
    sd_escape,
    statsd_lines,
    syslog_message,
)
from edgefilter.rules.screen import Screener
from edgefilter.service import Service

from .test_service import add, call

HOSTILE_NAME = 'Evil" ] \\x=1 action=allow\x1b[31m\u202e'


# --------------------------------------------------------------------------- helpers
async def listener():
    return await asyncio_dgram.bind(("127.0.0.1", 0))


def addr(stream) -> str:
    host, port = stream.sockname[:2]
    return f"{host}:{port}"


async def receive(stream, enough, timeout: float = 3.0) -> list[bytes]:
    """Datagrams until ``enough(datagrams)`` holds; fails the test at ``timeout``."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not enough(got):
        left = deadline - time.monotonic()
        assert left > 0, f"collector got only {got!r}"
        try:
            data, _ = await asyncio.wait_for(stream.recv(), left)
        except TimeoutError:
            continue
        got.append(data)
    return got


async def until(cond, timeout: float = 10.0) -> None:
    """Wait for a condition (generous timeout: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def dead_port() -> int:
    """A UDP port with nothing listening (bound, then closed)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def metrics_of(datagrams: list[bytes]) -> list[tuple[str, float, str]]:
    return [m for d in datagrams for m in parse_statsd(d)]


def decision(callerid="+8613800138000", name="", block=(), settings=None, **kw):
    s = settings or settings_from_dict({})
    idx = ListIndex()
    screener = Screener(s, idx)
    if block:
        from edgefilter.lists.index import Entry, parse_pattern

        idx.extend(Entry("block", parse_pattern(p, "CN"), created_at=0) for p in block)
    return screener.decide(Call(callerid=callerid, calleridname=name, dnid="1000", extension="1000", context="from-trunk", uniqueid="1700000000.1", **kw))


# --------------------------------------------------------------------------- through the service
async def test_statsd_and_syslog_receive_every_call_through_the_service(make_settings):
    statsd, syslog = await listener(), await listener()
    svc = Service(make_settings(outputs={"statsd": addr(statsd), "syslog": addr(syslog), "statsd_prefix": "pbx1.ef"}), port=0)
    await svc.start()
    try:
        await add(svc, "block", "+86170*")
        r1 = await call(svc, "+8617012345678")
        r2 = await call(svc, "anonymous")
        r3 = await call(svc, "+8613900139000", calleridname=HOSTILE_NAME.encode())
        assert [r.variables["EDGEFILTER_ACTION"] for r in (r1, r2, r3)] == ["reject", "challenge", "allow"]

        events = await receive(syslog, lambda got: len(got) >= 3)
        grams = await receive(statsd, lambda got: sum(n.endswith(".latency") for n, _, _ in metrics_of(got)) >= 3)
        await svc._gauges()  # the periodic job, run now instead of waiting gauge_interval
        grams += await receive(statsd, lambda got: any(t == "g" for _, _, t in metrics_of(got)))
    finally:
        await svc.stop()
        statsd.close()
        syslog.close()

    m = metrics_of(grams)
    counters = {}
    for name, value, kind in m:
        if kind == "c":
            counters[name] = counters.get(name, 0) + value
    assert counters == {
        "pbx1.ef.calls.reject": 1,
        "pbx1.ef.rules.LIST_BLOCKED": 1,
        "pbx1.ef.calls.challenge": 1,
        "pbx1.ef.rules.CLI_WITHHELD": 1,
        "pbx1.ef.calls.allow": 1,
    }
    timers = [v for n, v, k in m if k == "ms"]
    assert len(timers) == 3 and all(0 <= v < 300 for v in timers)
    assert all(n == "pbx1.ef.screen.latency" for n, _, k in m if k == "ms")
    gauges = {n: v for n, v, k in m if k == "g"}
    assert gauges["pbx1.ef.lists.block"] == 1 and gauges["pbx1.ef.lists.allow"] == 0
    assert all(len(g) <= STATSD_MAX_DATAGRAM for g in grams)

    parsed = [parse_syslog(e) for e in events]
    by_action = {p["params"]["action"]: p for p in parsed}
    assert set(by_action) == {"reject", "challenge", "allow"}
    rej = by_action["reject"]
    assert rej["sd_id"] == SD_ID and rej["msgid"] == "decision" and rej["app_name"] == "edgefilter"
    assert rej["facility"] == 16 and rej["severity"] == 5  # local0, notice for a blocked call
    assert rej["params"]["caller"] == "+8617012345678" and rej["params"]["called"] == "1000"
    assert rej["params"]["rules"] == "LIST_BLOCKED(+20)" and rej["params"]["score"] == "20"
    assert rej["params"]["policy"] == "default" and float(rej["params"]["elapsed_ms"]) >= 0
    assert rej["msg"].startswith("reject +8617012345678 -> 1000 score=20 rules=LIST_BLOCKED")
    allow = by_action["allow"]
    assert allow["severity"] == 6
    # the hostile display name arrives whole, its ", ] and \ escaped per RFC 5424, ESC and
    # the bidi override made visible, and cannot add a parameter of its own
    assert allow["params"]["name"] == 'Evil" ] \\x=1 action=allow\\x1b[31m\\u202e'
    assert allow["params"]["action"] == "allow"
    raw = next(e for e in events if b"Evil" in e)
    assert b'name="Evil\\" \\] \\\\x=1' in raw and b"\x1b" not in raw and "\u202e".encode() not in raw


async def test_absent_collector_does_not_change_call_latency_and_stays_bounded(make_settings, tmp_path):
    """A dead collector costs a call nothing it would wait for. The latency side by side with
    outputs off is a benchmark figure (bench/outputs_latency.py: off, live, dead-port); here the
    bound only catches a call that waits on the collector (a blocking send, a retry), and holds
    on a loaded machine."""
    async def latencies(svc, n=60):
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            r = await call(svc, f"+86139{i:08d}")
            out.append(time.perf_counter() - t0)
            assert r.variables["EDGEFILTER_ACTION"] == "allow"
        return statistics.median(out), max(out)

    # 70 numbers of one block in a row: keep RANGE_CAMPAIGN and friends out of a latency test
    quiet = {"behaviour": {"enabled": False}}
    port = dead_port()
    svc = Service(
        make_settings(
            quiet,
            store={"path": str(tmp_path / "other.db")},
            outputs={"statsd": f"127.0.0.1:{port}", "syslog": f"127.0.0.1:{port}", "queue_size": 50},
        ),
        port=0,
    )
    await svc.start()
    try:
        await latencies(svc, 10)
        median, worst = await latencies(svc)
        # a burst far larger than the queue: all answered, queue never above its bound
        results = await asyncio.gather(*(call(svc, f"+86137{i:08d}") for i in range(200)))
        assert all(r.variables["EDGEFILTER_ACTION"] == "allow" for r in results)
        # every datagram of the burst offered and settled (sent, dropped at the full queue, refused)
        await until(lambda: all(out.sender.queue.empty() for out in svc.outputs))
        for out in svc.outputs:
            assert out.sender.queue.maxsize == 50
            # the kernel's errors are consumed as they come, never piling up
            assert out.sender._stream._excq.qsize() <= 1
        stats = svc.output_stats()
    finally:
        await svc.stop()
    assert worst < 1.5, (median, worst)
    # the kernel told us nothing listens, and we counted it instead of failing
    assert stats["statsd"]["refused"] + stats["syslog"]["refused"] > 0, stats
    assert stats["syslog"]["sent"] + stats["syslog"]["dropped"] + stats["syslog"]["refused"] > 0


async def test_slow_collector_never_blocks_and_the_queue_drops_and_counts():
    # A collector that never reads, with a tiny receive buffer: the kernel drops, we never wait.
    slow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    slow.bind(("127.0.0.1", 0))
    sender = UdpSender("statsd", slow.getsockname(), queue_size=100, batch=True)
    sender.start()
    try:
        t0 = time.perf_counter()
        accepted = sum(sender.offer((b"edgefilter.calls.allow:1|c", b"edgefilter.screen.latency:0.1|ms")) for _ in range(5000))
        assert time.perf_counter() - t0 < 2.0  # offering never waits (a blocking offer would wait for ever)
        assert accepted == 100 and sender.dropped == 4900
        assert sender.queue.qsize() == 100
        deadline = time.monotonic() + 2
        while not sender.queue.empty():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # the queue drained into the (full) socket without error, and nothing keeps the loop busy
        # since: CPU time of this process, which a loaded machine does not inflate
        cpu0 = time.process_time()
        await asyncio.sleep(0.3)
        assert time.process_time() - cpu0 < 0.1, "something is spinning on the event loop"
        assert sender.sent >= 1 and sender.errors == 0
    finally:
        await sender.close()
        slow.close()


async def test_a_collector_that_talks_back_cannot_grow_our_memory():
    col = await listener()
    sender = UdpSender("syslog", col.sockname[:2], queue_size=10)
    sender.start()
    try:
        sender.offer((b"<134>1 - - edgefilter - decision - hello",))
        _, peer = (await asyncio.wait_for(col.recv(), 3))
        for _ in range(500):
            await col.send(b"x" * 1000, peer)  # a hostile or confused collector floods us
        await asyncio.sleep(0.1)
        assert sender._stream._recvq.qsize() == 0  # not read: the kernel's buffer bounds it
        sender.offer((b"<134>1 - - edgefilter - decision - again",))
        data, _ = await asyncio.wait_for(col.recv(), 3)
        assert data.endswith(b"again") and sender.errors == 0
    finally:
        await sender.close()
        col.close()


async def test_statsd_batches_many_metrics_per_datagram_within_the_mtu():
    col = await listener()
    sender = UdpSender("statsd", col.sockname[:2], queue_size=1000, batch=True)
    items = [(f"edgefilter.rules.RULE_{i:04d}:1|c".encode(), b"edgefilter.screen.latency:0.123|ms") for i in range(400)]
    for it in items:
        sender.offer(it)
    sender.start()
    try:
        grams = await receive(col, lambda got: sum(len(parse_statsd(g)) for g in got) >= 800)
    finally:
        await sender.close()
        col.close()
    assert all(len(g) <= STATSD_MAX_DATAGRAM for g in grams)
    assert len(grams) < 40  # ~40 lines per datagram, not one each
    names = [n for g in grams for n, _, _ in parse_statsd(g)]
    assert names == [ln.decode().split(":")[0] for it in items for ln in it]  # in order, none lost or cut


async def test_prometheus_endpoint_reports_the_same_figures(make_settings):
    svc = Service(make_settings(outputs={"prometheus": "127.0.0.1:0"}), port=0)
    await svc.start()
    try:
        await add(svc, "block", "+86170*")
        await add(svc, "allow", "+8613800138000")
        await call(svc, "+8617012345678")
        await call(svc, "+8617012345679")
        await call(svc, "anonymous")
        await call(svc, "+8613800138000")
        await svc._gauges()
        prom = next(o for o in svc.outputs if o.name == "prometheus")
        url = f"http://127.0.0.1:{prom.port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        await svc.stop()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("edgefilter_calls_total", (("action", "reject"),))] == 2
    assert samples[("edgefilter_calls_total", (("action", "challenge"),))] == 1
    assert samples[("edgefilter_calls_total", (("action", "allow"),))] == 1
    assert samples[("edgefilter_calls_total", (("action", "voicemail"),))] == 0
    assert samples[("edgefilter_rule_hits_total", (("rule", "LIST_BLOCKED"),))] == 2
    assert samples[("edgefilter_rule_hits_total", (("rule", "LIST_ALLOWED"),))] == 1
    assert samples[("edgefilter_rule_hits_total", (("rule", "CLI_WITHHELD"),))] == 1
    assert samples[("edgefilter_screen_latency_seconds_count", ())] == 4
    assert samples[("edgefilter_screen_latency_seconds_bucket", (("le", "0.3"),))] == 4
    assert samples[("edgefilter_list_entries", (("list", "block"),))] == 1
    assert samples[("edgefilter_list_entries", (("list", "allow"),))] == 1


async def test_prometheus_port_in_use_is_logged_and_screening_goes_on(make_settings, caplog):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    svc = Service(make_settings(outputs={"prometheus": f"127.0.0.1:{busy.getsockname()[1]}"}), port=0)
    await svc.start()
    try:
        assert svc.outputs == []
        assert "[outputs] prometheus not started" in caplog.text
        assert (await call(svc, "+8613900139000")).variables["EDGEFILTER_ACTION"] == "allow"
    finally:
        await svc.stop()
        busy.close()


async def test_sighup_reload_turns_statsd_on_without_a_restart(make_settings, tmp_path):
    col = await listener()
    cfg = tmp_path / "edgefilter.toml"
    db = tmp_path / "edgefilter.db"
    cfg.write_text(f'[store]\npath = "{db}"\n[agi]\nlisten = "127.0.0.1:0"\n')
    from edgefilter.core.config import load_settings

    svc = Service(load_settings(cfg), config_path=str(cfg), port=0)
    await svc.start()
    try:
        assert svc.outputs == []
        cfg.write_text(cfg.read_text() + f'[outputs]\nstatsd = "{addr(col)}"\n')
        assert svc.reload()
        for _ in range(100):
            if svc.outputs:
                break
            await asyncio.sleep(0.01)
        await call(svc, "anonymous")
        grams = await receive(col, lambda got: any(n.endswith("calls.challenge") for n, _, _ in metrics_of(got)))
        assert ("edgefilter.rules.CLI_WITHHELD", 1.0, "c") in metrics_of(grams)
        # two quick reloads (new prefix, then a syslog too): one of each output, not two
        cfg.write_text(cfg.read_text() + 'statsd_prefix = "pbx2"\n')
        assert svc.reload()
        cfg.write_text(cfg.read_text() + f'syslog = "{addr(col)}"\n')
        assert svc.reload()
        await asyncio.gather(*[t for t in svc.tasks if not t.done() and "restart" in repr(t.get_coro())])
        assert sorted(o.name for o in svc.outputs) == ["statsd", "syslog"]
        assert sum(1 for o in svc.observers if getattr(o, "name", "") == "statsd") == 1
        await call(svc, "anonymous")
        grams = await receive(col, lambda got: any(n == "pbx2.calls.challenge" for g in got if not g.startswith(b"<") for n, _, _ in parse_statsd(g)))
    finally:
        await svc.stop()
        col.close()


# --------------------------------------------------------------------------- formats (pure)
def test_statsd_lines_of_a_log_only_decision_count_the_would_action():
    s = settings_from_dict({"screen": {"mode": "log-only"}})
    d = decision(block=["+86170*"], callerid="+8617012345678", settings=s)
    lines = [ln.decode() for ln in statsd_lines(d, "ef")]
    assert lines[:3] == ["ef.calls.allow:1|c", "ef.would.reject:1|c", "ef.rules.LIST_BLOCKED:1|c"]
    assert re.fullmatch(r"ef\.screen\.latency:\d+\.\d{3}\|ms", lines[3])


@hsettings(max_examples=100, deadline=None)
@given(st.text(max_size=300), st.text(max_size=300))
def test_any_caller_text_gives_one_wellformed_bounded_syslog_message(number, name):
    d = decision(callerid=number, name=name)
    msg = syslog_message(d, facility=16, hostname="pbx", procid=42)
    assert len(msg) <= SYSLOG_MAX_MESSAGE
    assert b"\n" not in msg and b"\r" not in msg and b"\x00" not in msg
    p = parse_syslog(msg)  # strict: an unescaped quote or bracket would fail here
    assert p["params"]["action"] == d.verdict.action.value
    for key, original in (("caller", number), ("name", name)):
        got = p["params"].get(key, "")
        if original.isprintable() and len(sd_escape(original)) == len(original) + sum(original.count(c) for c in '"\\]'):
            assert got == original  # printable text round-trips exactly through the escaping
    assert p["msg"].isascii()


def test_sd_escape_is_bounded_and_never_cuts_an_escape():
    s = sd_escape('"' * 500, limit=128)
    assert s.endswith("...") and len(s) <= 131 and s[:-3] == '\\"' * 64
    assert sd_escape("a]b\\c") == "a\\]b\\\\c"
    assert sd_escape("\n\r\x00") == "\\x0a\\x0d\\x00"


def test_severity_marks_forged_and_failed_screening_as_warnings():
    d = decision(callerid="+8613800138000", forged="LF in the caller ID")
    p = parse_syslog(syslog_message(d, facility=3))
    assert p["severity"] == 4 and p["facility"] == 3 and "CLI_FORGED" in p["params"]["rules"]


# --------------------------------------------------------------------------- config
def test_outputs_are_off_by_default_and_validated():
    s = settings_from_dict({})
    assert (s.outputs.statsd, s.outputs.syslog, s.outputs.prometheus) == (None, None, None)
    on = settings_from_dict({"outputs": {"statsd": "10.0.0.5:8125", "syslog": "[::1]:514", "prometheus": "0.0.0.0:9464"}})
    assert on.outputs.statsd == ("10.0.0.5", 8125) and on.outputs.syslog == ("::1", 514)
    for bad, words in [
        ({"statsd": "nohost"}, "host:port"),
        ({"syslog": "127.0.0.1:0"}, "port 0"),
        ({"statsd_prefix": "a b"}, "statsd_prefix"),
        ({"syslog_facility": "local8"}, "local7"),
        ({"syslog_app_name": "has space"}, "APP-NAME"),
        ({"gauge_interval": "10ms"}, "gauge_interval"),
        ({"queue_size": 1}, "queue_size"),
        ({"stasd": "127.0.0.1:8125"}, "did you mean 'statsd'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            settings_from_dict({"outputs": bad})


# --------------------------------------------------------------------------- the decision log line
def _kv_pairs(line: str) -> list[tuple[str, str]]:
    return re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_decision_log_line_carries_the_facts_and_escapes_hostile_text(fmt, caplog):
    d = decision(callerid='+8613800138000"\n decision action=allow', name=HOSTILE_NAME + "\r\nFAKE LINE")
    with caplog.at_level(logging.INFO, logger="edgefilter.decision"):
        DecisionLogger(fmt)(d)
    (rec,) = caplog.records
    line = rec.getMessage()
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u202e" not in line
    if fmt == "json":
        f = json.loads(line)
        assert line.isascii()
        assert f["caller_name"] == (HOSTILE_NAME + "\r\nFAKE LINE")[:120]
        assert f["caller"].startswith('+8613800138000"\n')
        keys = f
    else:
        pairs = _kv_pairs(line)
        keys = dict(pairs)
        assert [k for k, _ in pairs].count("action") == 1  # the caller could not add a field
        assert keys["caller_name"].startswith('"Evil\\" ] \\\\x=1 action=allow\\x1b[31m\\u202e')
        assert keys["caller"].startswith('"+8613800138000\\"\\x0a')
    for k in ("caller", "called", "action", "score", "rules", "policy", "elapsed_ms"):
        assert k in keys, k
    assert keys["action"] == d.verdict.action.value
    rules = keys["rules"] if fmt == "json" else keys["rules"].split(",")
    assert rules and all(re.fullmatch(r"[A-Z_]+\([+-][\d.]+\)", r) for r in rules)  # rules with weights


def test_log_formats_bound_overlong_caller_text():
    d = decision(callerid="1" * 5000, name="\u4e2d" * 5000)
    assert len(format_kv(d)) < 2000
    assert len(format_json(d)) < 2000


# --------------------------------------------------------------------------- deployment
def test_systemd_unit_is_hardened_and_reloads_with_sighup(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    unit = Path(__file__).resolve().parents[1] / "asterisk-conf" / "edgefilter.service"
    directives: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            directives.setdefault(k, []).append(v)
    want = {
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "ProtectSystem": "strict",
        "StateDirectory": "edgefilter",
        "WorkingDirectory": "/var/lib/edgefilter",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "User": "edgefilter",
    }
    for k, v in want.items():
        assert directives.get(k) == [v], k
    assert directives["ExecStart"][0].split()[1:] == ["serve", "--config", "/etc/edgefilter/edgefilter.toml"]
    if shutil.which("systemd-analyze"):
        test_unit = tmp_path / "edgefilter.service"
        test_unit.write_text(unit.read_text().replace("/usr/local/bin/edgefilter", "/bin/true"))
        r = subprocess.run(["systemd-analyze", "verify", str(test_unit)], capture_output=True, text=True, timeout=30)
        problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "edgefilter.service" in ln]
        assert not problems, problems


def test_list_counts_for_gauges_stay_in_step_with_the_index():
    from edgefilter.lists.index import Entry, parse_pattern

    idx = ListIndex()
    e = lambda lst, p, note="": Entry(lst, parse_pattern(p, "CN"), note=note, created_at=0)  # noqa: E731
    idx.extend([e("block", "+86170*"), e("block", "+8613800138000"), e("allow", "+8613800138000"), e("block", "+4121560####")])
    assert idx.counts() == {"block": 3, "allow": 1}
    idx.put(e("block", "+86170*", note="replaced"))  # same list and pattern: replaced, not added
    assert idx.counts() == {"block": 3, "allow": 1}
    assert idx.remove("block", parse_pattern("+8613800138000", "CN"))
    assert not idx.remove("block", parse_pattern("+8613800138000", "CN"))
    assert idx.counts() == {"block": 2, "allow": 1} == {k: sum(1 for x in idx if x.list == k) for k in ("block", "allow")}


def test_decision_log_line_is_not_built_when_info_is_off(monkeypatch, caplog):
    import edgefilter.outputs.decisionlog as dl

    def boom(d):
        raise AssertionError("built a line nobody writes")

    monkeypatch.setattr(dl, "format_kv", boom)
    with caplog.at_level(logging.WARNING, logger="edgefilter.decision"):
        DecisionLogger("kv")(decision(callerid="+8613800138000"))
    assert caplog.records == []
    with caplog.at_level(logging.INFO, logger="edgefilter.decision"), pytest.raises(AssertionError):
        DecisionLogger("kv")(decision(callerid="+8613800138000"))

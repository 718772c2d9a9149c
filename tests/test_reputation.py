"""Reputation sources: a local aiohttp server plays the services (fast, slow, failing, garbage,
rate-limiting); calls go through the real service and the Asterisk double, clocks are injected."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import replace

import pytest
from aiohttp import web

from edgefilter import cli
from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.core.config import dump, load_settings, settings_from_dict
from edgefilter.core.errors import ConfigError
from edgefilter.core.model import Call
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.reputation import Answer, Breaker, MemoryCache, ReputationClient, ReputationLookup, build_request, read_answer, weight_of
from edgefilter.reputation.answers import parse_retry_after, redact
from edgefilter.rules.screen import Screener
from edgefilter.service import Service
from edgefilter.store.sqlite import ReputationRow, Store

NUMBER = "+8613800138000"


# ----------------------------------------------------------------------------- the fake services
class FakeReputation:
    """Reputation services on 127.0.0.1 that count every request they get.

    /fast/{n}      {"data": {"score": S}} (S from ``scores``, 0 when unknown)
    /delay/{n}     the same after ``delay`` seconds (below the deadline)
    /slow/{n}      the same once ``release`` is set (beyond any budget)
    /fail/{n}      HTTP 500
    /garbage/{n}   200 with a body that is not JSON
    /ratelimit/{n} 429 with Retry-After: 120
    /flaky/{n}     500 while ``flaky_failing``, else like /fast
    /status/{n}    200 when the number has a score, else 404
    /category/{n}  {"result": [{"category": C}]}
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.headers: list[dict] = []
        self.scores: dict[str, float] = {}
        self.categories: dict[str, str] = {}
        self.release = asyncio.Event()
        self.delay = 0.05
        self.flaky_failing = True
        self.port = 0
        self._runner: web.AppRunner | None = None

    def count(self, route: str | None = None, number: str | None = None) -> int:
        return sum(1 for r, n in self.requests if (route is None or r == route) and (number is None or n == number))

    async def arrived(self, n: int, route: str | None = None, number: str | None = None) -> int:
        """The count once ``n`` requests got here (requests still on their way on a loaded box)."""
        for _ in range(300):
            if self.count(route, number) >= n:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # and a moment for any extra one to show up
        return self.count(route, number)

    def url(self, route: str, tail: str = "{e164}") -> str:
        return f"http://127.0.0.1:{self.port}/{route}/{tail}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route, num = request.match_info["route"], request.match_info["num"]
        self.requests.append((route, num))
        self.headers.append(dict(request.headers))
        body = {"data": {"score": self.scores.get(num, 0)}}
        if route == "delay":
            await asyncio.sleep(self.delay)
        elif route == "slow":
            await asyncio.wait_for(self.release.wait(), 10)
        elif route == "fail" or (route == "flaky" and self.flaky_failing):
            return web.Response(status=500, text="internal error")
        elif route == "garbage":
            return web.Response(status=200, text="<html>oops{", content_type="application/json")
        elif route == "ratelimit":
            return web.Response(status=429, text="slow down", headers={"Retry-After": "120"})
        elif route == "status":
            return web.Response(status=200 if num in self.scores else 404)
        elif route == "category":
            body = {"result": [{"category": self.categories.get(num, None)}]}
        return web.json_response(body)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{route}/{num}", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def fake():
    f = FakeReputation()
    await f.start()
    try:
        yield f
    finally:
        await f.stop()


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def source(url: str, **kw) -> dict:
    base = {"url": url, "json_path": "data.score", "score_weights": {"50": 4.0, "80": 8.0}}
    base.update(kw)
    return base


def rep_settings(make_settings, sources: dict, screen: dict | None = None, **reputation):
    # These tests call one number many times in a row: keep the behaviour rules (RATE_BURST) out.
    data = {"reputation": {"sources": sources, **reputation}, "behaviour": {"enabled": False}}
    if screen:
        data["screen"] = screen
    return make_settings(data)


async def call(svc: Service, callerid: str = NUMBER, **kw):
    result = await place_call("127.0.0.1", svc.port, CallSpec(callerid=callerid, **kw), timeout=3.0)
    assert result.closed_by_server and not result.timed_out, result
    return result


def rules(result) -> list[str]:
    return result.variables["EDGEFILTER_RULES"].split()


class Harness:
    """Screener + client + lookup on a real store, with one injected clock (no service)."""

    def __init__(self, settings, store: Store, clock: FakeClock) -> None:
        self.settings = settings
        self.clock = clock
        self.client = ReputationClient(settings.reputation, store, clock=clock, monotonic=clock)
        self.screener = Screener(settings, clock=clock)
        self.lookup = ReputationLookup(self.client, settings, lambda: self.screener.index)
        self.screener.async_sources.append(self.lookup)

    async def screen(self, callerid: str = NUMBER, **kw):
        return await self.screener.screen(Call(callerid=callerid, **kw))


@pytest.fixture
async def harness(make_settings, tmp_path):
    made: list[Harness] = []
    stores = []

    async def make(sources: dict, screen: dict | None = None, **reputation) -> Harness:
        settings = rep_settings(make_settings, sources, screen, **reputation)
        cm = Store.open(str(tmp_path / f"h{len(made)}.db"))
        store = await cm.__aenter__()
        stores.append(cm)
        h = Harness(settings, store, FakeClock())
        await h.client.start(warm=False)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.client.close()
    for cm in stores:
        await cm.__aexit__(None, None, None)


def hit(decision, rule: str):
    found = [h for h in decision.verdict.hits if h.rule == rule]
    return found[0] if found else None


# ----------------------------------------------------------------------------- through the service
async def test_second_call_is_decided_from_the_cache_without_any_request(make_settings, fake):
    fake.scores[NUMBER] = 90
    settings = rep_settings(make_settings, {"fast": source(fake.url("fast"))})
    svc = Service(settings, port=0)
    await svc.start()
    try:
        first = await call(svc)
        assert rules(first) == ["REPUTATION_LISTED"] and first.variables["EDGEFILTER_SCORE"] == "8"
        assert first.variables["EDGEFILTER_ACTION"] == "challenge"
        assert fake.count("fast", NUMBER) == 1
        for _ in range(3):
            again = await call(svc)
            assert _stable(again.variables) == _stable(first.variables)
        assert fake.count() == 1, "cached answers must not be fetched again"
        await svc.reputation.flush()
        row = await svc.store.get_reputation("fast", NUMBER)
        assert (row.status, row.score) == ("listed", 90.0)
        assert row.expires_at - row.fetched_at == pytest.approx(86400)  # ttl_positive default 1d
    finally:
        await svc.stop()
    assert svc.reputation is None
    # a restarted service answers from the stored cache, still without asking
    svc = Service(settings, port=0)
    await svc.start()
    try:
        assert rules(await call(svc)) == ["REPUTATION_LISTED"]
        assert fake.count() == 1
    finally:
        await svc.stop()


async def test_a_slow_source_never_makes_a_call_exceed_the_budget(make_settings, fake):
    fake.scores[NUMBER] = 90
    settings = rep_settings(
        make_settings,
        {"slow": source(fake.url("slow")), "fast": source(fake.url("fast"), score_weights={"50": 1.0})},
        screen={"budget": "300ms"},
        margin="100ms",
        source_max_in_flight=32,
        max_in_flight=64,
    )
    svc = Service(settings, port=0)
    decisions = []
    svc.observers.append(decisions.append)
    await svc.start()
    try:
        # The slow source answers only when released (never, during the calls): a call that waited
        # for it would time out. The bounds below tell that apart and hold on a loaded machine;
        # what the budget itself bounds is the screening (no SCREEN_TIMEOUT: the reputation wait
        # gave up at budget - margin by itself).
        lone = await call(svc)
        assert lone.elapsed < 1.5, f"call took {lone.elapsed * 1000:.0f} ms"
        assert set(rules(lone)) == {"REPUTATION_PENDING", "REPUTATION_LISTED"}  # the fast source still counted
        assert lone.variables["EDGEFILTER_ACTION"] == "allow"
        burst = await asyncio.gather(*(call(svc, f"+86138001381{i:02d}") for i in range(20)))
        for r in burst:
            # slow is pending; fast (score 0 for these numbers: no hit) may be too on a loaded box
            assert set(rules(r)) == {"REPUTATION_PENDING"} and r.variables["EDGEFILTER_ACTION"] == "allow"
            # wall time as the double saw it; the double shares the service's event loop here, so
            # 20 answers in one burst may queue behind each other for a few ms each
            assert r.elapsed < 2.0
        for d in decisions:  # the screening itself never ran out of its budget
            assert "SCREEN_TIMEOUT" not in d.verdict.rules and d.elapsed_ms < 1500, d
        assert len(decisions) == 21 and await fake.arrived(21, "slow") == 21
        # the slow answers land in the cache once they come: the next call uses them, no request
        fake.release.set()
        await svc.reputation.settle()
        again = await call(svc)
        assert set(rules(again)) == {"REPUTATION_LISTED"} and again.variables["EDGEFILTER_SCORE"] == "9"
        assert fake.count("slow") == 21
    finally:
        await svc.stop()


async def test_a_dead_source_costs_an_error_rule_not_the_decision(make_settings):
    settings = rep_settings(make_settings, {"dead": source("http://127.0.0.1:9/{e164}")})
    svc = Service(settings, port=0)
    await svc.start()
    try:
        r = await call(svc)
        assert rules(r) == ["REPUTATION_ERROR"] and r.variables["EDGEFILTER_ACTION"] == "allow"
    finally:
        await svc.stop()


async def test_concurrent_calls_from_one_number_share_one_request(make_settings, fake):
    fake.scores[NUMBER] = 90
    settings = rep_settings(make_settings, {"slow": source(fake.url("slow"))})
    svc = Service(settings, port=0)
    await svc.start()
    try:
        results = await asyncio.gather(*(call(svc) for _ in range(30)))
        assert all(rules(r) == ["REPUTATION_PENDING"] for r in results)
        assert await fake.arrived(1, "slow", NUMBER) == 1
        fake.release.set()
        await svc.reputation.settle()
        assert rules(await call(svc)) == ["REPUTATION_LISTED"]
        assert fake.count() == 1
    finally:
        await svc.stop()


async def test_allowlisted_and_private_numbers_are_never_sent(make_settings, fake):
    settings = rep_settings(make_settings, {"fast": source(fake.url("fast"))})
    settings = replace(settings, policies=settings_from_dict({
        "policies": {"office": {"match_did": ["2000"], "never_block": ["+8613700137000"]}},
    }).policies)
    svc = Service(settings, port=0)
    await svc.start()
    try:
        for lst, text in (("allow", "+8613800138000"), ("allow", "+86139*"), ("block", "+8613912345678")):
            await svc.store.put_entry(Entry(lst, parse_pattern(text, "CN"), created_at=time.time()))
        await svc.follower.poll()
        private = [
            dict(callerid="+8613800138000"),  # allowlisted exactly
            dict(callerid="013912340000"),  # under an allowlisted prefix
            dict(callerid="+8613912345678"),  # blocked, but inside an allowed prefix
            dict(callerid="+8613700137000", dnid="1000"),  # never_block of another line
            dict(callerid="10086"),  # short number
            dict(callerid="1001"),  # internal extension
            dict(callerid="138"),  # invalid
            dict(callerid="anonymous"),
            dict(callerid="+8615000150000", callingpres=32),  # presentation restricted
        ]
        for spec in private:
            await call(svc, **spec)
        assert fake.requests == [], "a private number was sent to a reputation source"
        assert svc.reputation_lookup.skipped["allowlist"] == 3
        # the control: an ordinary number is looked up (so the check above can fail)
        await call(svc, "+8615000150000")
        assert fake.requests == [("fast", "+8615000150000")]
    finally:
        await svc.stop()


async def test_service_maintenance_purges_expired_answers_and_reload_reweighs(make_settings, fake, tmp_path):
    fake.scores[NUMBER] = 90
    cfg = tmp_path / "edgefilter.toml"
    body = f'[store]\npath = "{tmp_path / "edgefilter.db"}"\n[agi]\nlisten = "127.0.0.1:0"\n' \
           f'[reputation.sources.fast]\nurl = "{fake.url("fast")}"\njson_path = "data.score"\n'
    cfg.write_text(body + "weight_per_point = 0.05\n")
    svc = Service(load_settings(cfg), config_path=str(cfg), port=0)
    await svc.start()
    try:
        assert (await call(svc)).variables["EDGEFILTER_SCORE"] == "4.5"
        cfg.write_text(body + "weight_per_point = 0.1\n")
        assert svc.reload()
        await svc.reputation.flush()
        r = await call(svc)  # re-weighed from the stored answer: the mapping applies at use time
        assert r.variables["EDGEFILTER_SCORE"] == "9" and fake.count() == 1
        await svc.store.put_reputation([ReputationRow("+8613900139000", "fast", 1.0, None, "listed", 1.0, 2.0)])
        await svc._maintenance()
        assert await svc.store.get_reputation("fast", "+8613900139000") is None
        assert await svc.store.get_reputation("fast", NUMBER) is not None
    finally:
        await svc.stop()


async def test_sources_added_by_a_reload_are_asked_from_then_on(fake, tmp_path, capsys):
    fake.scores[NUMBER] = 90
    cfg = tmp_path / "edgefilter.toml"
    base = f'[store]\npath = "{tmp_path / "edgefilter.db"}"\n[agi]\nlisten = "127.0.0.1:0"\n'
    cfg.write_text(base)
    svc = Service(load_settings(cfg), config_path=str(cfg), port=0)
    await svc.start()
    try:
        assert rules(await call(svc)) == [] and svc.reputation is None
        cfg.write_text(base + f'[reputation.sources.fast]\nurl = "{fake.url("fast")}"\njson_path = "data.score"\nweight_per_point = 0.1\n')
        assert cli.main(["config", "check", "--config", str(cfg)]) == 0
        assert "reputation sources: fast; calls wait for them at most 250 ms" in capsys.readouterr().out
        assert svc.reload()
        await svc.reputation_starting  # the reputation client starts in the background
        assert rules(await call(svc)) == ["REPUTATION_LISTED"] and fake.count() == 1
    finally:
        await svc.stop()


# ----------------------------------------------------------------------------- injected clocks
async def test_ttl_expiry_with_an_injected_clock(harness, fake):
    fake.scores[NUMBER] = 90
    h = await harness({"fast": source(fake.url("fast"), ttl_positive="1h", ttl_negative="10m")})
    assert hit(await h.screen(), "REPUTATION_LISTED").weight == 8.0
    h.clock.advance(3599)
    assert hit(await h.screen(), "REPUTATION_LISTED").detail.endswith("(cached 59m ago)")
    assert fake.count() == 1
    h.clock.advance(2)
    assert hit(await h.screen(), "REPUTATION_LISTED") is not None
    assert fake.count() == 2, "an expired answer must be fetched again"
    # a negative answer (score 0 -> weight 0) is kept ttl_negative
    other = "+8613900139000"
    assert (await h.screen(other)).verdict.hits == ()
    h.clock.advance(599)
    await h.screen(other)
    assert fake.count("fast", other) == 1
    h.clock.advance(2)
    await h.screen(other)
    assert fake.count("fast", other) == 2


async def test_breaker_opens_after_failures_and_closes_after_a_good_probe(harness, fake):
    h = await harness({"flaky": source(fake.url("flaky"), breaker_failures=3, breaker_cooldown="30s")})
    for i in range(3):
        d = await h.screen(f"+861380013800{i}")
        assert hit(d, "REPUTATION_ERROR").detail == "flaky: HTTP 500"
    assert fake.count() == 3
    d = await h.screen("+8613800138009")
    assert "circuit breaker open" in hit(d, "REPUTATION_UNAVAILABLE").detail
    assert fake.count() == 3, "an open breaker must not ask"
    h.clock.advance(31)  # half-open: one probe, which fails -> open again
    assert hit(await h.screen("+8613800138009"), "REPUTATION_ERROR") is not None
    assert hit(await h.screen("+8613800138008"), "REPUTATION_UNAVAILABLE") is not None
    assert fake.count() == 4
    fake.flaky_failing = False
    fake.scores["+8613800138008"] = 99
    h.clock.advance(31)  # the probe succeeds -> closed
    assert hit(await h.screen("+8613800138008"), "REPUTATION_LISTED").weight == 8.0
    assert h.client.states["flaky"].breaker.state == "closed"
    await h.screen("+8613800138007")
    await h.screen("+8613800138006")
    assert fake.count() == 7


async def test_a_429_opens_the_breaker_at_once_for_retry_after(harness, fake):
    h = await harness({"limited": source(fake.url("ratelimit"), breaker_failures=5, breaker_cooldown="30s")})
    assert hit(await h.screen(), "REPUTATION_ERROR").detail == "limited: rate limited (HTTP 429)"
    h.clock.advance(100)  # past the cool-down, not past Retry-After: 120
    assert hit(await h.screen("+8613900139000"), "REPUTATION_UNAVAILABLE") is not None
    assert fake.count() == 1
    h.clock.advance(21)
    await h.screen("+8613900139000")
    assert fake.count() == 2


async def test_garbage_and_errors_are_not_cached(harness, fake):
    h = await harness({"garbage": source(fake.url("garbage")), "fail": source(fake.url("fail"))})
    d = await h.screen()
    assert {x.detail for x in d.verdict.hits} == {"garbage: garbage: the answer is not JSON", "fail: HTTP 500"}
    assert d.verdict.score == 0 and d.verdict.action.value == "allow"
    await h.screen()
    assert fake.count("garbage") == 2 and fake.count("fail") == 2
    await h.client.flush()
    assert await h.client.store.reputation_rows() == []


async def test_coalescing_within_the_deadline(harness, fake):
    fake.scores[NUMBER] = 90
    fake.delay = 0.08
    h = await harness({"delay": source(fake.url("delay"))}, screen={"budget": "3s"})
    decisions = await asyncio.gather(*(h.screen() for _ in range(50)))
    assert all(hit(d, "REPUTATION_LISTED").weight == 8.0 for d in decisions)
    assert fake.count() == 1


async def test_requests_in_flight_are_bounded_per_source_and_overall(harness, fake):
    h = await harness({"slow": source(fake.url("slow"), max_in_flight=2)}, screen={"budget": "100ms"})
    ds = await asyncio.gather(*(h.screen(f"+861380013800{i}") for i in range(5)))
    assert sorted(d.verdict.rules[0] for d in ds) == ["REPUTATION_PENDING"] * 2 + ["REPUTATION_UNAVAILABLE"] * 3
    assert "max_in_flight" in hit(ds[-1], "REPUTATION_UNAVAILABLE").detail
    assert await fake.arrived(2) == 2
    h2 = await harness({"a": source(fake.url("slow")), "b": source(fake.url("slow"))}, screen={"budget": "100ms"}, max_in_flight=3)
    d = await asyncio.gather(*(h2.screen(f"+861390013900{i}") for i in range(2)))
    assert sum(r == "REPUTATION_PENDING" for x in d for r in x.verdict.rules) == 3
    assert h2.client.in_flight == 3
    fake.release.set()
    await h.client.settle()
    await h2.client.settle()
    assert h.client.in_flight == 0 and h2.client.in_flight == 0


async def test_api_key_from_a_private_file_goes_in_the_header(make_settings, fake, tmp_path):
    key = tmp_path / "phoneblock.key"
    key.write_text("s3cr3t-key\n")
    os.chmod(key, 0o600)
    settings = rep_settings(make_settings, {"pb": source(
        fake.url("fast"), api_key_file=str(key), headers={"Authorization": "Bearer {api_key}", "X-Hash": "{sha256}"},
    )})
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in dump(settings)
    svc = Service(settings, port=0)
    await svc.start()
    try:
        await call(svc)
    finally:
        await svc.stop()
    assert fake.headers[0]["Authorization"] == "Bearer s3cr3t-key"
    assert fake.headers[0]["X-Hash"] == hashlib.sha256(NUMBER.encode()).hexdigest()
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match=r"readable by every user \(mode 0644\); run `chmod 600"):
        rep_settings(make_settings, {"pb": source(fake.url("fast"), api_key_file=str(key), headers={"A": "{api_key}"})})


# ----------------------------------------------------------------------------- CLI
async def test_cli_lookup_shows_live_answers_with_timing_and_the_cache(make_settings, fake, capsys):
    fake.scores[NUMBER] = 90
    settings = rep_settings(make_settings, {"fast": source(fake.url("fast")), "broken": source(fake.url("fail"))})
    parser = cli.build_parser()

    async def run(*argv) -> str:
        args = parser.parse_args(["lookup", *argv])
        assert await args.func(args, settings) == 0
        return capsys.readouterr().out

    out = await run("013800138000")
    assert "-> +8613800138000 (valid)" in out
    assert "fast:\n  cached: nothing\n  live:   score 90 -> weight +8 (score 90 >= 80); HTTP 200, " in out
    assert "broken:\n  cached: nothing\n  live:   error: HTTP 500; HTTP 500, " in out and "not cached" in out
    out = await run(NUMBER, "--source", "fast")
    assert "  cached: score 90 -> weight +8 (score 90 >= 80); fetched " in out
    assert "cache kept (still fresh; --refresh replaces it)" in out and "broken" not in out
    assert fake.count("fast") == 2
    out = await run(NUMBER, "--cached-only")
    assert fake.count() == 3 and "live" not in out
    fake.scores[NUMBER] = 60
    out = await run(NUMBER, "--source", "fast", "--refresh")
    assert "live:   score 60 -> weight +4" in out and "cached until" in out
    async with Store.open(settings.store.path) as store:
        assert (await store.get_reputation("fast", NUMBER)).score == 60
    args = parser.parse_args(["check", NUMBER])  # `check` explains with cached answers, asks nobody
    assert await args.func(args, settings) == 0
    out = capsys.readouterr().out
    assert "REPUTATION_LISTED" in out and "fast: score 60 >= 50 -> +4 (cached 0s ago)" in out and "action: tag" in out
    assert "reputation: broken has no cached answer" in out and fake.count() == 4
    async with Store.open(settings.store.path) as store:
        await store.put_entry(Entry("allow", parse_pattern("+86139*", "CN"), created_at=time.time()))
    before = fake.count()
    out = await run("+8613900139000")
    assert "not looked up: the number is in the allowlist" in out and fake.count() == before
    out = await run("10086")
    assert "not looked up" in out and fake.count() == before
    with pytest.raises(Exception, match="--source 'fsat': no such reputation source \\(did you mean 'fast'\\?\\)"):
        await run(NUMBER, "--source", "fsat")


async def test_cli_cache_purge_and_stats(make_settings, capsys):
    settings = make_settings()
    now = time.time()
    async with Store.open(settings.store.path) as store:
        await store.put_reputation([
            ReputationRow("+8613800138000", "a", 90.0, None, "listed", now, now + 3600),
            ReputationRow("+8613800138001", "a", None, None, "unlisted", now - 7200, now - 3600),
            ReputationRow("+8613800138000", "b", None, "scam", "listed", now, now + 3600),
        ])
    parser = cli.build_parser()

    async def run(*argv) -> str:
        args = parser.parse_args(["cache", *argv])
        assert await args.func(args, settings) == 0
        return capsys.readouterr().out

    out = await run("stats")
    assert [line.split() for line in out.splitlines()[1:]] == [["a", "1", "1", "1"], ["b", "1", "1", "0"]]
    assert "purged 1 expired reputation answers" in await run("purge", "--expired")
    assert "purged 1 reputation answers of b" in await run("purge", "--source", "b")
    assert "purged 1 reputation answers\n" in await run("purge")


# ----------------------------------------------------------------------------- config
def cfg_error(make_settings, sources=None, **rep) -> str:
    with pytest.raises(ConfigError) as e:
        make_settings({"reputation": {**rep, **({"sources": sources} if sources is not None else {})}})
    return str(e.value)


URL = "https://rep.example.org/v1/{e164}"


@pytest.mark.parametrize(
    "src,needle",
    [
        ({"url": URL, "json_pth": "a"}, "unknown key 'json_pth' in [reputation.sources.x] (did you mean 'json_path'?)"),
        ({"url": "https://rep.example.org/{number}", "json_path": "a", "weight": 1.0}, "unknown placeholder {number}"),
        ({"url": "ftp://rep.example.org/{e164}", "json_path": "a", "weight": 1.0}, "expected an http:// or https:// URL"),
        ({"url": "https://{e164}.example.org/", "json_path": "a", "weight": 1.0}, "with a fixed host"),
        ({"url": URL, "weight": 1.0}, "say how to read the answer"),
        ({"url": URL, "json_path": "data.score"}, "say what a listing weighs"),
        ({"url": URL, "listed_status": 200, "weight_per_point": 1.0}, "without json_path an answer is only listed or not"),
        ({"url": URL, "json_path": "a", "weight_per_point": 1.0, "score_weights": {"5": 1.0}}, "either weight_per_point or score_weights"),
        ({"url": URL, "json_path": "a..b", "weight": 1.0}, "expected a dotted path"),
        ({"url": URL, "json_path": "a", "score_weights": {"high": 1.0}}, "'high' is not a score"),
        ({"url": URL, "listed_status": 200, "unlisted_status": [200, 404], "weight": 1.0}, "status 200 is also in listed_status"),
        ({"url": URL, "json_path": "a", "weight": 1.0, "body": "{e164}"}, "a body is sent with method = \"POST\" only"),
        ({"url": URL + "?key={api_key}", "json_path": "a", "weight": 1.0}, "{api_key} is used but no api_key_file"),
        ({"url": URL, "json_path": "a", "weight": 1.0, "headers": {"X-A": "a\nb"}}, "control characters"),
        ({"url": URL, "json_path": "a", "weight": 1.0, "timeout": 2}, "[reputation.sources.x] timeout: expected a duration string"),
        ({"url": URL, "json_path": "a", "weight": 1.0, "method": "PUT"}, "'PUT' is not one of: GET, POST, HEAD"),
        ({"url": URL, "json_path": "a", "weight": 1.0, "timeout": "0s"}, "a request timeout is between 10ms and 60s"),
    ],
)
def test_source_config_is_strictly_validated(make_settings, src, needle):
    assert needle in cfg_error(make_settings, {"x": src})


def test_reputation_section_errors_name_key_and_suggest(make_settings):
    assert "unknown key 'max_inflight' in [reputation] (did you mean 'max_in_flight'?)" in cfg_error(make_settings, max_inflight=3)
    assert "unknown key 'source' in [reputation] (did you mean 'sources'?)" in cfg_error(make_settings, source={})
    assert "[reputation.sources.Phone]: names use lowercase" in cfg_error(make_settings, {"Phone": {"url": URL}})
    err = cfg_error(make_settings, {"x": {"url": URL, "json_path": "a", "weight": 1.0}}, margin="300ms")
    assert "[reputation] margin: the margin (300ms) must be shorter than [screen] budget (300ms)" in err


def test_sources_layer_key_by_key_and_take_defaults_from_the_section(tmp_path):
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(
        '[reputation]\nttl_negative = "1h"\nsource_max_in_flight = 3\n'
        f'[reputation.sources.pb]\nurl = "{URL}"\njson_path = "votes"\nscore_weights = {{ 1 = 2.0, 4 = 6.0 }}\n'
        'headers = { Accept = "application/json" }\n'
    )
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-pb.toml").write_text('[reputation.sources.pb]\nttl_positive = "2d"\nenabled = true\n')
    s = load_settings(cfg)
    (pb,) = s.reputation.sources
    assert (pb.url, pb.ttl_positive, pb.ttl_negative, pb.max_in_flight) == (URL, 172800.0, 3600.0, 3)
    assert pb.score_weights == ((1.0, 2.0), (4.0, 6.0)) and pb.headers == (("Accept", "application/json"),)
    assert pb.timeout == 2.0 and pb.breaker_failures == 5 and pb.breaker_cooldown == 60.0
    # config dump round-trips
    (tmp_path / "dumped.toml").write_text(dump(s))
    assert load_settings(tmp_path / "dumped.toml").reputation == s.reputation


# ----------------------------------------------------------------------------- pure parts
def src_of(**kw):
    data = {"url": URL, "json_path": "data.score", "weight": 5.0, **kw}
    return settings_from_dict({"reputation": {"sources": {"s": data}}}).reputation.sources[0]


@pytest.mark.parametrize(
    "status,body,expected",
    [
        (200, b'{"data": {"score": 72}}', ("listed", 72.0, None)),
        (200, b'{"data": {"score": "72.5"}}', ("listed", 72.5, None)),
        (200, b'{"data": {"score": "SCAM call\\u001b[2J"}}', ("listed", None, "scam call??2j")),
        (200, b'{"data": {"score": null}}', ("unlisted", None, None)),
        (200, b'{"data": {"score": false}}', ("unlisted", None, None)),
        (200, b'{"data": {"score": true}}', ("listed", None, None)),
        (404, b"", ("unlisted", None, None)),
        (200, b'{"data": {}}', ("error", None, None)),
        (200, b'{"data": {"score": [1]}}', ("error", None, None)),
        (200, b"[" * 100000, ("error", None, None)),
        (200, b"\xff\xfe", ("error", None, None)),
        (500, b'{"data": {"score": 72}}', ("error", None, None)),
        (429, b"", ("error", None, None)),
        (302, b"", ("error", None, None)),
    ],
)
def test_answers_are_read_defensively(status, body, expected):
    a = read_answer(src_of(unlisted_status=404), status, body)
    assert (a.status, a.score, a.category) == expected


def test_json_path_with_indices_and_status_mode():
    s = src_of(json_path="results[1].cat", category_weights={"scam": 15.0})
    a = read_answer(s, 200, json.dumps({"results": [{}, {"cat": "Scam"}]}).encode())
    assert (a.category, weight_of(s, a)[0]) == ("scam", 15.0)
    s = settings_from_dict({"reputation": {"sources": {"s": {"url": URL, "listed_status": 200, "unlisted_status": 404, "weight": 6.0}}}}).reputation.sources[0]
    assert read_answer(s, 200, b"whatever").status == "listed"
    assert read_answer(s, 404, b"").status == "unlisted"
    assert read_answer(s, 503, b"").reason == "HTTP 503"


@pytest.mark.parametrize(
    "kw,score,category,weight",
    [
        ({"weight_per_point": 0.1}, 72, None, 7.2),
        ({"weight_per_point": 0.1, "min_score": 80}, 72, None, 0.0),
        ({"score_weights": {"50": 3.0, "80": 8.0}}, 79, None, 3.0),
        ({"score_weights": {"50": 3.0, "80": 8.0}}, 80, None, 8.0),
        ({"score_weights": {"50": 3.0, "80": 8.0}}, 49, None, 0.0),
        ({}, 1, None, 5.0),
        ({"category_weights": {"scam": 15.0, "business": -3.0}}, None, "business", -3.0),
        ({"category_weights": {"scam": 15.0}}, None, "other", 5.0),
    ],
)
def test_scores_and_categories_map_to_weights(kw, score, category, weight):
    s = src_of(**kw)
    assert weight_of(s, Answer("s", "listed", score=score, category=category))[0] == weight
    assert weight_of(s, Answer("s", "unlisted"))[0] == 0.0


def test_request_templates_encode_the_number_and_hash():
    s = src_of(url="https://rep.example.org/q?n={e164}&d={digits}&h={sha256_digits}")
    r = build_request(s, "+8613800138000")
    digest = hashlib.sha256(b"8613800138000").hexdigest()
    assert r.url == f"https://rep.example.org/q?n=%2B8613800138000&d=8613800138000&h={digest}"
    s = replace(s, api_key="k/y+")
    assert redact("GET https://x/k%2Fy%2B and k/y+", s) == "GET https://x/*** and ***"
    assert parse_retry_after("30", 0) == 30 and parse_retry_after("99999", 0) == 3600
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == pytest.approx(10)
    assert parse_retry_after("soon", 0) is None


def test_breaker_and_lru_alone():
    clock = FakeClock(0)
    b = Breaker(2, 10, clock)
    assert b.allow() and not b.failure() and b.failure() and not b.allow()
    clock.advance(10)
    assert b.allow() and not b.allow()  # one probe at a time
    b.success()
    assert b.allow() and b.state == "closed"
    cache = MemoryCache(2)
    for i in range(3):
        cache.put(ReputationRow(str(i), "s", None, None, "unlisted", 0, 100))
    assert cache.get("s", "0", 1) is None and cache.get("s", "2", 1) is not None
    assert cache.get("s", "2", 100) is None and len(cache) == 1


def test_the_documented_example_sources_load(tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reputation.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    for name in ("phoneblock.key", "callfilter.key"):
        (tmp_path / name).write_text("k3y\n")
        os.chmod(tmp_path / name, 0o600)
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(example.replace("/etc/edgefilter/phoneblock.key", str(tmp_path / "phoneblock.key")))
    s = load_settings(cfg)
    assert [src.name for src in s.reputation.sources] == ["phoneblock", "callfilter", "inhouse", "categories"]
    by = {src.name: src for src in s.reputation.sources}
    assert by["callfilter"].api_key == "k3y" and build_request(by["callfilter"], NUMBER).url.endswith("/k3y/1/8613800138000")
    assert weight_of(by["phoneblock"], Answer("phoneblock", "listed", score=5))[0] == 6.0
    assert weight_of(by["callfilter"], Answer("callfilter", "listed", score=0))[0] == 0.0
    assert weight_of(by["categories"], Answer("categories", "listed", category="business"))[0] == -2.0


async def test_a_version_1_database_gains_the_reputation_table(tmp_path):
    import aiosqlite

    from edgefilter.store.sqlite import MIGRATIONS, SCHEMA_VERSION

    path = str(tmp_path / "old.db")
    async with aiosqlite.connect(path) as db:
        await db.executescript(MIGRATIONS[1] + "\nPRAGMA user_version = 1;")
        await db.execute("INSERT INTO calls (ts, action) VALUES (1.0, 'allow')")
        await db.commit()
    async with Store.open(path) as store:
        (version,) = await (await store.db.execute("PRAGMA user_version")).fetchone()
        assert version == SCHEMA_VERSION >= 4
        await store.put_reputation([ReputationRow(NUMBER, "s", 1.0, None, "listed", 1.0, 2.0)])
        assert (await store.reputation_rows(number=NUMBER))[0].score == 1.0
        assert len(await store.recent_calls(0)) == 1


def _stable(variables: dict) -> dict:
    """The verdict variables without the per-call random challenge digit and id."""
    return {k: v for k, v in variables.items() if not k.startswith("EDGEFILTER_CHALLENGE_")}

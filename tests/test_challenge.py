"""The press-a-digit challenge end to end through the Asterisk double: screen -> challenge-result.

The dial plan's part is played by the test: it takes EDGEFILTER_CHALLENGE_ID / _DIGIT from the
screen call's MSet and reports on ``challenge-result`` exactly as extensions-edgefilter.conf does
(``AGI(agi://.../challenge-result,id=${EDGEFILTER_CHALLENGE_ID},digit=${ef_digit})``, or
``hangup=1`` from the hangup handler on a dead channel).
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.asterisk.challenge import ID_ALPHABET, ID_LENGTH, ChallengeBook, ChallengeFailures, ChallengeRecorder
from edgefilter.core.config import settings_from_dict
from edgefilter.core.model import Action, Call
from edgefilter.lists.index import Entry, ListIndex, parse_pattern
from edgefilter.rules.screen import Screener
from edgefilter.service import Service

FRIEND = "+8613900139000"  # valid; challenged because presentation is restricted (callingpres 32)


async def call(svc: Service, callerid=FRIEND, **kw):
    kw.setdefault("callingpres", 32)
    r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=callerid, **kw), timeout=3.0)
    assert r.closed_by_server and not r.timed_out and r.pipelined == 0, r
    return r


async def report(svc: Service, first, *, digit: str | None = None, hangup=False, **kw):
    """What the dial plan does after Read(): one FastAGI call on challenge-result, same channel."""
    args = [f"id={first.variables['EDGEFILTER_CHALLENGE_ID']}"]
    args.append("hangup=1" if hangup else f"digit={digit or ''}")
    kw.setdefault("uniqueid", first.uniqueid)
    kw.setdefault("callerid", FRIEND)
    kw.setdefault("callingpres", 32)
    r = await place_call("127.0.0.1", svc.port, CallSpec(script="challenge-result", args=args, **kw), timeout=3.0)
    assert r.closed_by_server and not r.timed_out and r.pipelined == 0, r
    return r


async def written(svc: Service, n: int) -> None:
    for _ in range(100):
        if svc.challenge_recorder.written >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {svc.challenge_recorder.written} challenge writes, expected {n}")


async def test_challenge_verdict_carries_digit_id_and_timeout_in_the_same_mset(service):
    r = await call(service)
    assert len(r.commands) == 1 and r.commands[0].startswith(b'EXEC MSet "EDGEFILTER_ACTION=challenge,')
    v = r.variables
    assert v["EDGEFILTER_ACTION"] == "challenge" and "CLI_WITHHELD" in v["EDGEFILTER_RULES"]
    assert re.fullmatch("[1-9]", v["EDGEFILTER_CHALLENGE_DIGIT"])
    assert len(v["EDGEFILTER_CHALLENGE_ID"]) == ID_LENGTH and set(v["EDGEFILTER_CHALLENGE_ID"]) <= set(ID_ALPHABET)
    assert v["EDGEFILTER_CHALLENGE_TIMEOUT"] == "5"
    other = await call(service)
    assert other.variables["EDGEFILTER_CHALLENGE_ID"] != v["EDGEFILTER_CHALLENGE_ID"]


async def test_allowed_and_rejected_calls_get_no_challenge(service):
    r = await call(service, callingpres=0)
    assert r.variables["EDGEFILTER_ACTION"] == "allow"
    assert not any(k.startswith("EDGEFILTER_CHALLENGE") for k in r.variables)
    assert service.challenges.pending == {}


async def test_pass_allowlists_the_number_so_the_next_call_rings(service):
    first = await call(service)
    r = await report(service, first, digit=first.variables["EDGEFILTER_CHALLENGE_DIGIT"])
    assert r.variables == {"EDGEFILTER_CHALLENGE_RESULT": "pass"}
    assert len(r.commands) == 1
    again = await call(service)  # at once: the in-memory index already has the entry
    assert again.variables["EDGEFILTER_ACTION"] == "allow"
    assert "LIST_ALLOWED" in again.variables["EDGEFILTER_RULES"].split()
    await written(service, 2)  # the outcome row and the allow entry
    (entry,) = await service.store.entries("allow")
    assert entry.pattern.text == FRIEND and entry.source == "challenge"
    assert entry.expires_at == pytest.approx(time.time() + 30 * 86400, abs=60)
    assert service.challenges.pending == {}


async def test_allow_for_is_configurable_and_other_nodes_see_the_entry(make_settings):
    settings = make_settings(challenge={"allow_for": "2h"})
    a, b = Service(settings, port=0), Service(settings, port=0)
    await a.start()
    await b.start()
    try:
        first = await call(a)
        assert (await report(a, first, digit=first.variables["EDGEFILTER_CHALLENGE_DIGIT"])).variables[
            "EDGEFILTER_CHALLENGE_RESULT"
        ] == "pass"
        await written(a, 2)
        (entry,) = await a.store.entries("allow")
        assert entry.expires_at == pytest.approx(time.time() + 7200, abs=60)
        for _ in range(100):  # node b follows the change feed (poll_interval 50 ms in tests)
            r = await call(b)
            if r.variables["EDGEFILTER_ACTION"] == "allow":
                break
            await asyncio.sleep(0.02)
        assert "LIST_ALLOWED" in r.variables["EDGEFILTER_RULES"].split()
    finally:
        await a.stop()
        await b.stop()


async def test_wrong_digit_retries_with_a_fresh_digit_then_fails_and_counts(service):
    first = await call(service)
    r1 = await report(service, first, digit="0")
    assert r1.variables["EDGEFILTER_CHALLENGE_RESULT"] == "retry"
    assert re.fullmatch("[1-9]", r1.variables["EDGEFILTER_CHALLENGE_DIGIT"])
    r2 = await report(service, first, digit="0")
    assert r2.variables == {"EDGEFILTER_CHALLENGE_RESULT": "fail"}
    nxt = await call(service)
    rules = nxt.variables["EDGEFILTER_RULES"].split()
    assert "CHALLENGE_FAILED" in rules and "LIST_ALLOWED" not in rules
    assert nxt.variables["EDGEFILTER_SCORE"] == "10"  # CLI_WITHHELD 6 + one failure 4
    assert nxt.variables["EDGEFILTER_ACTION"] == "voicemail"
    assert await service.store.entries("allow") == []


async def test_the_retry_digit_is_the_one_that_passes(service):
    first = await call(service)
    old = first.variables["EDGEFILTER_CHALLENGE_DIGIT"]
    r1 = await report(service, first, digit="")  # silence
    assert r1.variables["EDGEFILTER_CHALLENGE_RESULT"] == "retry"
    new = r1.variables["EDGEFILTER_CHALLENGE_DIGIT"]
    r2 = await report(service, first, digit=new)
    assert r2.variables["EDGEFILTER_CHALLENGE_RESULT"] == "pass", (old, new)


async def test_silence_twice_fails(service):
    first = await call(service)
    assert (await report(service, first, digit="")).variables["EDGEFILTER_CHALLENGE_RESULT"] == "retry"
    assert (await report(service, first, digit="")).variables["EDGEFILTER_CHALLENGE_RESULT"] == "fail"
    assert service.challenge_failures.count(FRIEND[1:], time.time()) == 1


async def test_retries_zero_fails_on_the_first_wrong_digit_and_failures_add_up(make_settings):
    svc = Service(make_settings(challenge={"retries": 0}), port=0)
    await svc.start()
    try:
        for _ in (1, 2):
            first = await call(svc)
            if first.variables["EDGEFILTER_ACTION"] != "challenge":
                break
            assert (await report(svc, first, digit="#")).variables["EDGEFILTER_CHALLENGE_RESULT"] == "fail"
        r = await call(svc)
        hit = [x for x in r.variables["EDGEFILTER_RULES"].split() if x == "CHALLENGE_FAILED"]
        assert hit and svc.challenge_failures.count(FRIEND[1:], time.time()) == 1
        assert r.variables["EDGEFILTER_ACTION"] == "voicemail"  # 6 + 4 after the first failure
    finally:
        await svc.stop()


async def test_caller_hanging_up_during_the_challenge_counts_as_a_failure(service):
    first = await call(service)
    # The hangup handler runs on a dead channel: GET/SET/EXEC still answered (fixture facts).
    r = await report(service, first, hangup=True, hangup_before_commands=True)
    assert r.channel_dead and r.commands  # the answer was still sent and the session closed cleanly
    assert r.variables["EDGEFILTER_CHALLENGE_RESULT"] == "fail"
    assert "CHALLENGE_FAILED" in (await call(service)).variables["EDGEFILTER_RULES"].split()
    # a late report for the same challenge (e.g. the handler after a result) changes nothing
    late = await report(service, first, digit=first.variables["EDGEFILTER_CHALLENGE_DIGIT"])
    assert late.variables["EDGEFILTER_CHALLENGE_RESULT"] == "pass"  # unknown id: fail open
    assert service.challenge_recorder.allowed == 0


async def test_hangup_not_counted_when_configured(make_settings):
    svc = Service(make_settings(challenge={"hangup_is_failure": False}), port=0)
    await svc.start()
    try:
        first = await call(svc)
        await report(svc, first, hangup=True, hangup_before_commands=True)
        assert "CHALLENGE_FAILED" not in (await call(svc)).variables["EDGEFILTER_RULES"].split()
        # answered on a channel still alive: the dial plan is told "fail" (it hangs up), nothing counted
        second = await call(svc)
        r = await report(svc, second, hangup=True)
        assert r.variables == {"EDGEFILTER_CHALLENGE_RESULT": "fail"}
        assert svc.challenge_recorder.failed == 0 and svc.challenge_failures.count(FRIEND[1:], time.time()) == 0
    finally:
        await svc.stop()


async def test_each_challenge_result_says_why_in_its_log_line(service, caplog):
    """The challenge-result log line is the admin's evidence: result, attempts and the reason."""
    import logging

    caplog.set_level(logging.INFO, logger="edgefilter.routes")
    for digit, why in (("", "silence"), ("0", "wrong digit"), ("x", "not a digit")):
        first = await call(service)
        r = await report(service, first, digit=digit)
        assert r.variables["EDGEFILTER_CHALLENGE_RESULT"] == "retry"
        line = [r for r in caplog.records if r.name == "edgefilter.routes"][-1].getMessage()
        assert line.startswith("challenge result=retry ") and f'attempts=1 reason="{why}"' in line, line
    first = await call(service)
    await report(service, first, hangup=True)
    line = [r for r in caplog.records if r.name == "edgefilter.routes"][-1].getMessage()
    assert 'result=fail caller="+8613900139000" attempts=0 reason="hung up during the challenge"' in line, line


async def test_caller_hanging_up_while_the_result_is_answered_still_passes(service):
    first = await call(service)
    r = await report(service, first, digit=first.variables["EDGEFILTER_CHALLENGE_DIGIT"], hangup_during_command=1)
    assert r.closed_by_server
    assert "LIST_ALLOWED" in (await call(service)).variables["EDGEFILTER_RULES"].split()


async def test_unknown_or_stale_id_fails_open_and_records_nothing(service):
    r = await place_call(
        "127.0.0.1", service.port, CallSpec(script="challenge-result", args=["id=" + "a" * ID_LENGTH, "digit=1"]), timeout=3.0
    )
    assert r.variables == {"EDGEFILTER_CHALLENGE_RESULT": "pass"}
    r = await place_call("127.0.0.1", service.port, CallSpec(script="challenge-result", args=["digit=1"]), timeout=3.0)
    assert r.variables == {"EDGEFILTER_CHALLENGE_RESULT": "pass"}
    assert service.challenge_recorder.allowed == 0 and service.challenge_recorder.failed == 0


async def test_a_report_from_another_channel_fails(service):
    first = await call(service)
    r = await report(service, first, digit=first.variables["EDGEFILTER_CHALLENGE_DIGIT"], uniqueid="1.999")
    assert r.variables["EDGEFILTER_CHALLENGE_RESULT"] == "fail"
    assert await service.store.entries("allow") == []


async def test_a_forged_env_block_on_the_result_route_fails(service):
    first = await call(service)
    digit = first.variables["EDGEFILTER_CHALLENGE_DIGIT"]
    r = await report(service, first, digit=digit, callerid=b"138\n\n200 result=1 (allow)")
    assert r.variables["EDGEFILTER_CHALLENGE_RESULT"] == "fail"


async def test_withheld_caller_passes_without_an_allow_entry(service):
    first = await call(service, "anonymous", callingpres=0)
    assert first.variables["EDGEFILTER_ACTION"] == "challenge"
    r = await report(service, first, digit=first.variables["EDGEFILTER_CHALLENGE_DIGIT"])
    assert r.variables["EDGEFILTER_CHALLENGE_RESULT"] == "pass"
    assert service.challenge_recorder.allowed == 0  # nothing to remember a withheld caller by


async def test_a_pass_never_allowlists_a_blocked_number(service):
    await service.store.put_entry(Entry("block", parse_pattern(FRIEND, "CN"), category="marketing", created_at=time.time()))
    await service.follower.poll()
    first = await call(service, callingpres=0)  # marketing weighs 8: challenge
    assert first.variables["EDGEFILTER_ACTION"] == "challenge", first.variables
    r = await report(service, first, digit=first.variables["EDGEFILTER_CHALLENGE_DIGIT"])
    assert r.variables["EDGEFILTER_CHALLENGE_RESULT"] == "pass"  # this call connects
    assert await service.store.entries("allow") == []
    assert (await call(service, callingpres=0)).variables["EDGEFILTER_ACTION"] == "challenge"


async def test_failures_survive_a_restart(make_settings):
    settings = make_settings()
    svc = Service(settings, port=0)
    await svc.start()
    try:
        first = await call(svc)
        await report(svc, first, digit="0")
        await report(svc, first, digit="0")
        await written(svc, 1)
    finally:
        await svc.stop()
    svc = Service(settings, port=0)
    await svc.start()
    try:
        assert "CHALLENGE_FAILED" in (await call(svc)).variables["EDGEFILTER_RULES"].split()
    finally:
        await svc.stop()


async def test_log_only_mode_issues_no_challenge(make_settings):
    svc = Service(make_settings(screen={"mode": "log-only"}), port=0)
    await svc.start()
    try:
        r = await call(svc)
        assert r.variables["EDGEFILTER_ACTION"] == "allow" and r.variables["EDGEFILTER_WOULD"] == "challenge"
        assert "EDGEFILTER_CHALLENGE_ID" not in r.variables
    finally:
        await svc.stop()


# ------------------------------------------------------------------ the book and the counter
class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _decision(screener: Screener, callerid=FRIEND, uniqueid="1.1"):
    return screener.decide(Call(callerid=callerid, callingpres=32, uniqueid=uniqueid))


def test_book_is_bounded_and_swept_after_its_ttl():
    settings = settings_from_dict({"challenge": {"max_pending": 3, "retries": 1, "timeout": "5s"}})
    clock = Clock()
    book = ChallengeBook(lambda: settings, clock=clock)
    screener = Screener(settings)
    ids = [book.issue(_decision(screener))["EDGEFILTER_CHALLENGE_ID"] for _ in range(5)]
    assert list(book.pending) == ids[2:] and book.dropped == 2
    assert book.ttl() == 2 * 25 + 60
    clock.t += 109
    assert book.sweep() == 0
    clock.t += 2
    assert book.sweep() == 3 and book.pending == {}


def test_an_answer_after_the_ttl_is_unknown():
    settings = settings_from_dict({})
    clock = Clock()
    book = ChallengeBook(lambda: settings, clock=clock)
    v = book.issue(_decision(Screener(settings)))
    clock.t += book.ttl() + 1
    out = book.answer(Call(callerid=FRIEND, uniqueid="1.1", params={"id": v["EDGEFILTER_CHALLENGE_ID"], "digit": v["EDGEFILTER_CHALLENGE_DIGIT"]}))
    assert out.result == "unknown" and out.variables() == {"EDGEFILTER_CHALLENGE_RESULT": "pass"}


def test_digits_are_uniform_over_one_to_nine():
    settings = settings_from_dict({})
    book = ChallengeBook(lambda: settings)
    screener = Screener(settings)
    seen = {book.issue(_decision(screener))["EDGEFILTER_CHALLENGE_DIGIT"] for _ in range(400)}
    assert seen == set("123456789")


def test_failures_count_only_inside_the_window_and_respect_the_rule_weight():
    settings = settings_from_dict({"challenge": {"fail_window": "1h"}, "rules": {"CHALLENGE_FAILED": {"weight": 3.0}}})
    failures = ChallengeFailures(lambda: settings)
    screener = Screener(settings)
    screener.sources.append(failures)
    now = time.time()
    failures.record(FRIEND[1:], now - 7200)
    failures.record(FRIEND[1:], now - 60)
    failures.record(FRIEND[1:], now - 30)
    d = screener.decide(Call(callerid=FRIEND), now=now)
    (hit,) = [h for h in d.verdict.hits if h.rule == "CHALLENGE_FAILED"]
    assert hit.weight == 6.0 and hit.group == "challenge"
    assert d.verdict.action is Action.CHALLENGE  # 6 reaches challenge on its own
    off = settings_from_dict({"rules": {"CHALLENGE_FAILED": {"weight": 3.0, "enabled": False}}})
    assert list(ChallengeFailures(lambda: off).hits(Call(callerid=FRIEND), d.number, now)) == []


def test_group_cap_limits_many_failures():
    settings = settings_from_dict({})
    failures = ChallengeFailures(lambda: settings)
    screener = Screener(settings)
    screener.sources.append(failures)
    now = time.time()
    for i in range(10):
        failures.record(FRIEND[1:], now - i)
    d = screener.decide(Call(callerid=FRIEND), now=now)
    assert d.verdict.score == 12.0  # 10 x 4 capped at [groups.challenge] max = 12


def test_recorder_keeps_the_admins_own_allow_entry():
    settings = settings_from_dict({})
    index = ListIndex()
    admin = Entry("allow", parse_pattern(FRIEND, "CN"), source="cli", created_at=1.0)
    index.put(admin)
    book = ChallengeBook(lambda: settings)
    rec = ChallengeRecorder(lambda: settings, lambda: index, ChallengeFailures(lambda: settings))
    v = book.issue(_decision(Screener(settings)))
    out = book.answer(Call(callerid=FRIEND, uniqueid="1.1", params={"id": v["EDGEFILTER_CHALLENGE_ID"], "digit": v["EDGEFILTER_CHALLENGE_DIGIT"]}))
    assert out.result == "pass" and rec.apply(out) is None
    assert list(index) == [admin]


async def test_concurrent_writers_share_the_store_connection_safely(service, caplog):
    """Call log and challenge outcomes are written by two tasks on one aiosqlite connection."""

    async def one(i: int) -> None:
        number = f"+86139{i:08d}"
        first = await call(service, number)
        await report(service, first, digit=first.variables["EDGEFILTER_CHALLENGE_DIGIT"], callerid=number)

    await asyncio.gather(*(one(i) for i in range(40)))
    for _ in range(300):
        if service.challenge_recorder.written >= 80 and service.calllog.written >= 40:
            break
        await asyncio.sleep(0.01)
    assert service.challenge_recorder.written == 80 and service.calllog.written == 40
    assert "write failed" not in caplog.text, caplog.text[-500:]
    assert len(await service.store.entries("allow")) == 40


async def test_store_transactions_from_concurrent_tasks_do_not_interleave(tmp_path):
    from edgefilter.asterisk.challenge import OutcomeRecord
    from edgefilter.store.sqlite import CallRecord, Store

    rec = CallRecord(1.0, "1.1", "+8613900139000", "+8613900139000", "valid", "", "1000", "1000", "from-trunk",
                     "allow", None, 0.0, "", "default", 0.1)
    async with Store.open(str(tmp_path / "e.db")) as store:
        jobs = []
        for i in range(20):
            jobs.append(store.record_calls([rec] * 50))
            jobs.append(store.put_entry(Entry("allow", parse_pattern(f"+86139{i:08d}", "CN"), source="challenge", created_at=1.0)))
            jobs.append(store.record_challenges([OutcomeRecord(1.0, "1.1", f"+86139{i:08d}", "fail")]))
        await asyncio.gather(*jobs)
        assert len(await store.recent_calls(0)) == 1000
        assert len(await store.entries("allow")) == 20
        assert len(await store.challenge_failures_since(0)) == 20


async def test_caller_gone_before_the_prompt_leaves_a_pending_challenge_that_expires_uncounted(service):
    # The caller hangs up while the screen MSet runs: the dial plan never reaches the challenge,
    # so no hangup handler reports it; the sweep forgets it after its TTL and counts nothing.
    r = await call(service, hangup_during_command=1)
    assert r.closed_by_server and r.channel_dead
    assert len(service.challenges.pending) == 1
    assert service.challenges.sweep(time.time() + service.challenges.ttl() + 1) == 1
    assert service.challenges.pending == {} and service.challenge_recorder.failed == 0
    assert "CHALLENGE_FAILED" not in (await call(service)).variables["EDGEFILTER_RULES"]


def test_a_challenge_issued_by_one_worker_is_checked_by_another():
    """SO_REUSEPORT sends challenge-result to any worker: the sealed id lets it check the digit."""
    settings = settings_from_dict({})
    key = b"k" * 32
    issuer, other = ChallengeBook(lambda: settings, secret=key), ChallengeBook(lambda: settings, secret=key)
    stranger = ChallengeBook(lambda: settings, secret=b"x" * 32)
    screener = Screener(settings)

    def report(book, v, digit, uniqueid="1.1"):
        return book.answer(Call(callerid=FRIEND, uniqueid=uniqueid, params={"id": v["EDGEFILTER_CHALLENGE_ID"], "digit": digit}))

    v = issuer.issue(_decision(screener))
    wrong = next(d for d in "123456789" if d != v["EDGEFILTER_CHALLENGE_DIGIT"])
    assert report(stranger, v, v["EDGEFILTER_CHALLENGE_DIGIT"]).result == "unknown"  # another key
    assert report(other, v, v["EDGEFILTER_CHALLENGE_DIGIT"], uniqueid="9.9").result == "unknown"  # another channel
    tampered = dict(v, EDGEFILTER_CHALLENGE_ID=v["EDGEFILTER_CHALLENGE_ID"][:9] + "b" + v["EDGEFILTER_CHALLENGE_ID"][10:])
    assert report(other, tampered, v["EDGEFILTER_CHALLENGE_DIGIT"]).result == "unknown"  # blocked flag flipped
    retry = report(other, v, wrong)
    assert retry.result == "retry" and retry.pending.attempts == 1
    nv = retry.variables()
    assert nv["EDGEFILTER_CHALLENGE_ID"] != v["EDGEFILTER_CHALLENGE_ID"] and len(nv["EDGEFILTER_CHALLENGE_ID"]) == ID_LENGTH
    # the retry lands on the first worker: it checks the new digit from the new id
    ok = report(issuer, nv, nv["EDGEFILTER_CHALLENGE_DIGIT"])
    assert ok.result == "pass" and ok.pending.number.e164 == FRIEND
    # a second wrong answer after the retry fails (attempts carried in the id), wherever it lands
    v2 = issuer.issue(_decision(screener))
    r1 = report(other, v2, "")
    r2 = report(issuer, r1.variables(), "")
    assert (r1.result, r2.result) == ("retry", "fail")
    # a late report of a finished challenge is not answered again
    assert report(issuer, r1.variables(), r1.digit).result == "unknown"


async def test_the_worker_pool_gives_every_worker_the_same_challenge_key(monkeypatch):
    from edgefilter import workers
    from edgefilter.asterisk.challenge import SECRET_ENV

    seen = []

    async def fake_exec(*argv, **kw):
        seen.append(kw["env"][SECRET_ENV])
        raise RuntimeError("not started in this test")

    monkeypatch.setattr(workers.asyncio, "create_subprocess_exec", fake_exec)
    pool = workers.WorkerPool(None, 2, ("127.0.0.1", 4573))
    for i in range(2):
        with pytest.raises(RuntimeError):
            await pool._spawn(i)
    assert len(seen) == 2 and seen[0] == seen[1] and len(bytes.fromhex(seen[0])) == 32
    monkeypatch.setenv(SECRET_ENV, seen[0])
    from edgefilter.asterisk.challenge import challenge_secret

    assert challenge_secret() == bytes.fromhex(seen[0])


async def test_a_sealed_id_checked_by_another_worker_expires_with_its_age(make_settings, monkeypatch, tmp_path):
    """Through two services sharing the pool's sealing key (as SO_REUSEPORT workers do): a
    challenge issued on one and reported on the other is checked from its sealed id while it is
    young, and refused once older than the challenge TTL, although its seal and digit are right.
    Without the age check a captured id would work for ever (and a right digit allowlist)."""
    from edgefilter.asterisk.challenge import SECRET_ENV

    monkeypatch.setenv(SECRET_ENV, "5a" * 32)
    issuer = Service(make_settings(), port=0)
    other = Service(make_settings(store={"spool_path": str(tmp_path / "other-spool.db")}), port=0)
    await issuer.start()
    await other.start()
    try:
        ttl = other.challenges.ttl()
        assert 60 < ttl < 3600

        def aged(seconds: float) -> None:
            other.challenges.clock = lambda: time.time() + seconds

        async def first_call():
            r = await call(issuer)
            assert r.variables["EDGEFILTER_ACTION"] == "challenge"
            v = r.variables
            wrong = next(d for d in "123456789" if d != v["EDGEFILTER_CHALLENGE_DIGIT"])
            return r, v["EDGEFILTER_CHALLENGE_DIGIT"], wrong

        # young (a minute old, well inside the TTL): the other worker checks it, a wrong digit retries
        aged(60)
        r, _, wrong = await first_call()
        young = await report(other, r, digit=wrong)
        assert young.variables["EDGEFILTER_CHALLENGE_RESULT"] == "retry" and "EDGEFILTER_CHALLENGE_DIGIT" in young.variables
        # older than TTL + a minute: unknown on the other worker (told "pass", nothing recorded) ...
        aged(ttl + 120)
        r, digit, wrong = await first_call()
        old = await report(other, r, digit=wrong)
        assert old.variables == {"EDGEFILTER_CHALLENGE_RESULT": "pass"}  # no retry, no new digit
        # ... and the right digit buys nothing either: no allowlisting, no failure counted
        r, digit, wrong = await first_call()
        old_right = await report(other, r, digit=digit)
        assert old_right.variables == {"EDGEFILTER_CHALLENGE_RESULT": "pass"}
        assert other.challenge_recorder.allowed == 0 and other.challenge_recorder.failed == 0
        assert other.screener.index.lookup(FRIEND[1:]) is None
        # only the young one waits (under its first and its retry id): the old ones were not taken in
        assert len({id(p) for p in other.challenges.pending.values()}) == 1
    finally:
        await other.stop()
        await issuer.stop()

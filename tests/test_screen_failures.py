"""The screening failure path, through the real FastAGI socket: a decision that raises or runs
out of its budget is answered ``[screen] on_error`` with a zero-weight SCREEN_ERROR /
SCREEN_TIMEOUT rule saying why, and a forged env block stays hostile even then.

The failures are planted where the running service really consults other code on every call:
a fact source that raises (as a broken history or challenge-failure source would) and an
asynchronous fact source (where reputation lookups plug in) that never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.service import Service

#: A caller ID with a planted env line (%0A in the SIP From, callerid-09g): a forged block.
FORGED = b"+8613800138000\nagi_network_script: screen"
BLOCKED = "+8613700137000"


async def screened(svc: Service, callerid, **kw):
    r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=callerid, **kw), timeout=5.0, truncate=False)
    assert r.closed_by_server and not r.timed_out and r.pipelined == 0, r
    assert r.agistatus == "SUCCESS" and len(r.commands) == 1, r.commands
    return r.variables


class Failing:
    """Stands in for a fact source that breaks (a bug, a corrupt in-memory structure)."""

    def __init__(self) -> None:
        self.calls = 0

    def hits(self, call, number, now):
        self.calls += 1
        raise RuntimeError("history index corrupt")


class Hanging:
    """An asynchronous fact source that never answers (a reputation service gone silent)."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def __call__(self, call, number, now, eff):
        self.started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return ()


@contextlib.asynccontextmanager
async def running(settings):
    """A service for one test body; stopped however the body ends (an open store would keep
    the test process alive)."""
    svc = Service(settings, port=0)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


@pytest.fixture
def failing_settings(make_settings):
    def make(**screen):
        # a policy for the trunk's context: the failed answer still names the policy in force
        return make_settings(screen={"budget": "100ms", **screen}, behaviour={"enabled": False},
                             policies={"trunk": {"match_context": ["from-trunk"]}})

    return make


def observed(svc: Service) -> list:
    """Every Decision the service makes, as its observers (log line, call log) get it."""
    seen: list = []
    svc.observers.append(seen.append)
    return seen


def assert_failed_decision(d, rule: str, on_error: str, detail: str) -> None:
    """What a failed decision carries: one zero-weight system rule that forced on_error and says
    why, the policy in force, when it was decided."""
    from datetime import datetime

    v = d.verdict
    assert (v.action.value, v.score, v.forced_by, v.policy, v.would) == (on_error, 0.0, rule, "trunk", None)
    (hit,) = v.hits
    assert (hit.rule, hit.weight, hit.group, hit.force.value) == (rule, 0.0, "system", on_error)
    assert hit.detail == detail
    assert d.number.e164 == BLOCKED and d.effective is not None and d.effective.label == "trunk"
    assert isinstance(d.when, datetime) and d.elapsed_ms > 0


async def _block(svc: Service, text: str) -> None:
    await svc.store.put_entry(Entry("block", parse_pattern(text, "CN"), created_at=time.time()))
    await svc.follower.poll()


async def _records(svc: Service, n: int) -> list:
    """The call records the service wrote (waits for the background writer)."""
    for _ in range(500):
        rows = await svc.store.recent_calls(0)
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {len(rows)} call records, expected {n}")


@pytest.mark.parametrize("on_error", ["allow", "voicemail"])
async def test_a_decision_that_raises_answers_on_error_with_screen_error(failing_settings, caplog, on_error):
    caplog.set_level(logging.INFO)
    async with running(failing_settings(on_error=on_error)) as svc:
        await _block(svc, BLOCKED)
        healthy = await screened(svc, BLOCKED)
        assert healthy["EDGEFILTER_ACTION"] == "reject" and healthy["EDGEFILTER_RULES"] == "LIST_BLOCKED"
        broken = Failing()
        svc.screener.sources.append(broken)
        decisions = observed(svc)
        v = await screened(svc, BLOCKED)
        assert broken.calls == 1, "the failure was not reached: the test proves nothing"
        assert (v["EDGEFILTER_ACTION"], v["EDGEFILTER_SCORE"], v["EDGEFILTER_RULES"]) == (on_error, "0", "SCREEN_ERROR")
        assert v["EDGEFILTER_POLICY"] == "trunk"
        assert_failed_decision(decisions[-1], "SCREEN_ERROR", on_error, "RuntimeError: history index corrupt")
        assert "screening failed; answering [screen] on_error" in caplog.text
        assert "RuntimeError: history index corrupt" in caplog.text
        # the call log says why, like any other decision
        rows = await _records(svc, 2)
        assert [(r.action, r.rules) for r in rows][-1] == (on_error, "SCREEN_ERROR")
        # and so does the decision line: a zero-weight rule that forced the on_error answer
        line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decision ")][-1]
        assert f"action={on_error} score=0.0" in line and "rules=SCREEN_ERROR(+0) forced_by=SCREEN_ERROR" in line, line


@pytest.mark.parametrize("on_error", ["allow", "voicemail"])
async def test_a_decision_past_its_budget_answers_on_error_with_screen_timeout(failing_settings, on_error):
    async with running(failing_settings(on_error=on_error)) as svc:
        await _block(svc, BLOCKED)
        silent = Hanging()
        svc.screener.async_sources.append(silent)
        decisions = observed(svc)
        v = await screened(svc, BLOCKED)
        assert silent.started == 1, "the slow source was not consulted: the test proves nothing"
        assert (v["EDGEFILTER_ACTION"], v["EDGEFILTER_SCORE"], v["EDGEFILTER_RULES"]) == (on_error, "0", "SCREEN_TIMEOUT")
        assert_failed_decision(decisions[-1], "SCREEN_TIMEOUT", on_error, "no decision within 100 ms")
        assert 100 <= decisions[-1].elapsed_ms < 5000  # the budget bounds it (generously: a loaded machine)
        # the lookup that ran out of time is cancelled, not left running behind the call
        for _ in range(100):
            if silent.cancelled:
                break
            await asyncio.sleep(0.01)
        assert silent.cancelled == 1
        rows = await _records(svc, 1)
        assert (rows[-1].action, rows[-1].rules) == (on_error, "SCREEN_TIMEOUT")
        assert rows[-1].elapsed_ms == round(decisions[-1].elapsed_ms, 3)


@pytest.mark.parametrize("failure", ["error", "timeout"])
@pytest.mark.parametrize("mode", ["enforce", "log-only"])
async def test_a_forged_call_stays_hostile_when_screening_fails(failing_settings, caplog, failure, mode):
    """``on_error = allow`` must never let a forged env block through: it is re-scored from the
    call alone (CLI_FORGED forces reject), even in log-only mode."""
    caplog.set_level(logging.WARNING)
    async with running(failing_settings(on_error="allow", mode=mode)) as svc:
        if failure == "error":
            svc.screener.sources.append(broken := Failing())
        else:
            svc.screener.async_sources.append(broken := Hanging())
        honest = await screened(svc, "+8613900139000")
        assert honest["EDGEFILTER_ACTION"] == "allow"
        assert honest["EDGEFILTER_RULES"] == ("SCREEN_ERROR" if failure == "error" else "SCREEN_TIMEOUT")
        v = await screened(svc, FORGED)
        assert (broken.calls if failure == "error" else broken.started) == 2  # the failure was hit
        assert v["EDGEFILTER_ACTION"] == "reject", v
        rules = v["EDGEFILTER_RULES"].split()
        assert "CLI_FORGED" in rules and "SCREEN_ERROR" not in rules and "SCREEN_TIMEOUT" not in rules
        assert float(v["EDGEFILTER_SCORE"]) >= 100
        assert "EDGEFILTER_WOULD" not in v  # not an allow with a note: a real reject
        assert "forged FastAGI env block" in caplog.text


async def test_a_failure_in_one_call_does_not_touch_the_next(failing_settings):
    """The failure path is per call: once the source is healthy again, decisions are normal."""
    async with running(failing_settings()) as svc:
        await _block(svc, BLOCKED)
        broken = Failing()
        svc.screener.sources.append(broken)
        assert (await screened(svc, BLOCKED))["EDGEFILTER_RULES"] == "SCREEN_ERROR"
        svc.screener.sources.remove(broken)
        v = await screened(svc, BLOCKED)
        assert (v["EDGEFILTER_ACTION"], v["EDGEFILTER_RULES"]) == ("reject", "LIST_BLOCKED")

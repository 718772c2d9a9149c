"""`edgefilter replay`: calls recorded by the real service, re-decided under another config."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import datetime

from edgefilter import cli
from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.core.config import RuleSettings, settings_from_dict
from edgefilter.lists.index import Entry, ListIndex, parse_pattern
from edgefilter.replay import format_report, replay_calls
from edgefilter.store.sqlite import CallRecord


async def test_replay_recorded_calls_under_a_new_config(service, tmp_path, capsys):
    svc = service
    now = time.time()
    await svc.store.put_entry(Entry("block", parse_pattern("+8613800138000", "CN"), category="marketing", created_at=now))
    await svc.follower.poll()
    callers = ["+8613800138000", "anonymous", "+8613900139000", "+8613900139001"]
    sent = {}
    for c in callers:
        r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=c), timeout=3)
        sent[c] = r.variables["EDGEFILTER_ACTION"]
    assert sent["+8613800138000"] == "challenge" and sent["anonymous"] == "challenge", sent
    # the call log writer records in the background (flush() is for stop(), after run() is cancelled)
    for _ in range(500):
        if svc.calllog.written >= len(callers):
            break
        await asyncio.sleep(0.02)
    assert svc.calllog.written == len(callers)

    new = tmp_path / "new.toml"
    new.write_text(
        f'[store]\npath = "{svc.settings.store.path}"\n'
        '[categories.marketing]\nforce = "reject"\n'
        '[rules.CLI_WITHHELD]\nweight = 0.0\n'
    )
    rc = await asyncio.to_thread(cli.main, ["replay", "--config", str(new), "--since", "1h"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "replayed 4 calls" in out and "2 would change action (50.0%), 2 unchanged" in out
    assert "challenge -> reject: 1 calls" in out and "challenge -> allow: 1 calls" in out
    assert "+8613800138000" in out and "LIST_CATEGORY" in out
    # the whole matrix, recorded (rows) against replayed (columns), cell by cell
    lines = out.splitlines()
    head = lines.index("recorded \\ replayed       allow  challenge     reject")
    assert [ln.split() for ln in lines[head + 1:head + 3]] == [
        ["allow", "2", ".", "."],  # the two unlisted numbers stay allowed
        ["challenge", "1", ".", "1"],  # anonymous -> allow (CLI_WITHHELD 0), marketing -> reject
    ]
    assert lines[head + 3] == ""  # no other recorded action

    same = tmp_path / "same.toml"
    same.write_text(f'[store]\npath = "{svc.settings.store.path}"\n')
    assert await asyncio.to_thread(cli.main, ["replay", "--config", str(same), "--since", "1h"]) == 0
    assert "0 would change action" in capsys.readouterr().out


def rec(caller, action, rules="", ts=None, name=""):
    return CallRecord(ts or time.time(), "u1", caller, None, "", name, "1000", "1000", "from-trunk", action, None, 0.0,
                      rules, "default", 0.1)


def test_source_rules_are_carried_with_the_new_weight_and_dropped_when_gone():
    s = settings_from_dict({"store": {"path": ":memory:"}})
    # a rule another fact source (behaviour history) fires: not produced by the call itself
    s = dataclasses.replace(s, rules={**s.rules, "RATE_BURST": RuleSettings("RATE_BURST", 16.0, "rate")})
    rep = replay_calls([rec("+8613900139000", "allow", "RATE_BURST"), rec("+8613900139000", "allow", "GONE_RULE")], s, ListIndex())
    assert rep.matrix == {("allow", "reject"): 1, ("allow", "allow"): 1}
    assert rep.carried == {"RATE_BURST": 1} and rep.dropped == {"GONE_RULE": 1}
    text = "\n".join(format_report(rep, "1d ago", ("x.toml",)))
    assert "allow -> reject: 1 calls" in text and "RATE_BURST x1" in text and "GONE_RULE x1" in text


def test_schedules_use_the_time_the_call_arrived_and_hostile_callers_are_escaped():
    s = settings_from_dict({"store": {"path": ":memory:"}, "categories": {"marketing": {"schedule": "business-hours", "force": "reject"}}})
    idx = ListIndex()
    idx.put(Entry("block", parse_pattern("+8613800138000", "CN"), category="marketing"))
    night = datetime(2026, 11, 25, 3, 0).timestamp()
    day = datetime(2026, 11, 25, 11, 0).timestamp()  # a Wednesday
    rep = replay_calls([rec("+8613800138000", "allow", ts=night), rec("+8613800138000", "allow", ts=day),
                        rec("\x1b[2J+86 evil", "allow", ts=day)], s, idx)
    assert rep.matrix[("allow", "reject")] == 1
    text = "\n".join(format_report(rep, "1d ago", ("x.toml",)))
    assert "\x1b" not in text


def test_challenge_and_reputation_rules_are_carried_like_every_fact_source_rule():
    """CHALLENGE_FAILED and REPUTATION_* come from fact sources the replay does not run (the
    challenge failures, online sources): carried over, never silently lost."""
    s = settings_from_dict({"store": {"path": ":memory:"}})
    s = dataclasses.replace(s, rules={**s.rules, "REPUTATION_LISTED": RuleSettings("REPUTATION_LISTED", 7.0, "reputation")})
    rep = replay_calls([rec("+8613900139000", "challenge", "CHALLENGE_FAILED"),
                        rec("+8613900139001", "challenge", "REPUTATION_LISTED")], s, ListIndex())
    assert rep.carried == {"CHALLENGE_FAILED": 1, "REPUTATION_LISTED": 1}
    # 4.0 reaches tag (3.0), 7.0 challenge (6.0); dropping them would replay both as allow
    assert rep.matrix == {("challenge", "tag"): 1, ("challenge", "challenge"): 1}

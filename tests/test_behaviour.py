"""Behaviour rules over the in-memory history, with an injected clock (no sleeps)."""

from __future__ import annotations

import itertools

import pytest

from edgefilter.core.config import settings_from_dict
from edgefilter.core.errors import ConfigError
from edgefilter.core.model import Call
from edgefilter.rules.behaviour import BehaviourRules
from edgefilter.rules.screen import Screener

_uid = itertools.count(1)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rig:
    """A Screener with the behaviour rules plugged in, fed like the service feeds it."""

    def __init__(self, data: dict | None = None) -> None:
        self.settings = settings_from_dict(data or {})
        self.clock = Clock()
        self.screener = Screener(self.settings, clock=self.clock)
        self.rules = BehaviourRules(lambda: self.settings)
        self.screener.sources.append(self.rules)

    def call(self, caller: str, exten: str = "1000", *, dnid: str = "", after: float = 0.0, **params):
        self.clock.t += after
        call = Call(callerid=caller, dnid=dnid, extension=exten, uniqueid=f"17000.{next(_uid)}", params=params)
        d = self.screener.decide(call)
        self.rules.record(call, d.number, self.clock(), d.verdict.action.value)
        return d

    @property
    def history(self):
        return self.rules.history


def hit(d, rule):
    return next((h for h in d.verdict.hits if h.rule == rule), None)


def test_ten_calls_in_a_minute_escalate_the_action():
    rig = Rig()
    actions = [rig.call("+8613800138000", after=5).verdict.action.value for _ in range(10)]
    assert actions == ["allow"] * 4 + ["challenge", "challenge", "voicemail", "voicemail", "voicemail", "reject"]
    d = rig.call("+8613800138000", after=5)
    assert hit(d, "RATE_BURST").weight == 6 + 2 * 6 and "11 calls within 1m" in hit(d, "RATE_BURST").detail
    # the burst window passes: the number is judged afresh
    assert rig.call("+8613800138000", after=61).verdict.action.value == "allow"


def test_burst_counts_only_inside_the_window():
    rig = Rig()
    for _ in range(4):
        rig.call("+8613800138000", after=15.1)  # 4 calls over 60.4 s
    d = rig.call("+8613800138000", after=15.1)
    assert hit(d, "RATE_BURST") is None  # the first call left the 1 m window
    d = rig.call("+8613800138000", after=1)
    assert hit(d, "RATE_BURST") is not None


def test_a_number_ringing_five_extensions_in_a_row_is_challenged():
    rig = Rig()
    ds = [rig.call("+8613900139000", exten=f"10{i:02d}", after=30) for i in range(1, 7)]
    assert [d.verdict.action.value for d in ds] == ["allow"] * 4 + ["challenge", "challenge"]
    assert "reached 5 extensions/DIDs within 10m" in hit(ds[4], "RATE_SPREAD").detail
    assert hit(ds[4], "RATE_BURST") is None
    # the same five extensions rung within seconds: burst and spread together
    rig2 = Rig()
    fast = [rig2.call("+8613900139001", exten=f"10{i:02d}", after=2) for i in range(1, 6)]
    assert fast[-1].verdict.action.value == "voicemail"


def test_calling_one_extension_repeatedly_is_no_spread():
    rig = Rig()
    for _ in range(6):
        d = rig.call("+8613900139000", exten="1000", after=100)
    assert hit(d, "RATE_SPREAD") is None and hit(d, "RATE_BURST") is None


def test_short_and_unanswered_calls_need_a_minimum_sample():
    rig = Rig()
    for _ in range(3):
        d = rig.call("+8613700137000", after=300)
        rig.history.set_outcome(d.call.uniqueid, False, 0.0)
    fourth = rig.call("+8613700137000", after=300)
    assert hit(fourth, "RATE_SHORT") is None  # 3 known outcomes < short_min_calls 4
    rig.history.set_outcome(fourth.call.uniqueid, True, 2.0)  # answered, but 2 s of talk: short
    d = rig.call("+8613700137000", after=300)
    h = hit(d, "RATE_SHORT")
    assert h is not None and h.weight == 4.0 and "4 of 4 recent calls" in h.detail


def test_calls_we_did_not_let_ring_do_not_count_as_short():
    from edgefilter.lists.index import Entry, parse_pattern

    rig = Rig()
    rig.screener.index.put(Entry("block", parse_pattern("+8613700137000", "CN")))
    for _ in range(6):
        d = rig.call("+8613700137000", after=300)
        assert d.verdict.action.value == "reject"
        rig.history.set_outcome(d.call.uniqueid, False, 0.0)  # rejected by us: of course unanswered
    assert hit(rig.call("+8613700137000", after=300), "RATE_SHORT") is None


def test_long_answered_calls_do_not_fire_rate_short():
    rig = Rig()
    for i in range(6):
        d = rig.call("+8613700137000", after=300)
        rig.history.set_outcome(d.call.uniqueid, True, 120.0 if i % 2 else 1.0)
    assert hit(rig.call("+8613700137000", after=300), "RATE_SHORT") is None  # 50 % < 60 %


def test_range_campaign_many_numbers_of_one_block():
    rig = Rig()
    ds = [rig.call(f"+86138001380{i:02d}", after=20) for i in range(5)]
    assert all(hit(d, "RANGE_CAMPAIGN") is None for d in ds[:4])
    h = hit(ds[4], "RANGE_CAMPAIGN")
    assert h is not None and "5 numbers of block +861380013XXXX" in h.detail
    # a number of another block is not part of it
    assert hit(rig.call("+8613900138000", after=1), "RANGE_CAMPAIGN") is None
    rig2 = Rig({"behaviour": {"campaign_block_digits": 2}})
    ds = [rig2.call(f"+86138001380{i:02d}", after=20) for i in range(5)]
    assert hit(ds[4], "RANGE_CAMPAIGN") is not None  # +86138001380XX


def test_cli_neighbour_spoofing():
    rig = Rig()
    d = rig.call("+14152229876", dnid="+14152221234")
    assert hit(d, "CLI_NEIGHBOUR") is not None and d.verdict.score == 3.0
    assert hit(rig.call("+14153339876", dnid="+14152221234"), "CLI_NEIGHBOUR") is None
    assert hit(rig.call("+14152221234", dnid="+14152221234"), "CLI_NEIGHBOUR") is None  # itself
    assert hit(rig.call("+14152229876", dnid="unknown"), "CLI_NEIGHBOUR") is None


def test_known_contact_lowers_the_score_until_it_expires():
    rig = Rig({"behaviour": {"known_contact_ttl": "30d"}})
    rig.history.add_contact("+8613800138000", rig.clock())
    d = rig.call("+8613800138000", after=10)
    assert hit(d, "KNOWN_CONTACT").weight == -6.0
    rig.clock.t += 31 * 86400
    assert hit(rig.call("+8613800138000"), "KNOWN_CONTACT") is None


@pytest.mark.parametrize(
    "params,rules",
    [
        ({"stir": "A"}, ["STIR_A"]),
        ({"stir": "b"}, ["STIR_B"]),
        ({"stir": "C", "stir_verify": "Verification successful"}, ["STIR_C"]),
        ({"stir": "A", "stir_verify": "Signature verification failed"}, ["STIR_FAILED"]),
        ({"stir_verify": "Verification not present"}, []),
        ({"stir": "Z\nB"}, []),
        ({}, []),
    ],
)
def test_stir_shaken_attestation_and_verification(params, rules):
    d = Rig().call("+8613800138000", **params)
    assert [h.rule for h in d.verdict.hits if h.rule.startswith("STIR")] == rules


def test_refused_before_forces_voicemail_for_that_callee_or_anyone():
    rig = Rig()
    rig.history.refuse("+8613800138000", "1000")
    d = rig.call("+8613800138000", exten="1000", after=10)
    assert d.verdict.action.value == "voicemail" and d.verdict.forced_by == "REFUSED_BEFORE"
    assert hit(rig.call("+8613800138000", exten="1001", after=100), "REFUSED_BEFORE") is None
    rig.history.unrefuse("+8613800138000", "1000")
    assert hit(rig.call("+8613800138000", exten="1000", after=100), "REFUSED_BEFORE") is None
    any_ = Rig({"behaviour": {"refusal_scope": "anyone"}, "rules": {"REFUSED_BEFORE": {"weight": 10, "force": "reject"}}})
    any_.history.refuse("+8613800138000", "1000")
    d = any_.call("+8613800138000", exten="2000")
    assert d.verdict.action.value == "reject"


def test_allowlist_still_beats_behaviour():
    from edgefilter.lists.index import Entry, parse_pattern

    rig = Rig()
    rig.screener.index.put(Entry("allow", parse_pattern("+8613800138000", "CN")))
    for _ in range(10):
        d = rig.call("+8613800138000", after=1)
    assert d.verdict.action.value == "allow" and hit(d, "RATE_BURST") is not None


def test_policy_can_reweight_a_behaviour_rule_per_line():
    rig = Rig({"policies": {"callcentre": {"match_extension": ["2*"], "weights": {"RATE_BURST": 0.0}}}})
    for _ in range(8):
        d = rig.call("+8613800138000", exten="2000", after=1)
    assert hit(d, "RATE_BURST").weight == 0 and d.verdict.action.value == "allow"
    for _ in range(8):
        d = rig.call("+8613800138001", exten="1000", after=1)
    assert d.verdict.action.value != "allow"


def test_disabled_rules_and_forged_calls():
    rig = Rig({"rules": {"RATE_BURST": {"weight": 6, "enabled": False}}})
    for _ in range(10):
        d = rig.call("+8613800138000", after=1)
    assert hit(d, "RATE_BURST") is None
    rig = Rig({"behaviour": {"enabled": False}})
    for _ in range(10):
        d = rig.call("+8613800138000", after=1)
    assert d.verdict.hits == ()


def test_memory_is_bounded_in_count_and_age():
    rig = Rig({"behaviour": {"memory_calls": 100}})
    for i in range(150):
        rig.call(f"+86138001{i:05d}", after=0.1)
    assert len(rig.history) == 100
    assert len(rig.history._by_caller) == 100 and len(rig.history._by_uid) == 100
    rig.clock.t += 3601  # past every window (the horizon is the longest: short_window 1h)
    rig.call("+8613900139000")
    assert len(rig.history) == 1 and len(rig.history._by_block) == 1


def test_withheld_and_garbage_callers_are_not_keyed():
    rig = Rig()
    for _ in range(10):
        d = rig.call("anonymous", after=1)
    assert hit(d, "RATE_BURST") is None and rig.history._by_caller == {}


def test_behaviour_config_is_validated():
    with pytest.raises(ConfigError, match="did you mean 'burst_window'"):
        settings_from_dict({"behaviour": {"burst_windows": "1m"}})
    with pytest.raises(ConfigError, match="short_share"):
        settings_from_dict({"behaviour": {"short_share": 1.5}})
    with pytest.raises(ConfigError, match="refusal_scope"):
        settings_from_dict({"behaviour": {"refusal_scope": "everyone"}})
    s = settings_from_dict({"behaviour": {"burst_window": "2m", "outbound_contexts": ["from-internal"]}})
    assert s.behaviour.burst_window == 120 and s.behaviour.outbound_contexts == ("from-internal",)
    for rule in ("RATE_BURST", "RATE_SPREAD", "RATE_SHORT", "RANGE_CAMPAIGN", "CLI_NEIGHBOUR", "KNOWN_CONTACT",
                 "STIR_A", "STIR_B", "STIR_C", "STIR_FAILED", "REFUSED_BEFORE"):
        assert s.rules[rule].description and s.rules[rule].group


def test_a_late_call_from_another_node_takes_its_place_in_time():
    """Another node's call arrives (from the shared store) after newer local ones: the indexes
    stay in time order, so window scans neither stop early nor miss it."""
    from edgefilter.rules.history import CallHistory, RecentCall

    h = CallHistory(horizon=3600.0, max_calls=100)
    h.add(RecentCall(100.0, "a", "+8613800138000", "1000", "+86138001"), 100.0)
    h.add(RecentCall(130.0, "c", "+8613800138000", "1001", "+86138001"), 130.0)
    h.add(RecentCall(120.0, "b", "+8613800138000", "1002", "+86138001"), 131.0)  # late
    assert [c.uniqueid for c in h.from_caller("+8613800138000", 110.0)] == ["c", "b"]
    assert [c.uniqueid for c in h.from_block("+86138001", 0.0)] == ["c", "b", "a"]
    assert h.last_by_target["1002"].uniqueid == "b"
    h.add(RecentCall(90.0, "z", "+8613800138000", "1001", None), 132.0)  # older than the newest for 1001
    assert h.last_by_target["1001"].uniqueid == "c"
    h.expire(125.0 + 3600.0)  # z, a and b gone, c stays
    assert [c.uniqueid for c in h.from_caller("+8613800138000", 0.0)] == ["c"] and len(h) == 1

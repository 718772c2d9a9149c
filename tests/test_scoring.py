"""Pure scoring and policy logic, table-driven: thresholds, caps, forced-action priority, schedules."""

from datetime import datetime

import pytest

from edgefilter.core.config import settings_from_dict
from edgefilter.core.model import Action, Call, Hit
from edgefilter.lists.index import Entry, ListIndex, parse_pattern
from edgefilter.rules.policy import Effective, PolicyBook
from edgefilter.rules.scoring import decide, explain
from edgefilter.rules.screen import Screener

BASE = settings_from_dict({})
EFF = PolicyBook(BASE).resolve(Call("+8613800138000"), datetime(2026, 11, 30, 10, 0))


def h(rule, weight, group="", force=None):
    return Hit(rule, weight, group, "", force)


@pytest.mark.parametrize(
    "weights,expected",
    [
        ([], Action.ALLOW),
        ([2.99], Action.ALLOW),
        ([3.0], Action.TAG),
        ([5.99], Action.TAG),
        ([6.0], Action.CHALLENGE),
        ([4, 6], Action.VOICEMAIL),
        ([15], Action.REJECT),
        ([20, -6], Action.VOICEMAIL),
        ([-5], Action.ALLOW),
    ],
)
def test_thresholds(weights, expected):
    v = decide([h(f"R{i}", w) for i, w in enumerate(weights)], EFF, {})
    assert v.action is expected
    assert v.score == pytest.approx(sum(weights))


def test_group_cap_limits_positive_total():
    v = decide([h("A", 10, "cli"), h("B", 8, "cli"), h("C", 1, "other")], EFF, {"cli": 12.0, "other": None})
    assert v.score == 13 and v.capped == (("cli", 18, 12.0),)
    assert v.action is Action.VOICEMAIL


@pytest.mark.parametrize(
    "hits,action,by",
    [
        ([h("LIST_BLOCKED", 20, "lists", Action.REJECT), h("POLICY_NEVER_BLOCK", -50, "policy", Action.ALLOW)], Action.ALLOW, "POLICY_NEVER_BLOCK"),
        ([h("LIST_ALLOWED", -20, "lists", Action.ALLOW), h("CLI_FORGED", 100, "system", Action.REJECT)], Action.REJECT, "CLI_FORGED"),
        ([h("X", 1, "g", Action.VOICEMAIL), h("Y", 1, "g", Action.CHALLENGE)], Action.VOICEMAIL, "X"),
        ([h("X", -100, "g", Action.REJECT)], Action.REJECT, "X"),
    ],
)
def test_forced_action_priority(hits, action, by):
    v = decide(hits, EFF, {})
    assert (v.action, v.forced_by) == (action, by)


def test_policy_remap_applies_to_threshold_outcome_only():
    eff = Effective(("p",), EFF.thresholds, {}, {Action.TAG: Action.VOICEMAIL}, False)
    assert decide([h("A", 3)], eff, {}).action is Action.VOICEMAIL
    assert decide([h("A", 3, "g", Action.TAG)], eff, {}).action is Action.TAG


POLICIES = settings_from_dict(
    {
        "schedules": {"office": {"days": ["mon-fri"], "hours": ["09:00-18:00"]}, "night": {"hours": ["22:00-06:00"]}},
        "policies": {
            "everyone-after-hours": {"schedule": "!office", "actions": {"tag": "voicemail"}},
            "sales": {"match_did": ["+862161234567"], "thresholds": {"tag": 2.0}, "weights": {"CLI_WITHHELD": 9.0}},
            "support-ext": {"match_extension": ["20*"], "allowlist_only": True},
            "inbound-ctx": {"match_context": ["from-trunk"], "never_block": ["+86120", "+862160000*"]},
            "night-sales": {"match_did": ["+86216123456*"], "schedule": "night", "thresholds": {"reject": 11.0}},
        },
    }
)
BOOK = PolicyBook(POLICIES)


@pytest.mark.parametrize(
    "call,when,names",
    [
        (Call("x", dnid="1000", context="other"), datetime(2026, 11, 30, 10, 0), ()),  # Monday 10:00
        (Call("x", dnid="1000", context="other"), datetime(2026, 11, 30, 8, 59), ("everyone-after-hours",)),
        (Call("x", dnid="1000", context="other"), datetime(2026, 11, 30, 9, 0), ()),  # window start is inside
        (Call("x", dnid="1000", context="other"), datetime(2026, 11, 30, 18, 0), ("everyone-after-hours",)),  # end is outside
        (Call("x", dnid="1000", context="other"), datetime(2026, 11, 29, 12, 0), ("everyone-after-hours",)),  # Sunday
        (Call("x", dnid="02161234567", context="from-trunk"), datetime(2026, 11, 30, 10, 0), ("inbound-ctx", "sales")),
        (Call("x", dnid="+862161234567", context="from-trunk"), datetime(2026, 11, 30, 23, 0), ("everyone-after-hours", "inbound-ctx", "sales", "night-sales")),
        (Call("x", dnid="+862161234567", context="from-trunk"), datetime(2026, 11, 30, 6, 0), ("everyone-after-hours", "inbound-ctx", "sales")),
        (Call("x", extension="2001", context="x"), datetime(2026, 11, 30, 10, 0), ("support-ext",)),
        (Call("x", extension="3001", context="x"), datetime(2026, 11, 30, 10, 0), ()),
    ],
)
def test_policy_selection_and_schedule_edges(call, when, names):
    assert BOOK.resolve(call, when).names == names


def test_policy_layering_most_specific_wins():
    eff = BOOK.resolve(Call("x", dnid="+862161234567", context="from-trunk"), datetime(2026, 11, 30, 23, 0))
    assert eff.thresholds[Action.TAG] == 2.0 and eff.thresholds[Action.REJECT] == 11.0
    assert eff.weights["CLI_WITHHELD"] == 9.0
    assert eff.actions == {Action.TAG: Action.VOICEMAIL}


def screener_with(settings, *entries):
    idx = ListIndex()
    for lst, text, kw in entries:
        idx.put(Entry(lst, parse_pattern(text, "CN"), **kw))
    return Screener(settings, idx)


MON_10 = datetime(2026, 11, 30, 10, 0)
SAT_10 = datetime(2026, 11, 28, 10, 0)


@pytest.mark.parametrize(
    "call,when,action,rules",
    [
        (Call("+8613900139000"), MON_10, Action.REJECT, ("LIST_CATEGORY",)),  # fraud forces reject
        (Call("+8613700137000"), MON_10, Action.CHALLENGE, ("LIST_CATEGORY",)),  # marketing +8
        (Call("+8613600136000"), MON_10, Action.ALLOW, ("LIST_CATEGORY",)),  # delivery -4 in business hours
        (Call("+8613600136000", callingpres=32), MON_10, Action.ALLOW, ("CLI_WITHHELD", "LIST_CATEGORY")),  # 6-4=2
        (Call("+8613600136000", callingpres=32), SAT_10, Action.CHALLENGE, ("CLI_WITHHELD", "LIST_CATEGORY")),  # delivery weight off on Saturday
        (Call("anonymous", dnid="2001", extension="2001"), MON_10, Action.VOICEMAIL, ("CLI_WITHHELD", "POLICY_ALLOWLIST_ONLY")),
        (Call("+8613100131000", dnid="2001", extension="2001"), MON_10, Action.VOICEMAIL, ("POLICY_ALLOWLIST_ONLY",)),
        (Call("+8613500135000", dnid="2001", extension="2001"), MON_10, Action.ALLOW, ("LIST_ALLOWED",)),
        (Call("+862160000123", context="from-trunk"), MON_10, Action.ALLOW, ("LIST_BLOCKED", "POLICY_NEVER_BLOCK")),
        (Call("+8613800138000", calleridname="V123456789"), MON_10, Action.TAG, ("NAME_AUTODIALER",)),
        (Call("+8613800138000", calleridname="13800138000"), MON_10, Action.ALLOW, ("NAME_DIGITS_ONLY",)),
    ],
)
def test_decisions_with_categories_policies_and_name_rules(call, when, action, rules):
    scr = screener_with(
        POLICIES,
        ("block", "+8613900139000", {"category": "fraud"}),
        ("block", "+8613700137000", {"category": "marketing"}),
        ("block", "+8613600136000", {"category": "delivery"}),
        ("allow", "+8613500135000", {}),
        ("block", "+862160000*", {}),
    )
    d = scr.decide(call, when=when)
    assert d.verdict.action is action, explain(d.verdict, d.effective)
    assert set(d.verdict.rules) == set(rules)


def test_log_only_answers_allow_and_says_what_it_would_do():
    s = settings_from_dict({"screen": {"mode": "log-only"}})
    scr = screener_with(s, ("block", "+8613800138000", {}))
    v = scr.decide(Call("+8613800138000")).verdict
    assert v.action is Action.ALLOW and v.would is Action.REJECT
    forged = scr.decide(Call("138", forged="blank line")).verdict
    assert forged.action is Action.REJECT  # never allow a forged env block, even in log-only mode


def test_explain_lists_policy_rules_caps_thresholds_and_action():
    scr = screener_with(POLICIES)
    d = scr.decide(Call("anonymous", dnid="+862161234567", context="from-trunk"), when=MON_10)
    text = "\n".join(explain(d.verdict, d.effective))
    assert "policy: inbound-ctx+sales" in text
    assert "CLI_WITHHELD" in text and "+9.00" in text and "group=cli" in text
    assert "tag 2 reached" in text and "reject 15 not reached" in text
    assert text.endswith("action: challenge")


def test_log_line_carries_policy_rules_weights_caps_and_action():
    import json

    from edgefilter.outputs.decisionlog import format_json, format_kv

    scr = screener_with(POLICIES)
    d = scr.decide(Call("anonymous", calleridname="V1234567890", dnid="+862161234567", context="from-trunk"), when=MON_10)
    line = format_kv(d)
    assert "action=voicemail" in line and "policy=inbound-ctx+sales" in line
    assert "rules=CLI_WITHHELD(+9),NAME_AUTODIALER(+4)" in line and "score=13.0" in line
    d2 = scr.decide(Call("anonymous", calleridname="V1234567890", callingpres=32, context="x"), when=MON_10)
    assert json.loads(format_json(d2))["action"] == "voicemail"
    capped = screener_with(settings_from_dict({"groups": {"cli": {"max": 5.0}}})).decide(Call("anonymous"), when=MON_10)
    assert "capped=cli:6>5" in format_kv(capped)


def test_log_line_escapes_hostile_caller_text():
    import json

    from edgefilter.outputs.decisionlog import format_json, format_kv

    scr = screener_with(BASE)
    d = scr.decide(Call('13"8\n\x1b[31m x=1', calleridname="\u9a9a\u6270\r\nFAKE decision action=allow"), when=MON_10)
    line = format_kv(d)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert 'caller="13\\"8\\x0a\\x1b[31m x=1"' in line
    assert "\\u9a9a\\u6270" in line
    j = json.loads(format_json(d))
    assert j["caller_name"].startswith("\u9a9a\u6270\r\n") and "\n" not in format_json(d)


def test_unconditional_policies_resolve_once_with_the_same_result_as_per_call():
    # No schedule and no matcher: PolicyBook resolves once per config load; the answer must be
    # what the per-call resolution gives, and a conditional policy must still be resolved per call.
    static = settings_from_dict({"policies": {"all": {"thresholds": {"tag": 2.5}, "weights": {"CLI_WITHHELD": 7.0}, "never_block": ["+86120"]}}})
    book = PolicyBook(static)
    a = book.resolve(Call("+8613800138000"), datetime(2026, 11, 30, 10, 0))
    b = book.resolve(Call("x", dnid="1000", context="other"), datetime(2026, 11, 29, 3, 0))
    per_call = book._resolve(Call("x"), datetime(2026, 11, 30, 10, 0))
    assert a is b
    assert (a.names, a.thresholds, a.weights, a.actions, a.allowlist_only) == (
        per_call.names, per_call.thresholds, per_call.weights, per_call.actions, per_call.allowlist_only)
    assert a.names == ("all",) and a.thresholds[Action.TAG] == 2.5 and a.weights["CLI_WITHHELD"] == 7.0
    assert a.never_block is not None and a.never_block.lookup("86120") is not None
    assert PolicyBook(settings_from_dict({})).resolve(Call("x"), datetime(2026, 11, 30, 10, 0)).names == ()
    assert BOOK._static is None  # schedules and matchers: per call (test_policy_selection_... above)

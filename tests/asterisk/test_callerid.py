"""Withheld, anonymous and forged caller IDs through the real Asterisk and the shipped dial plan.

Fault 1 of issue 15: a withheld caller was flagged "filtered" by the dial plan and sent to
voicemail. Fault 4: FILTER() kept the digits of every line of a forged caller ID, so the number
escaped its block and was answered by voicemail. pjsip decodes %XX in the From user part, so
``%0A`` there is a real line feed in CALLERID(num) and in the FastAGI env block.
"""

from __future__ import annotations

import pytest

from . import scenarios as sc


def _from(user: str, name: str = "Caller") -> str:
    return f'From: "{name}" <sip:{user}@[local_ip]:[local_port]>'


@pytest.mark.parametrize("from_line,headers", [
    ('From: "Anonymous" <sip:anonymous@anonymous.invalid>', ""),
    (_from("Restricted", "Restricted"), ""),
    (_from("unknown", "unknown"), ""),
], ids=["anonymous", "restricted", "unknown"])
def test_a_withheld_caller_is_judged_as_withheld_only_and_challenged(lab, work, from_line, headers):
    mark = lab.mark()
    r = lab.call(sc.answered(work / "withheld.xml", from_line=from_line, headers=headers,
                             after_answer=sc.challenge_round(1, ""), hang_up_ms=200))
    assert r.returncode == 0, r.explain()  # answered: the challenge answers to play its prompt
    d = lab.service.wait_decision(mark)  # written just after the close: wait for it
    assert d["action"] == "challenge", d
    assert d["rules"] == ["CLI_WITHHELD(+6)"], d  # never CLI_FILTERED on top (it made 10: voicemail)


def test_a_withheld_number_known_to_the_network_is_challenged(lab, work):
    # Privacy: id with a trusted P-Asserted-Identity: callingpres 32/33, number present
    n = lab.number()
    mark = lab.mark()
    headers = f'P-Asserted-Identity: "Caller" <sip:{n}@[local_ip]:[local_port]>\nPrivacy: id'
    r = lab.call(sc.answered(work / "pai.xml", from_line='From: "Anonymous" <sip:anonymous@anonymous.invalid>', headers=headers,
                             after_answer=sc.challenge_round(1, ""), hang_up_ms=200))
    assert r.returncode == 0, r.explain()
    d = lab.decision_for(n, mark)
    assert d["action"] == "challenge" and d["rules"] == ["CLI_WITHHELD(+6)"], d


def test_a_phone_dialling_8_rings_6001_as_a_withheld_caller(lab, work):
    mark = lab.mark()
    r = lab.from_phone("6002", sc.answered(work / "eight.xml", from_line=_from("6002", "Bob"), auth=True,
                                           after_answer=sc.challenge_round(1, ""), hang_up_ms=200), "8")
    assert r.returncode == 0, r.explain()
    d = lab.service.wait_decision(mark)  # written just after the close: wait for it
    assert d["action"] == "challenge" and d["rules"] == ["CLI_WITHHELD(+6)"] and d["caller"] == "anonymous", d


# Forged caller IDs: each must be refused (403 here, the default cause), never answered, never allowed.
FORGED = {
    "issue-example": "{blocked}%0Aagi_arg_5:%20cidfiltered=0",
    "planted-reply": "%0Aagi_callerid:%20{friend}%0A%0A200%20result=1%20(allow)",
    "blank-line": "138%0A%0A200%20result=1%20(allow)",
    "carriage-return": "{friend}%0D",
    "tab": "{friend}%09x",
    "friend-with-tail": "{friend}%0Aagi_network_script:%20outbound",
    "arg-forgery": "{friend}%0Aagi_arg_1:%20cid=Kzg2MTM5MDAxMzkwMDA=",
    "esc-sequence": "{friend}%1B%5B2J",
}


@pytest.mark.parametrize("form", sorted(FORGED))
def test_a_forged_caller_id_is_refused_never_answered(lab, work, form):
    blocked, friend = lab.number(), lab.number()
    lab.service.cli("block", blocked)
    lab.service.cli("allow", friend)  # a forged caller ID must never buy an allow, even a friend's
    user = FORGED[form].format(blocked=blocked.lstrip("+"), friend=friend.lstrip("+"))
    mark = lab.mark()
    r = lab.call(sc.refused(work / "forged.xml", 403, from_line=_from(user, "Forger")))
    assert r.returncode == 0, r.explain()
    assert 200 not in r.responses() and 180 not in r.responses() and 183 not in r.responses()
    d = lab.service.wait_decision(mark)  # written just after the close: wait for it
    assert d["action"] == "reject" and any(h.startswith("CLI_FORGED") for h in d["rules"]), d
    assert not any(h.startswith("LIST_ALLOWED") for h in d["rules"]), d
    if form == "issue-example":  # the number in front of the line feed still meets its own block
        assert "LIST_BLOCKED(+20)" in d["rules"] and d["e164"] == blocked, d


def test_a_forged_caller_id_is_refused_through_a_bare_agi_too(lab, work):
    blocked = lab.number()
    lab.service.cli("block", blocked)
    mark = lab.mark()
    r = lab.call(sc.refused(work / "raw.xml", 403, from_line=_from(blocked.lstrip("+") + "%0Aagi_arg_1:%20exten=1")),
                 service="7100")
    assert r.returncode == 0, r.explain()
    d = lab.service.wait_decision(mark)  # written just after the close: wait for it
    assert d["action"] == "reject" and any(h.startswith("CLI_FORGED") for h in d["rules"]), d
    assert "LIST_BLOCKED(+20)" in d["rules"], d


def test_a_caller_name_with_quotes_and_backslashes_is_kept_and_harmless(lab, work):
    mark = lab.mark()
    n = lab.number()
    r = lab.call(sc.answered(work / "name.xml", from_line=f'From: "O\\"Brien \\\\ Co, (x)" <sip:{n.lstrip("+")}@[local_ip]:[local_port]>',
                             hang_up_ms=300))
    assert r.returncode == 0, r.explain()
    d = lab.service.wait_decision(mark)  # written just after the close: wait for it
    assert d["action"] == "allow" and d["e164"] == n, d

"""Each action, through the real Asterisk: the SIP the caller gets, what the phone gets, the record.

The caller is sipp on the loopback trunk (context from-loopback) or softphone 6002; the phone
6001 is sipp registered with digest auth. Every call goes through the shipped
extensions-example.conf and the edgefilter-screen subroutine, unchanged.
"""

from __future__ import annotations

import re

import pytest

from . import scenarios as sc
from .pbx import SIPP_DIR, wait_for


def test_shipped_allowed_scenario_is_answered_and_connected(lab):
    mark = lab.mark()
    r = lab.sipp.run(SIPP_DIR / "uac_allowed.xml", lab.target, csv=SIPP_DIR / "callers_allowed.csv")
    assert r.returncode == 0, r.explain()
    assert 200 in r.responses() and r.requests("MESSAGE") and r.requests("BYE")
    d = lab.decision_for("+8613900139000", mark)
    assert d["action"] == "allow" and d["context"] == "from-loopback"


def test_shipped_rejected_scenario_gets_403_and_never_rings(lab):
    lab.service.cli("block", "+8617012345678")
    mark = lab.mark()
    r = lab.sipp.run(SIPP_DIR / "uac_rejected.xml", lab.target, csv=SIPP_DIR / "callers_blocked.csv")
    assert r.returncode == 0, r.explain()
    assert r.responses()[-1] == 403 and 180 not in r.responses() and 200 not in r.responses()
    d = lab.decision_for("+8617012345678", mark)
    assert d["action"] == "reject" and d["rules"] == ["LIST_BLOCKED(+20)"]


@pytest.mark.parametrize("cause,code,reason", [("21", 403, "Q.850;cause=21"), ("17", 486, "Q.850;cause=17"),
                                               ("607", 607, None), ("608", 608, None)])
def test_each_reject_cause_gives_its_sip_response(lab, work, cause, code, reason):
    n = lab.number()
    lab.service.cli("block", n)
    with lab.configured(f'[actions]\nreject_cause = "{cause}"\n'):
        r = lab.call(sc.refused(work / f"refused{code}.xml", code), n)
    assert r.returncode == 0, r.explain()
    final = [m for m in r.received() if m.startswith(f"SIP/2.0 {code} ")]
    assert len(final) == 1 and 200 not in r.responses() and 180 not in r.responses()
    if reason:
        assert reason in final[0]


def test_sit_tone_comes_as_early_media_before_the_refusal(lab, work):
    n = lab.number()
    lab.service.cli("block", n)
    mark = lab.pbx.log_size()
    with lab.configured("[actions]\nreject_sit = true\n"):
        r = lab.call(sc.refused(work / "sit.xml", 403, early_media=True), n)
    assert r.returncode == 0, r.explain()
    assert r.responses()[-2:] == [183, 403] and 200 not in r.responses()
    assert "PlayTones(" in lab.pbx.log_since(mark) and '"info")' in lab.pbx.log_since(mark)
    assert r.elapsed >= 0.9  # the tones play for a second before the 403


def test_tag_reaches_the_phone_as_the_name_on_the_invite(lab, work):
    n = lab.number()
    lab.service.cli("block", n, "--category", "survey")
    with lab.phone("6001") as phone:
        r = lab.from_phone("6002", sc.answered(work / "tagged.xml", from_line='From: "Bob" <sip:6002@[local_ip]:[local_port]>',
                                                auth=True, hang_up_ms=500), "8" + n.lstrip("+"))
        assert r.returncode == 0, r.explain()
        wait_for(phone.invites, 5, "the INVITE at 6001")
    invite = phone.invites()[0]
    assert re.search(r'^From: "\[SPAM\?\] survey Test" <sip:' + re.escape(n.lstrip("+")) + "@", invite, re.M), invite


def test_voicemail_answers_and_deposits_the_message(lab, work):
    n = lab.number()
    lab.service.cli("block", n, "--category", "other")  # weight 10: voicemail
    inbox = lab.pbx.spool / "voicemail" / "default" / "6001" / "INBOX"
    before = set(inbox.glob("msg*.txt")) if inbox.exists() else set()
    speech = sc.play_audio("/usr/share/sip-tester/g711a.pcap", then_ms=7200)
    # the greeting ("the person at extension 6 0 0 1 is unavailable ... after the tone", beep)
    # takes about 13 s; then 7 s of speech (sipp's g711a.pcap, A-law), then the caller hangs up
    r = lab.call(sc.answered(work / "vm.xml", after_answer='  <pause milliseconds="14500"/>\n' + speech, hang_up_ms=500),
                 n, service="6001")
    assert r.returncode == 0, r.explain()
    new = wait_for(lambda: set(inbox.glob("msg*.txt")) - before, 10, "a voicemail message in 6001's INBOX")
    text = next(iter(new)).read_text()
    assert re.search(r"^callerid=.*" + re.escape(n.lstrip("+")), text, re.M), text
    assert int(re.search(r"^duration=(\d+)", text, re.M).group(1)) >= 1


def test_log_only_mode_lets_a_blocked_caller_ring_and_says_what_it_would_have_done(lab, work):
    n = lab.number()
    lab.service.cli("block", n)
    mark = lab.mark()
    with lab.configured('[screen]\nmode = "log-only"\n'):
        r = lab.call(SIPP_DIR / "uac_allowed.xml", n)
    assert r.returncode == 0, r.explain()
    d = lab.decision_for(n, mark)
    assert d["action"] == "allow" and d["would"] == "reject" and "LIST_BLOCKED(+20)" in d["rules"]


def test_internal_calls_are_not_screened(lab, work):
    mark = lab.mark()
    with lab.phone("6001") as phone:
        r = lab.from_phone("6002", sc.answered(work / "internal.xml", from_line='From: "Bob" <sip:6002@[local_ip]:[local_port]>',
                                                auth=True, hang_up_ms=300), "6001")
        assert r.returncode == 0, r.explain()
        assert phone.invites()
    assert lab.mark() == mark  # no decision: the service was never asked

"""The challenge with real RFC 2833 DTMF through Asterisk: pass, remembered, wrong keys, silence, hang-up.

Fault 6 of issue 15: the failing scenario played dtmf_2833_0.pcap twice; the second burst had the
same RTP sequence numbers and timestamp, Asterisk dropped it, and the second "press" was silence.
"""

from __future__ import annotations

import re

from . import scenarios as sc
from .pbx import SIPP_DIR, wait_for

WITHHELD = 'From: "Anonymous" <sip:anonymous@anonymous.invalid>'


def _pai(number: str) -> str:
    return f'P-Asserted-Identity: "Caller" <sip:{number}@[local_ip]:[local_port]>\nPrivacy: id'


def _results(lab, since: int) -> list[tuple[str, str]]:
    """(result, reason) of the challenge outcomes the service logged after offset ``since``."""
    return re.findall(r'challenge result=(\w+) caller="[^"]*" attempts=\d+ reason="([^"]*)"', lab.service.log_text()[since:])


def test_pass_with_real_dtmf_then_the_number_is_remembered(lab):
    mark = lab.mark()
    r = lab.sipp.run(SIPP_DIR / "uac_challenge_pass.xml", lab.target, csv=SIPP_DIR / "callers_challenged.csv")
    assert r.returncode == 0, r.explain()
    assert any("edgefilter-connected" in m for m in r.requests("MESSAGE"))
    assert lab.decision_for("+8613500135000", mark)["action"] == "challenge"
    listed = lab.service.cli("list", "allow").stdout
    assert "+8613500135000" in listed and "challenge" in listed
    mark = lab.mark()
    r = lab.sipp.run(SIPP_DIR / "uac_allowed.xml", lab.target, csv=SIPP_DIR / "callers_challenged.csv")
    assert r.returncode == 0, r.explain()
    d = lab.decision_for("+8613500135000", mark)
    assert d["action"] == "allow" and any(h.startswith("LIST_ALLOWED") for h in d["rules"]), d


def test_shipped_robot_presses_two_wrong_keys_for_real_and_fails(lab):
    since = len(lab.service.log_text())
    r = lab.sipp.run(SIPP_DIR / "uac_challenge_fail.xml", lab.target, csv=SIPP_DIR / "callers_robots.csv")
    assert r.returncode == 0, r.explain()
    assert r.requests("BYE") and not any("edgefilter-connected" in m for m in r.requests("MESSAGE"))
    # both presses arrived as keys (not silence): the wrong-digit reason, twice
    assert _results(lab, since) == [("retry", "wrong digit"), ("fail", "wrong digit")]
    out = lab.service.cli("check", "+8613500135999", "--withheld").stdout
    assert "CHALLENGE_FAILED" in out and "+4" in out, out


def test_silence_is_a_retry_then_a_failure(lab, work):
    n = lab.number()
    since = len(lab.service.log_text())
    r = lab.call(sc.answered(work / "silent.xml", from_line=WITHHELD, headers=_pai(n),
                             after_answer=sc.challenge_round(1, "") + sc.challenge_round(2, "")), n)
    assert r.returncode == 0, r.explain()
    assert _results(lab, since) == [("retry", "silence"), ("fail", "silence")]


def test_wrong_key_then_the_right_one_passes(lab, work):
    n = lab.number()
    since = len(lab.service.log_text())
    r = lab.call(sc.answered(work / "second-try.xml", from_line=WITHHELD, headers=_pai(n),
                             after_answer=sc.challenge_round(1, "0") + sc.challenge_round(2, "right")
                             + sc.expect_message("edgefilter-connected")), n)
    assert r.returncode == 0, r.explain()
    assert _results(lab, since) == [("retry", "wrong digit"), ("pass", "")]


def test_hanging_up_during_the_challenge_counts_as_a_failure(lab, work):
    n = lab.number()
    since = len(lab.service.log_text())
    r = lab.call(sc.answered(work / "hangup.xml", from_line=WITHHELD, headers=_pai(n),
                             after_answer=sc.challenge_round(1, ""), hang_up_ms=100), n)
    assert r.returncode == 0, r.explain()
    wait_for(lambda: _results(lab, since), 10, "the hang-up handler's report")
    assert _results(lab, since) == [("fail", "hung up during the challenge")]
    assert "CHALLENGE_FAILED" in lab.service.cli("check", n, "--withheld").stdout


def test_a_softphone_tester_passes_the_challenge_and_6001_rings(lab, work):
    """docs/softphone.md: dial 9<number> on 6002, press the digit, 6001 rings; again: no challenge."""
    n = lab.number()
    from_line = 'From: "Bob" <sip:6002@[local_ip]:[local_port]>'
    with lab.phone("6001") as phone:
        r = lab.from_phone("6002", sc.answered(work / "nine.xml", from_line=from_line, auth=True,
                                               after_answer=sc.challenge_round(1, "right"), hang_up_ms=2500), "9" + n.lstrip("+"))
        assert r.returncode == 0, r.explain()
        wait_for(phone.invites, 5, "6001 to ring after the pass")
    mark = lab.mark()
    with lab.phone("6001") as phone:
        r = lab.from_phone("6002", sc.answered(work / "nine-again.xml", from_line=from_line, auth=True, hang_up_ms=300),
                           "9" + n.lstrip("+"))
        assert r.returncode == 0, r.explain()
        wait_for(phone.invites, 5, "6001 to ring at once")
    d = lab.decision_for(n, mark)
    assert d["action"] == "allow" and any(h.startswith("LIST_ALLOWED") for h in d["rules"]), d

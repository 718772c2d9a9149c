"""AMI across an Asterisk restart, star codes from a registered phone, per-context and per-DID
policies, and the classic per-process launcher: each through the real Asterisk."""

from __future__ import annotations

import time

from . import scenarios as sc
from .dtmf import write_keys
from .pbx import SIPP_DIR, wait_for

ALICE = 'From: "Alice" <sip:6001@[local_ip]:[local_port]>'


def test_ami_reconnects_after_core_restart_now_and_the_mirror_goes_on(lab):
    mark = lab.pbx.log_size()
    t0 = time.monotonic()
    lab.pbx.restart_now()
    lab.wait_ami(mark, timeout=30)
    reconnect = time.monotonic() - t0
    assert reconnect < 10, reconnect
    n = lab.number()
    lab.service.cli("block", n)
    wait_for(lambda: n.lstrip("+") in lab.pbx.db_show("edgefilter-block"), 10, "the mirror after the restart")
    r = lab.call(SIPP_DIR / "uac_allowed.xml")  # and calls are screened on the restarted PBX
    assert r.returncode == 0, r.explain()


def _call_6001_from(lab, work, number: str, name: str) -> None:
    """An outside caller reaches 6001 (the phone answers); the caller hangs up."""
    with lab.phone("6001") as phone:
        r = lab.call(sc.answered(work / f"{name}.xml", hang_up_ms=300), number, service="6001")
        assert r.returncode == 0, r.explain()
        wait_for(phone.invites, 5, "6001 to ring")


def _star(lab, work, code: str) -> str:
    """6001 dials a star code; Asterisk answers, reads the number back, says thank you, hangs up."""
    mark = lab.pbx.log_size()
    r = lab.from_phone("6001", sc.answered(work / f"star{code.strip('*')}.xml", from_line=ALICE, auth=True), code, timeout=30)
    assert r.returncode == 0, r.explain()
    return lab.pbx.log_since(mark)


def test_star_codes_from_a_registered_phone_refuse_undo_block_and_report(lab, work):
    n = lab.number()
    _call_6001_from(lab, work, n, "first")
    log = _star(lab, work, "*60")
    assert "edgefilter: refuse -> ok " + n in log, log[-2000:]
    mark = lab.mark()
    r = lab.call(sc.answered(work / "refused-before.xml", hang_up_ms=300), n, service="6001")
    assert r.returncode == 0, r.explain()  # REFUSED_BEFORE: voicemail by default (answered)
    d = lab.decision_for(n, mark)
    assert d["action"] == "voicemail" and any(h.startswith("REFUSED_BEFORE") for h in d["rules"]), d

    log = _star(lab, work, "*69")
    assert "edgefilter: undo-last -> undone" in log, log[-2000:]
    m = lab.number()
    _call_6001_from(lab, work, m, "second")
    log = _star(lab, work, "*61")
    assert "edgefilter: block-last -> ok " + m in log, log[-2000:]
    assert m in lab.service.cli("list", "block").stdout
    r = lab.call(sc.refused(work / "blocked-now.xml", 403), m, service="6001")
    assert r.returncode == 0, r.explain()

    k = lab.number()
    _call_6001_from(lab, work, k, "third")
    log = _star(lab, work, "*621")
    assert "edgefilter: report-last -> ok " + k in log, log[-2000:]
    listed = [line for line in lab.service.cli("list", "block").stdout.splitlines() if k in line]
    assert listed and "marketing" in listed[0], listed


def test_star_0_during_the_call_refuses_the_caller_and_hangs_up(lab, work):
    """The called phone presses *0 mid-call (features-edgefilter.conf): the caller is refused,
    the call ends, and the caller's next call to that phone is REFUSED_BEFORE."""
    n = lab.number()
    # sip-tester's star and 0 files would not do: the 0's timestamp is older than the star's
    keys = '  <pause milliseconds="500"/>\n' + sc.play_audio(str(write_keys(work / "star0.pcap", "*0")))
    mark = lab.pbx.log_size()
    with lab.phone("6001", in_call=keys) as phone:
        r = lab.call(sc.answered(work / "star0.xml"), n, service="6001", timeout=30)  # Asterisk's BYE ends it
        assert r.returncode == 0, r.explain()
        assert phone.invites()
    log = lab.pbx.log_since(mark)
    assert "edgefilter: in-call refusal -> ok " + n in log, log[-3000:]
    mark = lab.mark()
    r = lab.call(sc.answered(work / "after-star0.xml", hang_up_ms=300), n, service="6001")
    assert r.returncode == 0, r.explain()
    d = lab.decision_for(n, mark)
    assert any(h.startswith("REFUSED_BEFORE") for h in d["rules"]), d


def test_a_star_code_with_no_caller_to_act_on_says_so(lab, work):
    with lab.phone("6002"):
        pass  # 6002 never received a call here
    mark = lab.pbx.log_size()
    r = lab.from_phone("6002", sc.answered(work / "nothing.xml", from_line='From: "Bob" <sip:6002@[local_ip]:[local_port]>',
                                           auth=True), "*60", timeout=30)
    assert r.returncode == 0, r.explain()
    assert "edgefilter: refuse -> nocaller" in lab.pbx.log_since(mark)


POLICY = """
[screen]
allowlist_only_action = "reject"
[policies.trunk-only]
match_context = ["from-trunk"]
allowlist_only = true
[policies.beijing-line]
match_did = ["+861065529988"]
allowlist_only = true
"""


def test_a_policy_matched_by_context_sees_the_inbound_context(lab, work):
    n = lab.number()
    with lab.configured(POLICY.replace('match_did = ["+861065529988"]\nallowlist_only = true\n', 'match_did = ["+861065529988"]\n')):
        mark = lab.mark()
        r = lab.call(sc.refused(work / "trunk.xml", 403), n, service="6001")  # from-loopback -> from-trunk
        assert r.returncode == 0, r.explain()
        d = lab.decision_for(n, mark)
        assert d["context"] == "from-trunk" and "trunk-only" in d["policy"] and d["action"] == "reject", d
        mark = lab.mark()
        r = lab.call(SIPP_DIR / "uac_allowed.xml", n)  # the 7000 line is in from-loopback: not that policy
        assert r.returncode == 0, r.explain()
        d = lab.decision_for(n, mark)
        assert d["context"] == "from-loopback" and "trunk-only" not in d["policy"], d


def test_a_policy_matched_by_did_applies_to_that_number_only(lab, work):
    n = lab.number()
    extra = POLICY.replace('match_context = ["from-trunk"]\nallowlist_only = true\n', 'match_context = ["nowhere"]\n')
    with lab.configured(extra):
        mark = lab.mark()
        r = lab.call(sc.refused(work / "did.xml", 403), n, service="861065529988")
        assert r.returncode == 0, r.explain()
        d = lab.decision_for(n, mark)
        assert "beijing-line" in d["policy"] and d["action"] == "reject", d
        mark = lab.mark()
        r = lab.call(SIPP_DIR / "uac_allowed.xml", n)
        assert r.returncode == 0, r.explain()
        assert "beijing-line" not in lab.decision_for(n, mark)["policy"]


def test_the_classic_launcher_screens_a_call(lab, work):
    blocked = lab.number()
    lab.service.cli("block", blocked)
    mark = lab.pbx.log_size()
    r = lab.call(sc.refused(work / "launcher-blocked.xml", 403), blocked, service="7200", timeout=30)
    assert r.returncode == 0, r.explain()
    assert "edgefilter-agi: AGISTATUS=SUCCESS action=reject" in lab.pbx.log_since(mark)
    r = lab.call(sc.answered(work / "launcher-allowed.xml", after_answer=sc.expect_message("edgefilter-connected"),
                             hang_up_ms=100), service="7200", timeout=30)
    assert r.returncode == 0, r.explain()
    assert "edgefilter-agi: AGISTATUS=SUCCESS action=allow" in lab.pbx.log_since(mark)

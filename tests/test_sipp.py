"""The sipp scenarios in asterisk-conf/sipp/: well-formed, in step with the dial plan, loadable by sipp.

No Asterisk runs here, so the scenarios are checked three ways: the XML parses and says what each
case expects (403 and never 200 for a rejection; the digit MESSAGE and one RFC 2833 pcap per digit
for the challenge); the texts they wait for are the ones the dial plan sends; and, when sipp
(Debian package sip-tester) is installed, sipp itself loads each scenario and sends the INVITE to
a port where nothing listens (a scenario sipp refuses never gets that far).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import phonenumbers
import pytest

ROOT = Path(__file__).resolve().parents[1]
SIPP = ROOT / "asterisk-conf" / "sipp"
DIALPLAN = (ROOT / "asterisk-conf" / "extensions-edgefilter.conf").read_text() + (
    ROOT / "asterisk-conf" / "extensions-example.conf"
).read_text()
SCENARIOS = ("uac_allowed", "uac_rejected", "uac_challenge_pass", "uac_challenge_fail")
CSVS = {
    "uac_allowed": "callers_allowed.csv",
    "uac_rejected": "callers_blocked.csv",
    "uac_challenge_pass": "callers_challenged.csv",
    "uac_challenge_fail": "callers_robots.csv",
}


def scenario(name: str) -> ET.Element:
    return ET.parse(SIPP / f"{name}.xml").getroot()


def responses(root: ET.Element) -> list[str]:
    return [r.get("response") for r in root.iter("recv") if r.get("response")]


def pcaps(root: ET.Element) -> list[str]:
    return [e.get("play_pcap_audio") for e in root.iter("exec") if e.get("play_pcap_audio")]


def test_every_scenario_is_well_formed_and_declares_its_variables():
    for name in SCENARIOS:
        root = scenario(name)
        assert root.tag == "scenario"
        assigned = {v for e in root.iter("ereg") for v in e.get("assign_to").split(",")}
        referenced = {v for r in root.iter("Reference") for v in r.get("variables").split(",")}
        assert assigned == referenced, name  # sipp refuses variables referenced only once


def test_rejected_expects_403_and_never_an_answer():
    root = scenario("uac_rejected")
    assert "403" in responses(root) and "200" not in responses(root)
    assert "180" not in responses(root)  # no ringing before a rejection


def test_allowed_expects_answer_then_connected_then_bye():
    root = scenario("uac_allowed")
    assert responses(root)[-1] == "200" and "403" not in responses(root)
    assert [r.get("request") for r in root.iter("recv") if r.get("request")] == ["MESSAGE", "BYE"]
    assert not pcaps(root)


def test_challenge_scenarios_match_what_the_dial_plan_sends():
    sent = re.findall(r"SendText\(([a-z-]+)", DIALPLAN)
    # (and the appeal's offer, recording start and reference: tests/asterisk/test_appeals.py reads them)
    assert set(sent) == {"edgefilter-challenge-digit", "edgefilter-connected", "edgefilter-appeal-offer",
                         "edgefilter-appeal-recording", "edgefilter-appeal-code"}
    assert "SendText(edgefilter-challenge-digit=${EDGEFILTER_CHALLENGE_DIGIT})" in DIALPLAN
    passed, failed = scenario("uac_challenge_pass"), scenario("uac_challenge_fail")
    regexps = [e.get("regexp") for e in passed.iter("ereg")]
    assert {f"edgefilter-challenge-digit={d}" for d in "123456789"} <= set(regexps)
    assert "edgefilter-connected" in regexps
    assert sorted(pcaps(passed)) == [f"/usr/share/sip-tester/dtmf_2833_{d}.pcap" for d in "123456789"]
    # the failing robot presses 0 then * (never challenge digits), once per attempt (retries = 1):
    # two different keys, as a replay of one RTP burst is dropped by Asterisk as a duplicate
    assert pcaps(failed) == ["/usr/share/sip-tester/dtmf_2833_0.pcap", "/usr/share/sip-tester/dtmf_2833_star.pcap"]
    assert "edgefilter-connected" not in [e.get("regexp") for e in failed.iter("ereg")]
    for root in (passed, failed):  # withheld presentation with a trusted identity
        invite = next(root.iter("send")).text
        assert "Privacy: id" in invite and "P-Asserted-Identity:" in invite
        assert "telephone-event/8000" in invite  # RFC 2833 negotiated, payload type 101 like the pcaps


def test_injection_files_hold_valid_numbers():
    for _name, csv in CSVS.items():
        lines = (SIPP / csv).read_text().splitlines()
        assert lines[0] == "SEQUENTIAL", csv
        for row in lines[1:]:
            number, caller_name, rest = row.split(";")
            assert rest == "" and caller_name
            assert phonenumbers.is_valid_number(phonenumbers.parse(number)), (csv, number)
            assert number not in ("6001", "6002")  # softphone users are identified by name first


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", SCENARIOS)
def test_sipp_loads_the_scenario_and_sends_the_invite(name):
    sipp = shutil.which("sipp")
    if sipp is None:
        pytest.skip("sipp not installed (apt-get install sip-tester)")
    nobody = _free_udp_port()  # nothing listens there: the call fails, the scenario was accepted
    r = subprocess.run(
        [sipp, "-sf", str(SIPP / f"{name}.xml"), "-inf", str(SIPP / CSVS[name]), "-s", "7000", "-m", "1",
         "-max_invite_retrans", "1", "-recv_timeout", "500", "-timeout", "5s", "-p", str(_free_udp_port()),
         "-nostdin", f"127.0.0.1:{nobody}"],
        capture_output=True, text=True, timeout=30,
    )
    out = r.stdout + r.stderr
    assert "referenced" not in out and "Assertion" not in out and "rror" not in out.replace("UDP errors", ""), out[-2000:]
    assert re.search(r"INVITE ---------->\s+1\b", out), out[-2000:]
    assert r.returncode == 1  # the one call failed: nobody answered

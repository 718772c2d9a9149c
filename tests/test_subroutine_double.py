"""The double speaks the shipped subroutine's FastAGI exactly as the real Asterisk 22 does.

tests/data/asterisk/subroutine-*.txt were recorded from Asterisk 22.10.1 through the shipped
extensions-edgefilter.conf (tests/asterisk/ runs the same calls end to end). The double's
``subroutine_call`` must produce the same env block, line for line, but for the values that
differ per call (uniqueid, linkedid, thread id, channel name, port), and the service must
decide the recorded streams the way the real-Asterisk tests see it decide them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgefilter.asterisk.callsim import CallSpec, build_env, load_transcript, place_call, subroutine_call, transcript_env

DATA = Path(__file__).with_name("data") / "asterisk"
VOLATILE = {"agi_uniqueid", "agi_request", "agi_channel", "agi_threadid"}


def _lines(env: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in env.split(b"\n")[:-2]:
        key, sep, value = line.partition(b": ")
        if key.decode(errors="replace") in VOLATILE:
            value = b"*"
        out.append((key, re.sub(rb"^linkedid=.*", b"linkedid=*", value) if sep else line))
    return out


CASES = {
    "subroutine-allow.txt": dict(callerid=b"+8613900139000", calleridname=b"Friend", exten=b"7000", vmbox=b"6001@default",
                                 inbound_context=b"from-loopback", dnid=b"7000"),
    "subroutine-anonymous.txt": dict(callerid=b"anonymous", calleridname=b"Anonymous", exten=b"6001", dnid=b"6001"),
    "subroutine-forged-lf.txt": dict(callerid=b"8617012345678\nagi_arg_5", calleridname=b"Forger", exten=b"6001", dnid=b"6001"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_double_sends_what_asterisk_sent_through_the_subroutine(name):
    real = transcript_env(load_transcript(DATA / name))
    double = build_env(subroutine_call(**CASES[name]))
    assert _lines(double) == _lines(real)


@pytest.mark.parametrize("name,action,rules", [
    ("subroutine-allow.txt", "allow", ""),
    ("subroutine-anonymous.txt", "challenge", "CLI_WITHHELD"),
    ("subroutine-forged-lf.txt", "reject", "CLI_FORGED"),  # 8617012345678 in front of the LF: valid
])
async def test_the_service_decides_the_recorded_streams(service, name, action, rules):
    r = await place_call("127.0.0.1", service.port, CallSpec(raw_env=transcript_env(load_transcript(DATA / name))), timeout=3.0)
    assert r.variables["EDGEFILTER_ACTION"] == action, r.variables
    assert r.variables["EDGEFILTER_RULES"] == rules, r.variables


async def test_context_and_voicemail_box_come_from_the_subroutine_arguments(service):
    r = await place_call("127.0.0.1", service.port, subroutine_call(b"hello world", exten=b"6001", vmbox=b"6002@default",
                                                                 inbound_context=b"from-trunk"), timeout=3.0)
    assert r.variables["EDGEFILTER_ACTION"] == "voicemail"
    assert r.variables["EDGEFILTER_VOICEMAIL_BOX"] == "6002@default"

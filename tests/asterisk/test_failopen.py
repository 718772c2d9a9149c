"""Fail open on the real Asterisk: the service stopped, or wedged (accepting, never answering).

Fault 3 of issue 15: res_agi waits for a FastAGI server with no timeout, and after a hang-up goes
on waiting unless AGIEXITONHANGUP is true, so a wedged service held calls forever. The shipped
subroutine now sets TIMEOUT(absolute) for the wait (its T extension fails open) and
AGIEXITONHANGUP=yes. A SIGSTOPped service is the wedge: the kernel still accepts on its socket.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from . import scenarios as sc
from .pbx import SIPP_DIR, wait_for

WAIT = 2.0  # EDGEFILTER_WAIT's default in extensions-edgefilter.conf


def _mirrored(lab, number: str) -> None:
    key = number.lstrip("+")
    wait_for(lambda: key in lab.pbx.db_show("edgefilter-block"), 10, f"{key} in AstDB edgefilter-block")


@pytest.fixture
def stopped(lab):
    """The service stopped (connection refused: AGISTATUS=FAILURE), started again after."""
    lab.service.stop()
    try:
        yield
    finally:
        mark = lab.pbx.log_size()
        lab.service.start()
        lab.wait_ami(mark)


@pytest.fixture
def wedged(lab):
    """The service stopped with SIGSTOP: connections are accepted and never answered."""
    lab.service.pause()
    try:
        yield
    finally:
        lab.service.resume()


def test_service_stopped_calls_ring_and_mirrored_hard_blocks_are_still_refused(lab, work):
    blocked = lab.number()
    lab.service.cli("block", blocked)
    _mirrored(lab, blocked)
    lab.service.stop()
    try:
        mark = lab.pbx.log_size()
        r = lab.call(SIPP_DIR / "uac_allowed.xml")
        assert r.returncode == 0, r.explain()
        assert "AGISTATUS=FAILURE" in lab.pbx.log_since(mark)
        r = lab.call(sc.refused(work / "mirrored.xml", 403), blocked)
        assert r.returncode == 0, r.explain()
        assert "mirrored hard block" in lab.pbx.log_since(mark)
        # a national-format caller ID finds the same mirrored block (EDGEFILTER_COUNTRY_CODE=86)
        r = lab.call(sc.refused(work / "mirrored-national.xml", 403), "0" + blocked[3:])
        assert r.returncode == 0, r.explain()
        # a forged caller ID is refused even with nobody to judge it
        r = lab.call(sc.refused(work / "forged-down.xml", 403,
                                from_line='From: "x" <sip:8613800138000%0Aagi_arg_1:%20y@[local_ip]:[local_port]>'))
        assert r.returncode == 0, r.explain()
    finally:
        mark = lab.pbx.log_size()
        lab.service.start()
        lab.wait_ami(mark)


def test_a_wedged_service_holds_a_call_at_most_the_wait_then_it_rings(lab, wedged):
    mark = lab.pbx.log_size()
    r = lab.call(SIPP_DIR / "uac_allowed.xml")
    assert r.returncode == 0, r.explain()
    log = lab.pbx.log_since(mark)
    assert "no answer within 2 s: failing open" in log, log[-3000:]
    # INVITE -> 200 OK: the wait plus Asterisk's own set-up (the 7000 line answers at once)
    answered = _invite_to_200(r.messages)
    assert WAIT - 0.1 <= answered <= WAIT + 1.0, answered


def test_a_wedged_service_does_not_let_a_mirrored_hard_block_ring(lab, work):
    blocked = lab.number()
    lab.service.cli("block", blocked)
    _mirrored(lab, blocked)
    lab.service.pause()
    try:
        r = lab.call(sc.refused(work / "wedged-mirrored.xml", 403), blocked)
    finally:
        lab.service.resume()
    assert r.returncode == 0, r.explain()


def test_a_caller_who_gives_up_during_a_wedge_leaves_no_channel_behind(lab, work, wedged):
    mark = lab.pbx.log_size()
    r = lab.call(sc.cancelled(work / "cancel.xml", after_ms=1000))
    assert r.returncode == 0, r.explain()
    assert r.responses()[-1] == 487
    # AGIEXITONHANGUP: the AGI ends with the caller, at once, not when the socket closes
    wait_for(lambda: not lab.pbx.channels(), 1.0, "the cancelled channel to go")
    log = lab.pbx.log_since(mark)
    assert "failing open" not in log and "Answer(" not in log.split("AGI(")[-1], log[-2000:]


def test_a_listener_that_accepts_and_never_answers_is_bounded_too(lab, work):
    """Not our process at all: something else holds the port (the issue's exact set-up)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    held = []

    def accept_and_hold():
        try:
            for _ in range(4):
                held.append(ls.accept())
        except OSError:  # closed at the end of the test
            pass

    threading.Thread(target=accept_and_hold, daemon=True).start()
    port = ls.getsockname()[1]
    lab.pbx.rx(f"dialplan set global EDGEFILTER_SERVICE 127.0.0.1:{port}")
    try:
        t0 = time.monotonic()
        r = lab.call(SIPP_DIR / "uac_allowed.xml")
        assert r.returncode == 0, r.explain()
        assert held, "the listener never got the connection"
        assert _invite_to_200(r.messages) <= WAIT + 1.0
        assert time.monotonic() - t0 < 15
    finally:
        lab.pbx.rx(f"dialplan set global EDGEFILTER_SERVICE 127.0.0.1:{lab.service.port}")
        ls.close()
        for c, _ in held:
            c.close()


def _invite_to_200(trace: str) -> float:
    """Seconds from the INVITE sipp sent to the 200 OK it received, from the trace's timestamps."""
    import re
    from datetime import datetime

    stamps = re.findall(r"^-{20,} (\S+ \S+)\n(UDP message (?:sent|received)[^\n]*)\n\n([^\n]*)", trace, re.M)
    t_inv = t_ok = None
    for stamp, kind, first in stamps:
        ts = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        if t_inv is None and "sent" in kind and first.startswith("INVITE "):
            t_inv = ts
        if t_ok is None and "received" in kind and first.startswith("SIP/2.0 200"):
            t_ok = ts
    assert t_inv is not None and t_ok is not None, trace[:2000]
    return t_ok - t_inv


def _bye_after_answer(trace: str) -> float:
    """Seconds from the 200 OK sipp received to Asterisk's BYE."""
    import re
    from datetime import datetime

    t_ok = t_bye = None
    for stamp, kind, first in re.findall(r"^-{20,} (\S+ \S+)\n(UDP message (?:sent|received)[^\n]*)\n\n([^\n]*)", trace, re.M):
        ts = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        if "received" in kind and first.startswith("SIP/2.0 200") and t_ok is None:
            t_ok = ts
        if "received" in kind and first.startswith("BYE ") and t_bye is None:
            t_bye = ts
    assert t_ok is not None and t_bye is not None, trace[:2000]
    return t_bye - t_ok


def test_the_wait_never_cuts_an_allowed_call(lab, work):
    """The service's answer clears TIMEOUT(absolute) in the same MSet: a call that rings on
    lasts as long as it lasts (3 s here, longer than the 2 s wait)."""
    mark = lab.pbx.log_size()
    r = lab.call(sc.answered(work / "long.xml"), service="7300")
    assert r.returncode == 0, r.explain()
    assert 2.9 <= _bye_after_answer(r.messages) <= 4.0
    log = lab.pbx.log_since(mark)
    assert "Channel hangup cancelled" in log and "cleared,1" not in log.replace("Goto (edgefilter-screen,cleared", "")


def test_an_older_service_that_leaves_the_wait_armed_does_not_cut_the_call(lab, work):
    """A FastAGI server that answers the verdict but not TIMEOUT(absolute)=0 (an edgefilter from
    before this dial plan, or another screening service): the subroutine clears the wait itself."""
    import socket as _socket

    ls = _socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)

    def old_service():
        c, _ = ls.accept()
        with c:
            buf = b""
            while b"\n\n" not in buf:
                buf += c.recv(4096)
            c.sendall(b'EXEC MSet "EDGEFILTER_ACTION=allow,EDGEFILTER_SCORE=0,EDGEFILTER_RULES=,EDGEFILTER_POLICY=default"\n')
            c.recv(4096)

    t = threading.Thread(target=old_service, daemon=True)
    t.start()
    lab.pbx.rx(f"dialplan set global EDGEFILTER_SERVICE 127.0.0.1:{ls.getsockname()[1]}")
    try:
        mark = lab.pbx.log_size()
        r = lab.call(sc.answered(work / "long-old.xml"), service="7300")
    finally:
        lab.pbx.rx(f"dialplan set global EDGEFILTER_SERVICE 127.0.0.1:{lab.service.port}")
        ls.close()
    assert r.returncode == 0, r.explain()
    assert 2.9 <= _bye_after_answer(r.messages) <= 4.0
    assert "Goto (edgefilter-screen,cleared,1)" in lab.pbx.log_since(mark)

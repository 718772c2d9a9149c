"""Appeals through the real Asterisk (issue 17): the prompt, the digit (RFC 2833), the recording
reaching the spool with audio, the reference code spoken (SayDigits) and stored, the cooldown
refusing a second appeal, `edgefilter appeals grant` letting the next call ring; a robot that
presses nothing gets the goodbye and no appeal; --no-appeal entries and forged caller IDs get
the plain refusal."""

from __future__ import annotations

import array
import re
import sqlite3
import time

from . import scenarios as sc
from .pbx import wait_for

G711A = "/usr/share/sip-tester/g711a.pcap"  # 7 s of speech (PCMA): what the caller says
MAX_SECONDS = 5  # the lab's [appeal] max_seconds: Record() stops the 7 s of speech after 5


def _config(lab, **extra) -> str:
    spool = lab.pbx.spool / "edgefilter-appeals"
    lines = ["[appeal]", "enabled = true", 'timeout = "2s"', f"max_seconds = {MAX_SECONDS}", f'recordings_dir = "{spool}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _appealing_caller(path, digit: str = "1"):
    """Hears the offer (the test line's MESSAGE), presses the digit, speaks once the recording
    starts, and is told the reference code; Asterisk hangs up."""
    after = (sc.expect_message(f"edgefilter-appeal-offer={digit}")
             + sc.play_audio(sc.DTMF.format(digit))
             + sc.expect_message("edgefilter-appeal-recording")
             + sc.play_audio(G711A)
             + sc.expect_message("edgefilter-appeal-code=[0-9]{6}"))
    return sc.answered(path, after_answer=after)


def _code(r) -> str:
    for m in r.requests("MESSAGE"):
        found = re.search(r"edgefilter-appeal-code=([0-9]{6})", m)
        if found:
            return found.group(1)
    raise AssertionError("no reference code reached the caller")


def _appeals(lab, number: str) -> list[tuple]:
    with sqlite3.connect(lab.service.db) as con:
        return con.execute("SELECT code, key, status, recording, recording_bytes, entry_source, rules FROM appeals "
                           "WHERE caller_e164 = ?", (number,)).fetchall()


def test_a_blocked_caller_appeals_and_once_granted_the_next_call_rings(lab, work):
    n = lab.number()
    lab.service.cli("block", n, "--source", "feed-x")
    with lab.configured(_config(lab)):
        mark = lab.pbx.log_size()
        t0 = time.monotonic()
        r = lab.call(_appealing_caller(work / "appeal.xml"), n)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.explain()
        code = _code(r)
        log = lab.pbx.log_since(mark)
        # the prompt was played, the reference spoken digit by digit
        assert "Playing 'edgefilter/appeal-offer" in log and "Playing 'edgefilter/appeal-reference" in log, log[-3000:]
        assert re.search(rf'SayDigits\("[^"]+", "{code}"\)', log), log[-3000:]
        assert [f"Playing 'digits/{d}" in log for d in set(code)] == [True] * len(set(code))
        # stored, with the decision appealed and the recording Asterisk wrote into its spool
        rows = wait_for(lambda: _appeals(lab, n), 5, "the appeal row")
        (stored, key, status, recording, size, source, rules), = rows
        assert (stored, status, source) == (code, "pending", "feed-x") and rules.startswith("LIST_BLOCKED")
        wav = lab.pbx.spool / "edgefilter-appeals" / f"{key}.wav"
        assert recording == str(wav) and wav.stat().st_size == size
        audio = array.array("h", wav.read_bytes()[44:])  # 16-bit linear, 8 kHz
        assert 3 * 8000 <= len(audio) <= (MAX_SECONDS + 1) * 8000  # speech, bounded by max_seconds
        assert max(map(abs, audio)) > 4000 and sum(map(abs, audio)) / len(audio) > 200  # speech, not silence
        out = lab.service.cli("appeals").stdout
        assert code in out and n in out and "source feed-x" in out and str(wav) in out, out
        print(f"\nappeal flow on the real Asterisk: {took:.1f} s from INVITE to BYE; recording {size} bytes "
              f"({(size - 44) / 16000:.1f} s)")
        # a second appeal within the cooldown: the plain refusal, no prompt
        r = lab.call(sc.refused(work / "again.xml", 403), n)
        assert r.returncode == 0, r.explain()
        # granted: an allow entry (source appeal) overriding the feed's block; the next call rings
        out = lab.service.cli("appeals", "grant", code, "--for", "7d").stdout
        assert f"allow {n}" in out and "source appeal" in out and f"overrides block entry {n} (source feed-x)" in out, out
        time.sleep(0.3)  # the service's poll_interval is 50 ms
        mark = lab.mark()
        r = lab.call(sc.answered(work / "rings.xml", after_answer=sc.expect_message("edgefilter-connected")), n)
        assert r.returncode == 0, r.explain()
        d = lab.decision_for(n, mark)
        assert d["action"] == "allow" and any(h.startswith("LIST_ALLOWED") for h in d["rules"]), d
        assert _appeals(lab, n)[0][2] == "granted"


def test_a_robot_that_presses_nothing_hears_goodbye_and_leaves_no_appeal(lab, work):
    n = lab.number()
    lab.service.cli("block", n)
    with lab.configured(_config(lab)):
        since = len(lab.service.log_text())
        r = lab.call(sc.answered(work / "robot.xml", after_answer=sc.expect_message("edgefilter-appeal-offer=1")), n)
        assert r.returncode == 0, r.explain()
        assert r.requests("BYE") and not any("edgefilter-appeal-recording" in m for m in r.requests("MESSAGE"))
        wait_for(lambda: f"appeal offer to {n} declined: silence" in lab.service.log_text()[since:], 5, "the declined offer")
        assert _appeals(lab, n) == []


def test_no_appeal_entries_and_forged_caller_ids_get_the_plain_refusal(lab, work):
    hard, forged = lab.number(), lab.number()
    lab.service.cli("block", hard, "--no-appeal")
    lab.service.cli("block", forged)
    with lab.configured(_config(lab)):
        time.sleep(0.3)
        for number, from_line in ((hard, None), (forged, f'From: "x" <sip:{forged.lstrip("+")}%0Aagi_arg_5:%20x@[local_ip]:[local_port]>')):
            kw = {"from_line": from_line} if from_line else {}
            r = lab.call(sc.refused(work / f"plain-{number[-4:]}.xml", 403, **kw), number)
            assert r.returncode == 0, r.explain()  # 403 and nothing else: never answered for a prompt
        assert _appeals(lab, hard) == [] and _appeals(lab, forged) == []

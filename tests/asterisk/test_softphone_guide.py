"""docs/softphone.md, followed literally on the real Asterisk: its commands, its table, its claims.

Fault 7 of issue 15: the guide assumed an empty pjsip.conf and manager.conf, never said AMI was
off, ran sipp from a directory where the CLI found no database, and bound the transport to every
address. Here section 2's shell commands run as written (with /etc/asterisk pointing at a private
directory) on a box that already has its own config, and the resulting Asterisk must boot with
both the box's and edgefilter's parts; section 3's commands run as written; every row of the
section 5 table is called from 6002 as a softphone would; sections 6 and 7 likewise.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from . import scenarios as sc
from .pbx import REPO, Asterisk, free_port, wait_for

GUIDE = REPO / "docs" / "softphone.md"
BOB = 'From: "Bob" <sip:6002@[local_ip]:[local_port]>'


def section(n: int) -> str:
    text = GUIDE.read_text()
    m = re.search(rf"^## {n}\. .*?(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no section {n} in {GUIDE}"
    return m.group(0)


def shell_lines(text: str) -> list[str]:
    """The commands of the ```sh blocks of a section, continuation lines joined."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        out += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return out


def table_rows(text: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows[1:] if not set(r[0]) <= set("- ")]


def kv(d: dict) -> str:
    """The decision as the service's key=value line prints it (the format the guide quotes)."""
    return f"action={d['action']} score={d['score']} policy={d['policy']} rules={','.join(d['rules'])}"


def logged(claim: str, line: str) -> bool:
    """Each `...`-separated piece of a quoted log claim appears in the line, in order."""
    pos = 0
    for piece in (p.strip() for p in claim.split("...")):
        i = line.find(piece, pos)
        if i < 0:
            return False
        pos = i + len(piece)
    return True


# ------------------------------------------------------------------------------ section 2
BOX_PJSIP = """; the box's own PJSIP set-up
[global]
type = global
user_agent = somebodys-pbx

[lan]
type = transport
protocol = udp
bind = 127.0.0.1:{port}
"""
BOX_MANAGER = """[general]
enabled = yes
port = {port}
bindaddr = 127.0.0.1

[admin]
secret = the-admins-own
read = all
write = all
"""


def _run_section2(etc: Path, *, existing_transport: bool) -> list[str]:
    """Section 2's shell commands, run as written with /etc/asterisk -> ``etc``; then the edits
    it describes in prose (the [global] line, the applicationmap line)."""
    ran = []
    for line in shell_lines(section(2)):
        if line.startswith("asterisk "):
            continue  # run against the instance below
        if "pjsip-edgefilter-transport.conf" in line and line.startswith("echo") and existing_transport:
            continue  # the guide: only when there is no transport yet
        cmd = line.replace("/etc/asterisk", str(etc))
        r = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stderr)
        ran.append(line)
    if existing_transport:
        text = section(2)
        line = re.search(r"```ini\n\s*(endpoint_identifier_order = [^\n]+)\n\s*```", text).group(1)
        conf = (etc / "pjsip.conf").read_text()
        (etc / "pjsip.conf").write_text(conf.replace("type = global\n", f"type = global\n{line}\n", 1))
    feature = next(ln for ln in (etc / "features-edgefilter.conf").read_text().splitlines() if ln.startswith("edgefilter-refuse"))
    features = (etc / "features.conf").read_text()
    (etc / "features.conf").write_text(features.replace("[applicationmap]\n", f"[applicationmap]\n{feature}\n", 1))
    return ran


@pytest.mark.parametrize("existing_transport", [True, False], ids=["box-with-pjsip-config", "empty-pjsip-conf"])
def test_section2_followed_literally_boots_with_the_boxs_config_and_ours(lab, tmp_path, existing_transport):
    install = lab.install
    pbx = Asterisk(install, tmp_path / "box", service_port=lab.service.port)
    pbx.configure()  # a private instance's directories; its etc is then rebuilt as the box had it
    etc = pbx.etc
    for name in ("pjsip.conf", "manager.conf", "extensions.conf", "voicemail.conf", "features.conf"):
        (etc / name).unlink()
    for f in etc.glob("*edgefilter*"):
        f.unlink()
    if existing_transport:
        (etc / "pjsip.conf").write_text(BOX_PJSIP.format(port=pbx.ports.sip))
    else:
        (etc / "pjsip.conf").write_text("; empty, as after `make samples` and clearing it\n")
    (etc / "manager.conf").write_text(BOX_MANAGER.format(port=pbx.ports.ami))
    shutil.copy(install.samples / "voicemail.conf", etc / "voicemail.conf")
    shutil.copy(install.samples / "features.conf", etc / "features.conf")
    (etc / "extensions.conf").write_text("[general]\n[default]\n")
    ran = _run_section2(etc, existing_transport=existing_transport)
    assert any(ln.startswith("cp ") for ln in ran) and any("manager-edgefilter.conf" in ln for ln in ran)
    if not existing_transport:
        # our transport binds 127.0.0.1:5060; another test box may hold 5060 here: move it
        t = etc / "pjsip-edgefilter-transport.conf"
        assert "bind = 127.0.0.1:5060" in t.read_text()
        t.write_text(t.read_text().replace("127.0.0.1:5060", f"127.0.0.1:{pbx.ports.sip}"))
    pbx.start()
    try:
        endpoints = pbx.rx("pjsip show endpoints")
        for name in ("6001", "6002", "loopback"):
            assert re.search(rf"Endpoint:\s+{name}\b", endpoints), endpoints
        transports = pbx.rx("pjsip show transports")
        assert ("lan" in transports) == existing_transport and ("edgefilter-udp" in transports) != existing_transport
        assert "0.0.0.0" not in transports
        glob = pbx.rx("pjsip show settings")
        assert "username,ip,anonymous" in glob
        if existing_transport:
            assert "somebodys-pbx" in glob  # the box's own [global] stayed in force
        users = pbx.rx("manager show users")
        assert "admin" in users and "edgefilter" in users
        assert "call,system,reporting" in re.sub(r"\s+", "", pbx.rx("manager show user edgefilter")).replace("read:", "read:")\
            or "call" in pbx.rx("manager show user edgefilter"), pbx.rx("manager show user edgefilter")
        plan = pbx.rx("dialplan show edgefilter-screen") + pbx.rx("dialplan show edgefilter-starcodes")
        assert "AGI(agi://" in plan and "*60" in plan
        assert "edgefilter-refuse" in pbx.rx("features show")
        assert "6001" in pbx.rx("voicemail show users")
        # what a bad merge looks like: a second global, a transport that cannot bind, an object
        # pjsip refuses, an include that does not load
        bad = re.compile(r"(ERROR|WARNING)\[.*(global|[Tt]ransport|edgefilter|pjsip\.conf|manager\.conf|features\.conf"
                         r"|extensions\.conf|voicemail\.conf|Could not create|Error loading)")
        warnings = [ln for ln in pbx.log_since(0).splitlines() if bad.search(ln)]
        assert not warnings, warnings
    finally:
        pbx.stop()


# ------------------------------------------------------------------------------ section 3
def test_section3_commands_run_as_written(lab, tmp_path):
    lines = shell_lines(section(3))
    setup = [ln for ln in lines if ln.startswith(("install ", "printf "))]
    assert len(setup) == 2
    for line in setup:  # the secret file and edgefilter.toml, in a scratch checkout directory
        r = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, executable="/bin/bash")
        assert r.returncode == 0, (line, r.stderr)
    assert oct((tmp_path / "ami.secret").stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "ami.secret").read_text().strip() == "change-me-ami"
    r = subprocess.run([sys.executable, "-m", "edgefilter", "config", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr  # ./edgefilter.toml found, AMI on with the secret file
    dump = subprocess.run([sys.executable, "-m", "edgefilter", "config", "dump"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert re.search(r"\[ami\][^\[]*enabled = true", dump), dump


def _guide_cli(lab, line: str) -> subprocess.CompletedProcess:
    """A `.venv/bin/edgefilter ...` line of the guide, run as written against the lab's service
    (EDGEFILTER_CONFIG: what ./edgefilter.toml is for a user in the checkout)."""
    args = shlex.split(line.split("#")[0])
    assert args[0] == ".venv/bin/edgefilter"
    r = subprocess.run([sys.executable, "-m", "edgefilter", *args[1:]], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "EDGEFILTER_CONFIG": str(lab.service.config)})
    assert r.returncode == 0, (line, r.stdout, r.stderr)
    return r


# --------------------------------------------------------------------- sections 5, 6, 7
def test_sections_5_to_7_on_a_new_users_box(lab, work):
    """The guide top to bottom on an empty database: section 3's blocks, every row of section 5,
    the checks after it, section 6, section 7's sipp commands."""
    lab.reset_service()
    for line in shell_lines(section(3)):
        if line.startswith(".venv/bin/edgefilter block"):
            _guide_cli(lab, line)

    rows = table_rows(section(5))
    assert [r[0] for r in rows] == ["`6001`", "`88613900139000`", "`88617012345678`", "`88613600136000`",
                                    "`88613300133000`", "`8`", "`98613500135100`", "`98613500135199`, press 0 then *"]
    for row in rows:
        dialled = re.match(r"`([^`]+)`", row[0]).group(1)
        claims = re.findall(r"`([^`]+)`", row[3])
        _row(lab, work, dialled, row, claims)

    # the checks after the table
    after = section(5).split("|")[-1]
    check = re.search(r"`(\.venv/bin/edgefilter check [^`]+)`", after).group(1)
    out = " ".join(_guide_cli(lab, check).stdout.split())
    claim = re.search(r"shows\s+`([^`]+)`", after).group(1)
    assert claim == "CHALLENGE_FAILED +4.00" and claim in out and "action: voicemail" in out, out
    listed = _guide_cli(lab, ".venv/bin/edgefilter list allow").stdout
    assert re.search(r"\+8613500135100.*challenge", listed), listed

    # section 6: stopped, the mirror refuses the spammer and lets the friend ring; then wedged
    text6 = section(6)
    assert "/edgefilter-block/8617012345678 : block" in text6
    wait_for(lambda: lab.pbx.db_show("edgefilter-block").get("8617012345678") == "block", 10, "the mirror of the spammer")
    lab.service.stop()
    try:
        with lab.phone("6001") as phone:
            _dial(lab, work, "88613900139000", "down-friend", expect="ring", phone=phone)
        _dial(lab, work, "88617012345678", "down-spammer", expect=403)
    finally:
        mark = lab.pbx.log_size()
        lab.service.start()
        lab.wait_ami(mark)
    lab.service.pause()
    try:
        mark = lab.pbx.log_size()
        with lab.phone("6001") as phone:
            _dial(lab, work, "88613900139000", "wedged-friend", expect="ring", phone=phone, hang_up_ms=300)
        assert "no answer within 2 s: failing open" in lab.pbx.log_since(mark) and "no answer within 2 s: failing open" in text6
    finally:
        lab.service.resume()

    # section 7: the sipp commands as written, from the checkout; only the PBX's address and
    # sipp's own port differ (another test box may hold 5060/5070 here)
    for line in shell_lines(section(7)):
        if not line.startswith("sipp "):
            continue
        args = shlex.split(line)
        assert args[-1] == "127.0.0.1:5060" and "-i" in args and args[args.index("-p") + 1] == "5070"
        args[-1] = lab.target
        args[args.index("-p") + 1] = str(free_port(socket.SOCK_DGRAM))
        r = subprocess.run(args + ["-nostdin", "-timeout", "60s", "-timeout_error"], cwd=REPO, capture_output=True, text=True,
                           timeout=90)
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-1000:])


def _dial(lab, work, dialled: str, name: str, *, expect, phone=None, after_answer: str = "", hang_up_ms: int = 500):
    """6002 dials; ``expect`` is a SIP code (refused), "ring" (6001 answers) or "answer" (Asterisk does)."""
    if isinstance(expect, int):
        scenario = sc.refused(work / f"{name}.xml", expect, from_line=BOB, auth=True)
    else:
        scenario = sc.answered(work / f"{name}.xml", from_line=BOB, auth=True, after_answer=after_answer, hang_up_ms=hang_up_ms)
    before = len(phone.invites()) if phone is not None else 0
    r = lab.from_phone("6002", scenario, dialled)
    assert r.returncode == 0, (dialled, r.explain())
    if expect == "ring":
        wait_for(lambda: len(phone.invites()) > before, 5, f"6001 to ring for {dialled}")
    return r


def _row(lab, work, dialled: str, row: list[str], claims: list[str]) -> None:
    mark = lab.mark()
    since = len(lab.service.log_text())
    what = row[2]
    with lab.phone("6001") as phone:
        if dialled == "6001":
            _dial(lab, work, dialled, "row-colleague", expect="ring", phone=phone)
            assert lab.mark() == mark and row[3] == "nothing"
            return
        if "403 Forbidden" in what:
            _dial(lab, work, dialled, f"row-{dialled}", expect=403)
            assert not phone.invites(), "6001 rang for a refused call"
        elif "voicemail greeting" in what:
            inbox = lab.pbx.spool / "voicemail" / "default" / "6001" / "INBOX"
            before = set(inbox.glob("msg*.txt")) if inbox.exists() else set()
            speech = '  <pause milliseconds="14500"/>\n' + sc.play_audio("/usr/share/sip-tester/g711a.pcap", then_ms=7200)
            _dial(lab, work, dialled, f"row-{dialled}", expect="answer", after_answer=speech)
            assert not phone.invites()
            wait_for(lambda: set(inbox.glob("msg*.txt")) - before, 10, "the message in 6001's voicemail")
        elif "press 0 then *" in row[0]:
            _dial(lab, work, dialled, f"row-{dialled}", expect="answer", hang_up_ms=None,
                  after_answer=sc.challenge_round(1, "0") + sc.challenge_round(2, "star"))
            assert not phone.invites()
        elif "press" in what:
            _dial(lab, work, dialled, f"row-{dialled}", expect="ring", phone=phone, hang_up_ms=2500,
                  after_answer=sc.challenge_round(1, "right"))
            if "call again" in what:
                _dial(lab, work, dialled, f"row-{dialled}-again", expect="ring", phone=phone)
        else:
            _dial(lab, work, dialled, f"row-{dialled}", expect="ring", phone=phone)
            if "display" in what:
                shown = re.search(r"display \*\*`([^`]+)`\*\*", what).group(1)
                assert re.search(rf'^From: "{re.escape(shown)}" <sip:', phone.invites()[-1], re.M), phone.invites()[-1]
    lab.service.wait_decision(mark)  # the line is written just after the call's close
    decisions = lab.service.decisions()[mark:]
    lines = [kv(d) for d in decisions]
    log = lab.service.log_text()[since:]
    for claim in claims:
        if claim.startswith("challenge result="):
            assert claim in log, (dialled, claim, log[-1500:])
        else:  # the last call of the row says it ("then ..." for the second call)
            assert logged(claim, lines[-1]) or logged(claim, lines[0]), (dialled, claim, lines)

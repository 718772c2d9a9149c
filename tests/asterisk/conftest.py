"""The real-Asterisk lab: one private Asterisk 22 and one `edgefilter serve` for the whole run.

Asterisk gets the project's asterisk-conf/ files installed as docs/softphone.md tells users (on a
box that already has its own transport, [global] and manager account), plus one test-only
context appended to from-loopback. The service runs as a real process with AMI on (the mirror
of hard blocks) and JSON decision lines, which the tests read. sipp is the caller and plays the
softphones. Tests use fresh caller numbers (``lab.number()``) so that the behaviour rules,
which remember every call, do not couple them.

Without an Asterisk or sipp the tests skip, saying how to enable them; with
EDGEFILTER_REQUIRE_ASTERISK=1 (set by .ci/run) they fail instead: CI must never skip them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from . import scenarios as sc
from .pbx import (
    AMI_SECRET,
    PHONE_PASSWORDS,
    REPO,
    Asterisk,
    Service,
    Sipp,
    SippResult,
    Unavailable,
    csv_file,
    find_install,
    free_port,
    trace_messages,
    wait_for,
)

REQUIRED = os.environ.get("EDGEFILTER_REQUIRE_ASTERISK") == "1"

#: Test-only extensions, appended to the shipped from-loopback context ("[from-loopback](+)"):
#: the bare AGI() a user may write instead of the subroutine, and the classic launcher.
TEST_DIALPLAN = f"""

; ---- edgefilter tests only (tests/asterisk/conftest.py): appended to from-loopback
[from-loopback](+)
; 7100: a raw AGI() with the caller ID untouched, one branch on the action
exten => 7100,1,AGI(agi://${{EDGEFILTER_SERVICE}}/screen,exten=7100)
 same => n,GotoIf($["${{EDGEFILTER_ACTION}}" = "reject"]?refuse)
 same => n,Answer()
 same => n,SendText(edgefilter-connected)
 same => n,Wait(0.5)
 same => n,Hangup()
 same => n(refuse),Hangup(21)
; 7300: screened by the shipped subroutine, then a 3-second call: the wait armed for the screening
; must not cut it (the service's answer clears it, or "cleared" does for an older service)
exten => 7300,1,Gosub(edgefilter-screen,s,1(7300))
 same => n,Answer()
 same => n,Wait(3)
 same => n,Hangup()
; 7200: the classic per-process launcher (agi/edgefilter-agi), screened by the shipped subroutine's
; branches: here only reject and allow matter
exten => 7200,1,AGI({REPO}/agi/edgefilter-agi,exten=7200)
 same => n,NoOp(edgefilter-agi: AGISTATUS=${{AGISTATUS}} action=${{EDGEFILTER_ACTION}})
 same => n,GotoIf($["${{EDGEFILTER_ACTION}}" = "reject"]?refuse)
 same => n,Answer()
 same => n,SendText(edgefilter-connected)
 same => n,Wait(0.5)
 same => n,Hangup()
 same => n(refuse),Hangup(21)
"""

BASE_CONFIG = """[numbers]
default_region = "CN"
"""


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"real-Asterisk tests required (EDGEFILTER_REQUIRE_ASTERISK=1) but: {reason}")
    pytest.skip(f"real-Asterisk tests skipped: {reason}")


class Phone:
    """A registered softphone played by sipp: ``invites()`` are the calls that reached it."""

    def __init__(self, lab: Lab, user: str, answer: bool, in_call: str = "") -> None:
        self.lab, self.user = lab, user
        self.port = free_port(socket.SOCK_DGRAM)
        work = lab.sipp.work
        self.register = sc.register(work / f"register-{user}.xml", user, 60)
        self.unregister = sc.register(work / f"unregister-{user}.xml", user, 0)
        r = lab.sipp.run(self.register, lab.target, port=self.port, timeout=10,
                         extra=("-au", user, "-ap", PHONE_PASSWORDS[user], "-key", "phone_port", str(self.port)))
        assert r.returncode == 0, r.explain()
        kind = ("keys" if in_call else "answer") if answer else "busy"
        scenario = sc.phone(work / f"phone-{user}-{kind}.xml", user, answer=answer, in_call=in_call)
        cmd, self.msg, _ = lab.sipp.command(scenario, lab.target, port=self.port, calls=1000)
        import subprocess

        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work, start_new_session=True)
        time.sleep(0.2)  # sipp binds its port at once; Asterisk sends nothing until a call

    def invites(self) -> list[str]:
        text = self.msg.read_text(errors="replace") if self.msg.exists() else ""
        return [m for d, m in trace_messages(text) if d == "received" and m.startswith("INVITE ")]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
        r = self.lab.sipp.run(self.unregister, self.lab.target, port=self.port, timeout=10,
                              extra=("-au", self.user, "-ap", PHONE_PASSWORDS[self.user], "-key", "phone_port", str(self.port)))
        assert r.returncode == 0, r.explain()


class Lab:
    """A private Asterisk, the service, sipp, and the helpers the tests speak through."""

    def __init__(self, work: Path) -> None:
        try:
            install = find_install()
            self.sipp = Sipp(work / "sipp")
        except Unavailable as e:
            _unavailable(str(e))
        if install.sounds is None:
            _unavailable("no Asterisk sound prompts (apt-get install asterisk-core-sounds-en-gsm; bash .ci/run installs them)")
        self.work = work
        self.install = install
        self.service = Service(work / "service", config=BASE_CONFIG)
        env = {"EDGEFILTER_CONFIG": str(self.service.config),
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.pbx = Asterisk(install, work / "pbx", service_port=self.service.port, extra_dialplan=TEST_DIALPLAN, env=env)
        self.pbx.configure()
        self.pbx.start()
        self.service.ami_port = self.pbx.ports.ami
        self.service.write_config()
        self.service.start()
        self.wait_ami()
        self._numbers = itertools.count(1)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.pbx.ports.sip}"

    def close(self) -> None:
        self.service.stop()
        self.pbx.stop()

    # ------------------------------------------------------------------ helpers
    def wait_ami(self, since: int = 0, timeout: float = 20.0) -> None:
        """Until the service's AMI account is logged in (after ``since`` in Asterisk's log)."""
        wait_for(lambda: "Manager 'edgefilter' logged on" in self.pbx.log_since(since), timeout, "the service's AMI login")

    def number(self) -> str:
        """A fresh valid Chinese mobile number, each in its own 10,000-block (so that no
        RANGE_CAMPAIGN or RATE_* rule ties one test's calls to another's)."""
        i = next(self._numbers)
        return f"+86139{(os.getpid() * 7 + i * 7919) % 10000:04d}{i:04d}"

    def call(self, scenario: Path, number: str | None = None, *, name: str = "Test", service: str = "7000",
             timeout: float = 60.0, extra: tuple = ()) -> SippResult:
        """One call from the loopback trunk (any caller ID) to ``service``."""
        csv = csv_file(self.sipp.work, [(number or self.number(), name)])
        return self.sipp.run(scenario, self.target, csv=csv, service=service, timeout=timeout, extra=extra)

    def from_phone(self, user: str, scenario: Path, dialled: str, *, timeout: float = 60.0) -> SippResult:
        """A call placed by softphone ``user`` (digest auth, as a real phone) to ``dialled``."""
        return self.sipp.run(scenario, self.target, service=dialled, timeout=timeout,
                             extra=("-au", user, "-ap", PHONE_PASSWORDS[user]))

    @contextlib.contextmanager
    def phone(self, user: str = "6001", *, answer: bool = True, in_call: str = ""):
        p = Phone(self, user, answer, in_call)
        try:
            yield p
        finally:
            p.close()

    def decision_for(self, e164: str, since: int = 0, timeout: float = 10.0) -> dict:
        """The first decision about ``e164`` among those logged after the first ``since``."""
        def find():
            return next((d for d in self.service.decisions()[since:] if d["e164"] == e164 or d["caller"] == e164), None)
        return wait_for(find, timeout, f"a decision about {e164}")

    def mark(self) -> int:
        return len(self.service.decisions())

    @contextlib.contextmanager
    def configured(self, extra: str):
        """The service with ``extra`` TOML on top of the lab's config (SIGHUP), then back."""
        base = self.service.extra
        self.service.reload(base + extra)
        try:
            yield
        finally:
            self.service.reload(base)

    def reset_service(self) -> None:
        """The service restarted on an empty database, as a new user's would be."""
        self.service.stop()
        for f in self.service.root.iterdir():
            if f.name.startswith(("edgefilter.db", "edgefilter-spool", "edgefilter-lists")):
                f.unlink()
        mark = self.pbx.log_size()
        self.service.start()
        self.wait_ami(mark)

    def no_channels_left(self, timeout: float = 10.0) -> None:
        wait_for(lambda: not self.pbx.channels(), timeout, "every channel to be gone")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("asterisk-lab")
    lab = Lab(work)
    try:
        yield lab
    finally:
        lab.close()
        if os.environ.get("EDGEFILTER_KEEP_LAB"):
            print(f"lab kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def work(lab, request):
    """A folder for one test's scenario files."""
    d = lab.sipp.work / request.node.name.replace("/", "_")[:80]
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(autouse=True)
def _lab_clean(request):
    """After each real-Asterisk test: no call may be left behind on the PBX."""
    yield
    if "lab" in request.fixturenames:
        lab = request.getfixturevalue("lab")
        lab.no_channels_left()


__all__ = ["AMI_SECRET", "Lab"]

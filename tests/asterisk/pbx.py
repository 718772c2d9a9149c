"""A private, real Asterisk 22 for the tests: found, configured as docs/softphone.md tells users, run.

Everything the project promises about Asterisk (dial plan, FastAGI, AMI, AstDB, SIP responses,
DTMF, the softphone guide) is judged here by the real PBX, with sipp as the caller; the double
(``edgefilter.asterisk.callsim``) stays for fast tests. This module knows how to:

- find an Asterisk: ``EDGEFILTER_ASTERISK`` (a binary; its modules and data directories beside it
  or named by ``EDGEFILTER_ASTERISK_MODULES`` / ``EDGEFILTER_ASTERISK_DATA``), else the prebuilt
  Asterisk 22.10.1 in ``../shared/asterisk`` (unpacked once by its ``unpack`` script);
- lay out a private instance (its own directories, ports, control socket and AstDB) and install
  the project's ``asterisk-conf/`` files into it the way docs/softphone.md says, on top of a box
  that already has a transport, a ``[global]`` and a manager account of its own;
- start it, talk to it over its control socket (``rx``), restart and stop it;
- run sipp (``Sipp``) and the service (``Service``: ``edgefilter serve`` as a real process).

bench/asterisk.py uses the same classes, so the benchmark and the tests run one PBX set-up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "asterisk-conf"
SIPP_DIR = CONF / "sipp"
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
HOW_TO_ENABLE = (
    "set EDGEFILTER_ASTERISK to an Asterisk 22 binary, or put the prebuilt one at ../shared/asterisk "
    "(bash .ci/run installs sipp and the sounds)"
)
#: Modules that open ports or need hardware we do not want (the shared/asterisk README's list).
NOLOAD = (
    "chan_iax2.so", "chan_skinny.so", "chan_mgcp.so", "chan_unistim.so", "pbx_dundi.so",
    "res_hep.so", "res_hep_pjsip.so", "res_hep_rtcp.so", "res_phoneprov.so", "res_pjsip_phoneprov_provider.so",
    "app_voicemail_imap.so", "app_voicemail_odbc.so", "chan_dahdi.so", "chan_console.so", "chan_alsa.so",
    "chan_oss.so", "res_xmpp.so", "chan_motif.so", "res_snmp.so", "res_corosync.so", "cdr_radius.so", "cel_radius.so",
    "res_srtp.so",  # needs libsrtp2.so.1, which the prebuilt unpack does not install; no test uses SRTP
)
SOUND_DIRS = ("/usr/share/asterisk/sounds/en_US_f_Allison", "/usr/share/asterisk/sounds/en")


class Unavailable(Exception):
    """No Asterisk (or no sipp) here: the real-PBX tests skip, saying how to enable them."""


@dataclass(frozen=True)
class Install:
    binary: Path
    modules: Path
    datadir: Path  # holds documentation/: Asterisk 22 will not boot without its XML docs
    samples: Path | None
    env: dict
    sounds: Path | None

    def version(self) -> str:
        out = subprocess.run([str(self.binary), "-V"], capture_output=True, text=True, env=self.env, timeout=30)
        return out.stdout.strip()


def _env_with(ld_path: str | None) -> dict:
    env = dict(os.environ)
    if ld_path:
        env["LD_LIBRARY_PATH"] = ld_path
    return env


def _sounds(datadir: Path) -> Path | None:
    named = os.environ.get("EDGEFILTER_ASTERISK_SOUNDS")
    candidates = [Path(named)] if named else []
    candidates += [datadir / "sounds" / "en", *map(Path, SOUND_DIRS)]
    for c in candidates:
        if (c / "vm-goodbye.gsm").exists() or (c / "vm-goodbye.wav").exists():
            return c
    return None


def find_install() -> Install:
    """The Asterisk to test with, or Unavailable with one line saying how to get one."""
    named = os.environ.get("EDGEFILTER_ASTERISK")
    if named:
        binary = Path(named)
        if not os.access(binary, os.X_OK):
            raise Unavailable(f"EDGEFILTER_ASTERISK={named} is not an executable")
        prefix = binary.resolve().parent.parent  # .../usr/sbin/asterisk -> .../usr
        modules = Path(os.environ.get("EDGEFILTER_ASTERISK_MODULES") or prefix / "lib" / "asterisk" / "modules")
        data_candidates = [os.environ.get("EDGEFILTER_ASTERISK_DATA"), prefix.parent / "var" / "lib" / "asterisk",
                           prefix / "share" / "asterisk", "/var/lib/asterisk", "/usr/share/asterisk"]
        datadir = next((Path(d) for d in data_candidates if d and (Path(d) / "documentation").is_dir()), None)
        if datadir is None:
            raise Unavailable(f"no Asterisk data directory with documentation/ beside {named}: set EDGEFILTER_ASTERISK_DATA")
        samples = prefix.parent / "etc" / "asterisk-samples"
        return Install(binary, modules, datadir, samples if samples.is_dir() else None, _env_with(None), _sounds(datadir))
    for unpack in (REPO.parent / "shared" / "asterisk" / "unpack", Path("/work/shared/asterisk/unpack")):
        if unpack.exists():
            break
    else:
        raise Unavailable(f"no Asterisk found: {HOW_TO_ENABLE}")
    r = subprocess.run(["bash", str(unpack)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise Unavailable(f"{unpack} failed: {r.stderr.strip()[-300:]}")
    found = dict(re.findall(r"^export (\w+)='([^']*)'$", r.stdout, re.M))
    root = Path(found["ASTERISK_ROOT"])
    datadir = root / "var" / "lib" / "asterisk"
    return Install(Path(found["ASTERISK_BIN"]), Path(found["ASTERISK_MODULES"]), datadir,
                   Path(found["ASTERISK_SAMPLES"]), _env_with(found.get("LD_LIBRARY_PATH")), _sounds(datadir))


# ----------------------------------------------------------------------------------- ports
def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (SIP and RTP want UDP, AMI/AGI TCP)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def free_udp_range(size: int) -> int:
    """The first port of ``size`` consecutive free UDP ports (an RTP range of our own)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 60000 - size, 2)
        socks = []
        try:  # every port of a small range, a sample of a big one (file descriptors are limited)
            for p in range(base, base + size, max(1, size // 64)):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP range")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy; return its value or fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------- the PBX
@dataclass
class Ports:
    sip: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    ami: int = field(default_factory=free_port)
    rtp_size: int = 40  # RTP ports: one per answered call at a time (a benchmark needs hundreds)
    rtp: int = 0

    def __post_init__(self) -> None:
        if not self.rtp:
            self.rtp = free_udp_range(self.rtp_size)


AMI_SECRET = "change-me-ami"  # the placeholder shipped in manager-edgefilter.conf (loopback only)
PHONE_PASSWORDS = {"6001": "change-me-6001", "6002": "change-me-6002"}


class Asterisk:
    """One private Asterisk instance under ``root``; ``start()``, ``rx()``, ``restart()``, ``stop()``."""

    def __init__(self, install: Install, root: Path, *, service_port: int, verbose: int = 3,
                 country_code: str = "86", extra_dialplan: str = "", pjsip_extra: str = "", env: dict | None = None,
                 rtp_ports: int = 40) -> None:
        self.install = install
        self.root = root
        self.ports = Ports(rtp_size=rtp_ports)
        self.service_port = service_port
        self.verbose = verbose
        self.country_code = country_code
        self.extra_dialplan = extra_dialplan
        self.pjsip_extra = pjsip_extra
        self.env = {**install.env, **(env or {})}  # Asterisk's environment (AGI scripts inherit it)
        self.proc: subprocess.Popen | None = None
        self.etc = root / "etc"
        self.log = root / "log" / "full"
        self.spool = root / "spool"
        self._console = None

    # ---------------------------------------------------------------- configuration
    def configure(self) -> None:
        """The box as a user has it: its own pjsip/manager config, then our files merged in as
        docs/softphone.md section 2 says (include lines appended, [global] merged, globals set)."""
        r = self.root
        for d in ("etc", "lib", "spool", "run", "log", "agi-bin", "cache", "data/sounds"):
            (r / d).mkdir(parents=True, exist_ok=True)
        data = r / "data"
        for entry in self.install.datadir.iterdir():  # documentation/, keys/ ... (read-only, linked)
            if entry.name != "sounds" and not (data / entry.name).exists():
                (data / entry.name).symlink_to(entry)
        if self.install.sounds is not None and not (data / "sounds" / "en").exists():
            (data / "sounds" / "en").symlink_to(self.install.sounds)
        # the appeal prompts, installed as asterisk-conf/sounds/make-prompts.sh says: beside en/
        if not (data / "sounds" / "edgefilter").exists():
            (data / "sounds" / "edgefilter").symlink_to(CONF / "sounds" / "edgefilter")
        etc = self.etc
        (etc / "asterisk.conf").write_text(
            "[directories]\n"
            f"astetcdir => {etc}\nastmoddir => {self.install.modules}\nastdatadir => {data}\n"
            f"astvarlibdir => {r / 'lib'}\nastdbdir => {r / 'lib'}\nastkeydir => {r / 'lib'}\n"
            f"astagidir => {r / 'agi-bin'}\nastspooldir => {self.spool}\nastrundir => {r / 'run'}\n"
            f"astlogdir => {r / 'log'}\nastcachedir => {r / 'cache'}\n"
            f"[options]\nverbose = {self.verbose}\nnocolor = yes\nhideconnect = yes\n"
        )
        (etc / "modules.conf").write_text("[modules]\nautoload = yes\n" + "".join(f"noload => {m}\n" for m in NOLOAD))
        levels = f"notice,warning,error,verbose({self.verbose}),dtmf" if self.verbose else "notice,warning,error"
        (etc / "logger.conf").write_text(f"[general]\n[logfiles]\nfull => {levels}\n")
        (etc / "rtp.conf").write_text(f"[general]\nrtpstart = {self.ports.rtp}\nrtpend = {self.ports.rtp + self.ports.rtp_size - 1}\n")
        if self.install.samples is not None and (self.install.samples / "indications.conf").exists():
            shutil.copy(self.install.samples / "indications.conf", etc / "indications.conf")
        (etc / "cdr.conf").write_text("[general]\nenable = no\n")
        # --- what the box had before edgefilter: a transport, a [global], a manager account
        (etc / "pjsip.conf").write_text(
            "; the box's own PJSIP set-up (before edgefilter)\n"
            "[global]\ntype = global\nuser_agent = test-pbx\n"
            "; merged from asterisk-conf/pjsip-edgefilter.conf as docs/softphone.md says:\n"
            "endpoint_identifier_order = username,ip,anonymous\n\n"
            f"[transport-udp]\ntype = transport\nprotocol = udp\nbind = 127.0.0.1:{self.ports.sip}\n\n"
            f"{self.pjsip_extra}"
            '#include "pjsip-edgefilter.conf"\n'
        )
        (etc / "manager.conf").write_text(
            f"[general]\nenabled = yes\nport = {self.ports.ami}\nbindaddr = 127.0.0.1\n\n"
            "[admin]\nsecret = the-admins-own\ndeny = 0.0.0.0/0.0.0.0\npermit = 127.0.0.1/255.255.255.255\nread = all\nwrite = all\n\n"
            '#include "manager-edgefilter.conf"\n'
        )
        (etc / "voicemail.conf").write_text(
            "[general]\nformat = wav\n\n#include \"voicemail-edgefilter.conf\"\n"
        )
        (etc / "features.conf").write_text("[general]\n[featuremap]\n\n#include \"features-edgefilter.conf\"\n")
        for name in ("extensions-edgefilter.conf", "extensions-edgefilter-features.conf", "pjsip-edgefilter.conf",
                     "manager-edgefilter.conf", "voicemail-edgefilter.conf", "features-edgefilter.conf"):
            shutil.copy(CONF / name, etc / name)
        example = (CONF / "extensions-example.conf").read_text()
        example = set_global(example, "EDGEFILTER_SERVICE", f"127.0.0.1:{self.service_port}")
        example = set_global(example, "EDGEFILTER_COUNTRY_CODE", self.country_code)
        (etc / "extensions.conf").write_text(example + self.extra_dialplan)

    # ---------------------------------------------------------------- process
    @property
    def conf(self) -> str:
        return str(self.etc / "asterisk.conf")

    def start(self, timeout: float = 30.0) -> None:
        self._console = open(self.root / "console.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.install.binary), "-C", self.conf, "-f", "-n", "-g"],
            stdout=self._console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            start_new_session=True,
        )
        wait_for(lambda: (self.root / "run" / "asterisk.ctl").exists() or self.proc.poll() is not None, timeout, "asterisk.ctl")
        if self.proc.poll() is not None:
            raise RuntimeError(f"Asterisk exited at start ({self.proc.returncode}): {self.console_tail()}")
        r = self.rx("core waitfullybooted", timeout=timeout)
        if "fully booted" not in r.lower():
            raise RuntimeError(f"Asterisk did not boot: {r!r} {self.console_tail()}")

    def rx(self, command: str, timeout: float = 15.0) -> str:
        """One CLI command over the control socket (asterisk -rx), its output."""
        r = subprocess.run([str(self.install.binary), "-C", self.conf, "-rx", command],
                           capture_output=True, text=True, env=self.install.env, timeout=timeout)
        return r.stdout

    def restart_now(self, timeout: float = 30.0) -> None:
        """``core restart now`` as an admin types it: the process re-executes itself in place."""
        marker = self.log_size()
        self.rx("core restart now")
        wait_for(lambda: "Asterisk Ready" in self.log_since(marker) or "fully booted" in self.log_since(marker).lower()
                 or self._booted_again(marker), timeout, "Asterisk to come back after core restart now", interval=0.2)

    def _booted_again(self, marker: int) -> bool:
        try:
            return "fully booted" in self.rx("core waitfullybooted", timeout=5).lower() and self.log_size() > marker
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.rx("core stop now", timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._console is not None:
            self._console.close()
        self.proc = None

    # ---------------------------------------------------------------- reading what happened
    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, offset: int) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def console_tail(self, n: int = 3000) -> str:
        p = self.root / "console.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def channels(self) -> list[str]:
        """Channels alive now (``core show channels concise``)."""
        return [line for line in self.rx("core show channels concise").splitlines() if "!" in line]

    def db_show(self, family: str) -> dict[str, str]:
        out = {}
        for line in self.rx(f"database show {family}").splitlines():
            m = re.match(rf"^/{re.escape(family)}/(\S+)\s*:\s*(.*?)\s*$", line)
            if m:
                out[m.group(1)] = m.group(2)
        return out


def set_global(dialplan: str, name: str, value: str) -> str:
    """Change one ``NAME=value`` line of [globals], as the guide tells the admin to."""
    new, n = re.subn(rf"^{name}=.*$", f"{name}={value}", dialplan, count=1, flags=re.M)
    assert n == 1, f"{name} not in [globals]"
    return new


# ----------------------------------------------------------------------------------- sipp
def trace_messages(trace: str) -> list[tuple[str, str]]:
    """(``"sent"`` | ``"received"``, message text) for each SIP message in a sipp -trace_msg file."""
    out = []
    for block in re.split(r"^-{20,} [^\n]*\n", trace, flags=re.M):
        head, _, body = block.partition("\n")
        if "message sent" in head:
            out.append(("sent", body.strip("\n")))
        elif "message received" in head:
            out.append(("received", body.strip("\n")))
    return out


@dataclass
class SippResult:
    returncode: int
    messages: str  # every SIP message sent and received (-trace_msg)
    errors: str
    stdout: str
    elapsed: float

    def received(self) -> list[str]:
        """Every message sipp received, whole."""
        return [m for d, m in trace_messages(self.messages) if d == "received"]

    def responses(self) -> list[int]:
        """Status codes received, in order."""
        return [int(m[8:11]) for m in self.received() if m.startswith("SIP/2.0 ")]

    def requests(self, method: str) -> list[str]:
        """Requests of one method that sipp received (BYE, MESSAGE ...), whole."""
        return [m for m in self.received() if m.startswith(method + " ")]

    def explain(self) -> str:
        return f"sipp exit {self.returncode} after {self.elapsed:.1f}s, responses {self.responses()}\n{self.stdout[-1500:]}\n{self.errors[-1500:]}"


class Sipp:
    """sipp as the caller (or as a phone): each run on its own ports, with its message trace."""

    def __init__(self, work: Path) -> None:
        exe = shutil.which("sipp")
        if exe is None:
            raise Unavailable("sipp not installed (apt-get install sip-tester; bash .ci/run installs it)")
        self.exe = exe
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.runs = 0

    def command(self, scenario: Path, target: str, *, csv: Path | None = None, service: str = "7000", calls: int = 1,
                extra: tuple = (), port: int | None = None) -> tuple[list[str], Path, Path]:
        self.runs += 1
        tag = f"{scenario.stem}-{self.runs}"
        msg, err = self.work / f"{tag}.msg", self.work / f"{tag}.err"
        cmd = [self.exe, "-sf", str(scenario), "-i", "127.0.0.1", "-p", str(port or free_port(socket.SOCK_DGRAM)),
               "-mp", str(free_udp_range(4)), "-s", service, "-m", str(calls), "-nostdin",
               "-trace_msg", "-message_file", str(msg), "-trace_err", "-error_file", str(err)]
        if csv is not None:
            cmd += ["-inf", str(csv)]
        cmd += [*extra, target]
        return cmd, msg, err

    def run(self, scenario: Path, target: str, *, timeout: float = 60.0, **kw) -> SippResult:
        cmd, msg, err = self.command(scenario, target, **kw)
        t0 = time.monotonic()
        r = subprocess.run(cmd + ["-timeout", f"{int(timeout)}s", "-timeout_error"], capture_output=True, text=True,
                           timeout=timeout + 15, cwd=self.work)
        elapsed = time.monotonic() - t0
        return SippResult(r.returncode, _read(msg), _read(err), r.stdout[-4000:] + r.stderr[-2000:], elapsed)

    def start(self, scenario: Path, target: str, **kw) -> tuple[subprocess.Popen, Path, Path]:
        """A sipp left running (a phone waiting for calls); stop it with ``stop()``."""
        cmd, msg, err = self.command(scenario, target, **kw)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.work,
                                start_new_session=True)
        return proc, msg, err


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


def csv_file(work: Path, rows: list[tuple[str, str]], name: str | None = None) -> Path:
    """A sipp injection file (SEQUENTIAL; ``number;name;`` per line) for one test's callers."""
    work.mkdir(parents=True, exist_ok=True)
    p = work / (name or f"callers-{time.monotonic_ns()}.csv")
    p.write_text("SEQUENTIAL\n" + "".join(f"{n};{name};\n" for n, name in rows))
    return p


# --------------------------------------------------------------------------- the service
class Service:
    """``edgefilter serve`` as a real process on its own port, config and database."""

    def __init__(self, root: Path, *, port: int | None = None, config: str = "", ami_port: int | None = None,
                 db: Path | None = None, log_format: str = "json", poll_interval: str | None = "50ms") -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ami_port = ami_port
        self.db = db or root / "edgefilter.db"
        self.log_format = log_format
        self.poll_interval = poll_interval  # tests: CLI changes seen at once; None = the shipped default
        self.extra = config
        self.config = root / "edgefilter.toml"
        self.logfile = root / "service.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.write_config()

    def write_config(self, extra: str | None = None) -> None:
        if extra is not None:
            self.extra = extra
        secret = self.root / "ami.secret"
        secret.write_text(AMI_SECRET + "\n")
        secret.chmod(0o600)
        ami = ""
        if self.ami_port is not None:
            ami = (f'[ami]\nenabled = true\nport = {self.ami_port}\nsecret_file = "{secret}"\n'
                   'backoff_initial = "200ms"\nbackoff_max = "1s"\nping_interval = "2s"\nping_timeout = "2s"\n')
        self.config.write_text(
            f'[agi]\nlisten = "127.0.0.1:{self.port}"\n'
            f'[store]\npath = "{self.db}"\n' + (f'poll_interval = "{self.poll_interval}"\n' if self.poll_interval else "") +
            f'[log]\nformat = "{self.log_format}"\nlevel = "info"\n'
            f"{ami}{self.extra}"
        )

    def start(self, timeout: float = 30.0) -> None:
        self._log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefilter", "serve", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        wait_for(lambda: self._listening() or self.proc.poll() is not None, timeout, "edgefilter serve to listen")
        if self.proc.poll() is not None:
            raise RuntimeError(f"edgefilter serve exited ({self.proc.returncode}): {self.log_text()[-2000:]}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        """SIGSTOP: a wedged service, whose listening socket the kernel still accepts on."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def reload(self, extra: str) -> None:
        """A new config through SIGHUP (the way docs tell admins), waited for in the log."""
        mark = len(self.log_text())
        self.write_config(extra)
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in self.log_text()[mark:].lower() or "refused" in self.log_text()[mark:].lower(),
                 10, "the service to reload its config")
        assert "refused" not in self.log_text()[mark:].lower(), self.log_text()[mark:]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The edgefilter CLI on this service's config (as a user runs it)."""
        r = subprocess.run([sys.executable, "-m", "edgefilter", *args, "--config", str(self.config)],
                           capture_output=True, text=True, timeout=60)
        if check:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def decisions(self) -> list[dict]:
        """Every decision line the service logged (``[log] format = "json"``)."""
        out = []
        for line in self.log_text().splitlines():
            i = line.find('{"event":"decision"')
            if i >= 0:
                out.append(json.loads(line[i:]))
        return out

    def wait_decision(self, count_before: int, timeout: float = 10.0) -> dict:
        """The next decision after the first ``count_before`` ones."""
        return wait_for(lambda: (self.decisions()[count_before:] or [None])[0], timeout, "a decision line")

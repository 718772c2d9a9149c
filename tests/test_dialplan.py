"""asterisk-conf/ in CI: lint the dial plan and keep it in step with the code.

The dial plan and the service meet only through names: routes, AGI arguments, EDGEFILTER_*
variables, action words, challenge results, reject causes, the AstDB family, sound files. A
rename on either side breaks calls silently (an unknown action rings, a missing variable fails
open), so every one of those names is parsed out of the .conf files and compared with the
constants the code uses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgefilter.asterisk.appeals import ANSWERS, APPEAL_VARIABLES, SPOOL_FOLDER, STEPS
from edgefilter.asterisk.appeals import ROUTE as APPEAL_ROUTE
from edgefilter.asterisk.challenge import CHALLENGE_VARIABLES, RESULT_ROUTE, RESULTS
from edgefilter.core.config import DEFAULTS_PATH, REJECT_CAUSES
from edgefilter.core.model import Action
from edgefilter.rules.screen import SCREEN_VARIABLES

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "asterisk-conf"
SUBROUTINE = CONF / "extensions-edgefilter.conf"
EXAMPLE = CONF / "extensions-example.conf"
SOUNDS = Path(__file__).with_name("data") / "asterisk-core-sounds-en-gsm-1.6.1.txt"
LINT = Path(__file__).with_name("dialplan_lint.py")


def parse_conf(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of an Asterisk .conf file: ';' comments, '=' or '=>' pairs."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = re.sub(r"(?<!\\);.*$", "", raw).strip()
        if not line or line.startswith("#include"):
            continue
        m = re.fullmatch(r"\[([^\]]+)\](\(.*\))?", line)
        if m:
            section = m.group(1)
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key = value line: {raw!r}"
        out.append((section, key.strip(), value.lstrip(">").strip()))
    return out


def dialplan_text() -> str:
    """Both dial plan files without comments (what Asterisk executes)."""
    lines = []
    for path in (SUBROUTINE, EXAMPLE):
        for section, key, value in parse_conf(path):
            lines.append(f"[{section}] {key} => {value}")
    return "\n".join(lines)


def globals_defined() -> set[str]:
    return {k for s, k, _ in parse_conf(EXAMPLE) if s == "globals"}


# ------------------------------------------------------------------------------- lint
def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LINT), str(path)], capture_output=True, text=True, timeout=60)


def test_asterisklint_finds_nothing_in_the_shipped_dial_plan():
    pytest.importorskip("asterisklint")
    r = _lint(EXAMPLE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).strip() == ""


def test_asterisklint_catches_a_broken_copy(tmp_path):
    pytest.importorskip("asterisklint")
    for name in (SUBROUTINE.name, EXAMPLE.name):
        shutil.copy(CONF / name, tmp_path / name)
    broken = tmp_path / SUBROUTINE.name
    text = broken.read_text()
    broken.write_text(text.replace("Set(ef_done=1)", "Set(ef_done=1").replace("GotoIf($[\"${AGISTATUS}\" != \"SUCCESS\"]?passed)", "Goto(nosuchlabel)"))
    r = _lint(tmp_path / EXAMPLE.name)
    out = r.stdout + r.stderr  # asterisklint reports on stderr
    assert r.returncode == 1
    assert "W_APP_BALANCE" in out or "E_APP_PARSE_ERROR" in out
    assert "nosuchlabel" in out


# ------------------------------------------------------------------------ consistency
def test_edgefilter_variables_are_exactly_those_the_code_sets():
    named = set(re.findall(r"\bEDGEFILTER_[A-Z0-9_]+\b", dialplan_text()))
    settings = globals_defined()
    assert settings == {"EDGEFILTER_SERVICE", "EDGEFILTER_COUNTRY_CODE", "EDGEFILTER_WAIT"}
    # set by the admin's inbound context for the subroutine to pass on (STIR/SHAKEN results); the
    # example's inheritable __EDGEFILTER_CALL/__EDGEFILTER_CALLEE (the *0 feature) are not matched
    inputs = {"EDGEFILTER_STIR", "EDGEFILTER_STIR_VERIFY"}
    informational = set(INFORMATIONAL)
    assert named - settings == (set(SCREEN_VARIABLES) - informational) | set(CHALLENGE_VARIABLES) | set(APPEAL_VARIABLES) | inputs


def test_star_code_routes_in_the_dial_plan_exist_in_the_service():
    from edgefilter.asterisk.starcodes import StarCodes

    text = (CONF / "extensions-edgefilter-features.conf").read_text()
    routes = set(re.findall(r"agi://[^/]+/([a-z][a-z-]*)", text))
    routes |= set(re.findall(r"Set\(EDGEFILTER_ROUTE=([a-z-]+)\)", text))
    served = set(StarCodes(lambda: None, None, lambda: None, lambda r: None).routes())
    assert routes and routes <= served, routes - served


#: Set for the admin's own dial plan and the console (the MSet line at verbose 3), not branched
#: on by the shipped subroutine: its header documents them.
INFORMATIONAL = ("EDGEFILTER_SCORE", "EDGEFILTER_RULES", "EDGEFILTER_POLICY", "EDGEFILTER_CATEGORY", "EDGEFILTER_WOULD")


def test_every_code_variable_is_read_somewhere_or_documented():
    text = dialplan_text()
    header = SUBROUTINE.read_text().split("[edgefilter-screen]")[0]
    for name in (*SCREEN_VARIABLES, *CHALLENGE_VARIABLES, *APPEAL_VARIABLES):
        if name in INFORMATIONAL:
            assert name in header, f"{name} is not documented in the subroutine's header"
        else:
            assert "${" + name + "}" in text, f"the dial plan never reads {name}"


def _extensions(context: str) -> set[str]:
    return {v.split(",", 1)[0] for s, k, v in parse_conf(SUBROUTINE) if s == context and k == "exten"}


def test_the_dial_plan_branches_on_every_action_and_nothing_else():
    # one Goto to the extension named after the action; an unknown or empty action fails open
    goto = [v for s, k, v in parse_conf(SUBROUTINE) if s == "edgefilter-screen" and "${EDGEFILTER_ACTION}" in v
            and "Goto(" in v]
    branch = "${IF(${DIALPLAN_EXISTS(edgefilter-screen,${EDGEFILTER_ACTION},1)}?${EDGEFILTER_ACTION}:failopen)}"
    # the service's answer cleared the wait: branch at once; else clear it first ("cleared")
    assert goto == ['n,Goto(${IF($["${TIMEOUT(absolute)}" = "0"]?' + branch + ":cleared)},1)", f"n,Goto({branch},1)"]
    exts = _extensions("edgefilter-screen")
    assert {a.value for a in Action} <= exts
    assert exts - {a.value for a in Action} == {"s", "T", "failopen", "cleared"}  # no extension an action could hit by accident


def test_challenge_results_match():
    # retry and fail are branched on; pass (and anything else: the service gone) rings
    named = set(re.findall(r'"\$\{EDGEFILTER_CHALLENGE_RESULT\}" = "([a-z]+)"', dialplan_text()))
    assert named == set(RESULTS) - {"pass"}
    assert "pass" in RESULTS


def test_reject_causes_match_the_config_choices():
    text = dialplan_text()
    # Hangup(cause) for the Q.850 causes, PJSIPHangup for the SIP-only codes (> 600)
    assert "Hangup(${EDGEFILTER_REJECT_CAUSE})" in text and "PJSIPHangup(${EDGEFILTER_REJECT_CAUSE})" in text
    assert all(int(c) < 600 or int(c) > 600 for c in REJECT_CAUSES)
    assert {c for c in REJECT_CAUSES if int(c) > 600} == {"607", "608"}


SCREEN_CALL = re.compile(r"AGI\(agi://\$\{IF\(\$\[\"\$\{EDGEFILTER_SERVICE\}\" = \"\"\]\?127\.0\.0\.1\\:4573:\$\{EDGEFILTER_SERVICE\}\)\}/")


def test_agi_routes_and_arguments_are_the_ones_the_service_serves(service):
    # arguments run to the AGI( call's closing parenthesis at the end of the line (values may
    # hold function calls such as ${CHANNEL(linkedid)})
    text = SCREEN_CALL.sub("AGI(agi://${ef_svc}/", dialplan_text())
    calls = re.findall(r"AGI\(agi://\$\{ef_svc\}/([a-z-]+),(.*)\)\s*$", text, re.M)
    assert {route for route, _ in calls} == {"screen", RESULT_ROUTE, APPEAL_ROUTE}
    assert {"screen", RESULT_ROUTE, APPEAL_ROUTE} <= set(service.server.routes)  # the rest: star codes (features file)
    keys = {route: set() for route, _ in calls}
    for route, args in calls:
        keys[route] |= {a.split("=", 1)[0] for a in re.split(r",(?![^(]*\))", args)}
    assert keys == {
        "screen": {"cid", "exten", "vmbox", "context", "stir", "stir_verify", "linkedid"},
        RESULT_ROUTE: {"id", "digit", "hangup"},
        APPEAL_ROUTE: {"id", "step", "digit"},
    }
    steps = {a.split("=", 1)[1] for route, args in calls if route == APPEAL_ROUTE
             for a in re.split(r",(?![^(]*\))", args) if a.startswith("step=")}
    assert steps == set(STEPS)
    assert "AGI(" not in re.sub(r"AGI\(agi://\$\{ef_svc\}/", "", text)  # no other AGI


def test_the_mirror_family_is_the_shipped_default():
    family = tomllib.loads(DEFAULTS_PATH.read_text())["mirror"]["family"]
    assert set(re.findall(r"DB_EXISTS\(([a-z-]+)/", dialplan_text())) == {family}


def test_prompts_exist_in_the_core_sounds_package():
    sounds = set(SOUNDS.read_text().split())
    text = dialplan_text()
    used: set[str] = set()
    for app, args in re.findall(r"\b(Playback|Read)\(([^)]*)\)", text):
        files = args.split(",")[1] if app == "Read" else args.split(",")[0]
        used |= set(files.split("&"))
    digit_prompts = {f for f in used if "_DIGIT}" in f}
    assert digit_prompts == {"digits/${EDGEFILTER_CHALLENGE_DIGIT}", "digits/${EDGEFILTER_APPEAL_DIGIT}"}
    # the appeal's own prompts (no core sound says "this number does not take your call"): shipped
    # in asterisk-conf/sounds/edgefilter/, made by make-prompts.sh, installed beside en/
    ours = {f for f in used if f.startswith("edgefilter/")}
    assert ours == {"edgefilter/appeal-offer", "edgefilter/appeal-speak", "edgefilter/appeal-reference"}
    for f in ours:
        gsm = CONF / "sounds" / f"{f}.gsm"
        assert gsm.stat().st_size > 1000 and f.split("/")[1] in (CONF / "sounds" / "make-prompts.sh").read_text(), f
    plain = used - digit_prompts - ours
    assert plain and plain <= sounds, plain - sounds
    assert {f"digits/{d}" for d in "123456789"} <= sounds


def test_pjsip_kit_has_the_loopback_trunk_and_two_softphones():
    entries = parse_conf(CONF / "pjsip-edgefilter.conf")
    sections: dict[tuple[str, str], dict[str, str]] = {}
    current: dict[str, str] = {}
    for section, key, value in entries:  # same-named sections differ by type
        if key == "type":
            current = sections.setdefault((section, value), {})
        current[key] = value
    assert sections[("loopback", "identify")]["match"] == "127.0.0.1"
    assert sections[("loopback", "endpoint")]["context"] == "from-loopback"
    assert sections[("loopback", "endpoint")]["dtmf_mode"] == "rfc4733"
    assert "auth" not in sections[("loopback", "endpoint")]
    for ext in ("6001", "6002"):
        ep = sections[(ext, "endpoint")]
        assert ep["context"] == "from-phones" and ep["auth"] == ext and ep["aors"] == ext
        assert sections[(ext, "auth")]["password"].startswith("change-me")
        assert (ext, "aor") in sections
    contexts = {s for s, _, _ in parse_conf(EXAMPLE)}
    assert {"from-loopback", "from-phones", "from-trunk"} <= contexts


def test_voicemail_boxes_and_ami_account():
    boxes = {k for s, k, _ in parse_conf(CONF / "voicemail-edgefilter.conf") if s == "default"}
    assert boxes == {"6001", "6002"}
    ami = {k: v for s, k, v in parse_conf(CONF / "manager-edgefilter.conf") if s == "edgefilter"}
    assert "system" in ami["write"].split(",")  # DBPut / DBDel
    assert ami["permit"].startswith("127.0.0.1/") and ami["secret"].startswith("change-me")


@pytest.mark.parametrize("conf", ["extensions-edgefilter.conf", "extensions-edgefilter-features.conf"])
def test_every_agi_call_goes_to_the_configured_service(conf):
    """EDGEFILTER_SERVICE ([globals]) says where `edgefilter serve` listens: screening, the
    challenge, star codes, the in-call refusal and outbound reporting must all use it."""
    agi = [line for line in (CONF / conf).read_text().splitlines() if re.match(r"\s*(exten|same)\s*=>.*\bAGI\(", line)]
    assert agi
    for line in agi:
        assert "AGI(agi://${ef_svc}/" in line or SCREEN_CALL.search(line), line


# ------------------------------------------------------------------------------ appeals
def _lines(context: str) -> list[str]:
    return [v for s, k, v in parse_conf(SUBROUTINE) if s == context]


def test_a_plain_reject_costs_no_extra_application_for_appeals():
    """Issue 16 counts applications per call: the appeal test is folded into the reject branch's
    one GotoIf, so a reject without an appeal still runs GotoIf + Hangup."""
    reject = [v for s, k, v in parse_conf(SUBROUTINE) if s == "edgefilter-screen" and v.startswith(("reject,", "n(special)"))
              or (s == "edgefilter-screen" and v.startswith("n,Hangup(${EDGEFILTER_REJECT_CAUSE})"))]
    assert reject[0] == ("reject,1,GotoIf($[${EDGEFILTER_REJECT_SIT} = 1 | ${EDGEFILTER_REJECT_CAUSE} > 600 "
                         "| ${LEN(${EDGEFILTER_APPEAL_ID})} > 0]?special)")
    assert reject[1] == "n,Hangup(${EDGEFILTER_REJECT_CAUSE})"
    assert reject[2] == "n(special),GotoIf($[${LEN(${EDGEFILTER_APPEAL_ID})} > 0]?edgefilter-appeal,s,1)"
    # the fail-open path rejects too (mirrored hard blocks, forged caller IDs): never with a stale id
    failopen = [v for v in _lines("edgefilter-screen") if "EDGEFILTER_REJECT_CAUSE=21" in v]
    assert failopen and all("EDGEFILTER_APPEAL_ID=)" in v for v in failopen)


def test_the_appeal_records_under_the_spool_named_by_the_id_only_and_bounded():
    records = [v for v in _lines("edgefilter-appeal") if "Record(" in v]
    assert records == [f"n,Record(${{ASTSPOOLDIR}}/{SPOOL_FOLDER}/${{EDGEFILTER_APPEAL_ID}}.wav,4,${{EDGEFILTER_APPEAL_SECONDS}},k)"]
    answers = set(re.findall(r'"\$\{EDGEFILTER_APPEAL_STEP\}" != "([a-z]+)"', dialplan_text()))
    assert answers <= set(ANSWERS) and answers == {"record", "done"}  # anything else: goodbye
    assert any("SayDigits(${EDGEFILTER_APPEAL_CODE})" in v for v in _lines("edgefilter-appeal"))
    assert any("hangup_handler_push)=edgefilter-appeal-hangup,s,1" in v for v in _lines("edgefilter-appeal"))

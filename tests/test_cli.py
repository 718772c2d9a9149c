"""The `edgefilter` command as an admin uses it: one clear line and exit 1 on bad input, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgefilter import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "edgefilter.toml"
    path.write_text(f'[store]\npath = "{tmp_path / "db" / "edgefilter.db"}"\n')
    return str(path)


def run(*args):
    return subprocess.run([sys.executable, "-m", "edgefilter", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_block_list_check_remove_round_trip(cfg, capsys):
    assert cli.main(["block", "+86170*", "--note", "virtual operators", "--config", cfg]) == 0
    assert cli.main(["block", "013800138000", "--expires", "30d", "--category", "marketing", "--config", cfg]) == 0
    assert cli.main(["allow", "+8617012345678", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "block +86170* (prefix): added" in out and "block +8613800138000 (exact): added, expires" in out
    assert cli.main(["block", "+86170*", "--note", "virtual operators", "--config", cfg]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert cli.main(["list", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "+86170*" in out and "marketing" in out and "3 entries" in out
    assert cli.main(["list", "allow", "--config", cfg]) == 0
    assert "1 entries" in capsys.readouterr().out
    assert cli.main(["check", "+8617099999999", "--to", "1000", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "LIST_BLOCKED" in out and "action: reject" in out and "+86170* (cli)" in out
    assert cli.main(["check", "+8617012345678", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "action: allow" in out and "beats block +86170*" in out
    assert cli.main(["remove", "+86170*", "--config", cfg]) == 0
    assert cli.main(["check", "+8617099999999", "--config", cfg]) == 0
    assert "action: allow" in capsys.readouterr().out
    assert cli.main(["remove", "+86170*", "--config", cfg]) == 1


def test_check_at_a_time_uses_schedules(tmp_path, capsys):
    path = tmp_path / "edgefilter.toml"
    path.write_text(
        f'[store]\npath = "{tmp_path / "x.db"}"\n'
        '[schedules.office]\ndays = ["mon-fri"]\nhours = ["09:00-18:00"]\n'
        '[policies.night]\nschedule = "!office"\nactions = { challenge = "voicemail" }\n'
    )
    assert cli.main(["check", "anonymous", "--at", "2026-11-30 21:00", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "policy: night" in out and "action: voicemail" in out and "challenge -> voicemail" in out
    assert cli.main(["check", "anonymous", "--at", "2026-11-30 10:00", "--config", str(path)]) == 0
    assert "action: challenge" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["block", "hello"], "'hello' is not a phone number, prefix rule"),
        (["block", "+86*1*"], "a prefix rule is digits followed by one"),
        (["block", "+86170*", "--expires", "soon"], "--expires 'soon': use a duration"),
        (["block", "+86170*", "--category", "spam"], "unknown category 'spam'"),
        (["check", "+8613800138000", "--at", "tomorrow"], "--at 'tomorrow'"),
    ],
)
def test_bad_input_is_one_line_exit_1(cfg, args, message):
    r = run(*args, "--config", cfg)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr
    assert "Traceback" not in r.stderr


def test_usage_errors_exit_2():
    r = run("block")
    assert r.returncode == 2 and "usage:" in r.stderr
    assert run("frobnicate").returncode == 2


def test_bad_config_is_reported_cleanly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[screen]\nbudgett = \"1s\"\n")
    r = run("config", "check", "--config", str(bad))
    assert r.returncode == 1 and "unknown key 'budgett' in [screen] (did you mean 'budget'?)" in r.stderr
    r = run("serve", "--config", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_config_check_and_dump(cfg, capsys):
    assert cli.main(["config", "check", "--config", cfg]) == 0
    assert "config OK" in capsys.readouterr().out
    assert cli.main(["config", "dump", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "[thresholds]" in out and "[rules.LIST_BLOCKED]" in out


def test_store_problem_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    db = ro / "x.db"
    db.write_bytes(b"this is not a database" * 100)
    path = tmp_path / "c.toml"
    path.write_text(f'[store]\npath = "{db}"\n')
    r = run("block", "+86170*", "--config", str(path))
    assert r.returncode == 1 and "corrupt or not an edgefilter database" in r.stderr and "Traceback" not in r.stderr


def test_try_call_against_nothing_says_fail_open(cfg):
    r = run("try-call", "+8613800138000", "--port", "1", "--config", cfg)
    assert r.returncode == 1 and "AGISTATUS=FAILURE" in r.stdout


def test_classic_agi_launcher_screens_over_stdin(tmp_path, cfg):
    assert cli.main(["block", "+86170*", "--config", cfg]) == 0
    from edgefilter.asterisk.callsim import CallSpec, build_env

    env = build_env(CallSpec(callerid=b"+8617012345678", script="screen"))
    # a classic AGI has no agi_network lines
    env = b"".join(ln + b"\n" for ln in env.split(b"\n")[:-1] if not ln.startswith(b"agi_network"))
    proc = subprocess.Popen(
        [str(ROOT / "agi" / "edgefilter-agi")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "EDGEFILTER_CONFIG": cfg},
    )
    proc.stdin.write(env)
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line.startswith(b'EXEC MSet "EDGEFILTER_ACTION=reject,')
    proc.stdin.write(b"200 result=0\n")
    proc.stdin.close()
    assert proc.wait(30) == 0
    assert proc.stdout.read() == b""

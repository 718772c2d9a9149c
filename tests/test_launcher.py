"""The classic per-process launcher, spawned the way Asterisk runs an AGI script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edgefilter.asterisk.callsim import CallSpec, build_env

SCRIPT = Path(__file__).resolve().parents[1] / "agi" / "edgefilter-agi"


def classic_env(callerid: str) -> bytes:
    env = build_env(CallSpec(callerid=callerid, script=str(SCRIPT)))
    return b"".join(line + b"\n" for line in env.split(b"\n") if line and not line.startswith(b"agi_network")) + b"\n"


def test_launcher_answers_one_mset_and_exits(tmp_path):
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "none.db"}"\n')
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "EDGEFILTER_CONFIG": str(cfg)}, cwd=tmp_path,
    )
    p.stdin.write(classic_env("anonymous"))
    p.stdin.flush()
    line = p.stdout.readline()
    p.stdin.write(b"200 result=0\n")
    p.stdin.close()
    rest = p.stdout.read()
    assert p.wait(10) == 0, p.stderr.read()
    assert line.startswith(b'EXEC MSet "EDGEFILTER_ACTION=challenge,') and b"CLI_WITHHELD" in line
    assert rest == b""

"""`make bench-asterisk` is not run in CI (minutes, figures, not behaviour); this checks that its
harness still works end to end on a few calls per path, through the real Asterisk."""

from __future__ import annotations

import json
import subprocess
import sys

from .pbx import REPO


def test_bench_asterisk_quick_run_measures_every_path(lab, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "asterisk.py"), "--quick", "--output", str(out)],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "EDGEFILTER_BENCH_TIMING": "sipp"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    cells = result["cells"]["1000"]
    assert set(cells) == {"none@20", "trivial@20", "bare@20", "subroutine@20"}
    for name, c in cells.items():
        assert c["failed"] == 0 and c["measured"] == c["calls"] == 6, (name, c)  # every call timed
        assert 0 < c["p50_ms"] < 1000 and c["p99_ms"] >= c["p50_ms"], (name, c)
        assert c["cpu_ms_per_call"]["asterisk"] >= 0
    runs = [x for x in result["runs"] if x["path"] == "subroutine"]
    assert runs and runs[0]["ok"] == 6  # half refused (403), half answered: all as the scenario expects
    assert "| edgefilter through the shipped `edgefilter-screen` subroutine |" in (out.with_suffix(".md")).read_text()
    assert "sipp" in result["timing"]

"""`make mutation`: mutmut on the functions that guard calls, and the score per module.

On demand, never in CI; it stops after --max-minutes (45 by default) and counts only the
mutants it reached. It runs mutmut (the optional
`mutation` extra) on the call path of agi, numbers, screen, lists, imports, the SQLite store and
challenge: every mutant is one small change to one function (an operator, a constant, a
condition, an argument dropped), and the suite's tests that reach that function run against it.
A mutant no test notices "survived": either a gap in the tests or a change that makes no
difference (an equivalent mutant, a log message). docs/testing.md says how to read the result.

Usage: tools/mutation.py [--jobs N] [--only MODULE ...] [--no-docs]
       tools/mutation.py --report-only     (score of the last run, from mutants/)

What runs and why (CALL_PATH below):
  * only the functions a call or an import goes through where it guards (reads hostile input,
    fails over, rolls back, seals), not their whole modules: argparse help, export, snapshot
    files and merge planning are left out, and so are the two biggest decision functions
    (agi.build_call, ListIndex.lookup: about 320 mutants that every service test reaches,
    the slowest third of a run; the suite already pins them, see docs/testing.md);
  * SQLite only: the PostgreSQL tests reset one shared database per test and cannot run in two
    mutant processes at once, so pgstore is left out (its import and rollback paths are guarded
    by the same CLI tests on both backends, see tests/test_import_failures.py);
  * tests that run edgefilter in a child process (the classic launcher, the CLI as a subprocess,
    worker pools) run the unmutated code: they cannot kill a mutant, so such a mutant counts as
    survived unless an in-process test catches it too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = ROOT / ".venv" / "bin" / "mutmut"
DOC = ROOT / "docs" / "testing.md"
START, END = "<!-- mutation-score:start -->", "<!-- mutation-score:end -->"

#: Per part of the call path (the score table's rows): for each module of that part, the functions
#: whose mutants are run (mutmut names: x_func, xǁClassǁmethod). The parts keep the names of the
#: modules they were before the package became layer folders (issue 18), so scores compare.
CALL_PATH: dict[str, dict[str, list[str]]] = {
    "agi": {
        "asterisk.envblock": ["x_read_env", "xǁ_EnvParserǁ*"],
        "asterisk.agi": ["x_unread_junk", "x_safe_value", "x_brackets_balanced", "x_mset_command", "xǁAgiSessionǁ*",
                         "xǁAgiServerǁ_session"],
    },
    "numbers": {"core.numbers": ["x_normalize", "x__normalize", "x__normalize_safe", "x_strip_visual", "x_fast_parse", "x__idd_pattern",
                                 "x__is_short"]},
    "screen": {"rules.screen": ["*"]},
    "lists": {
        "lists.patterns": ["x_parse_pattern", "x_make_pattern", "xǁPatternǁfrom_text", "x__international_digits", "xǁEntryǁactive"],
        "lists.index": ["x__mask_matches", "x_exact_num", "x_digits_num", "xǁListIndexǁexact", "xǁListIndexǁput", "xǁListIndexǁremove",
                        "xǁListIndexǁ_bucket", "xǁ_Compactǁfind"],
    },
    "imports": {"imports": ["x_cmd_import", "x__rows_reporting", "x_parse_expires", "x__stop", "x_cmd_remove_source"]},
    "store": {
        "store.sqlite_base": ["xǁSqliteBaseǁtransaction"],
        "store.sqlite_import": ["xǁSqliteImportǁbegin_import", "xǁSqliteImportǁ_staged_profile", "xǁSqliteImportǁstage_rows",
                                "xǁSqliteImportǁapply_import"],
        "store.sqlite_lists": ["xǁSqliteListsǁput_entry", "xǁSqliteListsǁ_put", "xǁSqliteListsǁremove_entry",
                               "xǁSqliteListsǁremove_source"],
    },
    "challenge": {"asterisk.challenge": [
        "xǁChallengeBookǁ*", "x__enc", "x__dec", "x_new_digit", "x_new_id", "x_challenge_secret", "xǁOutcomeǁ*",
        "xǁChallengeRecorderǁapply", "xǁChallengeRecorderǁ_allow_entry", "xǁChallengeFailuresǁ*",
    ]},
}
DETECTED = {"killed", "timeout", "caught by type check"}
MISSED = {"survived", "no tests", "suspicious"}


def globs(parts: list[str]) -> list[str]:
    return [f"edgefilter.{m}.{f}__mutmut_*" for part in parts for m, fs in CALL_PATH[part].items() for f in fs]


def part_of(name: str, parts: list[str]) -> str | None:
    """The part of the call path a mutant belongs to, or None when it was not selected."""
    from fnmatch import fnmatch

    for part in parts:
        if any(fnmatch(name, g) for g in globs([part])):
            return part
    return None


def selected(name: str, modules: list[str]) -> bool:
    return part_of(name, modules) is not None


def results(modules: list[str]) -> dict[str, Counter]:
    """Status counts per module for the selected mutants, from mutmut's record in mutants/."""
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    per: dict[str, Counter] = {m: Counter() for m in modules}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        part = part_of(name, modules) if sep else None
        if part is not None:
            per[part][status] += 1
    return per


def survivors(modules: list[str]) -> list[str]:
    out = subprocess.run([str(MUTMUT), "results"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ln.strip().rpartition(": ")[0] for ln in out.splitlines()
            if ln.strip().endswith(": survived") and selected(ln.strip().rpartition(": ")[0], modules)]


def table(per: dict[str, Counter]) -> list[str]:
    rows = ["| module | mutants run | killed | survived | no test reaches it | timeout | score |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    total = Counter()
    for m, c in per.items():
        total.update(c)
        rows.append(_row(m, c))
    rows.append(_row("**all**", total))
    return rows


def _row(label: str, c: Counter) -> str:
    det = sum(c[s] for s in DETECTED)
    missed = sum(c[s] for s in MISSED)
    score = f"{100.0 * det / (det + missed):.1f} %" if det + missed else "-"
    return f"| {label} | {det + missed} | {c['killed']} | {c['survived']} | {c['no tests']} | {c['timeout']} | {score} |"


def write_doc(lines: list[str]) -> None:
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + START + "\n" + "\n".join(lines) + "\n" + END + tail)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-minutes", type=float, default=45.0,
                    help="stop mutmut after this long and report what ran (default 45; 0: no limit)")
    ap.add_argument("--only", nargs="+", choices=sorted(CALL_PATH), help="these modules only (the score table then covers only them)")
    ap.add_argument("--no-docs", action="store_true", help="print the score, leave docs/testing.md as it is")
    ap.add_argument("--report-only", action="store_true", help="no run: the score of the last one")
    args = ap.parse_args()
    modules = args.only or list(CALL_PATH)
    if not MUTMUT.exists():
        print("mutmut is not installed: make mutation installs the 'mutation' extra", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    capped = False
    if not args.report_only:
        # A fresh copy every time: mutmut keeps results per mutant and would skip unchanged ones,
        # but the tests may have changed since.
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        (ROOT / "mutants").mkdir()
        # tests start agi/edgefilter-agi from the copy: it finds its interpreter at ../.venv
        (ROOT / "mutants" / ".venv").symlink_to(ROOT / ".venv")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFILTER_TEST_PG")}
        cmd = [str(MUTMUT), "run", "--max-children", str(args.jobs), *globs(modules)]
        print(f"mutation: {len(modules)} modules, {args.jobs} processes; progress in mutants/run.log", flush=True)
        with open(ROOT / "mutants" / "run.log", "wb") as logf:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.max_minutes * 60 or None)
            except subprocess.TimeoutExpired:  # bounded: mutmut keeps each result as it comes
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = 0
                capped = True
        if rc != 0:
            tail = (ROOT / "mutants" / "run.log").read_bytes()[-3000:].decode("utf-8", "replace").replace("\r", "\n")
            print(f"mutmut failed ({rc}):\n{tail}", file=sys.stderr)
            return 1
    minutes = (time.monotonic() - t0) / 60
    per = results(modules)
    lines = table(per)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    stamp = (f"Last run {when}" + (f", {minutes:.0f} min with {args.jobs} processes" if not args.report_only else "")
             + f" (`make mutation`, mutmut {_mutmut_version()}).")
    unrun = sum(c["not checked"] for c in per.values())
    if capped or unrun:
        stamp += f" Stopped at the time limit: {unrun} selected mutants not run (not counted)."
    print("\n".join(lines))
    print(stamp)
    left = survivors(modules)
    if left:
        print(f"\n{len(left)} survivors; see one with: .venv/bin/mutmut show NAME")
        for name in left[:20]:
            print("  " + name)
    if not args.no_docs and not args.only:
        write_doc([stamp, "", *lines])
        print(f"score written to {DOC.relative_to(ROOT)}")
    return 0


def _mutmut_version() -> str:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mutmut'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())

"""A big feed parsed in worker processes reads exactly as in one process (feedworkers)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefilter import cli
from edgefilter.lists import feedworkers
from edgefilter.lists.feeds import FeedError, FeedOptions, chunked, feed_values, parse_feed, plan_slices
from edgefilter.lists.index import exact_num

OPTS = FeedOptions(list_name="block", region="DE", source="feed", created_at=1.0,
                   categories=frozenset({"marketing", "fraud", "scam"}))


def flat(chunks) -> list[tuple]:
    """Every chunk's content as one list in line order: what the import acts on."""
    out = []
    for c in chunks:
        out += [(no, "refused", reason) for no, reason in c.refused]
        out += [(no, text, num, c.metas[mid]) for no, text, num, mid in zip(c.lines, c.patterns, c.nums, c.meta_ids, strict=True)]
    return sorted(out, key=lambda t: t[0])


def one_process(text: str, fmt: str) -> list[tuple]:
    """What parse_feed says line by line, from its Entry objects (the reference)."""
    out = []
    for no, item in parse_feed(text, fmt, OPTS):
        if isinstance(item, str):
            out.append((no, "refused", item))
        else:
            meta = (item.list, item.category, item.note, item.source, item.created_at, item.expires_at)
            out.append((no, item.pattern.text, exact_num(item.pattern), meta))
    return out


def messy_lines(n: int, seed: int, csv: bool) -> list[str]:
    """Good numbers in every spelling, patterns, duplicates, comments, blanks and garbage."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        r = rnd.random()
        d = f"{rnd.randrange(10**8):08d}"
        if r < 0.35:
            value = f"+4930{d}"
        elif r < 0.5:
            value = f"0030{d}"  # DE dials 00: international
        elif r < 0.6:
            value = f"030 {d[:4]} {d[4:]}"  # national with spaces
        elif r < 0.65:
            value = f"+49 30 {d[:3]}*"  # a prefix
        elif r < 0.7:
            value = f"+49305{d[:3]}####"  # a mask
        elif r < 0.8:
            value = f"+4930{rnd.randrange(100):08d}"  # duplicates, some across slices
        elif r < 0.85:
            value = rnd.choice(["garbage", "+", "12ab34", "\u00e9\u00e9\u00e9", "++49 30 1234567", "x" * 300])
        elif r < 0.9:
            out.append(rnd.choice(["", "   ", "# a comment", "  # indented comment"]))
            continue
        else:
            value = f"+86 138 {d[:4]} {d[4:]}"
        if csv:
            cat = rnd.choice(["marketing", "fraud", "", "Scam", "unknown-cat"])
            out.append(f"{value};{cat};caller {rnd.randrange(5)}")
        else:
            out.append(value + (f"  # note {rnd.randrange(3)}" if rnd.random() < 0.2 else ""))
    return out


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of 97 lines from 200 lines on: many slices, boundaries everywhere."""
    monkeypatch.setattr(feedworkers, "PARALLEL_MIN_LINES", 200)
    monkeypatch.setattr(feedworkers, "SLICE_LINES", 97)


@pytest.mark.parametrize("kind", ["text", "csv-header", "csv-no-header", "csv-crlf-bom"])
def test_workers_read_a_file_exactly_as_one_process(small_slices, kind):
    lines = messy_lines(2000, seed=hash(kind) & 0xFFFF, csv=kind.startswith("csv"))
    if kind == "csv-header":
        lines = ["# exported 2026-11-28", "", "Number;Category;Name"] + lines
    if kind == "csv-crlf-bom":
        lines = ["\ufeffphone;type;full name"] + lines
    sep = "\r\n" if kind == "csv-crlf-bom" else "\n"
    text = sep.join(lines) + sep
    fmt = "text" if kind == "text" else "csv"
    plan = plan_slices(text, fmt, OPTS, feedworkers.SLICE_LINES)
    assert plan is not None and len(plan.ranges) > 10  # really cut
    one = one_process(text, fmt)
    assert flat(chunked(feed_values(text, fmt, OPTS), OPTS, size=333)) == one
    many = flat(feedworkers.parse_chunks(text, fmt, OPTS, jobs=3))
    assert many == one
    assert sum(1 for t in one if t[1] == "refused") > 50 and sum(1 for t in one if t[1] != "refused") > 1000


def test_files_that_cannot_be_cut_are_read_in_this_process(small_slices):
    quoted = "number,name\n" + "".join(f'+4930{i:08d},"Name, with comma {i}"\n' for i in range(500))
    assert plan_slices(quoted, "csv", OPTS, 97) is None  # a quoted field may span lines
    chunks = feedworkers.parse_chunks(quoted, "csv", OPTS, jobs=3)
    assert not isinstance(chunks, feedworkers._InOrder)
    assert len(flat(chunks)) == 500
    vcf = "".join(f"BEGIN:VCARD\nFN:P {i}\nTEL:+4930{i:08d}\nEND:VCARD\n" for i in range(100))
    assert plan_slices(vcf, "vcf", OPTS, 97) is None


def test_a_bad_column_is_reported_before_any_worker_starts(small_slices):
    text = "number,name\n" + "".join(f"+4930{i:08d},n\n" for i in range(500))
    with pytest.raises(FeedError, match="no such column"):
        feedworkers.parse_chunks(text, "csv", FeedOptions(column="fax"), jobs=2)


def _import(tmp_path: Path, feed: Path, jobs: int, capsys) -> tuple[int, str, str, list]:
    import sqlite3

    db = tmp_path / f"j{jobs}.db"
    cfg = tmp_path / f"j{jobs}.toml"
    cfg.write_text(f'[store]\npath = "{db}"\n')
    rc = cli.main(["import", str(feed), "--jobs", str(jobs), "--config", str(cfg)])
    out, err = capsys.readouterr()
    con = sqlite3.connect(db)
    rows = con.execute("SELECT list, pattern, kind, key, category, note, source, num, profile IS NOT NULL FROM entries ORDER BY 1, 2").fetchall()
    con.close()
    return rc, out, err.replace(f"j{jobs}", "jN"), rows


def test_cli_import_with_workers_says_and_writes_the_same(tmp_path, small_slices, capsys):
    feed = tmp_path / "feed.csv"
    feed.write_text("number;category;name\n" + "\n".join(messy_lines(3000, seed=7, csv=True)) + "\n")
    one = _import(tmp_path, feed, 1, capsys)
    two = _import(tmp_path, feed, 2, capsys)
    assert one == two
    rc, out, err, rows = two
    assert rc == 0 and "duplicate of line" in err and "unknown category" in err and len(rows) > 1500
    assert any(r[2] == "prefix" and r[7] is None for r in rows) and any(r[2] == "mask" for r in rows)


def test_bad_jobs_value_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["import", str(tmp_path / "x.txt"), "--jobs", "0"])
    assert e.value.code == 2 and "a number of processes" in capsys.readouterr().err


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


@pytest.mark.skipif(not Path("/proc/self/task").exists() or sys.platform != "linux", reason="needs Linux /proc")
def test_killing_an_import_kills_its_workers(tmp_path):
    """kill -9 of the import: no orphaned worker goes on parsing (PR_SET_PDEATHSIG)."""
    if not (Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")).exists():
        pytest.skip("kernel without /proc/<pid>/task/<tid>/children")
    feed = tmp_path / "big.txt"
    feed.write_text("".join(f"+49301{i:07d}\n" for i in range(400_000)))
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "k.db"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "edgefilter", "import", str(feed), "--jobs", "2", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        kids: set[int] = set()
        while time.monotonic() < deadline and len(kids) < 2 and proc.poll() is None:
            kids = _children(proc.pid)
            time.sleep(0.01)
        assert len(kids) >= 2, "the import never started its workers"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{k}").exists() and _state(k) != "Z" for k in kids):
            time.sleep(0.02)
        assert not [k for k in kids if Path(f"/proc/{k}").exists() and _state(k) != "Z"]
    finally:
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_no_worker_processes_to_be_had_means_one_process(small_slices, monkeypatch):
    """A container without /dev/shm (no semaphores) or a process limit: the file is still read."""
    def refuse(*a, **kw):
        raise NotImplementedError("no sem_open")

    monkeypatch.setattr(feedworkers, "ProcessPoolExecutor", refuse)
    text = "\n".join(messy_lines(500, seed=3, csv=False)) + "\n"
    chunks = feedworkers.parse_chunks(text, "text", OPTS, jobs=4)
    assert flat(chunks) == one_process(text, "text")

"""Store faults: a locked, read-only, full or corrupt database.

The call path reads memory only, so a sick store must never delay or change a verdict: the
service keeps screening within its budget, says once what is wrong (not once per call), and
catches up when the store heals. The CLI says what is wrong in one line (exit 1, no
traceback), and no fault ever leaves half a change behind.

Faults are real SQLite errors: another connection holding BEGIN EXCLUSIVE (locked),
``PRAGMA query_only`` (SQLITE_READONLY: works as root too, unlike chmod), ``PRAGMA
max_page_count`` pinned to the current size (SQLITE_FULL), random bytes (corrupt).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefilter import cli
from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.service import Service
from edgefilter.store import sqlite as store_mod
from edgefilter.store.sqlite import CallRecord, Store

from .conftest import behaviour_off


@pytest.fixture
def make_settings(make_settings):
    """This module's calls come from many numbers of one block in a row: keep the behaviour
    rules (RANGE_CAMPAIGN, RATE_*) out, so each test sees only the protection it is about."""
    return behaviour_off(make_settings)



def write_config(tmp_path: Path, db: Path, extra: str = "") -> Path:
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[store]\npath = "{db}"\nbusy_timeout = "200ms"\n{extra}')
    return cfg


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgefilter: error: "), err
    for w in words:
        assert w in lines[0], (w, err)


def make_corrupt(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))


async def fill_pages(store: Store) -> None:
    """Pin the database at its current size: the next write that needs a page fails (SQLITE_FULL)."""
    (n,) = await (await store.db.execute("PRAGMA page_count")).fetchone()
    await store.db.execute(f"PRAGMA max_page_count = {n}")


# ----------------------------------------------------------------------------- the service
async def _calls(port: int, n: int, budget: float) -> None:
    for i in range(n):
        r = await place_call("127.0.0.1", port, CallSpec(callerid=b"+8613900139%03d" % i), timeout=3.0)
        assert r.closed_by_server and r.variables["EDGEFILTER_ACTION"] == "allow", r
        # Calls never touch the store: the bound catches one that waits on it (a retry, a lock, a
        # backoff of up to [store] max_delay) and holds on a loaded machine.
        assert r.elapsed < budget * 5, f"call took {r.elapsed * 1000:.1f} ms with the store failing"


async def _wait_for(cond, timeout: float = 3.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("fault", ["locked", "readonly", "full", "corrupt"])
async def test_service_keeps_screening_on_a_sick_store_and_says_so_once(make_settings, caplog, fault):
    caplog.set_level(logging.INFO, logger="edgefilter.service")
    settings = make_settings(store={"busy_timeout": "100ms"})
    svc = Service(settings, port=0)
    await svc.start()
    svc.calllog.max_delay = 0.3  # retry often: the test heals the store and waits for the drain
    other = None
    try:
        await _calls(svc.port, 3, settings.screen.budget)
        await _wait_for(lambda: svc.calllog.written == 3)
        if fault == "locked":
            other = sqlite3.connect(settings.store.path, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
        elif fault == "readonly":
            await svc.store.db.execute("PRAGMA query_only = 1")
        elif fault == "full":
            await fill_pages(svc.store)
        else:  # garbage over every page but the header, and a cache too small to hide it
            await svc.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await svc.store.db.execute("PRAGMA cache_size = 1")
            db = Path(settings.store.path)
            with db.open("r+b") as f:
                f.seek(4096)
                f.write(os.urandom(db.stat().st_size - 4096))
        # a few seconds of traffic while the store fails: every call answered within budget
        t0 = time.monotonic()
        made = 0
        while svc.calllog.failures < 3 or made < 100:  # at least 3 failed attempts, 100 calls
            await _calls(svc.port, 20, settings.screen.budget)
            made += 20
            assert time.monotonic() - t0 < 10, "the fault was not hit: the test proves nothing"
            await asyncio.sleep(0.1)
        warnings = [r for r in caplog.records if "call log write failed" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once, not per retry
        words = {"locked": "locked", "readonly": "read-only", "full": "disk is full", "corrupt": "corrupt"}[fault]
        assert words in warnings[0].getMessage()
        if fault == "corrupt":  # nothing to heal; the follower says it once too
            assert sum("list follower failed" in r.getMessage() for r in caplog.records) == 1
            return
        # heal: everything queued is written, nothing lost, recovery logged
        if other is not None:
            other.execute("ROLLBACK")
        elif fault == "readonly":
            await svc.store.db.execute("PRAGMA query_only = 0")
        else:
            await svc.store.db.execute("PRAGMA max_page_count = 1073741823")
        await _wait_for(lambda: svc.calllog.written == 3 + made, timeout=5.0)
        await _wait_for(lambda: "call log writes recovered" in caplog.text, timeout=2.0)  # logged after the drain
        assert len(await svc.store.recent_calls(0)) == 3 + made
    finally:
        if other is not None:
            other.close()
        await svc.stop()


async def test_list_changes_still_reach_memory_while_the_call_log_is_failing(make_settings, tmp_path, caplog):
    # The follower reads; a writer stuck on a lock must not freeze screening decisions.
    settings = make_settings(store={"busy_timeout": "100ms"})
    svc = Service(settings, port=0)
    await svc.start()
    try:
        other = sqlite3.connect(settings.store.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        await _calls(svc.port, 5, settings.screen.budget)
        other.execute("ROLLBACK")
        other.close()
        cfg = write_config(tmp_path, Path(settings.store.path))
        assert await asyncio.to_thread(cli.main, ["block", "+8613900139999", "--config", str(cfg)]) == 0
        await _wait_for(lambda: svc.screener.index.size == 1)
        r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=b"+8613900139999"), timeout=3.0)
        assert r.variables["EDGEFILTER_ACTION"] == "reject"
    finally:
        await svc.stop()


def test_service_refuses_to_start_on_a_corrupt_database(tmp_path):
    db = tmp_path / "edgefilter.db"
    make_corrupt(db)
    cfg = write_config(tmp_path, db, '[agi]\nlisten = "127.0.0.1:0"\n')
    p = subprocess.run([sys.executable, "-m", "edgefilter", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"edgefilter: error: {db}: database file is corrupt or not an edgefilter database (file is not a database)"
    )


# ---------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("argv", [["block", "+8613800138000"], ["list"], ["check", "+8613800138000"], ["remove", "+8613800138000"]])
def test_cli_on_a_corrupt_database(tmp_path, capsys, argv):
    db = tmp_path / "edgefilter.db"
    make_corrupt(db)
    cfg = write_config(tmp_path, db)
    rc, out, err = run_cli(capsys, *argv, "--config", str(cfg))
    assert_one_line_error(rc, err, str(db), "corrupt")
    assert db.read_bytes()[:16] == b"SQLite format 3\x00"  # left as found


@pytest.mark.parametrize("argv", [["block", "+8613900139000"], ["remove", "+8613800138000"]])
def test_cli_on_a_locked_database(tmp_path, capsys, argv):
    db = tmp_path / "edgefilter.db"
    cfg = write_config(tmp_path, db)
    assert run_cli(capsys, "block", "+8613800138000", "--config", str(cfg))[0] == 0
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        rc, out, err = run_cli(capsys, *argv, "--config", str(cfg))
        assert time.monotonic() - t0 < 4.0  # [store] busy_timeout = 200ms, not the default 5 s
        assert_one_line_error(rc, err, "locked")
        # reads still work in WAL mode while another process writes
        rc, out, err = run_cli(capsys, "list", "--config", str(cfg))
        assert rc == 0 and "+8613800138000" in out
    finally:
        other.execute("ROLLBACK")
        other.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT pattern FROM entries").fetchall() == [("+8613800138000",)]
    assert con.execute("SELECT COUNT(*) FROM changes").fetchone() == (1,)
    con.close()


@pytest.fixture
def sick_store(monkeypatch):
    """Make every Store the CLI opens read-only or full (real SQLite errors, any user id)."""

    def install(kind: str) -> None:
        orig = store_mod.Store._setup

        async def setup(self, busy_timeout_ms):
            await orig(self, busy_timeout_ms)
            if kind == "readonly":
                await self.db.execute("PRAGMA query_only = 1")
            else:
                await fill_pages(self)

        monkeypatch.setattr(store_mod.Store, "_setup", setup)

    return install


def test_cli_on_a_read_only_database(tmp_path, capsys, sick_store):
    db = tmp_path / "edgefilter.db"
    cfg = write_config(tmp_path, db)
    assert run_cli(capsys, "block", "+8613800138000", "--config", str(cfg))[0] == 0
    sick_store("readonly")
    for argv in (["block", "+8613900139000"], ["remove", "+8613800138000"]):
        rc, out, err = run_cli(capsys, *argv, "--config", str(cfg))
        assert_one_line_error(rc, err, "read-only")
    rc, out, err = run_cli(capsys, "list", "--config", str(cfg))
    assert rc == 0 and "+8613800138000" in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_cli_on_a_read_only_file(tmp_path, capsys):
    db = tmp_path / "edgefilter.db"
    cfg = write_config(tmp_path, db)
    assert run_cli(capsys, "block", "+8613800138000", "--config", str(cfg))[0] == 0
    for f in tmp_path.glob("edgefilter.db*"):
        f.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        rc, out, err = run_cli(capsys, "block", "+8613900139000", "--config", str(cfg))
        assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "read-only" in err or "cannot open" in err
    finally:
        tmp_path.chmod(0o755)


def test_cli_on_a_full_disk_writes_all_or_nothing(tmp_path, capsys, sick_store):
    db = tmp_path / "edgefilter.db"
    cfg = write_config(tmp_path, db)
    assert run_cli(capsys, "block", "+8613800138000", "--config", str(cfg))[0] == 0
    sick_store("full")
    added = 0
    for i in range(200):
        rc, out, err = run_cli(capsys, "block", f"+86139001{i:05d}", "--note", "n" * 500, "--config", str(cfg))
        if rc:
            assert_one_line_error(rc, err, "disk is full")
            break
        added += 1
    else:
        pytest.fail("the pinned database never filled up: the test proves nothing")
    con = sqlite3.connect(db)
    entries = con.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    changes = con.execute("SELECT COUNT(*) FROM changes").fetchone()[0]
    assert entries == changes == 1 + added  # every entry has its change-feed row, nothing half-written
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()


async def test_a_batch_of_call_records_is_written_whole_or_not_at_all(tmp_path):
    async with Store.open(str(tmp_path / "e.db")) as st:
        await fill_pages(st)
        recs = [CallRecord(time.time(), f"u{i}", "+8613800138000", None, "valid", "n" * 100, "1000", "1000",
                           "from-trunk", "allow", None, 0.0, "", "default", 0.1) for i in range(2000)]
        with pytest.raises(sqlite3.OperationalError, match="full"):
            await st.record_calls(recs)
        assert await st.recent_calls(0) == []
        await st.db.execute("PRAGMA max_page_count = 1073741823")
        assert await st.record_calls(recs) == 2000


def test_describe_sqlite_error_words():
    d = store_mod.describe_sqlite_error
    assert "locked" in d("x.db", sqlite3.OperationalError("database is locked"))
    assert "read-only" in d("x.db", sqlite3.OperationalError("attempt to write a readonly database"))
    assert "disk is full" in d("x.db", sqlite3.OperationalError("database or disk is full"))
    assert "corrupt" in d("x.db", sqlite3.DatabaseError("file is not a database"))
    assert "corrupt" in d("x.db", sqlite3.DatabaseError("database disk image is malformed"))
    assert "disk I/O error" in d("x.db", sqlite3.OperationalError("disk I/O error"))


@pytest.mark.parametrize("argv,op", [(["block", "+8613900139000"], "put"), (["remove", "+8613800138000"], "del")])
def test_a_failure_between_the_entry_and_its_change_row_leaves_nothing(tmp_path, capsys, argv, op):
    # Deterministic mid-transaction fault: a trigger makes the second statement (the change-feed
    # row) fail after the entry row was written. The whole change must be rolled back, or the
    # running service would never hear of an entry that is on disk (or of one removed).
    db = tmp_path / "edgefilter.db"
    cfg = write_config(tmp_path, db)
    assert run_cli(capsys, "block", "+8613800138000", "--config", str(cfg))[0] == 0
    con = sqlite3.connect(db, isolation_level=None)
    before = (con.execute("SELECT list, pattern FROM entries").fetchall(), con.execute("SELECT * FROM changes").fetchall())
    con.execute(f"CREATE TRIGGER boom BEFORE INSERT ON changes WHEN NEW.op = '{op}' "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    rc, out, err = run_cli(capsys, *argv, "--config", str(cfg))
    assert_one_line_error(rc, err, "disk is full")
    after = (con.execute("SELECT list, pattern FROM entries").fetchall(), con.execute("SELECT * FROM changes").fetchall())
    con.close()
    assert after == before

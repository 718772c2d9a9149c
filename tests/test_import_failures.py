"""Imports that go wrong, through the real CLI on each store backend (SQLite, and PostgreSQL
when a test server is set): a database that fails in the middle of the import's transaction
leaves the lists exactly as they were, and ``--replace-source`` with a feed that has no entries
(empty, comments only, blank lines) refuses to delete the whole source.

The failing database is a real one: a trigger makes the DELETE of ``--replace-source`` fail
after the new entries and their change rows were already written inside the transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from edgefilter import cli
from edgefilter.imports import EXIT_REFUSED

from .conftest import PG_URL

OLD = ("+8613800138000", "+8613800138001")
NEW = ("+8613800138001", "+8613800138002", "+86170*")


@pytest.fixture
def backend(store_backend, tmp_path):
    """(config file, database helpers) for the backend under test."""
    if store_backend == "postgresql":
        cfg = tmp_path / "edgefilter.toml"
        cfg.write_text(f'[store]\nurl = "{PG_URL}"\nspool_path = "{tmp_path / "spool.db"}"\n')
        return str(cfg), PgDb(PG_URL)
    db = tmp_path / "e.db"
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[store]\npath = "{db}"\n')
    return str(cfg), SqliteDb(str(db))


class SqliteDb:
    def __init__(self, path: str) -> None:
        self.path = path

    def _run(self, sql: str, fetch: bool = False):
        con = sqlite3.connect(self.path)
        try:
            cur = con.execute(sql)
            rows = cur.fetchall() if fetch else None
            con.commit()
            return rows
        finally:
            con.close()

    def state(self) -> tuple[list, int]:
        entries = self._run("SELECT list, pattern, category, note, source, created_at, expires_at FROM entries ORDER BY 1, 2", True)
        (changes,) = self._run("SELECT COUNT(*) FROM changes", True)[0]
        return [tuple(r) for r in entries], changes

    def fail_deleting(self, pattern: str) -> None:
        self._run(f"CREATE TRIGGER boom BEFORE DELETE ON entries WHEN old.pattern = '{pattern}' "
                  "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")

    def heal(self) -> None:
        self._run("DROP TRIGGER boom")


class PgDb:
    def __init__(self, url: str) -> None:
        self.url = url

    def _run(self, sql: str, fetch: bool = False):
        import asyncpg

        async def go():
            conn = await asyncpg.connect(self.url)
            try:
                return await conn.fetch(sql) if fetch else await conn.execute(sql)
            finally:
                await conn.close()

        return asyncio.run(go())

    def state(self) -> tuple[list, int]:
        entries = self._run("SELECT list, pattern, category, note, source, created_at, expires_at FROM entries ORDER BY 1, 2", True)
        changes = self._run("SELECT COUNT(*) FROM changes", True)[0][0]
        return [tuple(r) for r in entries], changes

    def fail_deleting(self, pattern: str) -> None:
        self._run(
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF OLD.pattern = '{pattern}' THEN RAISE EXCEPTION 'disk on fire'; END IF; RETURN OLD; END $$; "
            "CREATE TRIGGER boom BEFORE DELETE ON entries FOR EACH ROW EXECUTE FUNCTION boom()"
        )

    def heal(self) -> None:
        self._run("DROP TRIGGER boom ON entries; DROP FUNCTION boom()")


def run(capsys, cfg: str, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([*argv, "--config", cfg])
    out, err = capsys.readouterr()
    return rc, out, err


def feed(tmp_path, name: str, lines) -> str:
    f = tmp_path / name
    f.write_text("".join(f"{x}\n" for x in lines))
    return str(f)


def test_a_database_failing_inside_the_import_leaves_the_lists_as_they_were(backend, tmp_path, capsys):
    cfg, db = backend
    assert run(capsys, cfg, "import", feed(tmp_path, "v1.txt", OLD), "--source", "feed")[0] == 0
    assert run(capsys, cfg, "block", "+8613900139000")[0] == 0  # another source, left alone
    before = db.state()
    assert [r[1] for r in before[0]] == ["+8613800138000", "+8613800138001", "+8613900139000"]
    db.fail_deleting(OLD[0])  # the new entries are written first, then the DELETE of OLD[0] fails
    v2 = feed(tmp_path, "v2.txt", NEW)
    rc, out, err = run(capsys, cfg, "import", v2, "--source", "feed", "--replace-source")
    assert rc == 1 and "disk on fire" in err and err.count("\n") == 1, err  # one line, no traceback
    assert "added" not in out
    assert db.state() == before, "a failed import left part of its transaction behind"
    # nothing half-done stands in the way: the same import goes through once the database heals
    db.heal()
    rc, out, err = run(capsys, cfg, "import", v2, "--source", "feed", "--replace-source")
    assert rc == 0 and "added 2, updated 0, unchanged 1" in out and "removed 1" in out, (out, err)
    assert [r[1] for r in db.state()[0]] == ["+8613800138001", "+8613800138002", "+8613900139000", "+86170*"]


EMPTY_FEEDS = {
    "empty": b"",
    "comments only": b"# community spam list, refreshed nightly\n# (no entries today)\n",
    "blank lines and a BOM": b"\xef\xbb\xbf\r\n\r\n   \r\n",
    "CSV header only": b"number,category,note\n",
}


@pytest.mark.parametrize("content", EMPTY_FEEDS.values(), ids=EMPTY_FEEDS.keys())
def test_replace_source_with_a_feed_without_entries_deletes_nothing(backend, tmp_path, capsys, content):
    """A feed that came back empty (a failed download, a truncated file) must not wipe the
    source it replaces: the import is refused, exit 3, the lists untouched."""
    cfg, db = backend
    assert run(capsys, cfg, "import", feed(tmp_path, "v1.txt", OLD), "--source", "feed")[0] == 0
    before = db.state()
    name = "feed.csv" if content.startswith(b"number") else "feed.txt"
    f = tmp_path / name
    f.write_bytes(content)
    rc, out, err = run(capsys, cfg, "import", str(f), "--source", "feed", "--replace-source")
    assert rc == EXIT_REFUSED, (rc, out, err)
    assert "--replace-source would delete every entry of 'feed'; nothing written" in err
    assert db.state() == before
    # without --replace-source the same empty feed is harmless and says so
    rc, out, err = run(capsys, cfg, "import", str(f), "--source", "feed")
    assert rc == 0 and "0 entries read, added 0, updated 0, unchanged 0" in out, (out, err)
    assert db.state() == before

"""Schema v7 of the SQLite entries table: no per-row insert trigger, candidates() read by index."""

from __future__ import annotations

import sqlite3

from edgefilter.lists.index import Entry, ListIndex, parse_pattern
from edgefilter.store import sqlite as sqlite_store
from edgefilter.store.sqlite import Store, load_index


def mk(list_name: str, text: str, **kw) -> Entry:
    return Entry(list_name, parse_pattern(text, "CN"), source=kw.pop("source", "t"), created_at=1.0, **kw)


ENTRIES = [
    mk("block", "+8613800138000", category="fraud"),
    mk("allow", "+8613800138000", note="the boss"),
    mk("block", "+86138*"),
    mk("allow", "+8613800*"),
    mk("block", "+86138001#####"),
    mk("block", "+86139001#####"),
    mk("block", "95588"),
    mk("block", "+8613900139000"),
]


async def test_candidates_find_every_kind_and_scan_no_table(tmp_path):
    db = str(tmp_path / "e.db")
    async with Store.open(db) as store:
        await store.import_entries(ENTRIES)
        # a foreign writer's exact row without num: found by its pattern too
        await store.db.execute(
            "INSERT INTO entries (list, pattern, kind, key, created_at) VALUES ('block', '+8613800138001', 'exact', '8613800138001', 1)"
        )
        await store.db.commit()
        statements: list[str] = []
        await store.db.set_trace_callback(statements.append)
        got = await store.candidates("8613800138000")
        got_foreign = await store.candidates("8613800138001")
        await store.db.set_trace_callback(None)
    assert {(e.list, e.pattern.text) for e in got} == {
        ("block", "+8613800138000"), ("allow", "+8613800138000"), ("block", "+86138*"), ("allow", "+8613800*"),
        ("block", "+86138001#####"), ("block", "+86139001#####"),  # same-length masks: ListIndex decides
    }
    assert ("block", "+8613800138001") in {(e.list, e.pattern.text) for e in got_foreign}
    index = ListIndex()
    index.extend(got)
    assert index.lookup("8613800138000").entry.list == "allow"  # as the full index decides
    _, full = load_index(db)
    assert full.lookup("8613800138000") == index.lookup("8613800138000")
    sql = next(s for s in statements if "UNION ALL" in s)
    con = sqlite3.connect(db)
    plan = [r[3] for r in con.execute("EXPLAIN QUERY PLAN " + sql)]
    con.close()
    assert plan and not [p for p in plan if p.startswith("SCAN")], plan  # 10 million rows: never a scan


async def test_a_v6_database_gets_v7_and_keeps_its_entries(tmp_path):
    db = str(tmp_path / "v6.db")
    con = sqlite3.connect(db)
    for v in (1, 2, 3, 4, 5, 6):
        con.executescript(sqlite_store.MIGRATIONS[v])
    # v6 as shipped: a full key index and the per-row trigger (migration 3 then created it)
    con.executescript(
        "CREATE TRIGGER entries_num_insert AFTER INSERT ON entries WHEN NEW.num IS NULL AND NEW.kind = 'exact' "
        "BEGIN UPDATE entries SET num = CAST('1' || NEW.key AS INTEGER) WHERE list = NEW.list AND pattern = NEW.pattern; END;"
    )
    con.execute("INSERT INTO entries (list, pattern, kind, key, created_at) VALUES ('block', '+8613800138000', 'exact', '8613800138000', 1)")
    con.execute("INSERT INTO entries (list, pattern, kind, key, created_at) VALUES ('block', '+86138*', 'prefix', '86138', 1)")
    con.execute("PRAGMA user_version = 6")
    con.commit()
    con.close()
    async with Store.open(db) as store:
        assert await store.schema_version() == sqlite_store.SCHEMA_VERSION  # 7, then 8 (appeals) on top
        await store.put_entry(mk("block", "+8613900139000"))
        got = {e.pattern.text for e in await store.candidates("8613800138000")}
    assert got == {"+8613800138000", "+86138*"}
    con = sqlite3.connect(db)
    schema = dict(con.execute("SELECT name, sql FROM sqlite_master WHERE tbl_name = 'entries'").fetchall())
    con.close()
    assert "entries_num_insert" not in schema
    assert "WHERE num IS NULL" in schema["entries_key"] and "entries_masks" in schema
    _, index = load_index(db)
    assert index.lookup("8613800138000") is not None and index.lookup("8613900139000") is not None
    assert index.compact_arrays()["block"][0].tolist() == [18613800138000, 18613900139000]


async def test_updated_entries_get_their_profile_in_the_same_pass(tmp_path):
    """A re-import that changes every entry's source and expiry keeps each entry's created_at and
    gives it the matching profile at once (no NULL profile left for a second pass)."""
    db = str(tmp_path / "u.db")
    numbers = [f"+86138{i:08d}" for i in range(300)]
    async with Store.open(db) as store:
        await store.import_entries([Entry("block", parse_pattern(n, "CN"), category="fraud", source="a", created_at=100.0)
                                    for n in numbers])
        await store.import_entries([Entry("block", parse_pattern(n, "CN"), category="fraud", source="a", created_at=50.0)
                                    for n in numbers[:10]])  # unchanged: created_at is not compared
        result = await store.import_entries(
            [Entry("block", parse_pattern(n, "CN"), category="scam" if i % 2 else "fraud", source="b", created_at=200.0,
                   expires_at=9e9) for i, n in enumerate(numbers)] + [mk("block", "+8613900139000")])
    assert (result.added, result.updated, result.unchanged) == (1, 300, 0)
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT e.pattern, e.profile, e.category, e.source, e.created_at, e.expires_at, "
        "p.category, p.source, p.created_at, p.expires_at FROM entries e LEFT JOIN profiles p ON p.id = e.profile"
    ).fetchall()
    con.close()
    assert len(rows) == 301 and all(r[1] is not None for r in rows)
    assert all(r[2:6] == r[6:10] for r in rows)  # the profile says what the row says
    assert {r[4] for r in rows if r[0] in numbers} == {100.0}  # created_at kept
    _, index = load_index(db)
    assert sum(len(k) for k, _ in index.compact_arrays().values()) == 301  # all compact, none in dicts
    hit = index.lookup("8613800000001", 10.0).entry
    assert (hit.category, hit.source, hit.created_at, hit.expires_at) == ("scam", "b", 100.0, 9e9)

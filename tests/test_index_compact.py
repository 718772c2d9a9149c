"""The compact (array) storage of ListIndex behaves exactly like the dict storage it replaces."""

from __future__ import annotations

import asyncio
import random
from array import array

import pytest

from edgefilter.lists.index import DELETED, Entry, ListIndex, Pattern, _Compact, digits_num, parse_pattern
from edgefilter.store.sqlite import Store, load_index


def mk(list_name, text, **kw):
    return Entry(list_name, parse_pattern(text, "CN"), **kw)


def summary(m):
    if m is None:
        return None
    e = m.entry
    return (e.list, e.pattern.text, e.category, e.note, e.source, e.expires_at,
            None if m.shadowed is None else (m.shadowed.list, m.shadowed.pattern.text))


def test_digits_num_keeps_length_and_leading_zeros():
    assert digits_num("8613800138000") == 18613800138000
    assert digits_num("012") != digits_num("12")
    assert digits_num("1" * 18) is not None and digits_num("1" * 19) is None
    assert digits_num("12a") is None and digits_num("") is None and digits_num("١٢٣") is None


#: Both ways a compact list finds a key: a dict for small lists, the binary search for large ones.
both_searches = pytest.mark.parametrize("small", [_Compact.SMALL, 0], ids=["dict", "search"])


@both_searches
def test_loaded_index_agrees_with_dict_index_under_random_changes(tmp_path, monkeypatch, small):
    monkeypatch.setattr(_Compact, "SMALL", small)
    rnd = random.Random(66)
    db = str(tmp_path / "e.db")
    numbers = [f"+86138{rnd.randrange(10**8):08d}" for _ in range(400)]
    base = [mk(rnd.choice(["block", "allow"]), n, category=rnd.choice(["", "fraud"]), source=rnd.choice(["a", "b"]),
               created_at=1.0, expires_at=rnd.choice([None, None, 500.0])) for n in numbers]
    base += [mk("block", "+86138*", source="p"), mk("allow", "+861380*", source="p"), mk("block", "95588", source="s"),
             mk("block", "+86138000#####", source="m")]

    async def fill():
        async with Store.open(db) as store:
            await store.import_entries(base)

    asyncio.run(fill())
    rev, loaded = load_index(db)
    assert rev > 0 and sum(len(c.keys) for c in loaded._compact.values()) == 400
    ref = ListIndex()
    ref.extend(base)
    assert loaded.size == ref.size and loaded.counts() == ref.counts()

    probes = [n[1:] for n in numbers] + ["8613800012345", "95588", "8613999999999", "8613800000000"]
    for step in range(600):
        op = rnd.random()
        text = rnd.choice(numbers + ["+8613812345678", "+86138*"])
        lst = rnd.choice(["block", "allow"])
        if op < 0.5:
            e = mk(lst, text, note=str(step), source="c", created_at=2.0, expires_at=rnd.choice([None, 400.0]))
            loaded.put(e)
            ref.put(e)
        else:
            p = Pattern.from_text(parse_pattern(text, "CN").text)
            assert loaded.remove(lst, p) == ref.remove(lst, p)
        if step % 50 == 0:
            for d in probes:
                for now in (100.0, 450.0, 600.0):
                    assert summary(loaded.lookup(d, now)) == summary(ref.lookup(d, now)), (d, now)
    assert loaded.size == ref.size and loaded.counts() == ref.counts()
    def key(e):
        return (e.list, e.pattern.text)

    assert sorted(map(key, loaded)) == sorted(map(key, ref))


@both_searches
def test_load_compact_adopts_arrays_without_copy(monkeypatch, small):
    monkeypatch.setattr(_Compact, "SMALL", small)
    idx = ListIndex()
    keys = array("q", [digits_num("8613800138000"), digits_num("8613800138001")])
    pids = array("I", [1, DELETED])
    idx.load_compact("block", keys, pids, {1: ("fraud", "", "feed", 1.0, None)})
    assert idx.size == 1 and idx.counts() == {"block": 1, "allow": 0}
    m = idx.lookup("8613800138000")
    assert (m.entry.pattern.text, m.entry.category, m.entry.source) == ("+8613800138000", "fraud", "feed")
    assert idx.lookup("8613800138001") is None
    idx.put(mk("block", "+8613800138001", source="cli"))
    assert idx.size == 2 and pids[1] != DELETED and not idx._exact  # reused the slot in place
    assert idx.remove("block", Pattern.from_text("+8613800138000")) and pids[0] == DELETED
    assert idx.lookup("8613800138000") is None and idx.size == 1


def test_foreign_writers_rows_still_load(tmp_path):
    """Rows written by SQL that knows nothing of num/profile load through the generic path."""
    db = str(tmp_path / "e.db")

    async def go():
        async with Store.open(db) as store:
            await store.import_entries([mk("block", "+8613800138000", source="x", created_at=1.0)])
            await store.db.execute(
                "INSERT INTO entries (list, pattern, kind, key, category, note, source, created_at) "
                "VALUES ('block', '+8613800138001', 'exact', '8613800138001', '', '', 'old', 1.0)"
            )
            await store.db.execute("UPDATE entries SET category = 'fraud' WHERE pattern = '+8613800138000'")
            await store.db.commit()

    asyncio.run(go())
    _, idx = load_index(db)
    assert idx.lookup("8613800138000").entry.category == "fraud"  # the stale profile was dropped
    assert idx.lookup("8613800138001").entry.source == "old"


def test_snapshot_is_written_used_and_refused_when_it_does_not_belong(tmp_path):
    import os
    import shutil

    from edgefilter.store.sqlite import SNAPSHOT_SUFFIX

    db = str(tmp_path / "e.db")
    first = [mk("block", f"+86138{i:08d}", source="a", created_at=1.0) for i in range(50)]

    async def write(entries=(), remove=()):
        async with Store.open(db) as store:
            if entries:
                await store.import_entries(entries)
            for text in remove:
                await store.remove_entry(parse_pattern(text, "CN"), "block")

    asyncio.run(write(first))
    rev1, full = load_index(db)
    assert os.path.exists(db + SNAPSHOT_SUFFIX)
    # changes after the snapshot: applied on top of it, same result as a full load
    asyncio.run(write([mk("block", "+8613900000000", source="b", created_at=2.0), mk("allow", "+8613800000001", source="b")],
                      remove=["+8613800000002"]))
    rev2, from_snap = load_index(db)
    _, fresh = load_index(db, snapshot=False)
    assert rev2 > rev1 and from_snap.size == fresh.size == 51
    for d in ("8613800000001", "8613800000002", "8613900000000", "8613800000049"):
        assert summary(from_snap.lookup(d, 10.0)) == summary(fresh.lookup(d, 10.0))
    assert from_snap.lookup("8613800000002") is None
    # the snapshot of another database with the same revision is refused
    other = str(tmp_path / "other.db")

    async def other_db():
        async with Store.open(other) as store:
            await store.import_entries([mk("block", f"+86150{i:08d}", source="z") for i in range(60)])

    asyncio.run(other_db())
    shutil.copy(db + SNAPSHOT_SUFFIX, other + SNAPSHOT_SUFFIX)
    _, idx = load_index(other)
    assert idx.size == 60 and idx.lookup("8613800000003") is None and idx.lookup("8615000000003") is not None
    # a corrupt snapshot is ignored
    with open(db + SNAPSHOT_SUFFIX, "r+b") as f:
        f.seek(30)
        f.write(b"garbage")
    assert load_index(db)[1].size == 51


def test_compact_hits_are_ordinary_entries():
    from edgefilter.lists.index import _exact_entry

    e = _exact_entry("block", "8613800138000", ("fraud", "n", "s", 1.0, 5.0))
    ref = Entry("block", Pattern("exact", "8613800138000", "+8613800138000"), "fraud", "n", "s", 1.0, 5.0)
    assert e == ref and hash(e) == hash(ref) and repr(e) == repr(ref)
    assert e.active(4.0) and not e.active(5.0)


def test_imported_rows_get_kind_key_num_and_profile_like_put_entry(tmp_path):
    """Staged rows carry only the pattern text: kind, key and num are derived in SQL."""
    import sqlite3

    from edgefilter.lists.index import exact_num

    texts = ["+8613800138000", "95588", "+86170*", "+4121560####", "+8613800138001"]
    db_import, db_put = str(tmp_path / "i.db"), str(tmp_path / "p.db")
    entries = [mk("block", t, category="fraud" if i % 2 else "", note=f"n{i}", source="s", created_at=1.0)
               for i, t in enumerate(texts)]

    async def go():
        async with Store.open(db_import) as store:
            await store.import_entries(entries)
        async with Store.open(db_put) as store:
            for e in entries:
                await store.put_entry(e)

    asyncio.run(go())
    q = ("SELECT e.list, e.pattern, e.kind, e.key, e.category, e.note, e.source, e.created_at, e.expires_at, e.num, "
         "p.category, p.note FROM entries e LEFT JOIN profiles p ON p.id = e.profile ORDER BY e.pattern")
    got = {db: sqlite3.connect(db).execute(q).fetchall() for db in (db_import, db_put)}
    assert got[db_import] == got[db_put]
    for row in got[db_import]:
        p = Pattern.from_text(row[1])
        assert (row[2], row[3], row[9]) == (p.kind, p.key, exact_num(p))
        assert (row[10], row[11]) == ((row[4], row[5]) if row[9] is not None else (None, None))


def test_exact_and_exact_keys_see_compact_numbers_each_once():
    """The AMI mirror asks the index for exact entries (exact, exact_keys): bulk-loaded numbers
    in the compact arrays must be seen as well as dict ones, each key once, removals honoured."""
    index = ListIndex()
    prof = {1: ("harassment", "", "import:x", 1700000000.0, None)}
    index.load_compact("block", array("q", [18613800138000, 18613800138001]), array("I", [1, 1]), prof)
    index.load_compact("allow", array("q", [18613800138001]), array("I", [1]), prof)
    index.put(mk("block", "+8613900139000"))
    index.remove("block", parse_pattern("+8613800138000", "CN"))
    index.put(mk("block", "+8613700137000"))
    assert sorted(index.exact_keys()) == ["8613700137000", "8613800138001", "8613900139000"]
    assert sorted(e.list for e in index.exact("8613800138001")) == ["allow", "block"]
    assert index.exact("8613800138000") == []
    assert [e.pattern.text for e in index.exact("8613900139000")] == ["+8613900139000"]


def test_packed_read_gives_the_rows_in_key_order_or_falls_back_to_them(tmp_path, monkeypatch):
    """read_compact packs (num, profile) into one integer per row when 64 bits leave room, else
    reads two arrays per chunk, else row by row; each way (few or many profiles, long keys, a
    profile id beyond the profiles table) must read exactly what the row-by-row query reads,
    across chunk boundaries."""
    import sqlite3

    from edgefilter.store import sqlite as store_mod

    monkeypatch.setattr(store_mod, "COMPACT_CHUNK", 37)
    used = []  # (shift, usable) of each chunked read
    chunked = store_mod._read_compact_chunks

    def spy(con, list_name, shift, keys, pids):
        used.append((shift, chunked(con, list_name, shift, keys, pids)))
        return used[-1][1]

    monkeypatch.setattr(store_mod, "_read_compact_chunks", spy)

    def case(name, profiles, pick, extra=()):
        db = str(tmp_path / f"{name}.db")

        async def migrate():
            async with Store.open(db):
                pass

        asyncio.run(migrate())
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("BEGIN")
        con.executemany("INSERT INTO profiles (id, sig, list, category, note, source, created_at) VALUES (?, ?, 'block', '', '', ?, 1.0)",
                        [(p, f"sig{p}", f"s{p}") for p in range(1, profiles + 1)])
        rnd = random.Random(name)
        digits = sorted({f"86138{rnd.randrange(10**8):08d}" for _ in range(500)})
        con.executemany(
            "INSERT INTO entries (list, pattern, kind, key, source, created_at, num, profile) VALUES (?, ?, 'exact', ?, 's', 1.0, ?, ?)",
            [(rnd.choice(["block", "block", "allow"]) if d not in extra else "block", "+" + d, d, digits_num(d), pick(rnd))
             for d in digits + list(extra)],
        )
        con.execute("COMMIT")
        used.clear()
        for list_name in ("block", "allow"):
            want = con.execute("SELECT num, profile FROM entries WHERE list = ? AND num IS NOT NULL AND profile IS NOT NULL "
                               "ORDER BY num", (list_name,)).fetchall()
            keys, pids = store_mod.read_compact(con, list_name, profiles)
            assert list(zip(keys, pids, strict=True)) == want and len(want) > 100
        return used

    assert case("few", 3, lambda r: r.randrange(1, 4)) == [(8, True)] * 2  # a byte for the profile id
    assert case("some", 300, lambda r: r.randrange(1, 301)) == [(16, True)] * 2  # two bytes
    assert case("many", 70000, lambda r: r.randrange(1, 70001)) == [(0, True)] * 2  # no room: two arrays
    assert case("long", 3, lambda r: 1, extra=["861380013800012345"]) == [(0, True), (8, True)]  # 18 digits in block
    assert case("dangling", 3, lambda r: r.choice([1, 2, 3, 3, 3, 3, 999])) == [(8, False)] * 2  # refused, read row by row


@both_searches
def test_lookup_agrees_with_the_rules_read_literally(monkeypatch, small):
    """lookup is written for speed (inlined search, no dict of candidates); here the rules are
    read literally: among the active entries matching the digits, take each list's most specific
    (Pattern.fixed_digits); the winner is the more specific of the two, allow at equal; the
    other list's best is the shadowed one. Compact and dict entries, changes and expiry mixed."""
    monkeypatch.setattr(_Compact, "SMALL", small)
    rnd = random.Random(17)
    numbers = sorted({f"8613800{rnd.randrange(400):03d}{rnd.randrange(30):03d}" for _ in range(300)})

    def matches(p, d):
        if p.kind == "exact":
            return p.key == d
        if p.kind == "prefix":
            return d.startswith(p.key)
        return len(p.key) == len(d) and all(m in ("#", c) for m, c in zip(p.key, d, strict=True))

    profiles = {1: ("fraud", "", "feed", 1.0, None), 2: ("", "n", "crm", 1.0, 150.0), 3: ("x", "", "old", 1.0, 50.0)}
    index, live = ListIndex(), {}
    for list_name in ("block", "allow"):
        mine = sorted(rnd.sample(numbers, 120))
        pids = [rnd.choice([1, 1, 2, 3]) for _ in mine]
        index.load_compact(list_name, array("q", map(digits_num, mine)), array("I", pids), profiles)
        for d, pid in zip(mine, pids, strict=True):
            live[(list_name, "+" + d)] = Entry(list_name, Pattern("exact", d, "+" + d), *profiles[pid])
    for step in range(400):
        list_name, d = rnd.choice(["block", "allow"]), rnd.choice(numbers)
        kind = rnd.choice(["exact", "prefix", "prefix", "mask"])
        if kind == "exact":
            p = Pattern("exact", d, "+" + d)
        elif kind == "prefix":
            key = d[: rnd.randrange(4, 13)]
            p = Pattern("prefix", key, f"+{key}*")
        else:
            key = d[: rnd.randrange(8, 13)].ljust(len(d), "#")
            p = Pattern("mask", key, "+" + key)
        if rnd.random() < 0.25:
            assert index.remove(list_name, p) == (live.pop((list_name, p.text), None) is not None)
        else:
            e = Entry(list_name, p, "c", str(step), "s", 2.0, rnd.choice([None, None, 50.0, 150.0]))
            index.put(e)
            live[(list_name, p.text)] = e
    probes = numbers + ["8613800999000", "8613801000000", "86138", "8613800"]
    for now in (10.0, 50.0, 100.0, 150.0, 200.0):
        for d in probes:
            best = {}
            for e in live.values():
                if matches(e.pattern, d) and e.active(now):
                    spec = e.pattern.fixed_digits
                    best.setdefault(e.list, (spec, []))
                    if spec > best[e.list][0]:
                        best[e.list] = (spec, [])
                    if spec == best[e.list][0]:
                        best[e.list][1].append(e)
            m = index.lookup(d, now)
            if not best:
                assert m is None, (d, now)
                continue
            order = sorted(best, key=lambda name: (best[name][0], name == "allow"), reverse=True)
            assert m.entry.list == order[0] and m.entry in best[order[0]][1], (d, now)
            same = best[order[0]][1][best[order[0]][1].index(m.entry)]  # built through slots or not:
            assert hash(m.entry) == hash(same) and repr(m.entry) == repr(same)  # indistinguishable
            if len(order) == 2:
                assert m.shadowed in best[order[1]][1], (d, now)
            else:
                assert m.shadowed is None

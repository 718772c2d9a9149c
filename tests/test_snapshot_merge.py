"""A snapshot far behind the change feed (a big import while the service ran) is merged, not
thrown away: the index it gives equals a full read of the database."""

from __future__ import annotations

import asyncio
import random

from edgefilter.lists.index import LISTS, Entry, ListIndex, parse_pattern
from edgefilter.store import sqlite as sqlite_store
from edgefilter.store.sqlite import Store, load_index, read_snapshot_header


def mk(list_name: str, text: str, **kw) -> Entry:
    return Entry(list_name, parse_pattern(text, "CN"), created_at=1.0, **kw)


def content(index) -> dict:
    """Everything a lookup can tell, for every number and pattern the test used."""
    return {k: (m.entry.list, m.entry.pattern.text, m.entry.category, m.entry.source,
                None if m.shadowed is None else m.shadowed.pattern.text) if (m := index.lookup(k, 10.0)) else None
            for k in PROBES} | {"counts": index.counts()}


PROBES: list[str] = []


def test_a_far_behind_snapshot_is_merged_and_equals_a_full_read(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "SNAPSHOT_MAX_BEHIND", 50)  # 50 changes: "far behind" in this test
    rnd = random.Random(6)
    db = str(tmp_path / "e.db")
    base = [f"+86138{rnd.randrange(10**8):08d}" for _ in range(3000)]
    later = [f"+86139{rnd.randrange(10**8):08d}" for _ in range(400)] + [f"+86137{i:08d}" for i in range(100)]
    PROBES[:] = [n[1:] for n in base + later] + ["8613800000000", "8617000000001", "95588"]

    async def first():
        async with Store.open(db) as store:
            await store.import_entries([mk("block", n, category="fraud", source="feed") for n in base[:2500]]
                                       + [mk("allow", n, source="crm") for n in base[2500:]])
            await store.put_entry(mk("block", "+86170*", source="ranges"))

    async def then():
        async with Store.open(db) as store:
            await store.import_entries([mk("block", n, category="marketing", source="feed2") for n in later])  # new keys
            await store.import_entries([mk("block", n, category="scam", source="feed") for n in base[:200]])  # updated
            for n in base[200:260]:
                await store.remove_entry(parse_pattern(n, "CN"), "block")  # deleted
            await store.put_entry(mk("allow", base[300], source="cli"))  # the same number on the other list
            await store.remove_entry(parse_pattern("+86170*", "CN"))  # a prefix gone
            await store.put_entry(mk("block", "+8617000000*", source="ranges"))  # another one added
            await store.put_entry(mk("block", "95588", source="short"))  # a short number (not compact)
            await store.remove_entry(parse_pattern(later[0], "CN"), "block")  # added, then removed again
            await store.put_entry(mk("block", later[1], category="fraud", source="cli"))  # added, then updated

    asyncio.run(first())
    rev0, _ = load_index(db)  # full read; writes the snapshot at rev0
    assert read_snapshot_header(db + ".index", rev0)["rev"] == rev0
    asyncio.run(then())
    merges = []
    real = ListIndex.plan_merge
    monkeypatch.setattr(ListIndex, "plan_merge", lambda self, *a: merges.append(a) or real(self, *a))
    rev, merged = load_index(db)  # snapshot + merge (far more than 50 changes behind)
    assert len(merges) == 1
    assert rev - rev0 > 50
    assert read_snapshot_header(db + ".index", rev)["rev"] == rev  # rewritten at the new revision
    _, full = load_index(db, snapshot=False)
    assert content(merged) == content(full)
    assert content(merged)["counts"] == {"block": 2500 - 60 + 500 - 1 + 2, "allow": 501}
    for name in LISTS:  # the merged arrays are what a full read gives (sorted, same profiles)
        keys, pids = merged.compact_arrays()[name]
        assert list(keys) == sorted(keys)
    _, again = load_index(db)  # from the rewritten snapshot: no change since
    assert content(again) == content(full)


def test_too_far_behind_reads_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "SNAPSHOT_MAX_BEHIND", 5)
    monkeypatch.setattr(sqlite_store, "MERGE_MAX_BEHIND", 20)
    db = str(tmp_path / "e.db")

    async def add(numbers):
        async with Store.open(db) as store:
            await store.import_entries([mk("block", n, source="f") for n in numbers])

    asyncio.run(add([f"+8613800{i:06d}" for i in range(10)]))
    rev0, _ = load_index(db)
    asyncio.run(add([f"+8613900{i:06d}" for i in range(30)]))
    calls = []
    real = ListIndex.plan_merge
    monkeypatch.setattr(ListIndex, "plan_merge", lambda self, *a: calls.append(a) or real(self, *a))
    rev, index = load_index(db)
    assert not calls and index.size == 40 and rev - rev0 == 30


async def test_the_follower_merges_a_big_batch_into_the_running_index_like_a_full_load(tmp_path, monkeypatch):
    """Interned profile ids of the running index differ from the database's: the merge maps them."""
    from types import SimpleNamespace

    from edgefilter import follower as service_mod

    monkeypatch.setattr(service_mod, "FULL_RELOAD_AFTER", 30)
    rnd = random.Random(9)
    db = str(tmp_path / "f.db")
    base = [f"+86138{rnd.randrange(10**8):08d}" for _ in range(300)]
    new = [f"+86137{rnd.randrange(10**8):08d}" for _ in range(200)]
    PROBES[:] = [n[1:] for n in base + new] + ["8617012345678", "8617099999999"]
    async with Store.open(db) as store:
        await store.import_entries([mk("block", n, category="fraud", source="feed") for n in base])
        screener = SimpleNamespace(index=ListIndex())
        follower = service_mod.ListFollower(store, screener)
        await follower.poll()  # the first load
        index = screener.index
        # a few changes, replayed one by one: an interned profile, an overlay number, a prefix
        await store.put_entry(mk("block", base[0], category="scam", source="cli"))
        await store.put_entry(mk("block", new[0], category="marketing", source="cli"))
        await store.put_entry(mk("block", "+86170*", source="ranges"))
        await follower.poll()
        assert screener.index is index and index.lookup(new[0][1:]).entry.category == "marketing"
        # then a big batch: new numbers (one already in the overlay), updates, deletions, prefixes
        await store.import_entries([mk("block", n, category="spam", source="feed2") for n in new]
                                   + [mk("allow", n, source="crm") for n in base[:20]])
        await store.import_entries([mk("block", n, category="scam", source="feed") for n in base[20:70]])
        for n in base[70:90]:
            await store.remove_entry(parse_pattern(n, "CN"), "block")
        await store.remove_entry(parse_pattern("+86170*", "CN"))
        await store.put_entry(mk("block", "+861709999*", source="ranges"))
        merges = []
        real = ListIndex.plan_merge
        monkeypatch.setattr(ListIndex, "plan_merge", lambda self, *a: merges.append(a) or real(self, *a))
        await follower.poll()
        assert merges and screener.index is index  # merged into the running index
        _, full = load_index(db, snapshot=False)
        assert content(index) == content(full)
        assert index.counts() == {"block": 300 - 20 + 200 + 1, "allow": 20}  # + the new prefix
        # the index keeps following one change at a time after the merge
        await store.put_entry(mk("block", new[5], category="fraud", source="cli"))
        await follower.poll()
        assert index.lookup(new[5][1:]).entry.category == "fraud"


def test_a_number_held_by_the_other_list_outside_the_arrays_is_still_merged(tmp_path, monkeypatch):
    """A foreign writer's allow row for X (no compact key: it loads into the dict overlay), then an
    import that blocks X: the merged snapshot must hold the block, also at the next start."""
    import sqlite3

    monkeypatch.setattr(sqlite_store, "SNAPSHOT_MAX_BEHIND", 50)
    db = str(tmp_path / "o.db")
    x = "+8613900139000"
    PROBES[:] = [x[1:]]

    async def base():
        async with Store.open(db) as store:
            await store.import_entries([mk("block", f"+86138{i:08d}", source="feed") for i in range(200)])

    asyncio.run(base())
    con = sqlite3.connect(db)
    con.execute("INSERT INTO entries (list, pattern, kind, key, created_at, expires_at) "
                "VALUES ('allow', ?, 'exact', ?, 1, 5)", (x, x[1:]))  # an expired allow, num NULL
    con.execute("INSERT INTO changes (list, pattern, op) VALUES ('allow', ?, 'put')", (x,))
    con.commit()
    con.close()
    load_index(db)  # full read, snapshot written

    async def block_x():
        async with Store.open(db) as store:
            await store.import_entries([mk("block", x, source="feed2")]
                                       + [mk("block", f"+86137{i:08d}", source="feed2") for i in range(100)])

    asyncio.run(block_x())
    _, merged = load_index(db)
    _, next_start = load_index(db)  # from the snapshot the merge rewrote
    _, full = load_index(db, snapshot=False)
    assert content(merged) == content(next_start) == content(full)
    assert next_start.lookup(x[1:], 10.0).entry.list == "block"

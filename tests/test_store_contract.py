"""The store contract (edgefilter.store.contract.StoreContract), one suite run on both stores:
SQLite always, PostgreSQL when a test server is set (``.ci/with-postgres`` starts a private one;
without it those cases skip, saying why).

Both stores must mean the same thing by every method: the service, the CLI and the follower
code above them do not know which one they have. A test here uses only the contract; what is
peculiar to one backend (SQLite's faults and snapshots, several PostgreSQL nodes, `db copy`)
stays in its own file.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from edgefilter.core.errors import StoreError
from edgefilter.lists.index import parse_pattern
from edgefilter.store.contract import StoreContract
from edgefilter.store.open import open_store
from edgefilter.store.postgres import PgStore
from edgefilter.store.records import Appeal, CallOutcome, ContactSeen, Refusal, entry_from_row
from edgefilter.store.sqlite import Store

from .conftest import entry, record


# ------------------------------------------------------------------ the contract's shape
def _members(cls) -> dict[str, typing.Any]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n)) and n != "open"}


def _kind(f) -> str:
    f = inspect.unwrap(f)
    if inspect.isasyncgenfunction(f):
        return "async iterator"
    return "coroutine" if inspect.iscoroutinefunction(f) else "plain"


def _params(f) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]


@pytest.mark.parametrize("cls", [Store, PgStore], ids=["sqlite", "postgresql"])
def test_each_store_implements_exactly_the_contract(cls):
    """Every method of StoreContract exists on the store with the same parameters and defaults,
    awaited where the contract awaits (an async iterator or a context manager where it returns
    one), and the store offers nothing public beyond it but ``open``: the contract is the API."""
    contract = _members(StoreContract)
    assert set(_members(cls)) == set(contract)
    for name, spec in contract.items():
        impl = getattr(cls, name)
        assert _params(impl) == _params(spec), name
        if _kind(spec) == "coroutine":
            assert _kind(impl) == "coroutine", name
        else:  # declared as a plain function returning an AsyncIterator or a context manager
            returns = str(inspect.signature(spec).return_annotation)
            if "AsyncIterator" in returns:
                assert inspect.isasyncgenfunction(impl), name
            elif "AsyncContextManager" in returns:  # @contextlib.asynccontextmanager
                assert impl is not inspect.unwrap(impl) and _kind(impl) == "async iterator", name
            else:
                assert _kind(impl) == "plain", name
    for attr in typing.get_type_hints(StoreContract):
        assert attr in ("backend", "where", "path", "node")
    assert cls.backend in ("sqlite", "postgresql")


async def test_the_open_store_has_the_contract_attributes(store):
    assert store.backend in ("sqlite", "postgresql") and store.where and store.path
    assert isinstance(store.node, str)
    assert await store.schema_version() == await store.migrate()
    err = StoreError(f"{store.where}: disk is full")
    assert store.describe_error(err) == str(err)  # a StoreError's own words


# ---------------------------------- list entries and the change feed
async def test_put_update_unchanged_remove_and_the_change_feed(store):
    e = entry("block", "+8613800138000", category="harassment", note="ex", source="cli", expires_at=1800000000.0)
    assert await store.put_entry(e) == "added"
    assert await store.put_entry(e) == "unchanged"
    assert await store.put_entry(dataclasses.replace(e, note="ex-partner")) == "updated"
    assert await store.put_entry(entry("allow", "+8613800138000")) == "added"
    rev = await store.head_rev()
    changes = await store.changes_since(0, 100)
    assert [(c[1], c[2], c[3]) for c in changes] == [
        ("put", "block", "+8613800138000"), ("put", "block", "+8613800138000"), ("put", "allow", "+8613800138000"),
    ]
    assert changes[-1][0] == rev
    assert changes[0][4].note == "ex-partner"  # the change carries the entry's current row
    assert await store.remove_entry(parse_pattern("+8613800138000", "CN"), "block") == ["block"]
    assert await store.remove_entry(parse_pattern("+8613800138000", "CN")) == ["allow"]
    assert await store.remove_entry(parse_pattern("+8613800138000", "CN")) == []
    tail = await store.changes_since(rev, 100)
    assert [(c[1], c[2], c[4]) for c in tail] == [("del", "block", None), ("del", "allow", None)]
    assert await store.counts() == {"block": 0, "allow": 0}


async def test_changed_entries_give_each_changed_pattern_once_as_it_is_now(store):
    await store.import_entries([entry("block", "+8613800138000", category="fraud", source="feed"),
                                entry("block", "+86170*", source="feed")])
    since = await store.head_rev()
    await store.put_entry(entry("block", "+8613800138000", category="scam", source="cli"))
    await store.put_entry(entry("block", "+8613800138000", category="marketing", source="cli"))
    await store.import_entries([entry("allow", "+8613912345678", note="mum", source="crm")])
    await store.remove_entry(parse_pattern("+86170*", "CN"))
    head, rows, profiles = await store.changed_entries(since)
    assert head == await store.head_rev() > since
    by = {(r[0], r[1]): r for r in rows}
    assert len(rows) == len(by) == 3  # two changes of one pattern: once, as it is now
    changed = entry_from_row(by[("block", "+8613800138000")][2])
    assert changed.category == "marketing" and changed.source == "cli"
    assert by[("block", "+86170*")][2] is None  # deleted
    lst, text, columns, num, pid = by[("allow", "+8613912345678")]
    assert entry_from_row(columns).note == "mum" and num == 18613912345678 and profiles[pid][:3] == ("", "mum", "crm")
    assert (await store.changed_entries(head))[1] == []


async def test_every_field_survives_and_candidates_find_exact_prefix_and_mask(store):
    rows = [
        entry("block", "+8613800138000", category="fraud", note="caller said \"bank\"", source="import:cnfeed",
              created_at=1700000001.5, expires_at=1900000000.25),
        entry("block", "+86170*", category="marketing"),
        entry("block", "+861390013####"),
        entry("allow", "+8613912345678", note="mum"),
        entry("block", "+4930*"),
    ]
    counts = await store.put_entries(rows)
    assert counts == {"added": 5, "updated": 0, "unchanged": 0}
    assert await store.put_entries(rows) == {"added": 0, "updated": 0, "unchanged": 5}
    got = await store.entries()
    assert sorted(got, key=lambda e: (e.list, e.pattern.text)) == sorted(rows, key=lambda e: (e.list, e.pattern.text))
    assert [e.pattern.text for e in await store.entries("allow")] == ["+8613912345678"]
    # exact and prefix entries by key, plus every mask of the same length (the index decides)
    found = {e.pattern.text for e in await store.candidates("8617012345678")}
    assert found == {"+86170*", "+861390013####"}
    assert {e.pattern.text for e in await store.candidates("8613800138000")} == {"+8613800138000", "+861390013####"}
    assert {e.pattern.text for e in await store.candidates("493012345")} == {"+4930*"}
    batches = [b async for b in store.iter_entries(batch=2)]
    assert [len(b) for b in batches] == [2, 2, 1]
    assert await store.counts() == {"block": 4, "allow": 1}


async def test_expiry_purge_records_deletions(store):
    now = 1800000000.0
    await store.put_entries([
        entry("block", "+8613800138001", expires_at=now - 1),
        entry("block", "+8613800138002", expires_at=now + 3600),
        entry("block", "+8613800138003"),
    ])
    active = await store.entries(include_expired=False, now=now)
    assert [e.pattern.text for e in active] == ["+8613800138002", "+8613800138003"]
    rev = await store.head_rev()
    assert await store.purge_expired(now=now) == 1
    assert [(c[1], c[3]) for c in await store.changes_since(rev, 10)] == [("del", "+8613800138001")]
    assert len(await store.entries()) == 2


async def test_a_failed_transaction_leaves_nothing(store):
    rev = await store.head_rev()
    with pytest.raises(RuntimeError):
        async with store.transaction():
            await store.put_entry(entry("block", "+8613800138000"))
            await store.put_entry(entry("allow", "+8613900139000"))
            raise RuntimeError("import failed half way")
    assert await store.entries() == []
    assert await store.head_rev() == rev


async def test_trim_changes_keeps_the_newest(store):
    await store.put_entries([entry("block", f"+86138001380{i:02d}") for i in range(10)])
    head = await store.head_rev()
    await store.trim_changes(keep=3)
    assert [c[0] for c in await store.changes_since(0, 100)] == [head - 2, head - 1, head]


async def test_call_log_recent_cursor_and_purge(store):
    await store.record_calls([record(i) for i in range(5)])
    recent = await store.recent_calls(1700000002.0)
    assert [r.uniqueid for r in recent] == ["1700000000.2", "1700000000.3", "1700000000.4"]
    assert recent[0].caller_name == "Zhang" and recent[0].elapsed_ms == 0.4 and recent[0].would is None
    page = await store.calls_after(0, limit=2)
    assert [r.uniqueid for _, r in page] == ["1700000000.0", "1700000000.1"]
    rest = await store.calls_after(page[-1][0])
    assert [r.uniqueid for _, r in rest] == ["1700000000.2", "1700000000.3", "1700000000.4"]
    assert await store.calls_after(rest[-1][0]) == []
    assert await store.purge_calls(1700000003.0) == 3
    assert [r.uniqueid for r in await store.recent_calls(0)] == ["1700000000.3", "1700000000.4"]


async def test_migrate_is_idempotent_and_reopening_keeps_data(backend_settings):
    settings = backend_settings()
    async with open_store(settings) as s:
        v = await s.migrate()
        assert v >= 1 and await s.migrate() == v
        await s.put_entry(entry("block", "+8613800138000"))
    async with open_store(settings) as s:
        assert await s.migrate() == v
        assert [e.pattern.text for e in await s.entries()] == ["+8613800138000"]


# ------------------ call log, refusals, challenges, reputation cache
async def test_write_batch_keeps_queue_order_and_a_retry_changes_nothing(store):
    store.node = "pbx-a"
    batch = [
        record(1, key="k1"),
        CallOutcome("1700000000.1", "l1", True, 12.0, 16, "Normal Clearing", "ANSWER", 1700000030.0, node="pbx-a"),
        CallOutcome("1700000000.1", talk_seconds=13.5, node="pbx-a"),  # refines the talk time only
        CallOutcome("1700000000.1", answered=False, node="pbx-b"),  # another node's call of that uniqueid: not ours
        ContactSeen("+8613900139000", 1700000100.0, "outbound"),
        ContactSeen("+8613900139000", 1700000050.0, "talked"),  # older: the newest time stays
        record(2, key=""),  # no key: one is drawn
    ]
    assert await store.write_batch(batch) == len(batch)
    assert await store.write_batch(batch[:6]) == 6  # the spool drains a batch twice: no second row
    o = await store.outcome_of("1700000000.1")
    assert (o["linkedid"], o["answered"], o["talk_seconds"], o["hangup_cause"], o["dial_status"]) == ("l1", 1, 13.5, 16, "ANSWER")
    assert await store.contacts(0) == [("+8613900139000", 1700000100.0)]
    got = await store.recent_calls(0)
    assert [(r.uniqueid, r.node) for r in got] == [("1700000000.1", "pbx-a"), ("1700000000.2", "pbx-a")]
    assert got[0].key == "k1" and len(got[1].key) == 32
    calls = await store.calls_from(got[0].caller_e164, 0)
    assert calls[0]["talk_seconds"] == 13.5 and calls[0]["uniqueid"] == "1700000000.1"


async def test_history_rows_up_to_an_id_then_calls_after_it(store):
    await store.record_calls([record(i) for i in range(3)])
    head = await store.calls_head()
    await store.record_calls([record(i) for i in range(3, 5)])
    rows = await store.history_rows(0, through_id=head)
    assert [r[1] for r in rows] == ["1700000000.0", "1700000000.1", "1700000000.2"]
    assert rows[0] == (1700000000.0, "1700000000.0", "+8613800138000", "mobile", "1000", "1000", None, None, "allow")
    assert [r.uniqueid for _, r in await store.calls_after(head)] == ["1700000000.3", "1700000000.4"]
    assert [r[1] for r in await store.history_rows(0, limit=2)] == ["1700000000.3", "1700000000.4"]
    assert await store.calls_head() > head
    batches = [[r.uniqueid for r in b] async for b in store.iter_calls(1700000001.0, 1700000004.0, batch=2)]
    assert batches == [["1700000000.1", "1700000000.2"], ["1700000000.3"]]
    assert sorted(await store.last_callers()) == [("1000", 1700000004.0, "1700000000.4", "+8613800138004", "1000")]


async def test_refusal_ledger_with_its_entry_and_version(store):
    v0 = await store.refusals_version()
    blocked = entry("block", "+8617012345678", source="starcode:1000")
    rid = await store.add_refusal(Refusal(0, "+8617012345678", "1000", 1700000000.0, "block", "", "starcode:1000", "u1"), blocked)
    v1 = await store.refusals_version()
    assert rid > 0 and v1 != v0
    assert [e.pattern.text for e in await store.entries("block")] == ["+8617012345678"]
    rev = await store.head_rev()
    # an admin's entry is never taken over by a star code: the ledger row keeps no pattern
    await store.put_entry(entry("block", "+8613700137000", source="cli"))
    await store.add_refusal(Refusal(0, "+8613700137000", "1000", 1700000001.0, "refuse", source="starcode:1000"),
                            entry("block", "+8613700137000", source="starcode:1000"))
    assert [r.pattern for r in await store.refusals()] == ["+8617012345678", ""]
    undone = await store.undo_last_refusal("1000", 1700000002.0)
    assert undone.caller_e164 == "+8613700137000" and undone.undone_at == 1700000002.0
    assert [e.source for e in await store.entries("block")] == ["cli", "starcode:1000"]
    undone = await store.undo_last_refusal("1000", 1700000003.0)
    assert undone.caller_e164 == "+8617012345678"
    assert [e.pattern.text for e in await store.entries("block")] == ["+8613700137000"]
    assert [(c[1], c[3]) for c in await store.changes_since(rev, 10)][-1] == ("del", "+8617012345678")
    assert await store.undo_last_refusal("1000", 1700000004.0) is None
    assert await store.refusals(active_only=True) == []
    assert [r.callee for r in await store.refusals(caller="+8617012345678")] == ["1000"]
    assert await store.refusals_version() not in (v0, v1)


async def test_challenge_outcomes_are_stored_once_per_key(store):
    from edgefilter.asterisk.challenge import OutcomeRecord

    fail = OutcomeRecord(1700000000.0, "u1", "+8613800138000", "fail")
    assert await store.record_challenges([fail, OutcomeRecord(1700000001.0, "u2", "+8613900139000", "pass")]) == 2
    assert await store.record_challenges([fail]) == 0  # the retry of a write that did commit
    assert await store.challenge_failures_since(0) == [("8613800138000", 1700000000.0)]
    assert await store.challenge_failures_since(0, "+8613900139000") == []
    assert await store.purge_challenges(1700000000.5) == 1
    assert await store.challenge_failures_since(0) == []


async def test_reputation_cache_upserts_reads_and_purges(store):
    from edgefilter.store.sqlite import ReputationRow

    a = ReputationRow("+8613800138000", "fast", 80.0, "scam", "listed", 1700000000.0, 1700086400.0)
    b = ReputationRow("+8613800138000", "slow", None, None, "unlisted", 1700000001.0, 1700000100.0)
    assert await store.put_reputation([a, b]) == 2
    newer = dataclasses.replace(a, score=90.0, fetched_at=1700000002.0)
    assert await store.put_reputation([newer]) == 1
    assert await store.get_reputation("fast", "+8613800138000") == newer
    assert await store.get_reputation("fast", "+8613900139000") is None
    assert await store.reputation_rows() == [newer, b]
    assert await store.reputation_rows(number="+8613800138000", fresh_at=1700000200.0) == [newer]
    assert await store.purge_reputation(expired_at=1700000200.0) == 1
    assert await store.purge_reputation(source="fast") == 1
    assert await store.reputation_rows() == []


# ------------------------------------------------- imports (issue 6)
async def test_import_counts_replace_source_dry_run_remove_and_export(store):
    """One import = one transaction with added/updated/unchanged counts and change-feed rows;
    the same on both backends, down to what the compact index loads."""
    feed = [
        entry("block", "+8613800138000", category="fraud", source="import:feed", note="n"),
        entry("block", "+8613800138001", category="fraud", source="import:feed", note="n"),
        entry("block", "95588", category="fraud", source="import:feed", note="n"),  # short: not compact
        entry("block", "+86170*", category="marketing", source="import:feed"),
        entry("block", "+8613800138000", category="other", source="import:feed"),  # duplicate: first wins
    ]
    await store.put_entry(entry("block", "+8613800138001", category="fraud", source="cli"))
    rev = await store.head_rev()
    r = await store.import_entries(feed, lists=("block",))
    assert (r.added, r.updated, r.unchanged, r.removed) == (3, 1, 0, 0)
    changed = await store.changes_since(rev, 100)
    assert sorted((c[1], c[3]) for c in changed) == [
        ("put", "+8613800138000"), ("put", "+8613800138001"), ("put", "+86170*"), ("put", "95588")]
    got = {e.pattern.text: e for e in await store.entries("block")}
    assert got["+8613800138000"].category == "fraud" and got["+8613800138001"].source == "import:feed"
    assert got["+86170*"].pattern.kind == "prefix" and got["95588"].pattern.key == "95588"
    rev = await store.head_rev()
    again = await store.import_entries(feed[:4], lists=("block",))
    assert (again.added, again.updated, again.unchanged) == (0, 0, 4) and await store.head_rev() == rev
    dry = await store.import_entries([feed[0]], replace_source="import:feed", lists=("block",), dry_run=True)
    assert (dry.unchanged, dry.removed) == (1, 3) and await store.head_rev() == rev and len(await store.entries()) == 4
    await store.put_entry(entry("allow", "+8613900139000", source="import:feed"))  # another list: kept
    rev = await store.head_rev()
    rep = await store.import_entries([dataclasses.replace(feed[0], note="new")], replace_source="import:feed", lists=("block",))
    assert (rep.added, rep.updated, rep.unchanged, rep.removed) == (0, 1, 0, 3)
    assert sorted((c[1], c[3]) for c in await store.changes_since(rev, 100)) == [
        ("del", "+8613800138001"), ("del", "+86170*"), ("del", "95588"), ("put", "+8613800138000")]
    # the index a node loads agrees with the table, metadata and all
    await store.import_entries([entry("block", f"+86139{i:08d}", source="bulk", expires_at=1900000000.0) for i in range(50)])
    head, index = await store.load_index()
    assert head == await store.head_rev()
    assert sorted(index, key=lambda e: (e.list, e.pattern.text)) == await store.entries()
    assert index.lookup("8613900000007").entry.source == "bulk"
    assert index.lookup("8613800138000").entry.note == "new"
    assert index.counts() == {"block": 51, "allow": 1}
    exported = [e async for b in store.export_entries("block", batch=7) for e in b]
    assert exported == await store.entries("block")
    by_source = [e async for b in store.export_entries(source="import:feed") for e in b]
    assert [(e.list, e.pattern.text) for e in by_source] == [("allow", "+8613900139000"), ("block", "+8613800138000")]
    assert await store.remove_source("bulk") == 50
    assert await store.remove_source("bulk") == 0
    assert await store.counts() == {"block": 1, "allow": 1}


# -------------------------- the same API and schema versions on both
def test_both_backends_offer_the_same_methods():
    """The contract that keeps porting mechanical: every public method exists on both stores with
    the same parameters, defaults and kind (coroutine, async iterator, context manager...); only
    how a store is opened differs."""
    import inspect

    from edgefilter.store.postgres import PgStore
    from edgefilter.store.sqlite import Store

    def kind(f) -> str:
        f = inspect.unwrap(f)
        if inspect.isasyncgenfunction(f):
            return "async iterator"
        return "coroutine" if inspect.iscoroutinefunction(f) else "plain"

    def api(cls) -> dict[str, tuple]:
        return {
            n: (kind(getattr(cls, n)), [(p.name, p.kind, p.default) for p in inspect.signature(getattr(cls, n)).parameters.values()])
            for n in dir(cls)
            if not n.startswith("_") and callable(getattr(cls, n)) and n != "open"
        }

    assert api(Store) == api(PgStore)
    # what the features above the store use (a method lost on both sides fails here too)
    for name in ("write_batch", "record_calls", "calls_after", "calls_head", "history_rows", "last_callers",
                 "calls_from", "outcome_of", "iter_calls", "add_refusal", "undo_last_refusal", "refusals",
                 "refusals_version", "contacts", "record_challenges", "challenge_failures_since",
                 "purge_challenges", "put_reputation", "get_reputation", "reputation_rows", "purge_reputation",
                 "watch_changes", "describe_error", "schema_version",
                 # imports (issue 6): staged atomic import, sources, export, the compact index load
                 "begin_import", "stage_import", "apply_import", "import_entries", "remove_source",
                 "export_entries", "load_index",
                 # appeals (issue 17)
                 "set_no_appeal", "no_appeal_patterns", "add_appeal", "appeals", "get_appeal", "decide_appeal",
                 "appeal_summary", "purge_appeals"):
        assert name in api(Store), name
    assert Store.backend == "sqlite" and PgStore.backend == "postgresql"


def test_both_backends_have_the_same_schema_versions():
    """A feature's tables land on both backends under the same version number."""
    from edgefilter.store import postgres as pgstore
    from edgefilter.store import sqlite as store

    missing = sorted(set(store.MIGRATIONS) - set(pgstore.MIGRATIONS))
    assert not missing, f"port SQLite migration(s) {missing} to pgstore.MIGRATIONS (see docs/postgresql.md)"
    assert pgstore.SCHEMA_VERSION == store.SCHEMA_VERSION


# ------------------------------------------------ appeals (issue 17)
def appeal(key: str, ts: float, caller: str = "+8613800138000", **kw):
    from edgefilter.store.sqlite import Appeal

    base = dict(uniqueid="1700000000.1", called="7000", node="pbx-a", rules="LIST_BLOCKED(+20)", score=20.0,
                policy="default", entry_list="block", entry_pattern="+86138*", entry_source="feed-x",
                entry_category="marketing", recording=f"/spool/edgefilter-appeals/{key}.wav", recording_bytes=80204)
    base.update(kw)
    return Appeal(0, "", key, ts, caller, **base)


async def test_appeals_get_unique_codes_are_decided_once_and_purged(store):
    a = await store.add_appeal(appeal("k" * 20, 1700000000.0))
    assert a.id > 0 and len(a.code) == 6 and a.code.isdigit() and a.status == "pending"
    assert await store.add_appeal(appeal("k" * 20, 1700000000.0)) == a  # a retried write: stored once
    b = await store.add_appeal(appeal("m" * 20, 1700000100.0, caller="+8613900139000", recording_bytes=None))
    assert b.code != a.code and b.recording_bytes is None
    got = await store.get_appeal(a.code)
    assert got == a and got.entry_source == "feed-x" and got.rule_names == ["LIST_BLOCKED"]
    assert [x.code for x in await store.appeals()] == [a.code, b.code]
    assert [x.code for x in await store.appeals(caller="+8613900139000")] == [b.code]
    assert await store.appeal_summary(1700000050.0) == (2, [("+8613900139000", 1700000100.0)])
    # a grant writes its allow entry in the same transaction; a second decision changes nothing
    allow = entry("allow", "+8613800138000", source="appeal", expires_at=1800000000.0)
    rev = await store.head_rev()
    g = await store.decide_appeal(a.code, "granted", 1700000200.0, note="our customer", entry=allow)
    assert (g.status, g.decided_at, g.note, g.grant_pattern, g.grant_expires) == (
        "granted", 1700000200.0, "our customer", "+8613800138000", 1800000000.0)
    assert [(c[1], c[2], c[3]) for c in await store.changes_since(rev, 10)] == [("put", "allow", "+8613800138000")]
    again = await store.decide_appeal(a.code, "denied", 1700000300.0, note="changed my mind")
    assert again == g
    assert (await store.decide_appeal(b.code, "denied", 1700000300.0)).status == "denied"
    assert await store.decide_appeal("000000", "denied", 1700000300.0) is None
    assert (await store.appeal_summary(0.0))[0] == 0
    assert [x.code for x in await store.appeals(status="granted")] == [a.code]
    gone = await store.purge_appeals(1700000050.0)
    assert [x.key for x in gone] == ["k" * 20] and [x.code for x in await store.appeals()] == [b.code]


async def test_no_appeal_flag_on_entries_with_a_change_row(store):
    p = parse_pattern("+86170*", "CN")
    await store.put_entry(entry("block", "+86170*", source="cli"))
    rev = await store.head_rev()
    assert await store.set_no_appeal("block", p, True) is True
    assert await store.set_no_appeal("block", p, True) is False  # already so: no change row
    assert await store.no_appeal_patterns() == [("block", "+86170*")]
    assert [(c[1], c[2], c[3]) for c in await store.changes_since(rev, 10)] == [("put", "block", "+86170*")]
    await store.put_entry(entry("block", "+86170*", source="cli", note="updated"))  # keeps the flag
    assert await store.no_appeal_patterns() == [("block", "+86170*")]
    assert await store.set_no_appeal("block", parse_pattern("+86171*", "CN"), True) is False  # no such entry
    await store.set_no_appeal("block", p, False)
    assert await store.no_appeal_patterns() == []


# ------------------------------------------------------------------ beyond the tests above
async def test_nested_transactions_are_savepoints(store):
    """A transaction inside another one that fails is undone alone; the outer one commits."""
    rev = await store.head_rev()
    async with store.transaction():
        await store.put_entry(entry("block", "+8613800138001"))
        with pytest.raises(RuntimeError):
            async with store.transaction():
                await store.put_entry(entry("block", "+8613800138002"))
                raise RuntimeError("inner step failed")
        await store.put_entry(entry("allow", "+8613900139000"))
    assert [(e.list, e.pattern.text) for e in await store.entries()] == [("allow", "+8613900139000"), ("block", "+8613800138001")]
    assert [(c[1], c[2], c[3]) for c in await store.changes_since(rev, 10)] == [
        ("put", "block", "+8613800138001"), ("put", "allow", "+8613900139000")]


async def test_remove_source_on_one_list_and_entries_without_the_expired(store):
    await store.put_entries([
        entry("block", "+8613800138001", source="feed"), entry("allow", "+8613800138002", source="feed"),
        entry("block", "+8613800138003", source="cli", expires_at=1700000100.0),
    ])
    rev = await store.head_rev()
    assert await store.remove_source("feed", "block") == 1
    assert [(c[1], c[2], c[3]) for c in await store.changes_since(rev, 10)] == [("del", "block", "+8613800138001")]
    assert [(e.list, e.source) for e in await store.entries()] == [("allow", "feed"), ("block", "cli")]
    assert [e.pattern.text for e in await store.entries("block", include_expired=False, now=1700000000.0)] == ["+8613800138003"]
    assert await store.entries("block", include_expired=False, now=1700000100.0) == []
    assert await store.remove_source("nobody") == 0
    assert await store.counts() == {"block": 1, "allow": 1}


async def test_a_retried_batch_is_stored_once(store):
    """(from test_pgstore.py, where it ran on PostgreSQL only)"""
    recs = [record(i, key=f"key-{i}") for i in range(3)]
    assert await store.record_calls(recs) == 3
    assert await store.record_calls(recs + [record(3, key="key-3")]) == 1
    assert len(await store.recent_calls(0)) == 4
    assert await store.record_calls([]) == 0


async def test_a_call_log_batch_is_written_whole_or_not_at_all(store):
    """write_batch is one transaction: an item it cannot store (a programming error) leaves
    nothing of the batch behind."""
    with pytest.raises(TypeError):
        await store.write_batch([record(1), ContactSeen("+8613900139000", 1700000000.0, "outbound"), object()])
    assert await store.recent_calls(0) == [] and await store.contacts(0) == []
    assert await store.write_batch([]) == 0


async def test_contacts_keep_the_newest_time_and_purge_calls_forgets_old_ones(store):
    await store.write_batch([
        ContactSeen("+8613900139000", 1700000100.0, "outbound"),
        ContactSeen("+8613700137000", 1700000000.0, "talked"),
        ContactSeen("+8613900139000", 1700000200.0, "talked"),  # newer: replaces the time
    ])
    assert sorted(await store.contacts(0)) == [("+8613700137000", 1700000000.0), ("+8613900139000", 1700000200.0)]
    assert await store.contacts(1700000150.0) == [("+8613900139000", 1700000200.0)]
    assert await store.purge_calls(1700000100.0) == 0  # no calls; the old contact goes all the same
    assert await store.contacts(0) == [("+8613900139000", 1700000200.0)]


async def test_call_reads_by_caller_and_uniqueid_and_their_limits(store):
    await store.write_batch([record(i) for i in range(4)] + [CallOutcome("1700000000.2", answered=True, talk_seconds=5.0)])
    assert [r.uniqueid for r in await store.recent_calls(0, limit=2)] == ["1700000000.0", "1700000000.1"]
    assert [len(b) for b in [b async for b in store.iter_calls(0, batch=3)]] == [3, 1]
    calls = await store.calls_from("+8613800138002", 0)
    assert [(c["uniqueid"], c["answered"], c["talk_seconds"], c["action"]) for c in calls] == [("1700000000.2", 1, 5.0, "allow")]
    assert await store.calls_from("+8613800138002", 1700000003.0) == []
    assert await store.outcome_of("no-such-call") is None
    assert (await store.outcome_of("1700000000.1"))["answered"] is None


async def test_an_empty_store_answers_zero_and_nothing(store):
    assert await store.head_rev() == 0 and await store.calls_head() == 0
    assert await store.counts() == {"block": 0, "allow": 0}
    assert await store.changes_since(0, 10) == [] and (await store.changed_entries(0))[:2] == (0, [])
    assert await store.refusals_version() == (0, 0, 0) and await store.refusals() == []
    assert await store.undo_last_refusal("1000", 1700000000.0) is None
    assert await store.appeal_summary(0) == (0, []) and await store.appeals() == []
    assert await store.get_appeal("123456") is None and await store.purge_appeals(2e9) == []
    assert await store.history_rows(0) == [] and await store.last_callers() == []
    assert await store.challenge_failures_since(0) == [] and await store.purge_challenges(2e9) == 0
    assert await store.reputation_rows() == [] and await store.purge_reputation() == 0
    assert await store.no_appeal_patterns() == [] and await store.purge_expired() == 0
    rev, index = await store.load_index()
    assert rev == 0 and index.counts() == {"block": 0, "allow": 0}


async def test_appeal_filters_and_a_decision_that_is_not_one(store):
    a = await store.add_appeal(_appeal("a" * 20, 1700000000.0))
    b = await store.add_appeal(_appeal("b" * 20, 1700000100.0))
    assert [x.code for x in await store.appeals(since=1700000050.0)] == [b.code]
    assert [x.code for x in await store.appeals(status="pending", limit=1)] == [a.code]
    assert await store.appeals(status="granted") == []
    with pytest.raises(ValueError):
        await store.decide_appeal(a.code, "maybe", 1700000200.0)
    assert (await store.get_appeal(a.code)).status == "pending"
    kept = await store.add_appeal(dataclasses.replace(_appeal("c" * 20, 1700000200.0), code="654321"), keep_code=True)
    assert kept.code == "654321" and (await store.get_appeal("654321")).key == "c" * 20


def _appeal(key: str, ts: float) -> Appeal:
    return Appeal(0, "", key, ts, "+8613800138000", uniqueid="u1", called="7000", node="pbx-a", rules="LIST_BLOCKED(+20)")


async def test_watch_changes_is_a_push_feed_or_returns_at_once(store):
    """SQLite has no change notices: watch_changes returns at once (the poll is the feed).
    PostgreSQL's runs for ever, waking the follower on every change: see test_pgstore.py."""
    if store.backend != "sqlite":
        pytest.skip("PostgreSQL's change notices are tested with two nodes in test_pgstore.py")
    assert await store.watch_changes(lambda: None) is None

"""Which store: ``open_store(settings)`` gives the SQLite file (one box, the embedded default) or
PostgreSQL (``[store] url``: several PBXs sharing one memory), with the same async API.

Also the move from one to the other (``copy_sqlite_to_postgres``, `edgefilter db copy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from edgefilter.core.config import Settings, StoreSettings
from edgefilter.core.errors import StoreError
from edgefilter.lists.index import Pattern
from edgefilter.store.contract import StoreContract
from edgefilter.store.postgres import PgStore
from edgefilter.store.sqlite import KEYED_CALL_COLUMNS, OUTCOME_COLUMNS, CallRecord, ContactSeen, Store

#: Whichever store open_store gives: the contract both implement (contract.StoreContract).
AnyStore = StoreContract


def read_password_file(path: str) -> str:
    """The first line of ``path``; refused when group or others may read it (a leaked secret)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise StoreError(f"[store] password_file {path}: cannot read it ({e.strerror})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StoreError(
            f"[store] password_file {path}: readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"[store] password_file {path}: cannot read it ({e})") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise StoreError(f"[store] password_file {path}: the file is empty")
    return lines[0]


#: File name of a PostgreSQL node's index snapshot (in the directory of [store] spool_path).
PG_SNAPSHOT_NAME = "edgefilter-lists.index"


def store_exists(settings: Settings) -> bool:
    """False only for a SQLite file not created yet (read-only commands then show nothing)."""
    return bool(settings.store.url) or Path(settings.store.path).exists()


@contextlib.asynccontextmanager
async def open_store(settings: Settings | StoreSettings, *, create: bool = True, connect: bool = True) -> AsyncIterator[AnyStore]:
    """The configured store, schema migrated. ``connect=False`` (the service) hands out a
    PostgreSQL store without waiting for the server: it connects, migrates and loads when it can."""
    st = settings.store if isinstance(settings, Settings) else settings
    if st.url:
        password = read_password_file(st.password_file) if st.password_file else None
        async with PgStore.open(st.url, password=password, migrate=connect) as store:
            store.node = st.node
            # the compact index's start-up cache is per node: a local file beside the spool
            store.snapshot_path = str(Path(st.spool_path).parent / PG_SNAPSHOT_NAME) if st.spool_path else ""
            yield store
    else:
        async with Store.open(st.path, create=create, busy_timeout_ms=int(st.busy_timeout * 1000)) as store:
            store.node = st.node
            yield store


# --------------------------------------------------------------------------- db copy
@dataclass
class CopyReport:
    entries: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    calls: int = 0
    calls_written: int = 0
    refusals: int = 0
    refusals_written: int = 0
    contacts: int = 0
    challenges: int = 0
    challenges_written: int = 0
    reputation: int = 0
    reputation_written: int = 0
    appeals: int = 0
    appeals_written: int = 0
    appeals_recoded: list[tuple[str, str]] | None = None  # (old code, new code) when a code was taken on PostgreSQL

    def lines(self) -> list[str]:
        return [
            f"entries: {self.entries} read, {self.added} added, {self.updated} updated, {self.unchanged} already there",
            f"calls: {self.calls} read, {self.calls_written} written, {self.calls - self.calls_written} already there",
            f"refusals: {self.refusals} read, {self.refusals_written} written, {self.refusals - self.refusals_written} already there",
            f"contacts: {self.contacts} read and merged (the newest time of each kept)",
            f"challenge outcomes: {self.challenges} read, {self.challenges_written} written, "
            f"{self.challenges - self.challenges_written} already there",
            f"reputation answers: {self.reputation} read, {self.reputation_written} written "
            f"(an answer already there and fetched later is kept)",
            f"appeals: {self.appeals} read, {self.appeals_written} written, {self.appeals - self.appeals_written} already there"
            + "".join(f"; appeal {old} is {new} now (its code was taken)" for old, new in self.appeals_recoded or ()),
        ]


def copied_call_key(node: str, rowid: int, row: tuple) -> str:
    """A stable key for a SQLite call row: the same file copied twice gives the same keys, so a
    re-run writes nothing twice (the node name is not part of it: a re-run with another --node
    still matches)."""
    digest = hashlib.sha256(json.dumps([rowid, *row], default=str).encode()).hexdigest()[:32]
    return f"sqlite-{digest}"


@dataclass(frozen=True)
class _CopiedChallenge:
    ts: float
    uniqueid: str
    caller_e164: str
    outcome: str
    key: str


async def copy_sqlite_to_postgres(src_path: str, dst: PgStore, *, node: str, batch: int = 5000) -> CopyReport:
    """Move a single-box install into PostgreSQL: every table - list entries with all their
    fields (created_at too), call records with their outcomes (tagged with ``node``), the
    refusal ledger, known contacts, challenge outcomes and the reputation cache. Idempotent:
    a re-run (after an interruption, or to pick up what the box wrote since) adds only what is
    missing."""
    if not Path(src_path).exists():
        raise StoreError(f"{src_path}: no such SQLite database")
    report = CopyReport()
    dst.node = node  # challenge outcomes without a node get this one
    async with Store.open(src_path, create=False) as src:
        # In batches, each its own transaction: memory stays flat on big lists, and a copy that
        # stopped half way is finished by running it again. Entries that already existed keep
        # their PostgreSQL created_at on update (put semantics); a fresh copy carries the source's.
        async for entries in src.iter_entries(batch):
            report.entries += len(entries)
            counts = await dst.put_entries(entries)
            report.added += counts["added"]
            report.updated += counts["updated"]
            report.unchanged += counts["unchanged"]
        for list_name, pattern in await src.no_appeal_patterns():  # block --no-appeal (issue 17)
            await dst.set_no_appeal(list_name, Pattern.from_text(pattern), True)
        # Calls with their outcome columns; a row keeps the key it has (written since schema v6),
        # else gets a stable one derived from its content.
        cursor = 0
        while True:
            cur = await src.db.execute(
                f"SELECT id, {KEYED_CALL_COLUMNS}, {OUTCOME_COLUMNS} FROM calls WHERE id > ? ORDER BY id LIMIT ?",
                (cursor, batch),
            )
            rows = list(await cur.fetchall())
            if not rows:
                break
            out = []
            for r in rows:
                rec = CallRecord(*r[1:18])
                key = rec.key or copied_call_key(node, r[0], rec.row())
                out.append(rec.row() + (node, key) + tuple(r[18:]))
            report.calls += len(out)
            report.calls_written += await dst._copy_calls(out)
            cursor = rows[-1][0]
        refusals = await src.refusals()
        report.refusals = len(refusals)
        for i in range(0, len(refusals), batch):
            report.refusals_written += await dst._copy_refusals(refusals[i:i + batch])
        cur = await src.db.execute("SELECT e164, last_ts, how FROM contacts")
        seen = [ContactSeen(e, ts, how) for e, ts, how in await cur.fetchall()]
        report.contacts = len(seen)
        for i in range(0, len(seen), batch):
            await dst.write_batch(seen[i:i + batch])
        cursor = 0
        while True:
            cur = await src.db.execute(
                "SELECT id, ts, uniqueid, caller_e164, outcome, key FROM challenge_outcomes WHERE id > ? ORDER BY id LIMIT ?",
                (cursor, batch),
            )
            rows = list(await cur.fetchall())
            if not rows:
                break
            recs = [_CopiedChallenge(ts, uid, e164, outcome, key or copied_call_key(node, rid, (ts, uid, e164, outcome)))
                    for rid, ts, uid, e164, outcome, key in rows]
            report.challenges += len(recs)
            report.challenges_written += await dst.record_challenges(recs)
            cursor = rows[-1][0]
        answers = await src.reputation_rows()
        report.reputation = len(answers)
        for i in range(0, len(answers), batch):
            report.reputation_written += await dst._copy_reputation(answers[i:i + batch])
        # appeals keep their code (callers were told it) unless PostgreSQL has it for another one
        report.appeals_recoded = []
        for a in await src.appeals():
            report.appeals += 1
            there = await dst.get_appeal(a.code)
            if there is not None and there.key == a.key:
                continue
            got = await dst.add_appeal(dataclasses.replace(a, node=a.node or node), keep_code=True)
            report.appeals_written += 1
            if got.code != a.code:
                report.appeals_recoded.append((a.code, got.code))
    return report


def _conforms(sqlite: Store, postgres: PgStore) -> tuple[StoreContract, StoreContract]:
    """Never called: mypy checks here that both stores satisfy the contract (the contract itself
    imports neither store, so it stays below both; tests check the same at run time)."""
    return sqlite, postgres

"""The store contract: what the service, the CLI, the behaviour memory, imports, appeals and
`db copy` may ask of a store, whichever backend ``open.open_store`` gave them.

``StoreContract`` (a typing.Protocol) lists the async API; sqlite.Store (one box) and
postgres.PgStore (several PBXs sharing one database) both implement it, checked by mypy
(``_conforms`` below) and by one test suite run on both (tests/test_store_contract.py). The
records it reads and writes are in records.py. Each docstring says what a caller may rely on;
how a backend gets there (savepoints or a pooled connection, polling or LISTEN/NOTIFY, ...) is
its own business.

Guarantees common to every method: a failure of the database raises StoreError with a message
an admin can act on (never a password); every write is one transaction (nothing partial is
left, including a list entry and its change row); times are epoch seconds (float); numbers are
E.164 with '+' unless a method says otherwise.

``BatchedImport`` is the part of the contract written once for both: the staging loop of
``import_entries`` on top of each backend's begin_import / stage_rows / apply_import.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Protocol

from edgefilter.lists.index import LISTS, ChangedRow, Entry, ListIndex, Pattern
from edgefilter.store.records import (
    Appeal,
    CallRecord,
    ImportResult,
    Refusal,
    ReputationRow,
    StagedRow,
    staged_row,
)


class ChallengeOutcomeLike(Protocol):
    """What ``record_challenges`` reads of a challenge outcome (challenge.OutcomeRecord). An
    optional ``key`` attribute, unique across nodes, makes a retried write a no-op; without one
    the store draws a key."""

    @property
    def ts(self) -> float: ...
    @property
    def uniqueid(self) -> str: ...
    @property
    def caller_e164(self) -> str: ...
    @property
    def outcome(self) -> str: ...  # pass | fail | hangup


class StoreContract(Protocol):
    """The API both stores implement (how one is opened is not part of it: see open.open_store)."""

    #: "sqlite" or "postgresql"
    backend: str
    #: the database as it may be shown (a file path, or the URL without its password)
    where: str
    #: what older code prints as "the database" (the same as ``where`` on PostgreSQL)
    path: str
    #: this node's name: rows written without one (calls, challenge outcomes) get it
    node: str

    # -- the store itself ---------------------------------------------------------------------
    def describe_error(self, exc: BaseException) -> str:
        """An admin-readable reason for a failure of this store (a StoreError's own message)."""
        ...

    async def migrate(self) -> int:
        """Bring the schema up to this edgefilter's version (idempotent; returns it). A newer
        schema than this edgefilter knows raises StoreError."""
        ...

    async def schema_version(self) -> int:
        """The schema version the database is at (0: none yet)."""
        ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with store.transaction():`` everything inside commits together or not at all
        (rolled back on any exception). Store methods called inside join it; a transaction
        opened inside another one in the same task is a savepoint."""
        ...

    # -- list entries --------------------------------------------------------------------------
    async def put_entry(self, entry: Entry) -> str:
        """Insert or update one entry: 'added', 'updated' (category, note, source or expiry
        differ; created_at stays), or 'unchanged' (nothing written, no change row)."""
        ...

    async def put_entries(self, entries: Iterable[Entry], batch: int = 5000) -> dict[str, int]:
        """put_entry for many in one transaction: counts {"added", "updated", "unchanged"}."""
        ...

    async def remove_entry(self, pattern: Pattern, list_name: str | None = None) -> list[str]:
        """Delete the pattern from one list or both; the lists it was removed from ('del' change
        rows for those only)."""
        ...

    async def remove_source(self, source: str, list_name: str | None = None) -> int:
        """Delete every entry a source brought in (one list or both); how many, with 'del' rows."""
        ...

    async def entries(self, list_name: str | None = None, *, include_expired: bool = True,
                      now: float | None = None) -> list[Entry]:
        """Entries in (list, pattern) byte order; without the expired ones (at ``now``) on request."""
        ...

    async def candidates(self, digits: str) -> list[Entry]:
        """Entries that could match ``digits`` (E.164 without '+'): the exact number, every
        prefix of it, every mask of its length. A superset: the caller matches."""
        ...

    def iter_entries(self, batch: int = 50000) -> AsyncIterator[list[Entry]]:
        """Every entry, in batches of at most ``batch`` (no order promised)."""
        ...

    def export_entries(self, list_name: str | None = None, source: str | None = None,
                       batch: int = 20000) -> AsyncIterator[list[Entry]]:
        """Entries (of one list, one source) in (list, pattern) order, in batches: a whole list
        is never held in memory."""
        ...

    async def counts(self) -> dict[str, int]:
        """{"block": n, "allow": n}: entries per list (expired ones too)."""
        ...

    async def purge_expired(self, now: float | None = None) -> int:
        """Delete entries expired at ``now`` (they already stopped matching), with 'del' rows."""
        ...

    async def set_no_appeal(self, list_name: str, pattern: Pattern, flag: bool) -> bool:
        """Mark an entry never appealable (or appealable again), with a 'put' change row. False
        when nothing changed (no such entry, or it was so already). A later put keeps the flag."""
        ...

    async def no_appeal_patterns(self) -> list[tuple[str, str]]:
        """(list, pattern) of every entry marked never appealable."""
        ...

    # -- the change feed ----------------------------------------------------------------------
    async def head_rev(self) -> int:
        """The newest change revision (0: none). Revisions commit in order: whoever has seen
        revision N has seen every revision below it."""
        ...

    async def changes_since(self, rev: int, limit: int) -> list[tuple[int, str, str, str, Entry | None]]:
        """Up to ``limit`` changes after ``rev`` in revision order: (rev, op 'put'|'del', list,
        pattern, the entry as it is now or None when it is gone)."""
        ...

    async def changed_entries(self, since: int) -> tuple[int, list[ChangedRow], dict]:
        """(head revision, each (list, pattern) changed in (since, head] once as it is now, the
        metadata profiles {id: (category, note, source, created_at, expires_at)}), read in one
        consistent snapshot: a big batch for ListIndex.plan_merge."""
        ...

    async def trim_changes(self, keep: int = 100000) -> None:
        """Forget change rows older than the newest ``keep`` (a follower that far behind reloads)."""
        ...

    async def watch_changes(self, wake: Callable[[], None], resync: Callable[[], None] | None = None) -> None:
        """Push change notices: call ``wake`` on each (PostgreSQL, runs for ever; after a lost
        connection it calls ``resync`` once). Returns at once where there are none (SQLite):
        polling head_rev is then the feed."""
        ...

    async def load_index(self) -> tuple[int, ListIndex]:
        """Every entry in a new ListIndex and the change revision it reflects (consistent: the
        changes after it are exactly those changes_since(rev) returns)."""
        ...

    # -- bulk import (issue 6) -----------------------------------------------------------------
    async def begin_import(self) -> None:
        """Start staging an import (private to this store object; staging writes nothing the
        service sees and takes no write lock)."""
        ...

    async def stage_rows(self, rows: Sequence[StagedRow]) -> None:
        """Stage rows (records.StagedRow); the first staged of a duplicate pattern wins."""
        ...

    async def stage_import(self, entries: Iterable[Entry]) -> None:
        """Stage Entry objects (the first of a duplicate pattern wins)."""
        ...

    async def apply_import(self, *, replace_source: str | None = None, lists: Sequence[str] = LISTS,
                           dry_run: bool = False) -> ImportResult:
        """Apply what was staged in ONE transaction with its change rows: counts of added,
        updated, unchanged (not written) and, with ``replace_source``, removed (that source's
        entries on ``lists`` not staged). ``dry_run``: the same counts, nothing written."""
        ...

    async def import_entries(self, entries: Iterable[Entry], *, replace_source: str | None = None,
                             lists: Sequence[str] = LISTS, dry_run: bool = False) -> ImportResult:
        """begin_import, stage_import and apply_import in one call."""
        ...

    # -- call log ------------------------------------------------------------------------------
    async def record_calls(self, records: Iterable[CallRecord]) -> int:
        """Write call records (the store's node and a fresh key for those without); a record
        whose key is already stored is skipped (a retry). Returns how many rows were new."""
        ...

    async def write_batch(self, items: Sequence[object]) -> int:
        """CallRecord, CallOutcome and ContactSeen items in one transaction, in queue order (an
        outcome applies to the call inserted before it). Retries are harmless: records skip by
        key, outcomes (per uniqueid and node) and contacts (newest time kept) are idempotent.
        Returns len(items); anything else raises TypeError."""
        ...

    async def recent_calls(self, since: float, limit: int = 1000000) -> list[CallRecord]:
        """Every node's calls with ts >= ``since``, oldest first."""
        ...

    def iter_calls(self, since: float, until: float | None = None, batch: int = 10000) -> AsyncIterator[list[CallRecord]]:
        """Calls with since <= ts (< until), oldest first, in batches."""
        ...

    async def calls_after(self, cursor: int, limit: int = 10000) -> list[tuple[int, CallRecord]]:
        """(id, call) with id > ``cursor`` in id order: following the largest id seen never
        skips a committed call."""
        ...

    async def calls_head(self) -> int:
        """The largest call id (0 when none): where a follower of calls_after starts."""
        ...

    async def purge_calls(self, before: float) -> int:
        """Delete calls with ts < ``before`` and contacts last seen before it; how many calls."""
        ...

    async def history_rows(self, since: float, limit: int = 1000000, through_id: int | None = None) -> list[tuple]:
        """Calls for the in-memory history: (ts, uniqueid, caller_e164, caller_kind, called,
        extension, answered, talk_seconds, action), the newest ``limit`` oldest first; only ids
        up to ``through_id`` when given (calls_after(through_id) follows on)."""
        ...

    async def last_callers(self, limit: int = 100000) -> list[tuple]:
        """The newest call per extension with a caller number: (extension, ts, uniqueid,
        caller_e164, called)."""
        ...

    async def calls_from(self, e164: str, since: float) -> list[dict]:
        """Every call from ``e164`` since ``since`` with its outcome columns, oldest first."""
        ...

    async def outcome_of(self, uniqueid: str) -> dict | None:
        """The outcome columns of the newest call with that uniqueid, None when there is none."""
        ...

    async def contacts(self, since: float) -> list[tuple[str, float]]:
        """(e164, last seen) of the contacts seen since ``since`` (KNOWN_CONTACT)."""
        ...

    # -- challenge outcomes --------------------------------------------------------------------
    async def record_challenges(self, records: Iterable[ChallengeOutcomeLike]) -> int:
        """Store challenge outcomes (the store's node; a key already stored is skipped).
        Returns how many were new."""
        ...

    async def challenge_failures_since(self, since: float, caller_e164: str | None = None) -> list[tuple[str, float]]:
        """(E.164 digits without '+', ts) of every failed challenge with ts > ``since`` (of one
        caller), every node's, oldest first."""
        ...

    async def purge_challenges(self, before: float) -> int:
        """Delete challenge outcomes with ts < ``before``; how many."""
        ...

    # -- reputation cache ----------------------------------------------------------------------
    async def put_reputation(self, rows: Iterable[ReputationRow]) -> int:
        """Insert or replace cached answers per (source, number) in one transaction; how many."""
        ...

    async def get_reputation(self, source: str, number: str) -> ReputationRow | None:
        """The cached answer of one source about one number, None when there is none."""
        ...

    async def reputation_rows(self, *, number: str | None = None, fresh_at: float | None = None,
                              limit: int = 1000000) -> list[ReputationRow]:
        """Cached answers (about one number; still fresh at ``fresh_at``), newest fetch first."""
        ...

    async def purge_reputation(self, *, source: str | None = None, expired_at: float | None = None) -> int:
        """Delete cached answers: all, one source's, and/or those expired at ``expired_at``."""
        ...

    # -- refusal ledger (star codes) -----------------------------------------------------------
    async def add_refusal(self, r: Refusal, entry: Entry | None = None) -> int:
        """Record a refusal and, for block/report, its list entry, in one transaction; returns
        its id. An entry already on that list (an admin's) is left alone and the ledger row
        keeps no pattern, so undoing never removes what someone else put there."""
        ...

    async def undo_last_refusal(self, callee: str, now: float) -> Refusal | None:
        """Undo the callee's newest refusal still in force (None when there is none); its list
        entry goes too while it is still the one the star code wrote."""
        ...

    async def refusals(self, *, caller: str | None = None, active_only: bool = False) -> list[Refusal]:
        """Ledger rows (of one caller; only those not undone), oldest first. Never purged."""
        ...

    async def refusals_version(self) -> tuple[int, int, int]:
        """(rows, largest id, rows undone): changes whenever any node records or undoes one."""
        ...

    # -- appeals (issue 17) --------------------------------------------------------------------
    async def add_appeal(self, a: Appeal, *, keep_code: bool = False) -> Appeal:
        """Store an appeal under a fresh unique 6-digit code (``keep_code``: its own first) and
        return it as stored; the same key twice is stored once (the first is returned)."""
        ...

    async def appeals(self, *, status: str | None = None, caller: str | None = None, since: float | None = None,
                      limit: int = 100000) -> list[Appeal]:
        """Appeals (of one status, one caller, since a time), oldest first."""
        ...

    async def get_appeal(self, code: str) -> Appeal | None:
        """The appeal with that code, None when there is none."""
        ...

    async def decide_appeal(self, code: str, status: str, now: float, *, note: str = "",
                            entry: Entry | None = None) -> Appeal | None:
        """Grant or deny ('granted'|'denied', else ValueError) a pending appeal, a grant's
        allow ``entry`` written in the same transaction. Returns the appeal as it is after
        (unchanged when it was decided already), None when the code is unknown."""
        ...

    async def appeal_summary(self, since: float) -> tuple[int, list[tuple[str, float]]]:
        """(appeals pending, (caller, newest ts) of every caller who appealed since ``since``)."""
        ...

    async def purge_appeals(self, before: float) -> list[Appeal]:
        """Delete appeals with ts < ``before``; returns them (their recordings are the caller's
        to delete)."""
        ...


class BatchedImport:
    """``import_entries`` and ``stage_import`` for any store with begin_import / stage_rows /
    apply_import: the same staging loop on SQLite and PostgreSQL, written once."""

    async def begin_import(self) -> None:
        raise NotImplementedError

    async def stage_rows(self, rows: Sequence[StagedRow]) -> None:
        raise NotImplementedError

    async def apply_import(
        self, *, replace_source: str | None = None, lists: Sequence[str] = LISTS, dry_run: bool = False
    ) -> ImportResult:
        raise NotImplementedError

    async def stage_import(self, entries: Iterable[Entry]) -> None:
        """Add entries to the import being staged (the first of a duplicate pattern wins)."""
        await self.stage_rows([staged_row(e) for e in entries])

    async def import_entries(
        self, entries: Iterable[Entry], *, replace_source: str | None = None, lists: Sequence[str] = LISTS,
        dry_run: bool = False,
    ) -> ImportResult:
        """Stage and apply in one go (see apply_import)."""
        await self.begin_import()
        batch: list[Entry] = []
        for e in entries:
            batch.append(e)
            if len(batch) >= 20000:
                await self.stage_import(batch)
                batch = []
        await self.stage_import(batch)
        return await self.apply_import(replace_source=replace_source, lists=lists, dry_run=dry_run)

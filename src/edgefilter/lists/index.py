"""Block and allow lists: the patterns admins write and the in-memory index the call path reads.

Three kinds of entry, all keyed on E.164 digits so that every way a trunk writes a number
matches: exact numbers (``+8613800138000``, or a short number ``95588``), prefix rules
(``+86170*``) and fixed-length digit masks (``+4121560####``). The longest match wins; at equal
length allow beats block. The index is compact sorted arrays for bulk-loaded exact numbers (a
binary search, ~24 probes for 10 million) plus dicts for everything else (at most ~20 probes for
prefixes), so the per-call lookup costs microseconds and never touches the database.

Pattern, Entry, Match and parse_pattern live in patterns.py (re-exported here).
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from edgefilter.lists.patterns import (
    _E_CAT,
    _E_CREATED,
    _E_EXPIRES,
    _E_LIST,
    _E_NOTE,
    _E_PATTERN,
    _E_SOURCE,
    _M_ENTRY,
    _M_SHADOWED,
    _P_KEY,
    _P_KIND,
    _P_TEXT,
    KINDS,
    LISTS,
    MAX_NOTE,
    Entry,
    Match,
    Pattern,
    _new,
    make_entry,
    make_pattern,
    parse_pattern,
)

__all__ = [
    "DELETED", "FENCE", "KINDS", "LISTS", "MAX_NOTE", "NUM_MAX_DIGITS", "ChangedRow", "Entry", "ListIndex", "Match", "MergePlan",
    "Pattern", "Profile", "digits_num", "entry_profile", "exact_num", "make_entry", "make_pattern", "parse_pattern",
]

#: Exact numbers with at most this many digits are kept as int64 keys (``int("1" + digits)``: the
#: leading 1 keeps leading zeros and length; 1 + 18 digits stays below 2**63).
NUM_MAX_DIGITS = 18
#: Profile id 0 in the compact arrays means "deleted" (a tombstone until the next full load).
DELETED = 0


def digits_num(digits: str) -> int | None:
    """The int64 key of E.164 digits for the compact exact table, or None when it does not fit."""
    if 0 < len(digits) <= NUM_MAX_DIGITS and digits.isdigit() and digits.isascii():
        return int("1" + digits)
    return None


def exact_num(p: Pattern) -> int | None:
    """The compact key of an exact international number (``+`` then digits), else None.

    Short numbers (``95588``, spelt without '+') and anything unusual stay in the dict overlay, so
    a compact key always means the canonical pattern ``+<digits>``.
    """
    if p.kind != "exact" or p.text != "+" + p.key:
        return None
    return digits_num(p.key)


#: The metadata an entry carries besides its list and pattern, shared by every entry of an import.
Profile = tuple  # (category, note, source, created_at, expires_at)
#: A changed entry as it is now: (list, pattern text, its stored columns (store.ENTRY_COLUMNS) or
#: None if deleted, compact key or None, database profile id or None) - what the stores read for
#: a big batch of changes. Columns, not an Entry: most rows of a big batch only need the key.
ChangedRow = tuple


@dataclass
class MergePlan:
    """ListIndex.plan_merge's result: new compact arrays per list, the profiles they introduce,
    the next free profile id, and the changed rows left for put/remove."""

    compact: dict
    profiles: dict
    next_profile: int
    rest: list


def entry_profile(e: Entry) -> Profile:
    return (e.category, e.note, e.source, e.created_at, e.expires_at)


class _Compact:
    """One list's exact numbers: sorted int64 keys and a parallel array of profile ids.

    10 million numbers cost 120 MB here instead of several GB as Entry objects. Keys never move
    after a load: a change to a loaded number rewrites its profile id in place, a removal writes
    DELETED, a new number goes to the dict overlay; the next full load folds everything in.
    """

    __slots__ = ("keys", "profiles", "live", "fences", "where")

    #: Every FENCE-th key is also kept as a Python int in a list: most of the binary search runs
    #: there (no int object made per probe), the last 6 probes in the array. 6 MB for 10 M keys.
    FENCE = 64
    #: A list of at most this many numbers (an allow list of customers, usually) also gets a dict
    #: from key to position, about 120 bytes a number: every lookup searches both lists, and one
    #: dict probe costs a tenth of the binary search (1.4 us of a 6 us lookup, measured beside 10
    #: million blocked numbers). Larger lists search only: their dict would cost gigabytes.
    SMALL = 1 << 18

    def __init__(self, keys: array, profiles: array, live: int | None = None) -> None:
        self.keys = keys
        self.profiles = profiles
        self.live = len(profiles) - profiles.count(DELETED) if live is None else live
        self.fences = keys[:: self.FENCE].tolist()
        self.where = dict(zip(keys, range(len(keys)), strict=True)) if len(keys) <= self.SMALL else None

    def find(self, num: int) -> int:
        if self.where is not None:
            return self.where.get(num, -1)
        j = bisect_right(self.fences, num) - 1
        if j < 0:
            return -1
        keys = self.keys
        lo = j * self.FENCE
        i = bisect_left(keys, num, lo, min(lo + self.FENCE, len(keys)))
        if i < len(keys) and keys[i] == num:
            return i
        return -1


#: Keys per fence of _Compact (read by the search inlined in ListIndex.lookup).
FENCE = _Compact.FENCE


class ListIndex:
    """In-memory index of both lists. Not thread-safe: owned by the event loop.

    Storage is built for tens of millions of exact numbers: loaded numbers live in compact sorted
    arrays (``load_compact``), everything else (prefixes, masks, short numbers, entries added since
    the load) in dicts of Entry lists. Lookups probe both; semantics are the same whichever holds
    an entry: longest match, allow beats block at equal length, expired entries never match.
    """

    def __init__(self) -> None:
        self._exact: dict[str, list[Entry]] = {}
        self._prefix: dict[str, list[Entry]] = {}
        self._prefix_lengths: list[int] = []
        self._mask: dict[tuple[str, int], list[Entry]] = {}
        self._mask_heads: set[int] = set()
        self._compact: dict[str, _Compact] = {}
        self._profiles: dict[int, Profile] = {}
        self._profile_ids: dict[Profile, int] = {}
        self._next_profile = 1
        self._counts = {name: 0 for name in LISTS}
        self.size = 0

    # -- bulk load ------------------------------------------------------------------------
    def load_compact(self, list_name: str, keys: array, profile_ids: array, profiles: dict[int, Profile]) -> None:
        """Adopt sorted, unique int64 ``keys`` (see digits_num) with their profile ids.

        Called once per list on a fresh index, before any put: the arrays are used as they are
        (no copy), so loading 10 million numbers builds no Python object per number.
        """
        if list_name in self._compact or len(keys) != len(profile_ids):
            raise ValueError("load_compact: once per list, keys and profile ids of equal length")
        for pid, prof in profiles.items():
            self._profiles[pid] = prof
            self._profile_ids.setdefault(prof, pid)
            self._next_profile = max(self._next_profile, pid + 1)
        c = _Compact(keys, profile_ids)
        self._compact[list_name] = c
        self._counts[list_name] += c.live
        self.size += c.live

    def plan_merge(self, rows: Iterable[ChangedRow], profiles: dict[int, Profile]) -> MergePlan:
        """A big batch of changes as new compact arrays plus the rows left for put/remove.

        ``rows`` are changed entries as they are now (ChangedRow: list, pattern text, stored
        columns or None when deleted, compact key or None, database profile id or None). A row that brings a
        number new to its list's arrays (the bulk of an import) is inserted into new arrays, in
        key order, by slices between the new keys' positions; every other row (an update, a
        deletion, a prefix, a number held in the dict overlay) is left to put/remove, which
        change the arrays in place. Reads this index only, so it may run in a worker thread
        while the event loop answers lookups; adopt_merge then installs the result at once.
        Database profile ids are mapped to this index's own (it interns profiles of its own).
        """
        pid_of: dict[int, int] = {}
        new_profiles: dict[int, Profile] = {}
        new_ids: dict[Profile, int] = {}
        next_pid = self._next_profile
        pairs: dict[str, list[tuple[int, int]]] = {name: [] for name in self._compact}
        rest: list[ChangedRow] = []
        for row in rows:
            list_name, text, columns, num, db_pid = row
            c = self._compact.get(list_name)
            if columns is None or num is None or db_pid is None or c is None or c.find(num) >= 0 \
                    or db_pid not in profiles \
                    or any(e.list == list_name for e in self._exact.get(text[1:], ())):  # num: text is +key
                rest.append(row)  # (a number in the overlay on this list stays there: put replaces it)
                continue
            pid = pid_of.get(db_pid)
            if pid is None:
                prof = profiles[db_pid]
                pid = self._profile_ids.get(prof) or new_ids.get(prof)
                if pid is None:
                    pid = new_ids[prof] = next_pid
                    new_profiles[pid] = prof
                    next_pid += 1
                pid_of[db_pid] = pid
            pairs[list_name].append((num, pid))
        compact: dict[str, _Compact] = {}
        for name, new in pairs.items():
            if not new:
                continue
            new.sort()  # already in key order (the stores read rows by list and key): linear
            c = self._compact[name]
            keys, pids = c.keys, c.profiles
            out_keys, out_pids = array("q"), array("I")
            prev = 0
            for num, pid in new:
                i = bisect_left(keys, num, prev)
                out_keys.extend(keys[prev:i])
                out_pids.extend(pids[prev:i])
                out_keys.append(num)
                out_pids.append(pid)
                prev = i
            out_keys.extend(keys[prev:])
            out_pids.extend(pids[prev:])
            compact[name] = _Compact(out_keys, out_pids, c.live + len(new))
        return MergePlan(compact, new_profiles, next_pid, rest)

    def adopt_merge(self, plan: MergePlan) -> list[ChangedRow]:
        """Install a plan_merge result (nothing may have changed this index since: the caller
        owns all changes); returns the rows still to put/remove."""
        for pid, prof in plan.profiles.items():
            self._profiles[pid] = prof
            self._profile_ids.setdefault(prof, pid)
        self._next_profile = max(self._next_profile, plan.next_profile)
        for name, c in plan.compact.items():
            old = self._compact[name]
            self._compact[name] = c
            self._added(name, c.live - old.live)
        return plan.rest

    def compact_arrays(self) -> dict[str, tuple[array, array]]:
        """The (keys, profile ids) arrays per list, empty for a list with none (for snapshots)."""
        out = {}
        for name in LISTS:
            c = self._compact.get(name)
            out[name] = (c.keys, c.profiles) if c is not None else (array("q"), array("I"))
        return out

    def _intern(self, e: Entry) -> int:
        prof = entry_profile(e)
        pid = self._profile_ids.get(prof)
        if pid is None:
            pid = self._next_profile
            self._next_profile += 1
            self._profiles[pid] = prof
            self._profile_ids[prof] = pid
        return pid

    def _compact_entry(self, list_name: str, num: int, pid: int) -> Entry:
        digits = str(num)[1:]
        return _exact_entry(list_name, digits, self._profiles[pid])

    # -- mutation -------------------------------------------------------------------------
    def _bucket(self, p: Pattern) -> tuple[dict, str | tuple[str, int]]:
        if p.kind == "exact":
            return self._exact, p.key
        if p.kind == "prefix":
            return self._prefix, p.key
        head = p.key.split("#", 1)[0]
        return self._mask, (head, len(p.key))

    def put(self, entry: Entry) -> None:
        """Insert or replace the entry with the same list and pattern."""
        if self._compact:
            num = exact_num(entry.pattern)
            c = self._compact.get(entry.list)
            if num is not None and c is not None:
                i = c.find(num)
                if i >= 0:
                    if c.profiles[i] == DELETED:
                        c.live += 1
                        self._added(entry.list, 1)
                    c.profiles[i] = self._intern(entry)
                    return
        table, key = self._bucket(entry.pattern)
        bucket = table.setdefault(key, [])
        for i, old in enumerate(bucket):
            if old.list == entry.list and old.pattern == entry.pattern:
                bucket[i] = entry
                return
        bucket.append(entry)
        self._added(entry.list, 1)
        if entry.pattern.kind == "prefix" and len(key) not in self._prefix_lengths:
            self._prefix_lengths.append(len(key))
            self._prefix_lengths.sort(reverse=True)
        elif entry.pattern.kind == "mask":
            self._mask_heads.add(len(key[0]))

    def _added(self, list_name: str, n: int) -> None:
        self.size += n
        self._counts[list_name] = self._counts.get(list_name, 0) + n

    def remove(self, list_name: str, pattern: Pattern) -> bool:
        if self._compact:
            num = exact_num(pattern)
            c = self._compact.get(list_name)
            if num is not None and c is not None:
                i = c.find(num)
                if i >= 0 and c.profiles[i] != DELETED:
                    c.profiles[i] = DELETED
                    c.live -= 1
                    self._added(list_name, -1)
                    return True
        table, key = self._bucket(pattern)
        bucket = table.get(key)
        if not bucket:
            return False
        for i, old in enumerate(bucket):
            if old.list == list_name and old.pattern == pattern:
                del bucket[i]
                if not bucket:
                    del table[key]
                self._added(list_name, -1)
                return True
        return False

    def extend(self, entries: Iterable[Entry]) -> None:
        """put() each entry; prefix rules (a full load brings 100,000 of them) take a shorter way
        with the same result: attributes read once, counters updated once."""
        prefix = self._prefix
        lengths = set(self._prefix_lengths)
        added = dict.fromkeys(LISTS, 0)
        for e in entries:
            p = e.pattern
            if p.kind != "prefix":
                self.put(e)
                continue
            key = p.key
            bucket = prefix.get(key)
            if bucket is None:
                prefix[key] = [e]
            else:
                for i, old in enumerate(bucket):
                    if old.list == e.list and old.pattern == p:
                        bucket[i] = e
                        break
                else:
                    bucket.append(e)
                    added[e.list] = added.get(e.list, 0) + 1
                continue
            added[e.list] = added.get(e.list, 0) + 1
            lengths.add(len(key))
        for name, n in added.items():
            if n:
                self._added(name, n)
        if len(lengths) != len(self._prefix_lengths):
            self._prefix_lengths[:] = sorted(lengths, reverse=True)

    def exact(self, key: str) -> list[Entry]:
        """Entries (both lists) for one exact number key; empty if none (compact arrays included)."""
        out = list(self._exact.get(key, ()))
        if self._compact:
            num = digits_num(key)
            if num is not None:
                for list_name, c in self._compact.items():
                    i = c.find(num)
                    if i >= 0 and c.profiles[i] != DELETED:
                        out.append(self._compact_entry(list_name, num, c.profiles[i]))
        return out

    def exact_keys(self) -> Iterator[str]:
        """Every exact number key held (either list), each once.

        The dict keys are copied first; the compact keys are read lazily (their arrays never
        change length after a load), so a caller may yield to the event loop between keys."""
        loose = list(self._exact)
        compact = list(self._compact.items())

        def keys() -> Iterator[str]:
            seen = set(loose)
            yield from loose
            for n, (_, c) in enumerate(compact):
                earlier = [other for _, other in compact[:n]]
                for num, pid in zip(c.keys, c.profiles, strict=True):  # equal length (load_compact)
                    if pid == DELETED:
                        continue
                    key = str(num)[1:]
                    if key in seen or any(o.find(num) >= 0 and o.profiles[o.find(num)] != DELETED for o in earlier):
                        continue
                    yield key

        return keys()

    def __iter__(self) -> Iterator[Entry]:
        for list_name, c in self._compact.items():
            for num, pid in zip(c.keys, c.profiles, strict=True):
                if pid != DELETED:
                    yield self._compact_entry(list_name, num, pid)
        for table in (self._exact, self._prefix, self._mask):
            for bucket in table.values():
                yield from bucket

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, digits: str | None, now: float | None = None) -> Match | None:
        """Best active entry for E.164 digits (no '+'), or None. Microseconds; no I/O.

        The hot path of every call, so written for speed over beauty: attributes are read once
        into locals, the compact search (_Compact.find) is inlined, the best entry of each list
        lives in two local variables (no dict, no tuples), and the Entry of a compact hit and the
        Match are built through their slots (see _exact_entry). What a hit costs beyond a miss
        is then the three objects it returns.
        """
        if not digits:
            return None
        if now is None:
            now = time.time()
        n = len(digits)
        allow = block = None  # the best active entry of each list so far, and its specificity
        allow_spec = block_spec = -1
        compact = self._compact
        if compact and n <= NUM_MAX_DIGITS and digits.isdigit() and digits.isascii():  # digits_num, inlined
            num = int("1" + digits)
            for list_name, c in compact.items():
                where = c.where  # _Compact.find, inlined
                if where is not None:
                    i = where.get(num, -1)
                    if i < 0:
                        continue
                else:
                    j = bisect_right(c.fences, num) - 1
                    if j < 0:
                        continue
                    keys = c.keys
                    lo = j * FENCE
                    i = bisect_left(keys, num, lo, min(lo + FENCE, len(keys)))
                    if i == len(keys) or keys[i] != num:
                        continue
                pid = c.profiles[i]
                if pid == DELETED:
                    continue
                category, note, source, created_at, expires_at = self._profiles[pid]
                if expires_at is not None and expires_at <= now:
                    continue
                # _exact_entry, inlined; str(num)[1:] is digits itself (digits_num keeps every digit)
                p = _new(Pattern)
                _P_KIND(p, "exact")
                _P_KEY(p, digits)
                _P_TEXT(p, "+" + digits)
                e = _new(Entry)
                _E_LIST(e, list_name)
                _E_PATTERN(e, p)
                _E_CAT(e, category)
                _E_NOTE(e, note)
                _E_SOURCE(e, source)
                _E_CREATED(e, created_at)
                _E_EXPIRES(e, expires_at)
                if list_name == "allow":
                    allow, allow_spec = e, 100 + n
                elif list_name == "block":
                    block, block_spec = e, 100 + n
        found = None  # dict buckets that match, with their specificity (rarely any)
        bucket = self._exact.get(digits)
        if bucket:
            found = [(bucket, 100 + n)]
        prefix_get = self._prefix.get
        for length in self._prefix_lengths:
            if length <= n:
                bucket = prefix_get(digits[:length])
                if bucket:
                    if found is None:
                        found = []
                    found.append((bucket, length))
        if self._mask_heads:
            mask = self._mask
            for head in self._mask_heads:
                bucket = mask.get((digits[:head], n))
                if bucket:
                    for e in bucket:
                        if _mask_matches(e.pattern.key, digits):
                            if found is None:
                                found = []
                            found.append(([e], e.pattern.fixed_digits))
        if found is not None:
            for entries, spec in found:
                for e in entries:
                    expires = e.expires_at
                    if expires is None or expires > now:
                        if e.list == "allow":
                            if spec > allow_spec:
                                allow, allow_spec = e, spec
                        elif e.list == "block" and spec > block_spec:
                            block, block_spec = e, spec
        if allow is None:
            if block is None:
                return None
            winner, shadowed = block, None
        elif block is None:
            winner, shadowed = allow, None
        elif allow_spec >= block_spec:  # at equal specificity allow beats block
            winner, shadowed = allow, block
        else:
            winner, shadowed = block, allow
        m = _new(Match)  # Match(winner, shadowed) through its slots
        _M_ENTRY(m, winner)
        _M_SHADOWED(m, shadowed)
        return m

    def counts(self) -> dict[str, int]:
        """Entries per list (maintained on every change: no scan of millions of entries)."""
        out = {name: 0 for name in LISTS}
        out.update(self._counts)
        return out


def _exact_entry(list_name: str, digits: str, profile: Profile) -> Entry:
    """The Entry of a compact number (ListIndex.lookup builds the same inline, for speed)."""
    return make_entry(list_name, make_pattern("exact", digits, "+" + digits), *profile)


def _mask_matches(mask: str, digits: str) -> bool:
    if len(mask) != len(digits):
        return False
    for m, d in zip(mask, digits, strict=True):
        if m != "#" and m != d:
            return False
    return True

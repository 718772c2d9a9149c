"""The in-memory LRU in front of the store's reputation table.

The call path reads only this (a dict lookup, well under a microsecond): SQLite costs about
75 us per lookup through aiosqlite's thread hop (DESIGN.md) and may be locked by an import.
It is filled from the store at start-up (freshest answers first) and by every fetch; a miss here
is resolved off the call's own budget by the fetch task, which asks the store before the network.
"""

from __future__ import annotations

from collections import OrderedDict

from edgefilter.store.sqlite import ReputationRow


class MemoryCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self._rows: OrderedDict[tuple[str, str], ReputationRow] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, source: str, number: str, now: float) -> ReputationRow | None:
        """The fresh answer of ``source`` about ``number``, or None (an expired one is dropped)."""
        key = (source, number)
        row = self._rows.get(key)
        if row is None:
            self.misses += 1
            return None
        if row.expires_at <= now:
            del self._rows[key]
            self.misses += 1
            return None
        self._rows.move_to_end(key)
        self.hits += 1
        return row

    def put(self, row: ReputationRow, *, if_absent: bool = False) -> None:
        if self.size <= 0:
            return
        key = (row.source, row.number)
        if if_absent and key in self._rows:
            return
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)

    def drop(self, source: str | None = None) -> None:
        if source is None:
            self._rows.clear()
            return
        for key in [k for k in self._rows if k[0] == source]:
            del self._rows[key]

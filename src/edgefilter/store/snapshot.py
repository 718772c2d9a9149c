"""The index snapshot file and the change rows both backends bring an index up to date with.

A node writes the compact part of a loaded ListIndex to a file (SQLite: ``<db>.index``;
PostgreSQL: a node-local file beside the spool) so that a restart reads two arrays instead of
millions of rows; the rows changed since then are applied on top (apply_changed).
"""

from __future__ import annotations

import contextlib
import json
import os
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

from edgefilter.lists.index import LISTS, ChangedRow, ListIndex, Pattern
from edgefilter.store.records import ENTRY_COLUMNS, entry_from_row

#: The compact part of a loaded index, written beside the database after a full load so that a
#: restart reads two arrays from a file instead of 10 million rows (see load_index).
SNAPSHOT_SUFFIX = ".index"
SNAPSHOT_MAGIC = b"EDGEFILTER-INDEX-1\n"
#: A snapshot more than this many changes behind the database is not used (a full load is cheaper).
SNAPSHOT_MAX_BEHIND = 20000
#: Further behind than SNAPSHOT_MAX_BEHIND (a big import while the service runs), the snapshot's
#: arrays still serve, as do a running service's (service.ListFollower): the numbers added since
#: are merged into them in key order (a 100,000-line feed beside 10 million numbers: about a
#: second instead of a full read). Beyond this many changes a full read is the cheaper way.
MERGE_MAX_BEHIND = 1_000_000


#: Each (list, pattern) changed in (?, ?] once, with its row as it is now (NULL columns: deleted).
CHANGED_SQL = (
    "SELECT c.list, c.pattern, " + ", ".join("e." + c.strip() for c in ENTRY_COLUMNS.split(",")) + ", e.num, e.profile "
    "FROM (SELECT DISTINCT list, pattern FROM changes WHERE rev > ? AND rev <= ?) c "
    "LEFT JOIN entries e ON e.list = c.list AND e.pattern = c.pattern ORDER BY c.list, e.num"
)
PROFILES_SQL = "SELECT id, category, note, source, created_at, expires_at FROM profiles"


def changed_row(r: Sequence) -> ChangedRow:
    """A CHANGED_SQL row as ListIndex.plan_merge takes it."""
    return r[0], r[1], tuple(r[2:11]) if r[2] is not None else None, r[11], r[12]


def apply_changed(index: ListIndex, rows: Iterable[ChangedRow]) -> None:
    """put or remove each changed row (the rows plan_merge left)."""
    for list_name, text, columns, _num, _pid in rows:
        if columns is not None:
            index.put(entry_from_row(columns))
        else:
            index.remove(list_name, Pattern.from_text(text))


def read_snapshot_header(file: str, head: int, max_behind: int = SNAPSHOT_MAX_BEHIND) -> dict | None:
    """A snapshot file's header ({"rev", "check", "lists", "offset"}) when it is usable at change
    feed revision ``head`` (not ahead of it, not too far behind), else None. The caller then
    checks that the database's change ``rev`` is the one recorded in "check": the same change
    feed, not another database's nor one trimmed past the snapshot."""

    try:
        with open(file, "rb") as f:
            if f.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
                return None
            header = json.loads(f.readline())
            header["rev"] = int(header["rev"])
            header["offset"] = f.tell()
            if header["rev"] > head or head - header["rev"] > max_behind:
                return None
            return header
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_snapshot_arrays(file: str, header: dict) -> dict[str, tuple[array, array]] | None:
    """The (keys, profile ids) arrays per list of a snapshot file (see read_snapshot_header)."""
    try:
        with open(file, "rb") as f:
            f.seek(header["offset"])
            arrays = {}
            for name in LISTS:
                n = int(header["lists"][name])
                keys, pids = array("q"), array("I")
                keys.fromfile(f, n)
                pids.fromfile(f, n)
                arrays[name] = (keys, pids)
            return arrays
    except (OSError, ValueError, KeyError, EOFError):
        return None


def write_snapshot(file: str, rev: int, check: list, index: ListIndex) -> None:
    """Write a snapshot file atomically (temp file + rename); a failure only costs the next start.
    ``check`` is the (list, pattern, op) of change ``rev``, which identifies the change feed."""

    arrays = index.compact_arrays()
    tmp = f"{file}.{os.getpid()}.tmp"
    try:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(SNAPSHOT_MAGIC)
            header = {"rev": rev, "check": check, "lists": {n: len(arrays[n][0]) for n in LISTS}}
            f.write(json.dumps(header).encode() + b"\n")
            for name in LISTS:
                keys, pids = arrays[name]
                keys.tofile(f)
                pids.tofile(f)
        os.replace(tmp, file)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)

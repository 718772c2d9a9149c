"""The lists and the callers of the benchmark: deterministic, so every run screens the same calls.

A list of ``n`` entries is mostly exact blocked mobiles (+86 138, spread over the whole range so
lookups are not cache-friendly), 1% exact allowed numbers (+86 159), 0.1% blocked prefixes
(+86 17x...*, all of one length) and a few digit masks; every 10th blocked number carries a
category (fraud forces reject, marketing scores through LIST_CATEGORY). The caller mix draws
from those same ranges, so "blocked exact" callers really are on the list.

Entries go into the database through public paths only: ``Store.put_entry`` (one transaction)
for the handful of named entries and one parameterised bulk insert into ``entries`` for the
mass, which the service then loads at start-up like any list. Nothing here knows how the
in-memory index is built.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass

from edgefilter.asterisk.callsim import CallSpec, build_env
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.store.sqlite import ENTRY_COLUMNS, Store

#: Callers a real trunk presents, by kind; weights of the default mix (mostly unknown callers,
#: as on a real line, with every branch of the decision exercised).
MIX = {
    "blocked_exact": 0.20,
    "blocked_prefix": 0.10,
    "allowed": 0.10,
    "unknown": 0.45,
    "withheld": 0.08,
    "invalid": 0.07,
}
CATEGORIES = ("", "", "", "", "", "", "", "", "fraud", "marketing")


@dataclass(frozen=True)
class Shape:
    """How many entries of each kind a list of ``n`` entries holds."""

    n: int

    @property
    def allow(self) -> int:
        return max(1, self.n // 100)

    @property
    def prefixes(self) -> int:
        return max(1, self.n // 1000)

    masks = 10

    @property
    def block(self) -> int:
        return max(1, self.n - self.allow - self.prefixes - self.masks)


#: Each number range is one valid CN mobile block of 10^8 numbers (checked with phonenumbers).
SPAN = 100_000_000


def _block_number(i: int) -> str:
    return f"+86138{i:08d}"


def _allow_number(i: int) -> str:
    return f"+86159{i:08d}"


def _prefix(i: int) -> str:
    return f"+8617{i:05d}*"  # +8617 + 5 digits: 9-digit prefix keys, a 13-digit number range


def _mask(i: int) -> str:
    return f"+86188{i:04d}####"


def rows(n: int, now: float | None = None) -> Iterator[tuple]:
    """Rows for ``entries`` (ENTRY_COLUMNS order) of a list of ``n`` entries."""
    now = time.time() if now is None else now
    shape = Shape(n)
    # Block numbers are spread over the whole 13x range (stride) so that they are not adjacent.
    stride = max(1, (SPAN - 1) // shape.block)
    for i in range(shape.block):
        text = _block_number(i * stride)
        yield ("block", text, "exact", text[1:], CATEGORIES[i % 10], "", "bench", now, None)
    stride_a = max(1, (SPAN - 1) // shape.allow)
    for i in range(shape.allow):
        text = _allow_number(i * stride_a)
        yield ("allow", text, "exact", text[1:], "", "", "bench", now, None)
    for i in range(shape.prefixes):
        text = _prefix(i)
        yield ("block", text, "prefix", text[1:-1], "", "", "bench", now, None)
    for i in range(shape.masks):
        text = _mask(i)
        yield ("block", text, "mask", text[1:], "marketing", "", "bench", now, None)


NAMED = ("+8617000000001", "+8613800000000")  # allowed numbers inside blocked ranges: allow beats block


async def build_database_async(path: str, n: int, batch: int = 100_000) -> float:
    """Create a fresh database holding a list of ``n`` entries; returns seconds taken.

    The schema comes from the Store itself (its migrations), the named entries go in through
    ``Store.put_entry``, and the mass through one parameterised bulk insert in a single
    transaction (a separate sqlite3 connection, as an import tool would).
    """
    t0 = time.perf_counter()
    async with Store.open(path) as store:
        for text in NAMED:
            await store.put_entry(Entry("allow", parse_pattern(text, "CN"), source="bench-named", created_at=time.time()))
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA synchronous = OFF")
        with db:  # one transaction: nothing partial is ever written
            it = rows(n)
            while True:
                chunk = [r for _, r in zip(range(batch), it, strict=False)]  # the last batch is short
                if not chunk:
                    break
                db.executemany(f"INSERT OR REPLACE INTO entries ({ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", chunk)
    finally:
        db.close()
    return time.perf_counter() - t0


def build_database(path: str, n: int) -> float:
    return asyncio.run(build_database_async(path, n))


def caller(kind: str, n: int, rng: random.Random) -> tuple[str, int]:
    """(caller ID, calling presentation) of one caller of ``kind`` against a list of ``n``."""
    shape = Shape(n)
    if kind == "blocked_exact":
        stride = max(1, (SPAN - 1) // shape.block)
        return _block_number(rng.randrange(shape.block) * stride), 0
    if kind == "blocked_prefix":
        return f"+8617{rng.randrange(shape.prefixes):05d}{rng.randrange(10000):04d}", 0
    if kind == "allowed":
        stride = max(1, (SPAN - 1) // shape.allow)
        return _allow_number(rng.randrange(shape.allow) * stride), 0
    if kind == "unknown":
        # 186 mobiles are on no list; national form, as many trunks send it.
        return f"0186{rng.randrange(10**8):08d}", 0
    if kind == "withheld":
        return rng.choice(("anonymous", "Restricted", "", "unknown")), rng.choice((0, 32, 67))
    if kind == "invalid":
        return rng.choice(("138", "+86123", "9" * 16, "+861380013800099")), 0
    raise ValueError(kind)


def envs(n: int, count: int, seed: int = 10, mix: dict[str, float] | None = None, host: str = "127.0.0.1", port: int = 4573) -> list[tuple[str, bytes]]:
    """``count`` (kind, env block) pairs drawn from the mix, exactly as Asterisk writes them."""
    rng = random.Random(seed)
    mix = mix or MIX
    kinds = list(mix)
    weights = [mix[k] for k in kinds]
    out = []
    stamp = int(time.time())
    for i in range(count):
        kind = rng.choices(kinds, weights)[0]
        cid, pres = caller(kind, n, rng)
        spec = CallSpec(callerid=cid, callingpres=pres, uniqueid=f"{stamp}.{i}", args=("1000",))
        out.append((kind, build_env(spec, host, port)))
    return out

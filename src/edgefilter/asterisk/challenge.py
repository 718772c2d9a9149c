"""The "press N" challenge: a robot fails it, a human passes once and is remembered.

The screen route issues a challenge for a call whose verdict is ``challenge``: a random digit
(``secrets.randbelow``) and a random id, sent in the same MSet as the verdict. The dial plan
answers, plays "to call this number, press N", reads one digit and reports it on the second
FastAGI route ``challenge-result`` (``id=...,digit=...``, or ``hangup=1`` from a hangup handler).
The book checks it and answers ``pass``, ``retry`` (with a fresh digit) or ``fail``.

Everything on the call path here is memory only (microseconds): pending challenges live in a
bounded, TTL-swept dict; a pass puts a temporary allow entry into the in-memory index at once
(the next call is allowed even before the database has it) and queues the durable write, which
other nodes then see through the change feed; a failure is counted at once in
``ChallengeFailures``, the FactSource behind rule CHALLENGE_FAILED, and queued for the database
so it survives a restart.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from edgefilter.core.config import Settings
from edgefilter.core.errors import PatternError
from edgefilter.core.model import Call, Hit, Number, NumberKind
from edgefilter.core.numbers import normalize
from edgefilter.lists.index import Entry, ListIndex, parse_pattern
from edgefilter.rules.screen import Decision

log = logging.getLogger("edgefilter.challenge")

#: Variables the challenge sets (screen route: DIGIT, ID, TIMEOUT; challenge-result: RESULT and,
#: on retry, a fresh DIGIT). The dial plan reads exactly these.
CHALLENGE_VARIABLES = (
    "EDGEFILTER_CHALLENGE_DIGIT",
    "EDGEFILTER_CHALLENGE_ID",
    "EDGEFILTER_CHALLENGE_TIMEOUT",
    "EDGEFILTER_CHALLENGE_RESULT",
)
#: Values of EDGEFILTER_CHALLENGE_RESULT the dial plan branches on.
RESULTS = ("pass", "fail", "retry")
#: The FastAGI route the dial plan reports the digit on.
RESULT_ROUTE = "challenge-result"

#: Our own charset for challenge ids: lowercase letters and digits without look-alikes. Nothing
#: here can break an AGI argument or an MSet pair.
ID_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
ID_LENGTH = 20  # nonce 8 + attempt 1 + blocked 1 + minute 3 + seal 7 (about 35 bits of MAC)
#: Environment variable through which a worker pool hands every worker the same sealing key, so
#: that a challenge-result landing on another worker (SO_REUSEPORT) is still checked, not passed.
SECRET_ENV = "EDGEFILTER_CHALLENGE_SECRET"
_B = len(ID_ALPHABET)
DTMF = frozenset("0123456789*#ABCD")
#: Kinds of caller ID that can be allowlisted (an invalid number never buys an allow).
_ALLOWABLE = frozenset({NumberKind.VALID, NumberKind.SHORT})
_BLOCK_RULES = frozenset({"LIST_BLOCKED", "LIST_CATEGORY"})
SOURCE = "challenge"  # source of the allow entries a pass adds


def new_digit(randbelow: Callable[[int], int] = secrets.randbelow) -> str:
    """1..9: no 0 (operator on many phones, and the failed-challenge sipp scenario presses it)."""
    return str(randbelow(9) + 1)


def new_id(randbelow: Callable[[int], int] = secrets.randbelow, length: int = ID_LENGTH) -> str:
    """``length`` random letters of ID_ALPHABET from one draw (one system call, not one each)."""
    return _enc(randbelow(_B**length), length)


def _enc(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, _B)
        out.append(ID_ALPHABET[r])
    return "".join(reversed(out))


def _dec(text: str) -> int | None:
    n = 0
    for ch in text:
        i = ID_ALPHABET.find(ch)
        if i < 0:
            return None
        n = n * _B + i
    return n


def challenge_secret() -> bytes:
    """The sealing key: the pool's (hex in $EDGEFILTER_CHALLENGE_SECRET) or a fresh random one."""
    text = os.environ.get(SECRET_ENV, "")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    return key if len(key) >= 16 else secrets.token_bytes(32)


@dataclass
class Pending:
    """One challenge waiting for its digit."""

    id: str
    digit: str
    number: Number
    uniqueid: str
    created: float
    attempts: int = 0  # wrong digits or silences so far
    blocked: bool = False  # the number is on the blocklist: a pass connects, never allowlists
    aliases: list = field(default_factory=list)  # earlier ids of this challenge (before retries)


@dataclass(frozen=True)
class Outcome:
    """What ``answer`` decided. ``result`` is pass/fail/retry, or ``unknown`` for an id we do not
    hold (expired, answered already, service restarted): the dial plan is told ``pass`` then (fail
    open, like a dead service), but nothing is recorded."""

    result: str
    pending: Pending | None = None
    digit: str = ""  # the fresh digit on retry
    reason: str = ""  # wrong digit / silence / hangup / forged / channel mismatch

    def variables(self) -> dict[str, str]:
        shown = {"unknown": "pass", "hangup": "fail"}.get(self.result, self.result)
        out = {"EDGEFILTER_CHALLENGE_RESULT": shown}
        if self.result == "retry" and self.pending is not None:
            out["EDGEFILTER_CHALLENGE_DIGIT"] = self.digit
            out["EDGEFILTER_CHALLENGE_ID"] = self.pending.id
        return out

    @property
    def counts_as_failure(self) -> bool:
        return self.result == "fail"


class ChallengeBook:
    """Pending challenges in memory: bounded (oldest dropped) and swept after their TTL."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        *,
        clock: Callable[[], float] = time.time,
        randbelow: Callable[[int], int] = secrets.randbelow,
        secret: bytes | None = None,
    ) -> None:
        self._settings = settings
        self.clock = clock
        self.randbelow = randbelow
        # Ids are sealed with this key (HMAC over nonce, attempt, blocked, minute, digit and the
        # channel's uniqueid): a process that does not hold the pending challenge (another worker)
        # can still tell a genuine id and check the digit pressed.
        self.secret = secret if secret is not None else challenge_secret()
        self.pending: OrderedDict[str, Pending] = OrderedDict()
        # ids answered or expired here: a late report (a hangup handler after the result) must
        # not be rebuilt from the sealed id and answered again
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.dropped = 0
        self.expired = 0

    def ttl(self) -> float:
        """Longest a real challenge can take: every attempt's prompt, wait and round trips."""
        c = self._settings().challenge
        return (c.retries + 1) * (c.timeout + 20.0) + 60.0

    def issue(self, decision: Decision) -> dict[str, str]:
        """Open a challenge for this call; returns the variables to add to the screen MSet."""
        settings = self._settings()
        now = self.clock()
        while len(self.pending) >= settings.challenge.max_pending:
            self.pending.popitem(last=False)
            self.dropped += 1
        blocked = any(h.rule in _BLOCK_RULES for h in decision.verdict.hits)
        p = Pending("", new_digit(self.randbelow), decision.number, decision.call.uniqueid[:64], now, blocked=blocked)
        cid = p.id = self._seal_id(p)
        self.pending[cid] = p
        return {
            "EDGEFILTER_CHALLENGE_DIGIT": p.digit,
            "EDGEFILTER_CHALLENGE_ID": cid,
            "EDGEFILTER_CHALLENGE_TIMEOUT": f"{settings.challenge.timeout:g}",
        }

    def _mac(self, nonce: str, attempt: int, blocked: bool, minute: int, digit: str, uniqueid: str) -> str:
        msg = f"{nonce}|{attempt}|{int(blocked)}|{minute}|{digit}|{uniqueid}".encode()
        mac = hmac.digest(self.secret, msg, "sha256")  # one-shot, in C: same bytes as hmac.new()
        return _enc(int.from_bytes(mac[:8], "big") % _B**7, 7)

    def _seal_id(self, p: Pending) -> str:
        nonce = new_id(self.randbelow, 8)
        minute = int(p.created // 60) % _B**3
        head = nonce + ID_ALPHABET[min(p.attempts, _B - 1)] + ID_ALPHABET[int(p.blocked)] + _enc(minute, 3)
        return head + self._mac(nonce, p.attempts, p.blocked, minute, p.digit, p.uniqueid)

    def _unseal(self, cid: str, call: Call) -> Pending | None:
        """Rebuild a challenge another process issued, from its sealed id (None if not genuine)."""
        if len(cid) != ID_LENGTH:
            return None
        nonce, attempt, blocked, minute, seal = cid[:8], _dec(cid[8]), _dec(cid[9]), _dec(cid[10:13]), cid[13:]
        if attempt is None or blocked not in (0, 1) or minute is None:
            return None
        uniqueid = call.uniqueid[:64]
        for digit in "123456789":
            if hmac.compare_digest(self._mac(nonce, attempt, bool(blocked), minute, digit, uniqueid), seal):
                now_minute = int(self.clock() // 60) % _B**3
                age = ((now_minute - minute) % _B**3) * 60.0
                if age > self.ttl() + 60.0:
                    return None
                number = normalize(call.callerid, self._settings().default_region)
                return Pending(cid, digit, number, uniqueid, self.clock() - age, attempts=attempt, blocked=bool(blocked))
        return None

    def answer(self, call: Call) -> Outcome:
        """Check what the dial plan reported on the challenge-result route."""
        settings = self._settings()
        cid = call.params.get("id", "")
        p = self.pending.get(cid) if len(cid) == ID_LENGTH else None
        if p is not None and self.clock() - p.created > self.ttl():
            self._finish(p)
            self.expired += 1
            p = None
        if p is None and cid not in self.finished:
            p = self._unseal(cid, call)  # issued by another worker of the pool
            if p is not None:
                self.pending[cid] = p
        if p is None:
            return Outcome("unknown", reason="no such challenge (expired, answered or from before a restart)")
        if call.forged:
            self._finish(p)
            return Outcome("fail", p, reason="forged env block on the challenge-result route")
        if p.uniqueid and call.uniqueid and call.uniqueid[:64] != p.uniqueid:
            self._finish(p)
            return Outcome("fail", p, reason="reported from another channel")
        if call.params.get("hangup", "").lower() in ("1", "yes", "true"):
            self._finish(p)
            if settings.challenge.hangup_is_failure:
                return Outcome("fail", p, reason="hung up during the challenge")
            return Outcome("hangup", p, reason="hung up during the challenge (not counted)")
        digit = call.params.get("digit", "")
        if digit == p.digit:
            self._finish(p)
            return Outcome("pass", p)
        why = "silence" if digit == "" else ("wrong digit" if digit in DTMF else "not a digit")
        p.attempts += 1
        if p.attempts <= settings.challenge.retries:
            p.digit = new_digit(self.randbelow)
            p.aliases.append(p.id)  # the old id keeps working here; the new one works anywhere
            p.id = self._seal_id(p)  # a new id for the new digit: any worker can check the retry
            self.pending[p.id] = p
            return Outcome("retry", p, digit=p.digit, reason=why)
        self._finish(p)
        return Outcome("fail", p, reason=why)

    def _finish(self, p: Pending) -> None:
        for cid in (*p.aliases, p.id):
            self.pending.pop(cid, None)
            self.finished[cid] = None
        while len(self.finished) > 2 * self._settings().challenge.max_pending:
            self.finished.popitem(last=False)

    def sweep(self, now: float | None = None) -> int:
        """Forget challenges past their TTL (the hangup handler normally reports those)."""
        now = self.clock() if now is None else now
        ttl = self.ttl()
        stale = {id(p): p for p in self.pending.values() if now - p.created > ttl}
        for p in stale.values():
            self._finish(p)
        self.expired += len(stale)
        return len(stale)


class ChallengeFailures:
    """FactSource for rule CHALLENGE_FAILED: failed challenges per number within the window.

    Memory only on the call path (a dict of small deques, bounded in numbers and per number);
    loaded from the database at start so failures survive a restart.
    """

    PER_NUMBER = 16

    def __init__(self, settings: Callable[[], Settings], max_numbers: int = 100000) -> None:
        self._settings = settings
        self.max_numbers = max_numbers
        self.failures: dict[str, deque[float]] = {}

    def record(self, digits: str, ts: float) -> None:
        q = self.failures.get(digits)
        if q is None:
            while len(self.failures) >= self.max_numbers:
                self.failures.pop(next(iter(self.failures)))
            q = self.failures[digits] = deque(maxlen=self.PER_NUMBER)
        q.append(ts)

    def load(self, rows: Iterable[tuple[str, float]]) -> None:
        for digits, ts in rows:
            self.record(digits, ts)

    def count(self, digits: str | None, now: float) -> int:
        q = self.failures.get(digits) if digits else None
        if not q:
            return 0
        since = now - self._settings().challenge.fail_window
        return sum(1 for t in q if t > since)

    def hits(self, call: Call, number: Number, now: float) -> Iterable[Hit]:
        n = self.count(number.digits, now)
        if not n:
            return ()
        settings = self._settings()
        rule = settings.rules.get("CHALLENGE_FAILED")
        if rule is None or not rule.enabled:
            return ()
        return (Hit("CHALLENGE_FAILED", round(rule.weight * n, 3), rule.group, f"{n} failed challenge(s) within [challenge] fail_window"),)


@dataclass(frozen=True)
class OutcomeRecord:
    ts: float
    uniqueid: str
    caller_e164: str
    outcome: str  # pass | fail | hangup
    # unique across nodes and drawn once: the retry of a write that did commit is stored once
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


class ChallengeStore(Protocol):
    """What ChallengeRecorder writes through (SQLite's Store and PostgreSQL's PgStore both)."""

    async def put_entry(self, entry: Entry) -> str: ...

    async def record_challenges(self, records: Iterable) -> int: ...


@dataclass
class ChallengeRecorder:
    """Applies outcomes: in memory at once (index, failure counts), durably in the background.

    ``apply`` is synchronous and cheap so the route can run it before answering; the database
    writes (allow entries, outcome rows) go through a bounded queue written by ``run`` and
    retried while the store fails, never on the caller's time.
    """

    settings: Callable[[], Settings]
    index: Callable[[], ListIndex]
    failures: ChallengeFailures
    store: ChallengeStore | None = None
    clock: Callable[[], float] = time.time
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(10000))
    allowed: int = 0
    failed: int = 0
    dropped: int = 0
    written: int = 0

    def apply(self, outcome: Outcome) -> Entry | None:
        """Count a failure or allowlist a pass; returns the allow entry added, if any."""
        p = outcome.pending
        if p is None or outcome.result in ("retry", "unknown"):
            return None
        now = self.clock()
        digits = p.number.e164 if p.number.kind in _ALLOWABLE else None
        if outcome.counts_as_failure:
            self.failed += 1
            if p.number.digits:
                self.failures.record(p.number.digits, now)
        if p.number.e164:
            self._enqueue(OutcomeRecord(now, p.uniqueid, p.number.e164, "pass" if outcome.result == "pass" else outcome.result))
        if outcome.result != "pass" or digits is None or p.blocked:
            return None
        entry = self._allow_entry(p, now)
        if entry is not None:
            self.index().put(entry)
            self.allowed += 1
            self._enqueue(entry)
        return entry

    def _allow_entry(self, p: Pending, now: float) -> Entry | None:
        settings = self.settings()
        try:
            pattern = parse_pattern(p.number.e164 or "", settings.default_region)
        except PatternError:
            return None
        match = self.index().lookup(pattern.key, now)
        for e in (match.entry, match.shadowed) if match else ():
            if e is None:
                continue
            if e.list == "block":
                return None  # never let a pass outrank the blocklist
            if e.pattern == pattern and e.source != SOURCE and e.list == "allow":
                return None  # the admin's own allow entry stays as it is
        return Entry(
            "allow",
            pattern,
            note="passed the press-a-digit challenge",
            source=SOURCE,
            created_at=now,
            expires_at=now + settings.challenge.allow_for,
        )

    def _enqueue(self, item: Entry | OutcomeRecord) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10000 == 0:
                log.warning("challenge write queue full: %d writes dropped (store too slow or failing)", self.dropped)

    async def run(self) -> None:
        """Write queued allow entries and outcomes; on a store failure wait and retry."""
        while True:
            item = await self.queue.get()
            while True:
                try:
                    await self._write(item)
                    self.written += 1
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("challenge write failed (%s); retrying in 1 s", e)
                    await asyncio.sleep(1.0)

    async def flush(self) -> None:
        """Write whatever is queued (tests, shutdown)."""
        while not self.queue.empty():
            item = self.queue.get_nowait()
            try:
                await self._write(item)
                self.written += 1
            except Exception as e:
                log.warning("challenge write failed at shutdown (%s)", e)

    async def _write(self, item: Entry | OutcomeRecord) -> None:
        if self.store is None:
            return
        if isinstance(item, Entry):
            await self.store.put_entry(item)
        else:
            await self.store.record_challenges([item])

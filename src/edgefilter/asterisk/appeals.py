"""Appeals: a refused caller can say "you have the wrong number", from the call itself.

Why: a filter that can be wrong must be correctable by the people it wrongs, without the admin
watching logs. A refusal stays a refusal (EDGEFILTER_ACTION=reject, so admins' dial plans and logs
keep keying on the five action words); an appealable one also carries EDGEFILTER_APPEAL_ID, an id
of our own charset sealed with the service's key (never caller text). The shipped dial plan then
answers, plays "this number does not take your call; if you think this is a mistake, press 1,
then say who you are and why you call", and reports the digit on the ``appeal`` route; a right
digit gets ``record``, and Asterisk's Record() writes ``${ASTSPOOLDIR}/edgefilter-appeals/<id>.wav``
(bounded by ``[appeal] max_seconds``). The ``appeal`` route's ``recorded`` step stores the appeal
with a 6-digit reference code, which the caller hears (SayDigits) before the hang-up.

Bounded on purpose, since everything here is triggered by hostile callers:
- the call path (``AppealBook.offer``) is memory only: the no-appeal entries, the number of
  appeals pending and each number's last appeal are kept in memory and refreshed from the store
  in the background;
- never for forged, withheld or invalid caller IDs, ``--no-appeal`` entries, refusals under the
  refusal ledger (unless ``refused_before``), rules outside ``[appeal] rules``; one appeal per
  number per ``cooldown``; ``max_pending`` appeals waiting for an admin; ``max_offers`` prompts at
  once; one offer per number at a time;
- the recording is named by our id only; the service never takes a path from Asterisk, checks
  the file's size when it can see ``recordings_dir`` and deletes recordings after ``retention``.

Admins decide with `edgefilter appeals` (appeals_cli.py). A grant adds a time-boxed allow entry
(source ``appeal``); grants and denials per rule and list source are the rule precision that
`edgefilter stats` shows (stats.appeal_precision).

The webhook notice of new appeals lives in appeal_notice.py (re-exported here).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgefilter.asterisk.appeal_notice import AppealNotifier as AppealNotifier
from edgefilter.asterisk.appeal_notice import payload as payload
from edgefilter.asterisk.appeal_notice import payload_json as payload_json
from edgefilter.asterisk.challenge import ID_ALPHABET, _dec, _enc, challenge_secret, new_id  # the same sealed-id letters
from edgefilter.core.config import Settings
from edgefilter.core.model import Action, Call, NumberKind
from edgefilter.core.numbers import normalize
from edgefilter.lists.index import ListIndex
from edgefilter.outputs.decisionlog import escape_text
from edgefilter.rules.screen import Decision
from edgefilter.store.sqlite import Appeal

log = logging.getLogger("edgefilter.appeals")

ROUTE = "appeal"
#: Variables besides EDGEFILTER_APPEAL_ID (screen.SCREEN_VARIABLES: sent, empty or not, with every
#: reject). DIGIT, TIMEOUT and SECONDS come with an offer in the screen route's MSet; STEP and CODE
#: are the appeal route's answers. The dial plan reads exactly these.
APPEAL_VARIABLES = (
    "EDGEFILTER_APPEAL_DIGIT",
    "EDGEFILTER_APPEAL_TIMEOUT",
    "EDGEFILTER_APPEAL_SECONDS",
    "EDGEFILTER_APPEAL_STEP",
    "EDGEFILTER_APPEAL_CODE",
)
#: What the dial plan reports on the route (``step=``) and what the route answers (STEP).
STEPS = ("digit", "recorded", "hangup")
ANSWERS = ("record", "refuse", "done", "error")
#: The folder under Asterisk's spool directory the dial plan records into.
SPOOL_FOLDER = "edgefilter-appeals"
SOURCE = "appeal"  # source of the allow entries a grant adds
ID_LENGTH = 20  # nonce 8 + minute 3 + seal 9
ID_RE = re.compile(rf"[{ID_ALPHABET}]{{{ID_LENGTH}}}\Z")
FILE_RE = re.compile(rf"[{ID_ALPHABET}]{{{ID_LENGTH}}}\.wav\Z")
#: Asterisk's wav format: 16-bit linear PCM at 8 kHz, a 44-byte header.
WAV_BYTES_PER_SECOND = 16000
WAV_HEADER = 44
_B = len(ID_ALPHABET)
_ENTRY_RULES = frozenset({"LIST_BLOCKED", "LIST_CATEGORY"})


def max_recording_bytes(max_seconds: int) -> int:
    """The largest file Record() can write for ``max_seconds`` (plus a second of slack)."""
    return WAV_HEADER + (max_seconds + 1) * WAV_BYTES_PER_SECOND


def recording_seconds(size: int | None) -> float | None:
    return None if size is None else max(0.0, (size - WAV_HEADER) / WAV_BYTES_PER_SECOND)


@dataclass
class Offer:
    """An appeal offered to one refused call, waiting for its digit and recording (memory only)."""

    id: str
    e164: str
    uniqueid: str
    created: float
    called: str = ""
    rules: str = ""
    score: float = 0.0
    policy: str = ""
    entry_list: str = ""
    entry_pattern: str = ""
    entry_source: str = ""
    entry_category: str = ""
    accepted: bool = False  # the right digit came: the recording may follow


def appeal_enabled(decision: Decision, settings: Settings) -> bool:
    """``[appeal] enabled``, unless the most specific matching policy that says ``appeal`` decides."""
    policies = {p.name: p for p in settings.policies}
    for name in reversed(decision.effective.names):
        p = policies.get(name)
        if p is not None and p.appeal is not None:
            return p.appeal
    return settings.appeal.enabled


class AppealBook:
    """Who may appeal, and the offers in progress: the screen route's side, memory only."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        index: Callable[[], ListIndex],
        *,
        redecide: Callable[[Call], Decision] | None = None,
        clock: Callable[[], float] = time.time,
        secret: bytes | None = None,
    ) -> None:
        self._settings = settings
        self._index = index
        self.redecide = redecide
        self.clock = clock
        self.secret = secret if secret is not None else challenge_secret()
        self.offers: OrderedDict[str, Offer] = OrderedDict()
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.no_appeal: set[tuple[str, str]] = set()  # (list, pattern) marked --no-appeal
        self.unsure: set[tuple[str, str]] = set()  # changed since the last read: no appeal meanwhile
        self.pending = 0  # appeals waiting for an admin (refreshed from the store)
        self.last_appeal: dict[str, float] = {}  # e164 -> newest appeal (within cooldown)
        self.refresh_wanted = asyncio.Event()  # set: read the store again (AppealDesk.run)
        self.declined: dict[str, int] = {}  # reason -> offers not made, for logs and tests
        self.count: Callable[[str], None] = lambda event: None  # metric outputs (service sets it)

    # ---------------------------------------------------------------- state from the store
    def load_state(self, no_appeal: list[tuple[str, str]], pending: int, last: list[tuple[str, float]]) -> None:
        """What the store says (AppealDesk.refresh): the marks in ``unsure`` are cleared there, by
        what was read, never here (a change applied during the read stays unsure)."""
        self.no_appeal = {(list_name, pattern) for list_name, pattern in no_appeal}
        self.pending = pending
        cutoff = self.clock() - self._settings().appeal.cooldown  # memory stays bounded by the window
        merged = {e164: ts for e164, ts in self.last_appeal.items() if ts >= cutoff}
        for e164, ts in last:
            if ts > merged.get(e164, 0.0):
                merged[e164] = ts
        self.last_appeal = merged

    def on_list_change(self, list_name: str, pattern: str, entry: object) -> None:
        """ListFollower hook: a block entry changed; until the no-appeal set is read again it
        is treated as never appealable (not offering for a few milliseconds is harmless)."""
        if list_name == "block":
            self.unsure.add((list_name, pattern))
            self._want_refresh()

    def on_list_load(self) -> None:
        self._want_refresh()

    def _want_refresh(self) -> None:
        self.refresh_wanted.set()

    # ---------------------------------------------------------------- the screen route
    def offer(self, decision: Decision) -> dict[str, str]:
        """Variables for a reject: EDGEFILTER_APPEAL_ID (empty when not appealable) and, with an
        offer, the digit, the digit's timeout and the longest recording."""
        settings = self._settings()
        if not (settings.appeal.enabled or any(p.appeal for p in settings.policies)):
            return {"EDGEFILTER_APPEAL_ID": ""}
        now = self.clock()
        why = self.why_not(decision, settings, now)
        if why is not None:
            self.declined[why] = self.declined.get(why, 0) + 1
            return {"EDGEFILTER_APPEAL_ID": ""}
        o = self._make_offer(decision, now)
        self.offers[o.id] = o
        self.count("offered")
        a = settings.appeal
        return {
            "EDGEFILTER_APPEAL_ID": o.id,
            "EDGEFILTER_APPEAL_DIGIT": a.digit,
            "EDGEFILTER_APPEAL_TIMEOUT": f"{a.timeout:g}",
            "EDGEFILTER_APPEAL_SECONDS": str(a.max_seconds),
        }

    def why_not(self, decision: Decision, settings: Settings, now: float) -> str | None:
        """None when this refusal may be appealed, else the reason (one word or two)."""
        v, n = decision.verdict, decision.number
        a = settings.appeal
        if v.action is not Action.REJECT:
            return "not a refusal"
        if decision.call.forged or "CLI_FORGED" in v.rules:
            return "forged"
        if n.kind is not NumberKind.VALID or not n.e164:
            return "no valid number"
        if not appeal_enabled(decision, settings):
            return "off for this line"
        if "REFUSED_BEFORE" in v.rules and not a.refused_before:
            return "refusal ledger"
        if a.rules and not set(a.rules) & set(v.rules):
            return "rule not appealable"
        match = self._index().lookup(n.digits, now)
        for e in (match.entry, match.shadowed) if match else ():
            if e is not None and e.list == "block" and (("block", e.pattern.text) in self.no_appeal
                                                        or ("block", e.pattern.text) in self.unsure):
                return "no-appeal entry"
        last = self.last_appeal.get(n.e164)
        if last is not None and now - last < a.cooldown:
            return "cooldown"
        self.sweep(now)
        if any(o.e164 == n.e164 for o in self.offers.values()):
            return "offer in progress"
        if self.pending >= a.max_pending:
            return "too many pending"
        if len(self.offers) >= a.max_offers:
            return "too many offers"
        return None

    def _make_offer(self, d: Decision, now: float) -> Offer:
        v = d.verdict
        o = Offer("", d.number.e164 or "", d.call.uniqueid[:64], now, called=d.call.called[:64],
                  rules=" ".join(f"{h.rule}({h.weight:+g})" for h in v.hits)[:1000], score=v.score, policy=v.policy)
        match = self._index().lookup(d.number.digits, now)
        if match is not None:
            e = match.entry if match.entry.list == "block" or match.shadowed is None else match.shadowed
            if any(r in _ENTRY_RULES for r in v.rules) or e.list == "block":
                o.entry_list, o.entry_pattern, o.entry_source, o.entry_category = e.list, e.pattern.text, e.source, e.category
        o.id = self._seal(o)
        return o

    def ttl(self) -> float:
        """Longest an offer can live: prompt and digit, recording, round trips."""
        a = self._settings().appeal
        return a.timeout + a.max_seconds + 60.0

    def _mac(self, nonce: str, minute: int, uniqueid: str, e164: str) -> str:
        msg = f"appeal|{nonce}|{minute}|{uniqueid}|{e164}".encode()
        mac = hmac.new(self.secret, msg, hashlib.sha256).digest()
        return _enc(int.from_bytes(mac[:8], "big") % _B**9, 9)

    def _seal(self, o: Offer) -> str:
        nonce = new_id(length=8)
        minute = int(o.created // 60) % _B**3
        return nonce + _enc(minute, 3) + self._mac(nonce, minute, o.uniqueid, o.e164)

    def _unseal(self, aid: str, call: Call) -> Offer | None:
        """An offer another worker (or this one before a restart with the pool's key) made:
        genuine when its seal matches this channel and caller; the facts are decided again."""
        if self.redecide is None or call.forged:
            return None
        nonce, minute = aid[:8], _dec(aid[8:11])
        settings = self._settings()
        number = normalize(call.callerid, settings.default_region)
        if minute is None or not number.e164 or not hmac.compare_digest(
                self._mac(nonce, minute, call.uniqueid[:64], number.e164), aid[11:]):
            return None
        age = ((int(self.clock() // 60) - minute) % _B**3) * 60.0
        if age > self.ttl() + 60.0:
            return None
        d = self.redecide(call)
        if d.verdict.action is not Action.REJECT or d.number.e164 != number.e164:
            return None
        o = self._make_offer(d, self.clock() - age)
        o.id = aid
        return o

    def find(self, call: Call) -> Offer | None:
        aid = call.params.get("id", "")
        if not ID_RE.match(aid):
            return None
        o = self.offers.get(aid)
        if o is not None and self.clock() - o.created > self.ttl():
            self.finish(o)
            o = None
        if o is None and aid not in self.finished:
            o = self._unseal(aid, call)
            if o is not None:
                self.offers[aid] = o
        if o is not None and o.uniqueid and call.uniqueid[:64] != o.uniqueid:
            return None  # another channel reporting this id
        return o

    def finish(self, o: Offer) -> None:
        self.offers.pop(o.id, None)
        self.finished[o.id] = None
        while len(self.finished) > 10000:
            self.finished.popitem(last=False)

    def sweep(self, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        ttl = self.ttl()
        stale = [o for o in self.offers.values() if now - o.created > ttl]
        for o in stale:
            self.finish(o)
        return len(stale)


# ------------------------------------------------------------------------------ recordings
@dataclass(frozen=True)
class RecordingCheck:
    path: str  # where the recording is ("" when it was deleted or never written)
    size: int | None  # None: the service cannot see recordings_dir
    problem: str = ""  # why it was deleted or is missing


def check_recording(settings: Settings, aid: str) -> RecordingCheck:
    """The recording Asterisk wrote for appeal ``aid`` (a name we made: ids only, no path from
    Asterisk). A symlink, a non-regular file or one larger than max_seconds allow is deleted."""
    a = settings.appeal
    spool_path = f"${{ASTSPOOLDIR}}/{SPOOL_FOLDER}/{aid}.wav"
    if not a.recordings_dir:
        return RecordingCheck(spool_path, None)
    path = Path(a.recordings_dir) / f"{aid}.wav"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return RecordingCheck("", 0, f"no file {path} (is recordings_dir Asterisk's ${{ASTSPOOLDIR}}/{SPOOL_FOLDER}?)")
    except OSError as e:
        return RecordingCheck(str(path), None, f"cannot read {path}: {e.strerror}")
    limit = max_recording_bytes(a.max_seconds)
    if not stat.S_ISREG(st.st_mode):
        problem = f"not a regular file (mode {stat.filemode(st.st_mode)}): deleted"
    elif st.st_size > limit:
        problem = f"{st.st_size} bytes, more than max_seconds = {a.max_seconds} allow ({limit}): deleted"
    else:
        return RecordingCheck(str(path), st.st_size)
    try:
        os.unlink(path)  # the link itself, never its target
    except OSError as e:
        problem += f" (failed: {e.strerror})"
    return RecordingCheck("", st.st_size, problem)


def delete_recording(settings: Settings, aid: str) -> bool:
    """Delete the recording of appeal ``aid`` in recordings_dir (a regular file named by the id)."""
    d = settings.appeal.recordings_dir
    if not d or not ID_RE.match(aid):
        return False
    path = Path(d) / f"{aid}.wav"
    try:
        if stat.S_ISREG(os.lstat(path).st_mode) or stat.S_ISLNK(os.lstat(path).st_mode):
            os.unlink(path)
            return True
    except OSError:
        pass
    return False


def sweep_recordings(settings: Settings, now: float) -> int:
    """Delete recordings older than retention that no appeal row named (an appeal never stored:
    the store was down, or the service went away mid-call). Only names of our own form."""
    d = settings.appeal.recordings_dir
    if not d:
        return 0
    gone = 0
    try:
        entries = list(os.scandir(d))
    except OSError:
        return 0
    for e in entries:
        if not FILE_RE.match(e.name):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if now - st.st_mtime > settings.appeal.retention:
                os.unlink(e.path)
                gone += 1
        except OSError:
            continue
    return gone


# ------------------------------------------------------------------------------ the route
class AppealStore(Protocol):
    """What the appeal route needs of a store (SQLite's Store and PostgreSQL's PgStore both)."""

    async def add_appeal(self, a: Appeal) -> Appeal: ...

    async def no_appeal_patterns(self) -> list[tuple[str, str]]: ...

    async def appeal_summary(self, since: float) -> tuple[int, list[tuple[str, float]]]: ...

    async def purge_appeals(self, before: float) -> list[Appeal]: ...


class AppealDesk:
    """The ``appeal`` FastAGI route: the digit, the recording, the hang-up; stores appeals.

    Not on the screening path (the caller is answered and listening): the store write of a
    recorded appeal is bounded by a timeout, and a failure answers ``error`` (the dial plan says
    goodbye) rather than a code nobody could look up.
    """

    STORE_TIMEOUT = 3.0

    def __init__(self, book: AppealBook, store: Callable[[], AppealStore], settings: Callable[[], Settings], *,
                 node: str = "", notify: Callable[[Appeal], None] | None = None,
                 count: Callable[[str], None] | None = None) -> None:
        self.book = book
        self.store = store
        self.settings = settings
        self.node = node
        self.notify = notify or (lambda a: None)
        self.count = count or (lambda event: None)

    async def answer(self, call: Call) -> dict[str, str]:
        step = call.params.get("step", "")
        o = self.book.find(call)
        if step not in STEPS or o is None:
            log.warning("appeal step=%s for an unknown or expired id (uniqueid=%s): refused",
                        escape_text(step, 16), escape_text(call.uniqueid, 40))
            return {"EDGEFILTER_APPEAL_STEP": "refuse"}
        if step == "hangup":
            self.book.finish(o)
            log.info("appeal offer to %s ended: hung up before the digit", o.e164)
            self.count("hangup")
            return {"EDGEFILTER_APPEAL_STEP": "done"}
        if step == "digit":
            return self._digit(call, o)
        return await self._recorded(call, o)

    def _digit(self, call: Call, o: Offer) -> dict[str, str]:
        settings = self.settings()
        digit = call.params.get("digit", "")
        last = self.book.last_appeal.get(o.e164)
        if digit != settings.appeal.digit:
            self.book.finish(o)
            why = "silence" if digit == "" else "wrong digit"
            log.info("appeal offer to %s declined: %s", o.e164, why)
            self.count("declined")
            return {"EDGEFILTER_APPEAL_STEP": "refuse"}
        if last is not None and self.book.clock() - last < settings.appeal.cooldown:
            self.book.finish(o)  # another call from this number appealed meanwhile
            log.info("appeal offer to %s refused: appealed within cooldown", o.e164)
            return {"EDGEFILTER_APPEAL_STEP": "refuse"}
        o.accepted = True
        self.book.last_appeal[o.e164] = self.book.clock()  # the cooldown starts with the digit
        return {"EDGEFILTER_APPEAL_STEP": "record"}

    async def _recorded(self, call: Call, o: Offer) -> dict[str, str]:
        self.book.finish(o)
        if not o.accepted:
            log.warning("appeal recording reported for %s before the digit: ignored", o.e164)
            return {"EDGEFILTER_APPEAL_STEP": "refuse"}
        settings = self.settings()
        rec = check_recording(settings, o.id)
        if rec.problem:
            log.warning("appeal %s recording: %s", o.id, rec.problem)
        appeal = Appeal(
            0, "", o.id, self.book.clock(), o.e164, o.uniqueid, o.called, self.node, o.rules, o.score, o.policy,
            o.entry_list, o.entry_pattern, o.entry_source, o.entry_category, rec.path, rec.size,
            note=f"recording: {rec.problem}" if rec.problem else "",
        )
        try:
            stored = await asyncio.wait_for(self.store().add_appeal(appeal), self.STORE_TIMEOUT)
        except Exception as e:
            log.error("appeal from %s not stored (%s): the caller hears no reference", o.e164, e)
            return {"EDGEFILTER_APPEAL_STEP": "error"}
        self.book.pending += 1
        secs = recording_seconds(rec.size)
        log.info("appeal %s from %s recorded: rules=%s entry=%s source=%s recording=%s%s%s", stored.code, o.e164,
                 o.rules or "-", o.entry_pattern or "-", escape_text(o.entry_source, 40) or "-", rec.path or "-",
                 f" bytes={rec.size}" if rec.size is not None else "", f" seconds={secs:.1f}" if secs is not None else "")
        self.count("recorded")
        try:
            self.notify(stored)
        except Exception:
            log.exception("appeal notice failed")
        return {"EDGEFILTER_APPEAL_STEP": "done", "EDGEFILTER_APPEAL_CODE": stored.code}

    async def refresh(self) -> None:
        """Read the no-appeal entries, the pending count and recent appeals (background)."""
        store = self.store()
        settings = self.settings()
        self.book.refresh_wanted.clear()
        unsure = set(self.book.unsure)
        patterns = await store.no_appeal_patterns()
        pending, last = await store.appeal_summary(self.book.clock() - settings.appeal.cooldown)
        self.book.load_state(patterns, pending, last)
        self.book.unsure -= unsure  # changes seen after the read stay unsure until the next one

    async def run(self, interval: float = 10.0) -> None:
        """Refresh on every list change and every ``interval`` (other nodes' appeals, decisions)."""
        failing = False
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                raise asyncio.CancelledError  # a cancel swallowed by a driver's wait_for (3.11): stop now
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (stop would hang)
                async with asyncio.timeout(interval):
                    await self.book.refresh_wanted.wait()
            except TimeoutError:
                pass
            try:
                await self.refresh()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning("appeal state refresh failed (%s); appeals are not offered for changed entries until it works", e)
                failing = True
                await asyncio.sleep(1.0)

    async def purge(self, now: float) -> int:
        """Appeals (and their recordings) older than retention; stray recordings too."""
        settings = self.settings()
        gone = await self.store().purge_appeals(now - settings.appeal.retention)
        for a in gone:
            delete_recording(settings, a.key)
        strays = sweep_recordings(settings, now)
        if gone or strays:
            log.info("purged %d appeals and %d stray recordings older than [appeal] retention", len(gone), strays)
        return len(gone)


def appeal_route(desk: AppealDesk):
    """``appeal``: ``id=..,step=digit,digit=N`` (record or refuse), ``step=recorded`` (the
    reference code), ``step=hangup`` (the caller left during the prompt)."""
    from edgefilter.asterisk.agi import AgiSession, close_writer

    async def handle(session: AgiSession) -> None:
        try:
            variables = await desk.answer(session.call)
        except Exception:
            log.exception("appeal route failed")
            variables = {"EDGEFILTER_APPEAL_STEP": "error"}
        try:
            await session.set_variables(variables)
        finally:
            close_writer(session.writer)

    return handle

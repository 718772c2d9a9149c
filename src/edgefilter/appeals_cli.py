"""`edgefilter appeals`: the admin's queue of appeals refused callers left (appeals.py).

Why a queue and not a mail: an appeal is a claim against a rule, a feed or a user's star code,
and deciding it needs the decision that was appealed (rules, weights, policy, the list entry and
its source), the caller's history and the recording side by side. ``grant`` adds a time-boxed
allow entry (source ``appeal``) and says which block entry it overrides; ``deny`` records the
answer. Both are stored with the appeal (SQLite and PostgreSQL alike), so `edgefilter stats`
can count grants per rule and per source (rule precision) and `edgefilter evidence` shows them.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime

from edgefilter.asterisk.appeals import SOURCE, max_recording_bytes, recording_seconds
from edgefilter.core.config import Settings
from edgefilter.core.durations import parse_duration
from edgefilter.core.errors import EdgefilterError
from edgefilter.lists.index import MAX_NOTE, Entry, ListIndex, parse_pattern
from edgefilter.outputs.decisionlog import escape_text
from edgefilter.store.open import open_store, store_exists
from edgefilter.store.sqlite import Appeal


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _recording(a: Appeal, settings: Settings) -> str:
    if not a.recording:
        return "none kept" + (f" ({escape_text(a.note, 120)})" if a.note.startswith("recording:") else "")
    secs = recording_seconds(a.recording_bytes)
    size = f" ({a.recording_bytes} bytes, {secs:.1f} s)" if secs is not None else " (not visible to this host: [appeal] recordings_dir)"
    return f"{a.recording}{size}"


def _entry(a: Appeal) -> str:
    if not a.entry_pattern:
        return "none (refused by the rules alone)"
    src = a.entry_source
    how = f"a star code of extension {src.split(':', 1)[1]}" if src.startswith("starcode:") else f"source {src}"
    cat = f", category {a.entry_category}" if a.entry_category else ""
    return f"{a.entry_list} {a.entry_pattern} ({escape_text(how, 80)}{cat})"


async def _show(store, a: Appeal, settings: Settings, now: float) -> list[str]:
    calls = await store.calls_from(a.caller_e164, now - 90 * 86400)
    refused = sum(1 for c in calls if c["action"] == "reject")
    refusals = [r for r in await store.refusals(caller=a.caller_e164) if r.undone_at is None]
    earlier = [x for x in await store.appeals(caller=a.caller_e164) if x.ts < a.ts]
    lines = [
        f"appeal {a.code}  {a.status}  {_when(a.ts)}  from {a.caller_e164} to {escape_text(a.called, 40) or '-'}",
        f"  refused by: {a.rules or '-'}  score {a.score:g}  policy {a.policy or 'default'}",
        f"  list entry: {_entry(a)}",
        f"  caller's history (90 d): {len(calls)} calls, {refused} refused; {len(refusals)} refusals by our users"
        f"; {len(earlier)} earlier appeals" + (f" ({', '.join(x.code + ' ' + x.status for x in earlier[-3:])})" if earlier else ""),
        f"  recording: {_recording(a, settings)}",
    ]
    if a.status == "pending":
        lines.append(f"  decide: edgefilter appeals grant {a.code} [--for 30d]   |   edgefilter appeals deny {a.code} [--note ...]")
    else:
        grant = f"; allowed {a.grant_pattern} until {_when(a.grant_expires)}" if a.grant_pattern else ""
        lines.append(f"  {a.status} {_when(a.decided_at)}{grant}" + (f"; note: {escape_text(a.note, 200)}" if a.note else ""))
    return lines


async def cmd_appeals(args, settings: Settings) -> int:
    action = args.action or "list"
    if action != "list" and not args.code:
        raise EdgefilterError(f"appeals {action} needs the appeal's reference code (edgefilter appeals lists them)")
    if not store_exists(settings):
        print("(no appeals: the database does not exist yet)")
        return 0 if action == "list" else 1
    now = time.time()
    async with open_store(settings, create=False) as store:
        if action == "list":
            appeals = await store.appeals(status=None if args.all else "pending")
            if not appeals:
                print("no appeals" + ("" if args.all else " pending") + (
                    "" if settings.appeal.enabled or any(p.appeal for p in settings.policies)
                    else " (appeals are off: [appeal] enabled = false and no policy sets appeal = true)"))
                return 0
            for listed in appeals:
                print("\n".join(await _show(store, listed, settings, now)))
            print(f"{len(appeals)} appeal(s)" + ("" if args.all else " pending"))
            return 0
        a = await store.get_appeal(args.code.strip())
        if a is None:
            raise EdgefilterError(f"no appeal {escape_text(args.code, 20)!r} (edgefilter appeals --all lists them)")
        if action == "play":
            return _play(a, settings)
        if a.status != "pending":
            raise EdgefilterError(f"appeal {a.code} was {a.status} on {_when(a.decided_at)} already")
        note = args.note or ""
        if len(note) > MAX_NOTE:
            raise EdgefilterError(f"--note is longer than {MAX_NOTE} characters")
        if action == "deny":
            denied = await store.decide_appeal(a.code, "denied", now, note=note or a.note)
            if denied is None:
                raise EdgefilterError(f"appeal {a.code} was decided meanwhile (gone)")
            print(f"appeal {denied.code} from {denied.caller_e164} denied; the number stays refused ({_entry(denied)})")
            return 0
        return await _grant(store, a, args, settings, now, note)


async def _grant(store, a: Appeal, args, settings: Settings, now: float, note: str) -> int:
    try:
        span = parse_duration(args.grant_for) if args.grant_for else settings.appeal.grant_for
    except ValueError as e:
        raise EdgefilterError(f"--for: {e}") from None
    if span <= 0:
        raise EdgefilterError("--for must be longer than 0s")
    pattern = parse_pattern(a.caller_e164, settings.default_region)
    index = ListIndex()
    index.extend(await store.candidates(pattern.key))
    match = index.lookup(pattern.key, now)
    blocks = [e for e in ((match.entry, match.shadowed) if match else ()) if e is not None and e.list == "block"]
    kept = [e for e in index.exact(pattern.key) if e.list == "allow" and e.pattern == pattern and e.active(now)
            and e.source != SOURCE and (e.expires_at is None or e.expires_at >= now + span)]
    entry = None
    if not kept:
        entry = Entry("allow", pattern, note=f"appeal {a.code} granted" + (f": {note}" if note else ""), source=SOURCE,
                      created_at=now, expires_at=now + span)
    decided = await store.decide_appeal(a.code, "granted", now, note=note or a.note, entry=entry)
    if decided is None or decided.status != "granted":
        raise EdgefilterError(f"appeal {a.code} was decided meanwhile ({decided.status if decided else 'gone'})")
    if entry is not None:
        print(f"appeal {a.code} granted: allow {pattern.text} until {_when(entry.expires_at)} (source {SOURCE})")
    else:
        print(f"appeal {a.code} granted: {pattern.text} is on the allowlist already ({escape_text(kept[0].source, 40)}); kept as it is")
    for blk in blocks:
        src = f"a star code of extension {blk.source.split(':', 1)[1]}" if blk.source.startswith("starcode:") else f"source {blk.source}"
        cat = f", category {blk.category}" if blk.category else ""
        print(f"  overrides block entry {blk.pattern.text} ({escape_text(src, 80)}{cat})")
        if blk.pattern != pattern:
            print("  (the entry stays for every other number it matches)")
        else:
            print(f"  (if it is wrong for good: edgefilter remove {blk.pattern.text} --list block)")
    if not blocks and a.entry_pattern:
        print(f"  the block entry appealed ({_entry(a)}) is gone already")
    if not blocks and not a.entry_pattern:
        print(f"  refused by rules ({a.rules}); the allow entry (LIST_ALLOWED) outranks them")
    print("the running service allows the next call from this number within [store] poll_interval")
    return 0


def _play(a: Appeal, settings: Settings) -> int:
    print(f"appeal {a.code} from {a.caller_e164}, {_when(a.ts)}: recording {_recording(a, settings)}")
    if not a.recording:
        return 1
    base = a.recording[:-4] if a.recording.endswith(".wav") else a.recording
    if a.recording_bytes is not None:
        print(f"  on this host:  aplay {a.recording}     (or: play {a.recording}; sox is in Debian's sox package)")
        if a.recording_bytes > max_recording_bytes(settings.appeal.max_seconds):
            print("  (larger than [appeal] max_seconds allow: it should have been deleted; check the file)")
    print(f'  on a phone:    asterisk -rx "channel originate PJSIP/6001 application Playback {base}"')
    if "${ASTSPOOLDIR}" in base:
        print("  (Asterisk resolves ${ASTSPOOLDIR}: astspooldir in asterisk.conf, /var/spool/asterisk on Debian)")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("appeals", parents=[common],
                       help="appeals refused callers left from the call: list, play, grant, deny")
    p.add_argument("action", nargs="?", choices=("list", "play", "grant", "deny"), help="list (default), play, grant or deny")
    p.add_argument("code", nargs="?", metavar="CODE", help="the appeal's reference (the digits the caller heard)")
    p.add_argument("--all", action="store_true", help="list: decided appeals too, not only pending ones")
    p.add_argument("--for", dest="grant_for", metavar="DURATION", help="grant: how long the number is allowed (default [appeal] grant_for)")
    p.add_argument("--note", help="grant/deny: why (kept with the appeal)")
    p.set_defaults(func=cmd_appeals)

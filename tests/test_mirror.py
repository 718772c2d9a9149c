"""The AstDB mirror of hard blocks, against a fake AMI client that behaves like Asterisk's AstDB.

The fake answers DBPut/DBDel/DBDelTree the way manager.c does (``Response: Success`` /
``Response: Error`` with ``Message: Database entry not found``) and keeps the resulting database,
so each test checks what Asterisk would end up holding, not only which actions were sent.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from edgefilter.asterisk.mirror import BlockMirror, MirrorError, hard_block_value
from edgefilter.core.config import settings_from_dict
from edgefilter.lists.index import Entry, ListIndex, Pattern, parse_pattern
from edgefilter.service import Service

FAMILY = "edgefilter-block"


class FakeAstDB:
    """``send_action`` like an AMI client connected to Asterisk (write=system)."""

    def __init__(self) -> None:
        self.db: dict[tuple[str, str], str] = {}
        self.actions: list[dict] = []
        self.fail_next = 0
        self.deny = False

    async def send_action(self, action: dict) -> dict:
        await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("AMI not connected")
        self.actions.append(dict(action))
        if self.deny:
            return {"Response": "Error", "Message": "Permission denied"}
        name, family = action["Action"], action["Family"]
        if name == "DBPut":
            self.db[(family, action["Key"])] = action["Val"]
            return {"Response": "Success", "Message": "Updated database successfully"}
        if name == "DBDel":
            if self.db.pop((family, action["Key"]), None) is None:
                return {"Response": "Error", "Message": "Database entry not found"}
            return {"Response": "Success", "Message": "Key deleted successfully"}
        if name == "DBDelTree":
            keys = [k for k in self.db if k[0] == family]
            for k in keys:
                del self.db[k]
            if not keys:
                return {"Response": "Error", "Message": "Database entry not found"}
            return {"Response": "Success", "Message": "Key tree deleted successfully"}
        return {"Response": "Error", "Message": "Invalid/unknown command"}

    def keys(self) -> dict[str, str]:
        return {k: v for (f, k), v in self.db.items() if f == FAMILY}


def entry(text: str, list_name="block", **kw) -> Entry:
    kw.setdefault("created_at", time.time())
    return Entry(list_name, parse_pattern(text, "CN"), **kw)


async def add(svc: Service, *entries: Entry) -> None:
    for e in entries:
        await svc.store.put_entry(e)
    await svc.follower.poll()
    await svc.mirror.flush()


@pytest.fixture
async def mirrored(make_settings):
    ami = FakeAstDB()
    svc = Service(make_settings(), port=0, ami=ami)
    await svc.start()
    try:
        yield svc, ami
    finally:
        await svc.stop()


def test_what_counts_as_a_hard_block():
    s = settings_from_dict({"categories": {"scam_hours": {"force": "reject", "schedule": "business-hours"}}})
    assert hard_block_value(entry("+8613800138000"), s) == "block"
    assert hard_block_value(entry("+8613800138000", category="fraud"), s) == "fraud"
    assert hard_block_value(entry("+8613800138000", category="marketing"), s) is None  # scored, not forced
    assert hard_block_value(entry("+8613800138000", category="scam_hours"), s) is None  # only some hours
    assert hard_block_value(entry("+86170*"), s) is None  # the dial plan looks up exact keys only
    assert hard_block_value(entry("+8613800138000", "allow"), s) is None
    soft = settings_from_dict({"rules": {"LIST_BLOCKED": {"weight": 9.0, "force": "voicemail"}}})
    assert hard_block_value(entry("+8613800138000"), soft) is None


async def test_start_wipes_the_family_and_puts_every_hard_block(make_settings):
    settings = make_settings()
    ami = FakeAstDB()
    ami.db[(FAMILY, "stale")] = "block"  # left from before: must go
    ami.db[("other-family", "1")] = "x"  # someone else's: untouched
    svc = Service(settings, port=0)
    await svc.start()
    for e in (entry("+8613800138000"), entry("95588"), entry("+8613700137000", category="fraud"),
              entry("+86170*"), entry("+8613600136000", category="marketing")):
        await svc.store.put_entry(e)
    await svc.stop()
    svc = Service(settings, port=0, ami=ami)
    await svc.start()
    try:
        await svc.mirror.flush()
        assert ami.actions[0] == {"Action": "DBDelTree", "Family": FAMILY}
        assert ami.keys() == {"8613800138000": "block", "95588": "block", "8613700137000": "fraud"}
        assert ami.db[("other-family", "1")] == "x"
    finally:
        await svc.stop()


async def test_changes_follow_the_change_feed(mirrored):
    svc, ami = mirrored
    await add(svc, entry("+8613800138000"))
    assert ami.keys() == {"8613800138000": "block"}
    await add(svc, entry("+8613800138000", "allow"))  # allow beats block: no longer a hard block
    assert ami.keys() == {}
    await svc.store.remove_entry(parse_pattern("+8613800138000", "CN"), "allow")
    await svc.follower.poll()
    await svc.mirror.flush()
    assert ami.keys() == {"8613800138000": "block"}
    await svc.store.remove_entry(parse_pattern("+8613800138000", "CN"))
    await svc.follower.poll()
    await svc.mirror.flush()
    assert ami.keys() == {}
    assert ami.actions[-1] == {"Action": "DBDel", "Family": FAMILY, "Key": "8613800138000"}


async def test_the_background_task_sends_without_being_asked(mirrored):
    svc, ami = mirrored
    await svc.store.put_entry(entry("+8613800138000"))
    for _ in range(100):
        if ami.keys():
            break
        await asyncio.sleep(0.02)
    assert ami.keys() == {"8613800138000": "block"}


async def test_bounded_newest_win(make_settings):
    ami = FakeAstDB()
    svc = Service(make_settings(mirror={"max_entries": 3}), port=0, ami=ami)
    await svc.start()
    try:
        t0 = time.time()
        for i in range(5):
            await add(svc, entry(f"+861380013800{i}", created_at=t0 + i))
        assert sorted(ami.keys()) == ["8613800138002", "8613800138003", "8613800138004"]
        assert svc.mirror.evicted == 2
        svc.mirror.resync()  # a full reload picks the newest three as well
        await svc.mirror.flush()
        assert sorted(ami.keys()) == ["8613800138002", "8613800138003", "8613800138004"]
    finally:
        await svc.stop()


async def test_ami_down_keeps_changes_pending_and_in_order():
    settings = settings_from_dict({})
    index = ListIndex()
    ami = FakeAstDB()
    mirror = BlockMirror(ami, lambda: settings, lambda: index)
    e = entry("+8613800138000")
    index.put(e)
    mirror.on_change("block", e.pattern.text, e)
    ami.fail_next = 1
    with pytest.raises(ConnectionError):
        await mirror.flush()
    assert ami.keys() == {} and list(mirror.pending) == ["8613800138000"]
    index.remove("block", e.pattern)  # removed while AMI was down: the put is replaced by a delete
    mirror.on_change("block", e.pattern.text, None)
    await mirror.flush()
    assert ami.keys() == {} and mirror.pending == {}


async def test_run_retries_with_backoff_until_ami_is_back():
    settings = settings_from_dict({})
    index = ListIndex()
    ami = FakeAstDB()
    ami.fail_next = 2
    mirror = BlockMirror(ami, lambda: settings, lambda: index, retry_after=0.01)
    e = entry("+8613800138000")
    index.put(e)
    mirror.on_change("block", e.pattern.text, e)
    task = asyncio.create_task(mirror.run())
    try:
        for _ in range(200):
            if ami.keys():
                break
            await asyncio.sleep(0.01)
        assert ami.keys() == {"8613800138000": "block"} and mirror.failures == 2
    finally:
        task.cancel()


async def test_permission_denied_is_an_error_not_a_success():
    settings = settings_from_dict({})
    index = ListIndex()
    ami = FakeAstDB()
    ami.deny = True
    mirror = BlockMirror(ami, lambda: settings, lambda: index)
    e = entry("+8613800138000")
    index.put(e)
    mirror.on_change("block", e.pattern.text, e)
    with pytest.raises(MirrorError, match="Permission denied"):
        await mirror.flush()
    assert list(mirror.pending) == ["8613800138000"]


async def test_expired_blocks_leave_astdb_before_the_purge():
    settings = settings_from_dict({})
    index = ListIndex()
    ami = FakeAstDB()
    now = [1_000_000.0]
    mirror = BlockMirror(ami, lambda: settings, lambda: index, clock=lambda: now[0])
    e = Entry("block", parse_pattern("+8613800138000", "CN"), created_at=now[0], expires_at=now[0] + 60)
    index.put(e)
    mirror.on_change("block", e.pattern.text, e)
    await mirror.flush()
    assert ami.keys() == {"8613800138000": "block"}
    assert mirror.expire() == 0
    now[0] += 61
    assert mirror.expire() == 1
    await mirror.flush()
    assert ami.keys() == {}


async def test_no_ami_or_disabled_means_no_mirror(make_settings):
    svc = Service(make_settings(), port=0)
    await svc.start()
    assert svc.mirror is None
    await svc.stop()
    svc = Service(make_settings(mirror={"enabled": False}), port=0, ami=FakeAstDB())
    await svc.start()
    assert svc.mirror is None
    await svc.stop()


async def test_a_big_resync_yields_to_the_event_loop_and_keeps_changes_made_meanwhile():
    settings = settings_from_dict({"mirror": {"max_entries": 50000}})
    index = ListIndex()
    for i in range(5000):
        index.put(Entry("block", Pattern("exact", f"86138{i:08d}", f"+86138{i:08d}"), created_at=float(i)))
    ami = FakeAstDB()
    mirror = BlockMirror(ami, lambda: settings, lambda: index)
    mirror.resync()
    ticks = 0

    async def other_calls():
        nonlocal ticks
        while True:
            ticks += 1
            if ticks == 3:  # a change arrives from the change feed in the middle of the scan
                allow = Entry("allow", parse_pattern("+8613800000001", "CN"), created_at=1.0)
                index.put(allow)
                mirror.on_change("allow", allow.pattern.text, allow)
            await asyncio.sleep(0)

    task = asyncio.create_task(other_calls())
    try:
        n = await mirror._rebuild(slice_size=250)
    finally:
        task.cancel()
    assert ticks >= 10  # the loop ran between slices
    assert n == 4999 and "8613800000001" not in mirror.mirrored
    await mirror.flush()
    assert len(ami.keys()) == 4999 and "8613800000001" not in ami.keys()

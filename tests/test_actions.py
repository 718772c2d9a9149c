"""What the dial plan needs to carry out each action, through the Asterisk double, and [actions] config."""

from __future__ import annotations

import asyncio
import time

import pytest

from edgefilter import cli
from edgefilter.asterisk.callsim import CallSpec, place_call
from edgefilter.core.config import settings_from_dict
from edgefilter.core.errors import ConfigError
from edgefilter.lists.index import Entry, parse_pattern
from edgefilter.service import Service


async def call(svc: Service, callerid: str, **kw):
    r = await place_call("127.0.0.1", svc.port, CallSpec(callerid=callerid, **kw), timeout=3.0)
    assert r.closed_by_server and r.pipelined == 0 and len(r.commands) == 1
    return r.variables


async def block(svc: Service, text: str, **kw) -> None:
    await svc.store.put_entry(Entry("block", parse_pattern(text, "CN"), created_at=time.time(), **kw))
    await svc.follower.poll()


@pytest.fixture
async def running(make_settings):
    started: list[Service] = []

    async def start(**sections) -> Service:
        svc = Service(make_settings(**sections), port=0)
        await svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        await svc.stop()


@pytest.mark.parametrize("cause", ["21", "17", "607", "608"])
async def test_reject_carries_the_configured_cause(running, cause):
    svc = await running(actions={"reject_cause": cause})
    await block(svc, "+8617012345678")
    v = await call(svc, "+8617012345678")
    assert v["EDGEFILTER_ACTION"] == "reject" and v["EDGEFILTER_REJECT_CAUSE"] == cause
    assert v["EDGEFILTER_REJECT_SIT"] == "0"  # always sent: the dial plan branches on it unchecked
    assert "EDGEFILTER_REJECT_CAUSE" not in await call(svc, "+8613900139000")  # only on reject


async def test_reject_sit_flag(running):
    svc = await running(actions={"reject_sit": True, "reject_cause": 608})
    await block(svc, "+8617012345678")
    v = await call(svc, "+8617012345678")
    assert v["EDGEFILTER_REJECT_SIT"] == "1" and v["EDGEFILTER_REJECT_CAUSE"] == "608"


async def test_voicemail_box_from_the_subroutine_then_the_config_then_the_extension(running):
    svc = await running()
    v = await call(svc, "hello world")  # CLI_GARBAGE: voicemail; the called extension's box
    assert v["EDGEFILTER_ACTION"] == "voicemail" and v["EDGEFILTER_VOICEMAIL_BOX"] == "1000@default"
    v = await call(svc, "hello world", args=("exten=7000", "vmbox=6001@default"))  # ARG2 of the Gosub
    assert v["EDGEFILTER_VOICEMAIL_BOX"] == "6001@default"
    v = await call(svc, "hello world", args=("exten=7000", "vmbox=6001@default,x"))  # not a box: ignored
    assert v["EDGEFILTER_VOICEMAIL_BOX"] == "7000@default"
    svc = await running(actions={"voicemail_box": "6002@default"})
    v = await call(svc, "hello world")
    assert v["EDGEFILTER_VOICEMAIL_BOX"] == "6002@default"
    v = await call(svc, "hello world", args=("vmbox=6001@default",))  # the line's own box still wins
    assert v["EDGEFILTER_VOICEMAIL_BOX"] == "6001@default"


async def test_tag_text_with_and_without_category(running):
    svc = await running()
    await block(svc, "+8613600136000", category="survey")  # weight 5: tag
    v = await call(svc, "+8613600136000")
    assert v["EDGEFILTER_ACTION"] == "tag"
    assert v["EDGEFILTER_TAG"] == "[SPAM?] survey" and v["EDGEFILTER_CATEGORY"] == "survey"
    assert v["EDGEFILTER_RULES"] == "LIST_CATEGORY"
    svc = await running(actions={"tag_category": False}, screen={"tag_text": "[ROBOT]"})
    await block(svc, "+8613600136000", category="survey")
    assert (await call(svc, "+8613600136000"))["EDGEFILTER_TAG"] == "[ROBOT]"


async def test_a_caller_name_never_reaches_the_tag(running):
    svc = await running()
    await block(svc, "+8613600136000", category="survey")
    v = await call(svc, "+8613600136000", calleridname='Evil",EDGEFILTER_ACTION=allow')
    assert v["EDGEFILTER_ACTION"] == "tag" and v["EDGEFILTER_TAG"] == "[SPAM?] survey"


@pytest.mark.parametrize(
    "section,data,message",
    [
        ("actions", {"reject_cause": "500"}, "is not a reject cause"),
        ("actions", {"reject_cause": True}, "expected a string"),
        ("actions", {"voicemail_box": "6001,x"}, "a mailbox is"),
        ("actions", {"reject_sit": "yes"}, "expected true or false"),
        ("actions", {"reject_casue": "21"}, "did you mean 'reject_cause'"),
        ("challenge", {"timeout": "90s"}, "between 1s and 60s"),
        ("challenge", {"retries": 9}, "out of range"),
        ("challenge", {"allow_for": 30}, "expected a duration string"),
        ("mirror", {"family": "edge filter"}, "AstDB family"),
        ("mirror", {"max_entries": -1}, "out of range"),
    ],
)
def test_bad_values_are_refused_with_file_and_key(section, data, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_dict({section: data}, origin="edgefilter.toml")


def test_shipped_defaults():
    s = settings_from_dict({})
    assert (s.actions.reject_cause, s.actions.reject_sit, s.actions.voicemail_box) == ("21", False, "")
    assert (s.challenge.retries, s.challenge.timeout, s.challenge.allow_for) == (1, 5.0, 30 * 86400)
    assert (s.mirror.family, s.mirror.max_entries) == ("edgefilter-block", 10000)
    assert s.rules["CHALLENGE_FAILED"].group == "challenge" and s.groups["challenge"] == 12.0


async def test_check_command_shows_failed_challenges(make_settings, tmp_path, capsys):
    svc = Service(make_settings(), port=0)
    await svc.start()
    try:
        first = await place_call("127.0.0.1", svc.port, CallSpec(callerid="+8613900139000", callingpres=32), timeout=3.0)
        cid = first.variables["EDGEFILTER_CHALLENGE_ID"]
        for _ in range(2):
            await place_call(
                "127.0.0.1", svc.port,
                CallSpec(script="challenge-result", args=[f"id={cid}", "digit=0"], uniqueid=first.uniqueid), timeout=3.0,
            )
        for _ in range(100):
            if svc.challenge_recorder.written:
                break
            await asyncio.sleep(0.01)
    finally:
        await svc.stop()
    cfg = tmp_path / "edgefilter.toml"
    cfg.write_text(f'[store]\npath = "{svc.settings.store.path}"\n')
    assert await asyncio.to_thread(cli.main, ["check", "+8613900139000", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "CHALLENGE_FAILED" in out and "+4.00" in out

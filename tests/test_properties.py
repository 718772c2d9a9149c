"""Property-based tests: whatever bytes or text arrive, parsers answer or refuse, never crash or hang.

Every parser here sees attacker- or admin-written input: the FastAGI env block (bytes from a
socket), caller IDs, list patterns (admins, import files), config files. The contract is narrow:
a result or the module's own error type (ProtocolError, PatternError, ConfigError), within a
bounded time. Example counts stay moderate so this file runs in seconds.
"""

from __future__ import annotations

import asyncio
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from edgefilter.asterisk.agi import ENV_KEYS, MAX_LINE, EnvBlock, build_call, mset_command, read_env, safe_value
from edgefilter.asterisk.callsim import CallSpec, _separate_args, build_env, parse_agi_args
from edgefilter.core.config import SCHEMA, Settings, load_settings
from edgefilter.core.errors import ConfigError, PatternError, ProtocolError
from edgefilter.core.model import Call, NumberKind
from edgefilter.core.numbers import normalize
from edgefilter.lists.index import Pattern, parse_pattern
from edgefilter.rules.screen import Screener, channel_variables

FAST = hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(coro, timeout: float = 2.0):
    async def main():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


# ------------------------------------------------------------------------------ env blocks
env_line = st.one_of(
    st.sampled_from(ENV_KEYS + ("agi_arg_1", "agi_arg_2", "agi_x")).flatmap(
        lambda k: st.binary(max_size=40).map(lambda v: k.encode() + b": " + v + b"\n")
    ),
    st.binary(max_size=60),
    st.just(b"\n"),
    st.just(b"200 result=1 (allow)\n"),
)


@st.composite
def env_bytes(draw):
    if draw(st.booleans()):
        spec = CallSpec(callerid=draw(st.binary(max_size=30)), args=draw(st.lists(st.binary(max_size=20), max_size=3)),
                        uniqueid=b"1795899799.81", threadid=1)
        base = build_env(spec, truncate=False)
        cut = draw(st.integers(0, len(base)))
        return base[:cut] + draw(st.binary(max_size=40)) + base[cut:]
    return b"".join(draw(st.lists(env_line, max_size=30)))


async def _read(data: bytes, eof: bool, timeout: float = 0.01):
    reader = asyncio.StreamReader(limit=MAX_LINE)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    try:
        env = await read_env(reader, max_bytes=16384, timeout=timeout)
    except ProtocolError:
        return None
    assert isinstance(env, EnvBlock)
    call = build_call(env)
    assert isinstance(call, Call)
    return env


@FAST
@given(env_bytes(), st.booleans())
def test_read_env_answers_or_refuses_and_never_hangs(data, eof):
    run(_read(data, eof))


@FAST
@given(st.binary(max_size=300))
def test_read_env_on_arbitrary_bytes(data):
    run(_read(data, True))


@FAST
@given(st.binary(max_size=30), st.binary(max_size=30))
def test_a_line_feed_in_the_callerid_always_marks_the_block_forged(head, tail):
    value = head + b"\n" + tail
    data = build_env(CallSpec(callerid=value, uniqueid=b"1.1"), truncate=False)
    env = run(_read(data, True))
    if env is not None:  # else refused outright (a blank line before any key, say)
        assert build_call(env).forged, data


@FAST
@given(st.dictionaries(st.sampled_from(ENV_KEYS + ("agi_arg_1", "agi_foo")), st.text(max_size=80), max_size=25),
       st.lists(st.text(max_size=40), max_size=5))
def test_build_call_takes_any_values(values, args):
    call = build_call(EnvBlock(values=values, args=args))
    assert isinstance(call.params, dict) and all(len(v) <= 256 for v in call.params.values())


# ------------------------------------------------------------------------- what we write back
@FAST
@given(st.dictionaries(st.sampled_from(["EDGEFILTER_ACTION", "EDGEFILTER_TAG", "EDGEFILTER_RULES", "EDGEFILTER_X"]),
                       st.text(max_size=300), min_size=1))
def test_mset_command_is_one_argument_whatever_the_values(variables):
    line = mset_command(variables).encode() + b"\n"
    argv = parse_agi_args(line)
    assert argv[:2] == [b"EXEC", b"MSet"] and len(argv) == 3
    pairs = _separate_args(argv[2], 0x2C, 24)
    assert [p.split(b"=", 1)[0].decode() for p in pairs] == list(variables)
    for p, v in zip(pairs, variables.values(), strict=True):
        assert p.split(b"=", 1)[1].decode() == safe_value(v)


# -------------------------------------------------------------------------------- numbers
caller_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda n, c, front: c + n if front else n + c,  # a real number plus one control byte
              st.sampled_from(["+8613800138000", "13800138000", "95588", "anonymous"]),
              st.sampled_from(["\r", "\n", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\t"]), st.booleans()),
    st.text(alphabet="+0123456789 -()./", max_size=25),
    st.binary(max_size=30).map(lambda b: b.decode("utf-8", "replace")),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)


@FAST
@given(caller_text, st.sampled_from(["CN", "US", "DE", "GB", "ZZ", "001"]))
def test_normalize_never_raises(raw, region):
    n = normalize(raw, region)
    assert isinstance(n.kind, NumberKind)
    if n.kind in (NumberKind.VALID, NumberKind.SHORT):
        assert n.digits and n.digits.isascii() and n.digits.isdigit()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        assert n.kind is NumberKind.GARBAGE


@FAST
@given(caller_text, st.sampled_from(["CN", "US", "DE"]))
def test_parse_pattern_answers_or_refuses(text, region):
    try:
        p = parse_pattern(text, region)
    except PatternError:
        return
    assert p.kind in ("exact", "prefix", "mask")
    assert Pattern.from_text(p.text) == p  # what is stored can be read back the same
    assert p.text.isascii() and p.text.isprintable()


# --------------------------------------------------------------------------------- config
def _toml_value():
    scalars = st.one_of(
        st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20), st.sampled_from(["10m", "300ms", "allow", "reject", "127.0.0.1:0", "CN", "mon-fri", "09:00-18:00"]),
    )
    return st.one_of(scalars, st.lists(scalars, max_size=3))


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').encode("unicode_escape").decode().replace('\\\\"', '\\"') + '"'
    return "[" + ", ".join(_fmt(x) for x in v) + "]"


@st.composite
def config_text(draw):
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(list(SCHEMA) + ["bogus"]))
        spec = SCHEMA.get(section)
        fields = getattr(spec, "fields", spec) or {"x": None}
        if hasattr(spec, "fields"):
            name = draw(st.sampled_from(["LIST_BLOCKED", "NAME_NEW", "fraud", "business-hours", "x", "Bad Name"]))
            lines.append(f'[{section}."{name}"]')
        else:
            lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(list(fields) + ["typo"]), max_size=4, unique=True)):
            lines.append(f"{key} = {_fmt(draw(_toml_value()))}")
    if draw(st.booleans()):  # and sometimes plain garbage
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(alphabet=string.printable, max_size=30)))
    return "\n".join(lines) + "\n"


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_text())
def test_config_loading_answers_or_raises_config_error(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "edgefilter.toml"
        path.write_text(text)
        try:
            settings = load_settings(path)
        except ConfigError:
            return
        assert isinstance(settings, Settings)
        try:
            screener = Screener(settings)  # policies compile their never_block patterns here
        except ConfigError:
            return
        d = screener.decide(Call(callerid="+8613800138000"))
        for value in channel_variables(d, settings).values():
            assert safe_value(value) == value or len(value) > 200, value


@FAST
@given(st.binary(max_size=200))
def test_config_loading_on_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "edgefilter.toml"
        path.write_bytes(data)
        try:
            load_settings(path)
        except ConfigError:
            pass


def test_deeply_nested_toml_is_a_config_error(tmp_path):
    import pytest

    path = tmp_path / "edgefilter.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_settings(path)

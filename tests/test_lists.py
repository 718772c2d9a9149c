import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from edgefilter.core.errors import PatternError
from edgefilter.lists.index import Entry, ListIndex, Pattern, parse_pattern


def entry(list_name, text, region="CN", **kw):
    return Entry(list_name, parse_pattern(text, region), **kw)


@pytest.mark.parametrize(
    "text,region,kind,canon",
    [
        ("+8613800138000", "CN", "exact", "+8613800138000"),
        ("013800138000", "CN", "exact", "+8613800138000"),
        ("+86170*", "CN", "prefix", "+86170*"),
        ("170*", "CN", "prefix", "+86170*"),
        ("0301234*", "DE", "prefix", "+49301234*"),
        ("00441632*", "CN", "prefix", "+441632*"),
        ("+4121560####", "CH", "mask", "+4121560####"),
        ("021560####", "CH", "mask", "+4121560####"),
        ("95588", "CN", "exact", "95588"),
        ("+86 170-*", "CN", "prefix", "+86170*"),
    ],
)
def test_patterns_canonicalise(text, region, kind, canon):
    p = parse_pattern(text, region)
    assert (p.kind, p.text) == (kind, canon)
    assert Pattern.from_text(p.text) == p


@pytest.mark.parametrize("text", ["", "abc", "+86*1*", "#123", "anonymous", "+1*", "+" + "1" * 70, "12#*", "+8617\n0*"])
def test_bad_patterns_say_why(text):
    with pytest.raises(PatternError):
        parse_pattern(text, "CN")


def test_exact_prefix_mask_lookup():
    idx = ListIndex()
    idx.extend([entry("block", "+8613800138000"), entry("block", "+86170*"), entry("block", "+4121560####", "CH")])
    assert idx.lookup("8613800138000").entry.pattern.kind == "exact"
    assert idx.lookup("8617012345678").entry.pattern.text == "+86170*"
    assert idx.lookup("41215601234").entry.pattern.text == "+4121560####"
    assert idx.lookup("412156012345") is None  # mask is fixed length
    assert idx.lookup("8613800138001") is None


def test_longest_match_wins_and_allow_beats_block_at_equal_length():
    idx = ListIndex()
    idx.extend([entry("block", "+86170*"), entry("allow", "+8617012*"), entry("block", "+861701234*")])
    assert idx.lookup("8617012345678").entry.list == "block"  # +861701234* is longest
    assert idx.lookup("8617012999999").entry.list == "allow"
    idx.put(entry("allow", "+861701234*"))
    m = idx.lookup("8617012345678")
    assert m.entry.list == "allow" and m.shadowed.list == "block"
    idx.put(entry("block", "+8617012345678"))
    assert idx.lookup("8617012345678").entry.list == "block"  # exact beats any pattern


def test_expired_entries_stop_matching_at_once():
    idx = ListIndex()
    idx.put(entry("block", "+86170*", expires_at=1000.0))
    idx.put(entry("block", "+8617*"))
    assert idx.lookup("8617012345678", now=999.0).entry.pattern.text == "+86170*"
    assert idx.lookup("8617012345678", now=1000.0).entry.pattern.text == "+8617*"


def test_put_replaces_and_remove_deletes():
    idx = ListIndex()
    idx.put(entry("block", "+86170*", note="a"))
    idx.put(entry("block", "+86170*", note="b"))
    assert idx.size == 1 and idx.lookup("8617012345678").entry.note == "b"
    assert idx.remove("block", Pattern.from_text("+86170*"))
    assert idx.lookup("8617012345678") is None and idx.size == 0
    assert not idx.remove("block", Pattern.from_text("+86170*"))


@hsettings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_pattern_raises_only_pattern_error(text):
    try:
        p = parse_pattern(text, "CN")
    except PatternError:
        return
    assert p.text.startswith("+") or p.text.isdigit()

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from edgefilter.core.model import NumberKind
from edgefilter.core.numbers import normalize


@pytest.mark.parametrize(
    "raw",
    ["+8613800138000", "008613800138000", "8613800138000", "013800138000", "13800138000", "+86-138-0013-8000", "+86 138 0013 8000", "tel:+8613800138000"],
)
def test_every_trunk_form_of_a_cn_mobile_reaches_one_e164(raw):
    n = normalize(raw, "CN")
    assert n.kind is NumberKind.VALID
    assert n.e164 == "+8613800138000"


def test_landline_national_and_international_forms():
    assert normalize("02161234567", "CN").e164 == "+862161234567"
    assert normalize("+86-21-6123-4567", "CN").e164 == "+862161234567"


def test_local_number_needs_area_code_to_be_valid():
    assert normalize("61234567", "CN").kind is NumberKind.INVALID
    n = normalize("61234567", "CN", area_code="21")
    assert (n.kind, n.e164) == (NumberKind.VALID, "+862161234567")


@pytest.mark.parametrize("raw", ["anonymous", "Anonymous", "Restricted", "unknown", "", "  ", "<unknown>", "Private"])
def test_withheld_forms(raw):
    n = normalize(raw, "CN")
    assert n.kind is NumberKind.WITHHELD and n.e164 is None


@pytest.mark.parametrize("raw", ["95588", "10086", "12345", "110"])
def test_short_numbers_key_on_their_digits(raw):
    n = normalize(raw, "CN")
    assert n.kind is NumberKind.SHORT and n.e164 == raw


@pytest.mark.parametrize(
    "raw,kind",
    [
        ("138", NumberKind.INVALID),
        ("+4121560123", NumberKind.INVALID),
        ("abc", NumberKind.GARBAGE),
        ("138\n\n200 result=1 (allow)", NumberKind.GARBAGE),
        ("138\r00138000", NumberKind.GARBAGE),
        # control characters after the part normalisation keeps (a URI's host, a parameter)
        ("sip:+8613800138000@x\r\n200 result=1 (allow)", NumberKind.GARBAGE),
        ("sip:+8613800138000@x\r", NumberKind.GARBAGE),
        ("tel:+8613800138000;x\x1b[2J", NumberKind.GARBAGE),
        ("sip:+8613800138000@x\x85", NumberKind.GARBAGE),
        ("sip:+8613800138000@x\u2028", NumberKind.GARBAGE),
        ("sip:+8613800138000@x", NumberKind.VALID),
        ("\ufffd\ufffd", NumberKind.GARBAGE),
        ("1234567890" * 8, NumberKind.GARBAGE),
        ("+", NumberKind.GARBAGE),
    ],
)
def test_invalid_and_garbage_are_distinct(raw, kind):
    assert normalize(raw, "CN").kind is kind


def test_other_region_default():
    assert normalize("(415) 555-0123", "US").e164 == "+14155550123"
    assert normalize("00491701234567", "CN").e164 == "+491701234567"


@hsettings(max_examples=400, deadline=None)
@given(st.text(max_size=120))
def test_normalize_never_raises(raw):
    n = normalize(raw, "CN")
    assert n.kind in NumberKind
    if n.e164 is not None and n.kind is not NumberKind.SHORT:
        assert n.e164.startswith("+") and n.e164[1:].isdigit()


@hsettings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A\+?[0-9 ()\-]{0,25}\Z"))
def test_normalize_digit_strings_never_raise(raw):
    normalize(raw, "CN")

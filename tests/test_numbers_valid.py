"""numbers._is_valid_for_region and numbers._region_for_number must answer exactly as phonenumbers.

The shortcut tries the mobile pattern first and stops at the first number type that matches;
phonenumbers tries eight rare types and fixed line first. These tests compare the two on numbers
built from every region's example numbers (valid ones and near misses: the same leading digits
with other tails and lengths, Italian leading zeros), on random PhoneNumbers of every country
code (shared ones such as +1, +7, +44 and non-geographic ones such as +800, +882, +883 included),
on regions given explicitly (the number's own, another one, "001", unknown ones), and then the
whole normalize() result with the shortcut replaced by phonenumbers' own functions.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import phonenumbers
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from phonenumbers import PhoneNumber, PhoneNumberType
from phonenumbers import phonenumberutil as pnu

from edgefilter.core import numbers
from edgefilter.core.numbers import _is_valid_for_region, _region_for_number

from .test_numbers_fast import _samples

ALL_TYPES = (
    PhoneNumberType.MOBILE,
    PhoneNumberType.FIXED_LINE,
    PhoneNumberType.TOLL_FREE,
    PhoneNumberType.PREMIUM_RATE,
    PhoneNumberType.SHARED_COST,
    PhoneNumberType.VOIP,
    PhoneNumberType.PERSONAL_NUMBER,
    PhoneNumberType.PAGER,
    PhoneNumberType.UAN,
    PhoneNumberType.VOICEMAIL,
)
REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)
NON_GEO = sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS)
COUNTRY_CODES = sorted(pnu.COUNTRY_CODE_TO_REGION_CODE)
#: Country codes nobody has, next to real ones.
NO_SUCH_CC = (0, 2, 28, 42, 801, 999, 3841)
OTHER_REGIONS = ("001", "ZZ", "cn", "us", "XK", "", "C")


def _examples() -> list[tuple[int, str]]:
    """(country code, national significant number) of every example number phonenumbers has."""
    out: list[tuple[int, str]] = []
    for region in REGIONS:
        for t in ALL_TYPES:
            ex = phonenumbers.example_number_for_type(region, t)
            if ex is not None:
                out.append((ex.country_code, pnu.national_significant_number(ex)))
    for cc in NON_GEO:
        ex = phonenumbers.example_number_for_non_geo_entity(cc)
        if ex is not None:
            out.append((cc, pnu.national_significant_number(ex)))
    return out


EXAMPLES = _examples()


def _number(cc: int, nsn: str) -> PhoneNumber:
    """A PhoneNumber as parse builds it: leading zeros of the NSN kept as Italian leading zeros."""
    out = PhoneNumber(country_code=cc)
    pnu._set_italian_leading_zeros_for_phone_number(nsn, out)
    out.national_number = int(nsn) if nsn else 0
    return out


def _check(num: PhoneNumber, region: str | None = None) -> None:
    want_region = phonenumbers.region_code_for_number(num)
    assert _region_for_number(num) == want_region, f"{num}: region"
    for r in (want_region, region):
        if r is None:
            continue
        want = phonenumbers.is_valid_number_for_region(num, r)
        assert _is_valid_for_region(num, r) == want, f"{num} for {r!r}: phonenumbers says {want}"


def _variants(nsn: str, rng: random.Random) -> Iterator[str]:
    yield nsn
    yield nsn[:-1]  # too short
    yield nsn + rng.choice("0123456789")  # too long
    yield "0" + nsn
    for _ in range(12):  # same leading digits, other tails
        keep = rng.randint(1, len(nsn))
        tail = "".join(rng.choice("0123456789") for _ in range(max(0, len(nsn) - keep + rng.randint(-2, 2))))
        yield nsn[:keep] + tail


def test_every_example_number_and_near_misses():
    rng = random.Random("valid-examples")
    valid = invalid = 0
    for cc, nsn in EXAMPLES:
        for body in _variants(nsn, rng):
            if not body:
                continue
            num = _number(cc, body)
            _check(num, rng.choice(REGIONS))
            if phonenumbers.is_valid_number(num):
                valid += 1
            else:
                invalid += 1
    # both answers are really exercised, over every region
    assert valid > 2000 and invalid > 2000, (valid, invalid)


def test_named_cases():
    cases = {
        "+8613800138000": True,  # CN mobile
        "+8619912345678": True,  # CN mobile
        "+862161234567": True,  # CN fixed line, Shanghai
        "+8675512345678": True,  # CN fixed line, Shenzhen
        "+86138001380": False,  # CN mobile, too short
        "+861380013800012": False,  # CN, too long
        "+12015550123": True,  # US
        "+16135550123": True,  # CA, shared country code 1
        "+18765550123": True,  # JM, shared country code 1
        "+11235550123": False,  # NANPA, no area code 123
        "+447400123456": True,  # GB mobile
        "+442079460958": True,  # GB fixed line
        "+447624123456": True,  # IM, shared country code 44
        "+390612345678": True,  # IT fixed line, leading zero
        "+393123456789": True,  # IT mobile
        "+390012345": False,  # IT, two leading zeros
        "+4930123456": True,  # DE fixed line
        "+4915123456789": True,  # DE mobile
        "+18002345678": True,  # US toll free
        "+80012345678": True,  # non-geographic toll free
        "+882123456": None,  # non-geographic, whatever phonenumbers says
        "+88341234567": None,
        "+979123456789": None,
        "+79123456789": True,  # RU mobile, shared country code 7
        "+77012345678": True,  # KZ mobile
    }
    for text, expected in cases.items():
        num = phonenumbers.parse(text, None)
        _check(num, "CN")
        if expected is not None:
            assert phonenumbers.is_valid_number(num) is expected, text  # the case is what it says
    for cc in NON_GEO:
        assert _region_for_number(PhoneNumber(country_code=cc, national_number=12345678)) == "001"


digits = st.text(alphabet="0123456789", min_size=1, max_size=17)


@st.composite
def phone_numbers(draw) -> PhoneNumber:
    """Near-valid numbers (an example's first digits, any tail) and random ones of any country code."""
    if draw(st.booleans()):
        cc, nsn = draw(st.sampled_from(EXAMPLES))
        keep = draw(st.integers(1, len(nsn)))
        nsn = nsn[:keep] + draw(st.text(alphabet="0123456789", max_size=len(nsn) - keep + 2))
    else:
        cc = draw(st.one_of(st.sampled_from(COUNTRY_CODES), st.sampled_from(NO_SUCH_CC), st.integers(0, 999)))
        nsn = draw(digits)
    num = PhoneNumber(country_code=cc, national_number=int(nsn))
    zeros = len(nsn) - len(nsn.lstrip("0"))
    if zeros and draw(st.booleans()):  # as parse sets them, or arbitrary ones
        num.italian_leading_zero = True
        num.number_of_leading_zeros = zeros if zeros > 1 else None
    elif draw(st.integers(0, 9)) == 0:
        num.italian_leading_zero = True
        num.number_of_leading_zeros = draw(st.one_of(st.none(), st.integers(0, 3)))
    return num


@hsettings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num=phone_numbers(), region=st.one_of(st.sampled_from(REGIONS), st.sampled_from(OTHER_REGIONS)))
def test_same_answer_as_phonenumbers(num, region):
    _check(num, region)


@contextmanager
def _phonenumbers_validity() -> Iterator[None]:
    """normalize() with phonenumbers' own region lookup and validity instead of the shortcut."""
    saved = numbers._region_for_number, numbers._is_valid_for_region
    numbers._region_for_number, numbers._is_valid_for_region = pnu.region_code_for_number, pnu.is_valid_number_for_region
    try:
        yield
    finally:
        numbers._region_for_number, numbers._is_valid_for_region = saved


def _both(texts: list[str], region: str, area_code: str = "") -> None:
    fast = [numbers._normalize_safe(t, region, area_code) for t in texts]
    with _phonenumbers_validity():
        slow = [numbers._normalize_safe(t, region, area_code) for t in texts]
    for t, f, s in zip(texts, fast, slow, strict=True):
        assert f == s, f"{t!r} in {region}: shortcut {f} != phonenumbers {s}"


@pytest.mark.parametrize("region", ("CN", "US", "CA", "GB", "IT", "DE", "RU", "JM"))
def test_normalize_is_unchanged_by_the_shortcut(region):
    texts = _samples(region, random.Random(f"valid-norm-{region}"))[:2500]
    texts += ["+80012345678", "0080012345678", "+882123456", "+88341234567", "+979123456789", "+8001234"]
    _both(texts, region)
    _both(texts[:300], region, area_code="21" if region == "CN" else "201")  # the local-number path


caller_ids = st.one_of(
    st.builds(lambda p, d: p + d, st.sampled_from(["", "+", "00", "0", "+86", "+1", "+44", "+39", "+800", "+882", "+883", "86"]), digits),
    st.builds(
        lambda p, ex, tail: p + ex[1][: len(ex[1]) // 2 + 1] + tail if p else f"+{ex[0]}{ex[1]}{tail}",
        st.sampled_from(["", "0"]),
        st.sampled_from(EXAMPLES),
        st.text(alphabet="0123456789", max_size=8),
    ),
)


@hsettings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=caller_ids, region=st.sampled_from(("CN", "US", "GB", "IT", "DE", "FR", "RU", "IN", "BR", "JP")))
def test_normalize_property(text, region):
    _both([text], region)

"""numbers.fast_parse must give exactly what phonenumbers.parse gives, or decline (None).

The fast path skips parse's generic front matter for compact caller IDs; these tests generate
many numbers in the shapes trunks send (and near misses) for regions with different numbering
plans (national prefix 0 or 1 or none, Italian leading zeros, shared country codes, transform
rules) and compare the PhoneNumber objects field by field, then the whole normalize() result.
"""

from __future__ import annotations

import random

import phonenumbers
import pytest
from phonenumbers import PhoneNumberType

from edgefilter.core import numbers
from edgefilter.core.numbers import fast_parse

REGIONS = ("CN", "US", "CA", "GB", "DE", "FR", "IT", "IN", "JP", "RU", "KZ", "BR", "AR", "MX", "AU", "NZ", "HK", "SG", "VA", "CI")
TYPES = (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE, PhoneNumberType.TOLL_FREE, PhoneNumberType.PREMIUM_RATE, PhoneNumberType.VOIP)


def _parse(text: str, region: str):
    try:
        return phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None


def _samples(region: str, rng: random.Random) -> list[str]:
    cc = str(phonenumbers.country_code_for_region(region))
    prefix = numbers.national_prefix(region)
    out: list[str] = []
    for t in TYPES:
        ex = phonenumbers.example_number_for_type(region, t)
        if ex is None:
            continue
        nsn = phonenumbers.national_significant_number(ex)
        out += [f"+{cc}{nsn}", f"{prefix}{nsn}", nsn, f"00{cc}{nsn}", f"+{cc}{prefix}{nsn}", f"{cc}{nsn}"]
        for _ in range(40):  # the example's leading digits with random tails: valid and invalid alike
            keep = rng.randint(1, len(nsn))
            tail = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 4) + len(nsn) - keep - 2))
            body = nsn[:keep] + tail
            out += [f"+{cc}{body}", f"{prefix}{body}", body]
    for _ in range(300):  # anything dialable
        body = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 21)))
        out += [body, "+" + body, "0" + body, prefix + body, cc + body, "+" + cc + body]
    return out


@pytest.mark.parametrize("region", REGIONS)
def test_fast_parse_matches_phonenumbers(region):
    rng = random.Random(f"fast-{region}")
    taken = 0
    for text in _samples(region, rng):
        fast = fast_parse(text, region)
        if fast is None:
            continue
        taken += 1
        full = _parse(text, region)
        assert full is not None, f"{text!r} in {region}: parse raises, the fast path answered {fast}"
        assert fast == full, f"{text!r} in {region}: fast {fast} != parse {full}"
        assert (fast.italian_leading_zero, fast.number_of_leading_zeros) == (full.italian_leading_zero, full.number_of_leading_zeros)
    assert taken > 500  # the fast path is really exercised (it must not decline everything)


def test_fast_path_takes_the_bench_shapes():
    # What trunks send most: international with '+', and the national trunk form.
    for text in ("+8613800138000", "018612345678", "13800138000", "+4420794609580", "+390612345678"):
        assert fast_parse(text, "CN") == phonenumbers.parse(text, "CN")


@pytest.mark.parametrize("region", ("CN", "US", "GB", "IT"))
def test_normalize_is_unchanged_by_the_fast_path(region, monkeypatch):
    rng = random.Random(f"norm-{region}")
    texts = _samples(region, rng)[:3000]
    fast = [numbers._normalize(t, region, "") for t in texts]
    monkeypatch.setattr(numbers, "fast_parse", lambda compact, region: None)
    slow = [numbers._normalize(t, region, "") for t in texts]
    assert fast == slow

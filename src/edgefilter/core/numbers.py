"""Caller-ID normalisation: whatever the trunk presents -> a Number with a stable E.164 key.

Trunks present the same caller as ``+8613800138000``, ``008613800138000``, ``8613800138000``,
``013800138000`` or ``13800138000``; lists and history must see one key. Caller IDs are
attacker-controlled, so ``normalize`` never raises: anything it cannot read becomes a Number of
kind GARBAGE with a reason. Withheld forms (``anonymous``, ``Restricted``...) are classified
before parsing because phonenumbers raises on them (see DESIGN.md).
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers
from phonenumbers import phonenumberutil as _pnu
from phonenumbers import shortnumberinfo

from edgefilter.core.model import Number, NumberKind

WITHHELD_WORDS = frozenset(
    {
        "",
        "anonymous",
        "restricted",
        "unknown",
        "unavailable",
        "private",
        "withheld",
        "<unknown>",
        "null",
        "none",
        "asterisk",
    }
)
#: Separators trunks and people put inside numbers; removed before parsing.
_VISUAL = re.compile(r"[ \-.()/]")
_DIALABLE = re.compile(r"^\+?[0-9]+\Z")
#: Bytes no trunk puts in a number: a CR or other control byte is an injection attempt (09f),
#: never something to strip away and accept.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PAD = " "
MAX_DIGITS = 20  # E.164 allows 15; leave room for 00 + country code + national trunk oddities


@lru_cache(maxsize=64)
def _country_code(region: str) -> int:
    return phonenumbers.country_code_for_region(region)


def strip_visual(text: str) -> str:
    """Remove visual separators (``+86-21-6123-4567``) and a ``tel:``/``sip:`` scheme."""
    t = text.strip(_PAD)
    low = t[:4].lower()
    if low in ("tel:", "sip:"):
        t = t[4:]
        t = t.split("@", 1)[0].split(";", 1)[0]
    return _VISUAL.sub("", t)


#: Distinct caller IDs whose normalisation is remembered. phonenumbers' parse + validation is
#: the largest item of a decision's CPU (60 us hot, 125 us with cold caches, of a decision of
#: 90-200 us on a 2-vCPU Xeon: docs/performance.md);
#: harassers and regular callers call again, and a Number is immutable, so repeats cost a dict
#: lookup. Caller IDs are at most 79 bytes (Asterisk cuts them), so the cache stays small
#: (a few MB); flooding it with new numbers costs only the uncached time, never correctness.
NORMALIZE_CACHE = 8192


def normalize(raw: str, region: str, *, area_code: str = "") -> Number:
    """Classify and normalise one caller ID; never raises.

    ``region`` is the ISO region for national forms; ``area_code`` (optional, national digits
    without the trunk prefix) lets a local number without its area code reach a valid E.164.
    """
    if type(raw) is str and len(raw) <= 128:
        return _normalize_cached(raw, region, area_code)
    return _normalize_safe(raw, region, area_code)


def _normalize_safe(raw: str, region: str, area_code: str) -> Number:
    try:
        return _normalize(raw, region, area_code)
    except Exception as exc:  # phonenumbers may raise on pathological input; the call path must not
        return Number(raw=raw, kind=NumberKind.GARBAGE, reason=f"unparseable ({type(exc).__name__})")


_normalize_cached = lru_cache(maxsize=NORMALIZE_CACHE)(_normalize_safe)


def _normalize(raw: str, region: str, area_code: str) -> Number:
    text = raw if isinstance(raw, str) else str(raw)
    if _CONTROL.search(text):
        return Number(raw=text, kind=NumberKind.GARBAGE, reason="control characters in the caller ID")
    if text.strip(_PAD).lower() in WITHHELD_WORDS:
        return Number(raw=text, kind=NumberKind.WITHHELD, reason="no caller ID presented")
    compact = strip_visual(text)
    if not _DIALABLE.match(compact):
        return Number(raw=text, kind=NumberKind.GARBAGE, reason="not a phone number (characters other than digits and '+')")
    digits = compact.lstrip("+")
    if len(digits) > MAX_DIGITS:
        return Number(raw=text, kind=NumberKind.GARBAGE, reason=f"{len(digits)} digits, longer than any phone number")
    if not digits:
        return Number(raw=text, kind=NumberKind.GARBAGE, reason="no digits")

    if not compact.startswith("+") and not compact.startswith("00"):
        # Short and service numbers (95588, 10086, 110) have no E.164 form: key on the digits.
        if len(digits) <= 6 and _is_short(digits, region):
            return Number(raw=text, kind=NumberKind.SHORT, e164=digits, region=region, reason="short/service number")

    try:
        parsed = fast_parse(compact, region) or phonenumbers.parse(compact, region)
    except phonenumbers.NumberParseException as exc:
        return Number(raw=text, kind=NumberKind.INVALID, reason=f"cannot parse: {exc._msg}")
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    num_region = _region_for_number(parsed)
    # is_valid_number(parsed) is exactly this with the region looked up again: do it once.
    if num_region is not None and _is_valid_for_region(parsed, num_region):  # None: False there too
        return Number(raw=text, kind=NumberKind.VALID, e164=e164, region=num_region)
    if area_code and not compact.startswith("+") and not compact.startswith("0"):
        local = phonenumbers.parse(f"+{_country_code(region)}{area_code}{digits}", None)
        local_region = _region_for_number(local)  # = phonenumbers.is_valid_number(local)
        if local_region is not None and _is_valid_for_region(local, local_region):
            return Number(
                raw=text,
                kind=NumberKind.VALID,
                e164=phonenumbers.format_number(local, phonenumbers.PhoneNumberFormat.E164),
                region=region,
                reason=f"local number, area code {area_code} added",
            )
    return Number(raw=text, kind=NumberKind.INVALID, e164=e164, region=num_region, reason="not a valid number for its region")


#: Lengths of a compact caller ID the fast path takes (digits, without '+'); anything else goes
#: through phonenumbers.parse, whose checks for very short and very long input it then keeps.
_FAST_MIN_DIGITS = 4
_FAST_MAX_DIGITS = 17
_IDD_PATTERNS: dict[str, re.Pattern[str] | None] = {}


def _idd_pattern(region: str, meta: phonenumbers.PhoneMetadata) -> re.Pattern[str] | None:
    try:
        return _IDD_PATTERNS[region]
    except KeyError:
        pat = re.compile(meta.international_prefix) if meta.international_prefix else None
        _IDD_PATTERNS[region] = pat
        return pat


def fast_parse(compact: str, region: str) -> phonenumbers.PhoneNumber | None:
    """``phonenumbers.parse(compact, region)`` for the two shapes trunks send, or None.

    Why: parse spends most of its time on what a compact caller ID never has (Unicode digits,
    letters, extensions, RFC 3966 context, a leading text to skip); a decision for a caller never
    seen before was half phonenumbers. ``compact`` is already ASCII digits with an optional
    leading '+' (``_DIALABLE``). This takes ``+<cc><nsn>`` and a national form that starts
    neither with the region's IDD nor with its country code, and runs exactly the steps parse
    runs for them, with phonenumbers' own metadata and helpers: the country code by the same
    extraction, the national prefix (and carrier code) stripped by the same function under the
    same length test, the Italian leading zeros set the same way. Every other shape, and every
    case where parse would raise, answers None so the caller runs phonenumbers.parse itself.
    tests/test_numbers_fast.py compares the two on many generated numbers from many regions.
    """
    plus = compact[:1] == "+"
    digits = compact[1:] if plus else compact
    if not (_FAST_MIN_DIGITS <= len(digits) <= _FAST_MAX_DIGITS + 3) or not digits.isascii() or not digits.isdigit():
        return None
    if plus:
        cc, nsn = _pnu._extract_country_code(digits)
        if cc == 0:
            return None  # parse retries without the '+': leave that to it
        number_region = _pnu.region_code_for_country_code(cc)
        if number_region == region:
            meta = phonenumbers.PhoneMetadata.metadata_for_region(region, None)
        else:
            meta = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(cc, number_region)
        if meta is None:
            return None
    else:
        meta = phonenumbers.PhoneMetadata.metadata_for_region(region.upper(), None) if region else None
        if meta is None or meta.country_code is None:  # (a region's metadata always has one)
            return None
        idd = _idd_pattern(region, meta)
        if idd is not None and idd.match(digits):
            return None  # an international prefix (or something parse may read as one)
        cc = meta.country_code
        if digits.startswith(str(cc)):
            return None  # parse may read the region's own country code here
        nsn = digits
    if len(nsn) < _pnu._MIN_LENGTH_FOR_NSN:
        return None
    _carrier, potential, _stripped = _pnu._maybe_strip_national_prefix_carrier_code(nsn, meta)
    if _pnu._test_number_length(potential, meta) not in (
        _pnu.ValidationResult.TOO_SHORT,
        _pnu.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
        _pnu.ValidationResult.INVALID_LENGTH,
    ):
        nsn = potential
    if not (_pnu._MIN_LENGTH_FOR_NSN <= len(nsn) <= _pnu._MAX_LENGTH_FOR_NSN):
        return None
    out = phonenumbers.PhoneNumber(country_code=cc)
    _pnu._set_italian_leading_zeros_for_phone_number(nsn, out)
    out.national_number = int(nsn)
    return out


#: Per region: its country code, its general description, the descriptions of the number types
#: in the order to try them, and its compiled ``leading_digits`` (for shared country codes).
_ValidityEntry = tuple[int, phonenumbers.PhoneNumberDesc, tuple[phonenumbers.PhoneNumberDesc, ...], re.Pattern[str] | None]
_VALIDITY: dict[str, _ValidityEntry] = {}


def _validity_entry(region: str) -> _ValidityEntry | None:
    """What ``_is_valid_for_region`` needs of ``region``'s metadata, or None to leave it to phonenumbers.

    phonenumbers calls a number valid when it matches the general description and
    ``_number_type_helper`` finds a type: one of premium rate, toll free, shared cost, VoIP,
    personal, pager, UAN, voicemail, fixed line, or mobile (mobile only if its pattern is not
    the fixed line's one: then fixed line has already answered). Validity is the OR of those
    matches, so the order does not change it: mobile first (most callers), fixed line second, the
    rest after. A description without a pattern never matches (``_match_national_number``), so it
    is left out. The non-geographic "001" and regions without metadata (or not spelled as in the
    metadata) answer None.
    """
    try:
        return _VALIDITY[region]
    except KeyError:
        pass
    if region == phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY:
        return None
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region, None)
    if meta is None or meta.country_code is None or meta.general_desc is None:
        return None
    candidates = [] if meta.same_mobile_and_fixed_line_pattern else [meta.mobile]
    candidates += [
        meta.fixed_line,
        meta.premium_rate,
        meta.toll_free,
        meta.shared_cost,
        meta.voip,
        meta.personal_number,
        meta.pager,
        meta.uan,
        meta.voicemail,
    ]
    descs = tuple(d for d in candidates if d is not None and d.national_number_pattern)
    leading = re.compile(meta.leading_digits) if meta.leading_digits is not None else None
    entry: _ValidityEntry = (meta.country_code, meta.general_desc, descs, leading)
    _VALIDITY[region] = entry
    return entry


def _nsn_has_type(nsn: str, general: phonenumbers.PhoneNumberDesc, descs: tuple[phonenumbers.PhoneNumberDesc, ...]) -> bool:
    """``_number_type_helper(nsn, metadata) != UNKNOWN``, stopping at the first type that matches."""
    if not _pnu._is_number_matching_desc(nsn, general):
        return False
    for desc in descs:
        if _pnu._is_number_matching_desc(nsn, desc):
            return True
    return False


def _is_valid_for_region(parsed: phonenumbers.PhoneNumber, region: str) -> bool:
    """``phonenumbers.is_valid_number_for_region(parsed, region)``, the mobile pattern tried first.

    Why: phonenumbers tries eight rare types and the fixed line patterns (large ones in CN)
    before the mobile one, and most callers are mobiles; with cold CPU caches that scan was the
    largest item of a decision for a new caller. Same metadata, same matching function
    (``_is_number_matching_desc``), same answer: tests/test_numbers_valid.py compares the two on
    many generated numbers. Non-geographic numbers ("001") and anything unusual go to phonenumbers.
    """
    entry = _validity_entry(region)
    if entry is None:
        return phonenumbers.is_valid_number_for_region(parsed, region)
    country_code, general, descs, _leading = entry
    if parsed.country_code != country_code:
        return False
    return _nsn_has_type(_pnu.national_significant_number(parsed), general, descs)


def _region_for_number(parsed: phonenumbers.PhoneNumber) -> str | None:
    """``phonenumbers.region_code_for_number(parsed)``, with the mobile-first type check.

    A country code of one region answers it directly (as phonenumbers does). For a shared one
    (1, 7, 44...) phonenumbers tries the regions in its order, by their ``leading_digits`` or,
    without one, by a full type scan (25 NANPA regions for an invalid +1 number); this does the
    same with ``_nsn_has_type``.
    """
    regions = _pnu.COUNTRY_CODE_TO_REGION_CODE.get(parsed.country_code)  # type: ignore[arg-type]
    if regions is None:
        return None
    if len(regions) == 1:
        return regions[0]
    nsn = _pnu.national_significant_number(parsed)
    for region in regions:
        entry = _validity_entry(region)
        if entry is None:
            return phonenumbers.region_code_for_number(parsed)  # unusual: let phonenumbers decide
        _cc, general, descs, leading = entry
        if leading is not None:
            if leading.match(nsn):
                return region
        elif _nsn_has_type(nsn, general, descs):
            return region
    return None


@lru_cache(maxsize=4096)
def _is_short(digits: str, region: str) -> bool:
    try:
        return shortnumberinfo.is_valid_short_number_for_region(phonenumbers.parse(digits, region), region)
    except phonenumbers.NumberParseException:
        return False


def country_digits(region: str) -> str:
    """Country calling code of ``region`` as digits (``CN`` -> ``86``)."""
    return str(_country_code(region))


def national_prefix(region: str) -> str:
    """The trunk prefix dialled before national numbers in ``region`` (``0`` in CN, ``1`` in US)."""
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
    return (meta.national_prefix or "") if meta else ""


def warm_up(region: str) -> None:
    """Load phonenumbers' metadata for ``region`` now, so the first call is not the slow one."""
    normalize("+8613800138000", region)
    normalize("013800138000", region)
    normalize("95588", region)

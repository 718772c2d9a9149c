"""Hot-path helpers: the normalisation cache and freezing the loaded lists out of the GC."""

from __future__ import annotations

import gc

from edgefilter.numbers import normalize
from edgefilter.service import Service, settle_heap


def test_normalize_cache_keys_on_region_and_area_code_and_survives_odd_input():
    a = normalize("013800138000", "CN")
    assert normalize("013800138000", "CN") is a  # remembered
    assert a.e164 == "+8613800138000"
    us = normalize("013800138000", "US")
    assert us is not a and us.e164 != a.e164
    local = normalize("61234567", "CN", area_code="21")
    assert local.e164 == "+862161234567" and normalize("61234567", "CN").e164 != local.e164
    long_raw = "1" * 500  # not cached (bounded key size), still classified
    assert normalize(long_raw, "CN").kind.value == "garbage"
    assert normalize(None, "CN").kind.value in ("withheld", "garbage")  # unhashable-safe path


def test_settle_heap_freezes_what_is_alive():
    try:
        settle_heap(collect=False)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


async def test_loading_lists_freezes_them(make_settings):
    svc = Service(make_settings(), port=0)
    gc.unfreeze()
    await svc.start()
    try:
        assert gc.get_freeze_count() > 0
    finally:
        await svc.stop()
        gc.unfreeze()

"""Hot-path helpers: the normalisation cache and freezing the loaded lists out of the GC."""

from __future__ import annotations

import gc

from edgefilter.core.numbers import normalize
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
    gc.unfreeze()  # earlier tests (a started service) may have left a frozen heap behind
    assert gc.get_freeze_count() == 0
    try:
        settle_heap(collect=False)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic GC frees it


def test_settle_heap_collects_cyclic_garbage_first_unless_told_not_to():
    import weakref

    gc.unfreeze()
    gc.disable()  # no automatic collection in between: only settle_heap decides
    try:
        node = _Node()
        gone = weakref.ref(node)
        del node
        settle_heap(collect=True)
        assert gone() is None  # collected, not frozen with the live heap
        # garbage that an earlier settle froze (a reload replaced the lists it belonged to) is
        # looked at again: settle_heap unfreezes before it collects
        node = _Node()
        stale = weakref.ref(node)
        del node
        gc.freeze()
        settle_heap(collect=True)
        assert stale() is None
        node = _Node()
        kept = weakref.ref(node)
        del node
        settle_heap(collect=False)
        assert kept() is not None  # frozen as it was (cheaper for small lists)
        gc.collect()
        assert kept() is not None  # frozen objects are out of the collector's sight
        gc.unfreeze()
        gc.collect()
        assert kept() is None
    finally:
        gc.unfreeze()
        gc.enable()


async def test_loading_lists_freezes_them(make_settings):
    svc = Service(make_settings(), port=0)
    gc.unfreeze()
    await svc.start()
    try:
        assert gc.get_freeze_count() > 0
    finally:
        await svc.stop()
        gc.unfreeze()

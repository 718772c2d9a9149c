"""Shared fixtures: settings on a temporary database, a running service on an ephemeral port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefilter.config import settings_from_dict
from edgefilter.service import Service

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "asterisk"
if not FIXTURES.exists():  # CI lays shared/ beside the clone; a worktree may sit elsewhere
    FIXTURES = Path(os.environ.get("EDGEFILTER_FIXTURES", "/work/shared/fixtures/asterisk"))


@pytest.fixture
def make_settings(tmp_path):
    def make(extra: dict | None = None, **sections):
        data = {
            "store": {"path": str(tmp_path / "edgefilter.db"), "poll_interval": "50ms", "spool_path": str(tmp_path / "spool.db")},
            "agi": {"listen": "127.0.0.1:0"},
        }
        for k, v in {**(extra or {}), **sections}.items():
            data.setdefault(k, {}).update(v) if isinstance(v, dict) and k in data else data.__setitem__(k, v)
        return settings_from_dict(data)

    return make


@pytest.fixture
async def service(make_settings):
    """A running service (FastAGI on 127.0.0.1, ephemeral port) on a fresh database."""
    svc = Service(make_settings(), port=0)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()

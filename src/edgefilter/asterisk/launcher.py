"""The classic (per-process) AGI entry: env on stdin, commands on stdout, same decision path.

Used by ``agi/edgefilter-agi``. It reads only the list entries that could match the caller
(indexed SQL), so start-up does not grow with list size, and it fails open: any error leaves
the channel variables unset and the dial plan rings the call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from edgefilter.asterisk.agi import REQUIRED_CLASSIC, AgiSession, build_call, read_env, safe_value, stream_limit, unread_junk
from edgefilter.asterisk.routes import screen_route
from edgefilter.core.config import load_settings
from edgefilter.core.errors import EdgefilterError
from edgefilter.core.numbers import normalize
from edgefilter.lists.index import ListIndex
from edgefilter.outputs.decisionlog import DecisionLogger, setup_logging
from edgefilter.rules.screen import Screener
from edgefilter.store.open import open_store, store_exists

log = logging.getLogger("edgefilter.launcher")


class _StdoutWriter:
    """Just enough of asyncio.StreamWriter for AgiSession on a blocking stdout pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None

    def can_write_eof(self) -> bool:  # agi.AgiWriter; close_writer never asks without a transport
        return False

    def write_eof(self) -> None:
        return None

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default=None):
        return default


async def run(stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    settings = load_settings(None)
    setup_logging(settings.log_level)  # stderr: Asterisk logs it as AGI stderr
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=stream_limit(settings.agi.max_env_bytes))
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(stdin_fd, "rb", buffering=0, closefd=False))
    env = await read_env(reader, max_bytes=settings.agi.max_env_bytes, timeout=settings.agi.read_timeout, required=REQUIRED_CLASSIC)
    junk = unread_junk(reader)  # the rest of a block cut short by a planted blank line (SECURITY.md)
    if junk:
        env.forged.append(f"{len(junk)} bytes after the env block before any command")
    call = build_call(env)
    if call.forged:  # as the FastAGI server does: the decision line says reject, this says why
        log.warning("forged AGI env block uniqueid=%s: %s", safe_value(call.uniqueid, 40), call.forged)
    screener = Screener(settings)
    number = normalize(call.callerid, settings.default_region)
    if number.digits and store_exists(settings):
        async with open_store(settings, create=False) as store:
            idx = ListIndex()
            idx.extend(await store.candidates(number.digits))
            screener.index = idx
    session = AgiSession(reader, _StdoutWriter(stdout_fd), env, call, settings.agi.read_timeout)
    session.out_of_step = bool(junk)
    await screen_route(screener, [DecisionLogger(settings.log_format)])(session)
    return 0


def main() -> int:
    try:
        return asyncio.run(run())
    except EdgefilterError as e:
        print(f"edgefilter-agi: {e} (call not screened; the dial plan fails open)", file=sys.stderr)
        return 0

"""The event loop `edgefilter serve` runs on: uvloop when it is installed, else asyncio's own.

Most of what a FastAGI session costs beyond the decision is the event loop's own work per
connection: accepting, building the transport, the reader's callbacks, the close. uvloop (the
``fast`` extra: ``pip install 'edgefilter[fast]'``) does that work in C on libuv; measured in
docs/performance.md (issue 16). Nothing else changes: the streams, timeouts and tasks are
asyncio's, on whichever loop runs them.

``[agi] event_loop`` chooses: ``auto`` (uvloop if importable), ``uvloop`` (required: an error
if missing) or ``asyncio``. The environment variable ``EDGEFILTER_EVENT_LOOP`` overrides it
with the same words, to rule the loop in or out without touching the config.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

from edgefilter.core.errors import ConfigError

ENV = "EDGEFILTER_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def choose(configured: str = "auto") -> tuple[LoopFactory | None, str]:
    """(the loop factory for asyncio.Runner, None for asyncio's default; the loop's name)."""
    choice = os.environ.get(ENV, "").strip().lower() or configured
    if choice not in CHOICES:
        raise ConfigError(f"{ENV}={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "[agi] event_loop = \"uvloop\" (or EDGEFILTER_EVENT_LOOP=uvloop) but uvloop is not installed: "
                "pip install 'edgefilter[fast]', or choose \"auto\""
            ) from None
        return None, "asyncio"
    return uvloop.new_event_loop, f"uvloop {getattr(uvloop, '__version__', '')}".strip()


def run(main: Coroutine[Any, Any, Any], configured: str = "auto") -> Any:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        factory, _ = choose(configured)
    except BaseException:
        main.close()  # never awaited: say so quietly instead of a RuntimeWarning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """What runs the current coroutine, for the start-up log line."""
    loop = asyncio.get_running_loop()
    module = type(loop).__module__.split(".")[0]
    if module == "uvloop":
        import uvloop

        return f"uvloop {getattr(uvloop, '__version__', '')}".strip()
    return "asyncio"

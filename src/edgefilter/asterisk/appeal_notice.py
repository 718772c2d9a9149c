"""``[appeal] webhook``: the notice of each new appeal, posted to the admin's URL in the background.

Split out of appeals.py (issue 18): nothing here is on the call path or touches the offer
state; the appeal route hands each stored appeal to ``AppealNotifier`` (a bounded queue) and
``run`` posts it. appeals.py re-exports these names. Log lines keep the ``edgefilter.appeals``
logger, as before the split.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefilter.core.config import Settings
from edgefilter.store.sqlite import Appeal

log = logging.getLogger("edgefilter.appeals")


@dataclass
class AppealNotifier:
    """``[appeal] webhook``: a JSON POST per new appeal, from a bounded queue, in the background.

    Never on the call path: ``__call__`` only queues (full -> dropped and counted); ``run`` posts
    with aiohttp under ``webhook_timeout`` and logs failures (once per outage)."""

    settings: Callable[[], Settings]
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(1000))
    sent: int = 0
    failed: int = 0
    dropped: int = 0

    def __call__(self, a: Appeal) -> None:
        if not self.settings().appeal.webhook:
            return
        try:
            self.queue.put_nowait(payload(a))
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        body = await self.queue.get()  # aiohttp is loaded only once there is something to send
        import aiohttp

        failing = False
        task = asyncio.current_task()
        async with aiohttp.ClientSession() as http:
            while True:
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError  # swallowed by a library's wait_for (3.11): stop now
                a = self.settings().appeal
                try:
                    async with http.post(a.webhook, json=body, timeout=aiohttp.ClientTimeout(total=a.webhook_timeout)) as r:
                        if r.status >= 300:
                            raise RuntimeError(f"HTTP {r.status}")
                    self.sent += 1
                    if failing:
                        log.info("appeal webhook answers again")
                    failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.failed += 1
                    if not failing:
                        log.warning("appeal webhook %s failed (%s): notices are being lost", a.webhook.split("?")[0], e or type(e).__name__)
                    failing = True
                body = await self.queue.get()


def payload(a: Appeal) -> dict:
    """What the webhook receives about one appeal (our own values; no caller text but the number)."""
    return {
        "event": "appeal", "code": a.code, "caller": a.caller_e164, "ts": a.ts, "called": a.called,
        "rules": a.rules, "score": a.score, "policy": a.policy,
        "entry": {"list": a.entry_list, "pattern": a.entry_pattern, "source": a.entry_source, "category": a.entry_category}
        if a.entry_pattern else None,
        "recording": a.recording, "recording_bytes": a.recording_bytes, "node": a.node,
        "how_to_decide": f"edgefilter appeals grant {a.code}   |   edgefilter appeals deny {a.code}",
    }


def payload_json(a: Appeal) -> str:
    return json.dumps(payload(a), sort_keys=True)

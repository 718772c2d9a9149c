"""FastAGI routes: what each ``agi://host:port/<route>`` does with a session.

``screen`` decides the call and answers with one ``EXEC MSet`` of the EDGEFILTER_* variables,
then closes at once (Asterisk sends the SIP response only after the close). Everything that
follows a decision (call log, log line, metrics) runs after the close, off the caller's time.
"""

from __future__ import annotations

import logging
from typing import Callable

from .agi import AgiSession, close_writer, mset_command
from .errors import ProtocolError
from .model import Call
from .screen import Decision, Screener, channel_variables

log = logging.getLogger("edgefilter.routes")

DecisionObserver = Callable[[Decision], None]


def screen_route(screener: Screener, observers: list[DecisionObserver]):
    async def handle(session: AgiSession) -> None:
        call = session.call
        decision = await screener.screen(call)
        variables = channel_variables(decision, screener.settings)
        try:
            await session.set_variables(variables)
        except ProtocolError as e:
            # A reply that is not a reply: something in the stream was planted. Re-decide as
            # forged and send the override without waiting (Asterisk runs commands in order,
            # so this last MSet wins whatever it was reading before).
            log.warning("FastAGI stream out of step for uniqueid=%s (%s): answering as forged", call.uniqueid[:40], e)
            decision = screener.decide(_as_forged(call, "reply out of step after the env block"))
            pairs = channel_variables(decision, screener.settings)
            session.writer.write(mset_command(pairs).encode() + b"\n")
            await session.writer.drain()
        finally:
            close_writer(session.writer)
        for observe in observers:
            try:
                observe(decision)
            except Exception:
                log.exception("decision observer failed")

    return handle


def _as_forged(call: Call, why: str) -> Call:
    from dataclasses import replace

    return replace(call, forged="; ".join(filter(None, [call.forged, why])))


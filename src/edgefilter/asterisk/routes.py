"""FastAGI routes: what each ``agi://host:port/<route>`` does with a session.

``screen`` decides the call and answers with one ``EXEC MSet`` of the EDGEFILTER_* variables,
then closes at once (Asterisk sends the SIP response only after the close). Everything that
follows a decision (call log, log line, metrics) runs after the close, off the caller's time.
For a ``challenge`` verdict the same MSet carries the digit to press and the challenge id;
``challenge-result`` is where the dial plan reports the digit read (or a hang-up).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from edgefilter.asterisk.agi import CLEAR_WAIT, AgiSession, close_writer, mset_command, safe_value
from edgefilter.asterisk.challenge import ChallengeBook, ChallengeRecorder, Outcome
from edgefilter.core.errors import ProtocolError
from edgefilter.core.model import Action, Call
from edgefilter.outputs.decisionlog import escape_text
from edgefilter.rules.screen import Decision, Screener, channel_variables

log = logging.getLogger("edgefilter.routes")

DecisionObserver = Callable[[Decision], None]


def screen_route(screener: Screener, observers: list[DecisionObserver], challenges: ChallengeBook | None = None,
                 appeals=None):
    """The answer also clears the wait the shipped subroutine armed (``TIMEOUT(absolute)=0``,
    agi.CLEAR_WAIT) in the same round trip: no dial plan application is spent on it per call."""

    async def handle(session: AgiSession) -> None:
        call = session.call
        decision = await screener.screen(call)
        variables = channel_variables(decision, screener.settings)
        if challenges is not None and decision.verdict.action is Action.CHALLENGE:
            try:
                variables.update(challenges.issue(decision))
            except Exception:  # never fail the call: without an id the dial plan uses voicemail
                log.exception("issuing a challenge failed")
        if appeals is not None and decision.verdict.action is Action.REJECT:  # appeals.AppealBook
            try:
                variables.update(appeals.offer(decision))
            except Exception:  # never fail the call: EDGEFILTER_APPEAL_ID stays empty, a plain refusal
                log.exception("offering an appeal failed")
        try:
            if session.out_of_step:
                # The env block was forged and the rest of it sits where replies should be:
                # send the (forged) verdict and close without reading anything back.
                await _send_blind(session, variables)
                return
            await session.set_variables({**variables, **CLEAR_WAIT})
            junk = session.unread_junk()
            if junk:
                raise ProtocolError(f"{len(junk)} unexpected bytes after the reply")
        except ProtocolError as e:
            # A reply that is not a reply: something in the stream was planted (a blank line in
            # an AGI argument ended the env block early). Re-decide as forged and send the
            # override without waiting (Asterisk runs commands in order, so this last MSet wins
            # whatever it was reading before).
            log.warning("FastAGI stream out of step for uniqueid=%s (%s): answering as forged", safe_value(call.uniqueid, 40), e)
            decision = screener.decide(_as_forged(call, "reply out of step after the env block"))
            await _send_blind(session, channel_variables(decision, screener.settings))
        finally:
            close_writer(session.writer)
            asyncio.get_running_loop().call_soon(_observe, observers, decision)  # after the socket's close

    return handle


async def _send_blind(session: AgiSession, variables: dict[str, str]) -> None:
    line = mset_command({**variables, **CLEAR_WAIT})
    session.commands.append(line)
    session.writer.write(line.encode() + b"\n")
    await session.writer.drain()


def _as_forged(call: Call, why: str) -> Call:
    from dataclasses import replace

    return replace(call, forged="; ".join(filter(None, [call.forged, why])))



def challenge_result_route(book: ChallengeBook, recorder: ChallengeRecorder):
    """``challenge-result``: the dial plan reports the digit read (``id=..,digit=..``) or a
    hang-up (``id=..,hangup=1`` from the hangup handler). One MSet answers
    EDGEFILTER_CHALLENGE_RESULT (and a fresh digit on retry); the outcome is applied in memory
    before the answer, so the caller's next call is already allowed or scored."""

    async def handle(session: AgiSession) -> None:
        call = session.call
        outcome = book.answer(call)
        try:
            recorder.apply(outcome)
        except Exception:
            log.exception("applying a challenge outcome failed")
        try:
            await session.set_variables(outcome.variables())
        finally:
            close_writer(session.writer)
        _log_outcome(call, outcome)

    return handle


def _log_outcome(call: Call, outcome: Outcome) -> None:
    p = outcome.pending
    caller = escape_text(p.number.e164 or p.number.raw, 40) if p else "-"
    attempts = p.attempts if p else 0
    level = logging.WARNING if outcome.result == "unknown" else logging.INFO
    log.log(
        level,
        "challenge result=%s caller=\"%s\" attempts=%d reason=\"%s\" uniqueid=%s",
        outcome.result, caller, attempts, outcome.reason, escape_text(call.uniqueid, 40),
    )


def _observe(observers: list[DecisionObserver], decision: Decision) -> None:
    """After the close, on the next turn of the event loop: closing a transport only schedules
    the socket's close, so observers run inline would keep Asterisk waiting for the EOF (and the
    caller for the SIP response) while the log line and the call record are made (issue 16:
    about 0.2 ms at p50 at 20 calls/s). call_soon keeps decisions in order."""
    for observe in observers:
        try:
            observe(decision)
        except Exception:
            log.exception("decision observer failed")

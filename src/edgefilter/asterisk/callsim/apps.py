"""The dial plan applications the double runs through ``EXEC``: Set, MSet, Hangup, Busy, ...

Split out of callsim.py (issue 18). MSet splits its data exactly as Asterisk does
(``_separate_args``), which is what the service's MSet answers are tested against; Hangup takes
a cause by name or number as ``ast_str2cause`` does. Tests may remove an application from
``_APPS`` to play an older Asterisk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from edgefilter.asterisk.callsim.wire import STATE_UP, _scan_int, _separate_args

if TYPE_CHECKING:  # the channel runs these through the command table: a runtime import would be circular
    from edgefilter.asterisk.callsim.channel import _AgiSession

# ast_str2cause(): a case-insensitive *prefix* match on these names.
_CAUSES = {
    b"UNALLOCATED": 1,
    b"NO_ROUTE_TRANSIT_NET": 2,
    b"NO_ROUTE_DESTINATION": 3,
    b"CHANNEL_UNACCEPTABLE": 6,
    b"CALL_AWARDED_DELIVERED": 7,
    b"NORMAL_CLEARING": 16,
    b"USER_BUSY": 17,
    b"NO_USER_RESPONSE": 18,
    b"NO_ANSWER": 19,
    b"SUBSCRIBER_ABSENT": 20,
    b"CALL_REJECTED": 21,
    b"NUMBER_CHANGED": 22,
    b"REDIRECTED_TO_NEW_DESTINATION": 23,
    b"ANSWERED_ELSEWHERE": 26,
    b"DESTINATION_OUT_OF_ORDER": 27,
    b"INVALID_NUMBER_FORMAT": 28,
    b"FACILITY_REJECTED": 29,
    b"RESPONSE_TO_STATUS_ENQUIRY": 30,
    b"NORMAL_UNSPECIFIED": 31,
    b"NORMAL_CIRCUIT_CONGESTION": 34,
    b"NETWORK_OUT_OF_ORDER": 38,
    b"NORMAL_TEMPORARY_FAILURE": 41,
    b"SWITCH_CONGESTION": 42,
    b"BEARERCAPABILITY_NOTAVAIL": 58,
    b"INTERWORKING": 127,
}


def _app_set(s: _AgiSession, data: bytes) -> int:
    """Set(name=value): one pair, split on the first '=' (so commas stay in the value)."""
    name, eq, value = data.partition(b"=")
    if data and eq:
        s.set_var(name, value)
    return 0


def _app_mset(s: _AgiSession, data: bytes) -> int:
    """MSet(a=1,b=2): separate_args on ',' (24 slots), then each pair on the first '='."""
    if not data:
        return 0
    for pair in _separate_args(data, 0x2C, 24):
        parts = _separate_args(pair, 0x3D, 2)
        if len(parts) == 2:
            s.set_var(parts[0], parts[1])
    return 0


def _parse_cause(data: bytes) -> int:
    cause = 0
    upper = data.strip().upper()
    for name, code in _CAUSES.items():
        if upper.startswith(name):
            cause = code
            break
    if cause <= 0:
        scanned = _scan_int(data)
        cause = scanned if scanned is not None and scanned > 0 else 0
    return cause


def _app_hangup(s: _AgiSession, data: bytes) -> int:
    cause = _parse_cause(data) if data else 0
    if cause <= 0:
        cause = s.hangupcause if s.hangupcause > 0 else 16  # AST_CAUSE_NORMAL_CLEARING
    s.hangupcause = cause
    s.result.hangup_cause = cause
    s.hang_up()
    return -1


def _hangup_with_indication(cause: int) -> Callable[[_AgiSession, bytes], int]:
    """Busy()/Congestion(): modelled as the caller hanging up on hearing the tone."""

    def app(s: _AgiSession, data: bytes) -> int:
        if s.state != STATE_UP and not s.hungup:
            s.hangupcause = cause
            s.result.hangup_cause = cause
        s.hang_up()
        return -1

    return app


def _app_media(answers: bool) -> Callable[[_AgiSession, bytes], int]:
    """Playback/Wait/Answer: -1 once the channel is gone, else 0 (no time passes)."""

    def app(s: _AgiSession, data: bytes) -> int:
        if s.hungup:
            return -1
        if answers and b"noanswer" not in data.lower():
            s.state = STATE_UP
        return 0

    return app


def _app_noop(s: _AgiSession, data: bytes) -> int:
    return 0


_APPS: dict[bytes, Callable[[_AgiSession, bytes], int]] = {
    b"set": _app_set,
    b"mset": _app_mset,
    b"hangup": _app_hangup,
    b"busy": _hangup_with_indication(17),
    b"congestion": _hangup_with_indication(34),
    b"playback": _app_media(answers=True),
    b"answer": _app_media(answers=True),
    b"wait": _app_media(answers=False),
    b"noop": _app_noop,
    b"verbose": _app_noop,
    b"log": _app_noop,
}

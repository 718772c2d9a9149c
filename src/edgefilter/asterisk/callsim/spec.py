"""The two records of a simulated call: CallSpec (what Asterisk sends, how the channel behaves)
and CallResult (what happened).

Split out of callsim.py (issue 18) so that the env block builder, the channel and the client
share them without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class CallSpec:
    """What Asterisk would send for one call, plus how the simulated channel behaves.

    Defaults look like an inbound PJSIP call.  ``bytes`` values are written to
    the wire untouched (after Asterisk's own normalisation when ``truncate`` is
    on), ``str`` values are UTF-8 encoded.  A name of ``None``/``""``/``"unknown"``
    means "no display name": ``agi_calleridname: unknown`` in the environment
    but ``200 result=1 ()`` from ``GET VARIABLE CALLERID(name)``, as on the real
    Asterisk (callerid README finding 7).
    """

    callerid: bytes | str | None = b"+8613800138000"
    calleridname: bytes | str | None = b"unknown"
    dnid: bytes | str | None = b"1000"
    extension: bytes | str = b"1000"
    context: bytes | str = b"from-trunk"
    channel: bytes | str = b"PJSIP/trunk-00000001"
    uniqueid: bytes | str | None = None  # generated unique per call ("<epoch>.<n>") when None
    script: str = "screen"  # path after host:port, may carry ?query; or a whole agi:// URL
    args: Sequence[bytes | str] = ()  # AGI(url,arg1,arg2) -> agi_arg_1, agi_arg_2
    callingpres: int = 0
    rdnis: bytes | str | None = b"unknown"
    extra: dict | None = None  # {"agi_priority": 3} overrides; value None drops the line
    raw_env: bytes | None = None  # sent verbatim instead of the env block (hostile tests)
    digits: bytes = b""  # DTMF the caller "presses", consumed by WAIT FOR DIGIT/STREAM FILE/GET DATA
    hangup_after_commands: int | None = None  # channel dies (idle) after answering N commands
    hangup_before_commands: bool = False  # channel dies right after the env block
    hangup_during_command: int | None = None  # channel dies while running command N (1-based)
    hangup_after_seconds: float | None = None  # channel dies N s after the env block was sent
    threadid: int | None = None  # agi_threadid; DEFAULT_THREADID when None
    channel_vars: dict | None = None  # channel variables set before the AGI ran (e.g. AGIEXECFULL)
    exit_on_hangup: bool = False  # AGIEXITONHANGUP=yes: Asterisk closes the socket after HANGUP


@dataclass
class CallResult:
    """What happened on one simulated call.

    ``replies`` holds every write Asterisk made after the env block, in order,
    one entry per ``ast_agi_send`` (a 520 usage reply is three entries), and
    includes the unsolicited ``HANGUP\\n`` lines and the final one written after
    the server closed (which a real server never reads).
    ``pipelined`` counts command lines that, when read, already had more server
    bytes waiting behind them (the server sent before getting the reply); a
    correct server keeps it at 0.  Those commands also stall, as on Asterisk.
    ``agistatus`` is what the dial plan sees next; ``elapsed`` runs from the
    env block's first byte to the server's close (or to the timeout).
    """

    variables: dict[str, str] = field(default_factory=dict)
    raw_variables: dict[bytes, bytes] = field(default_factory=dict)
    commands: list[bytes] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)
    transcript: list[tuple[str, bytes]] = field(default_factory=list)
    env: bytes = b""
    hangup_cause: int | None = None
    closed_by_server: bool = False
    timed_out: bool = False
    pipelined: int = 0
    elapsed: float = 0.0
    agistatus: str = "SUCCESS"
    channel_dead: bool = False
    uniqueid: str = ""
    error: str | None = None


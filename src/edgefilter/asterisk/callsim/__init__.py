"""A FastAGI *client* that talks to a FastAGI server the way Asterisk 22 does.

Why this exists: the screening server must be tested against what Asterisk
really sends, not what a hand-written fake assumes.  Every behaviour here is
taken from the golden captures in ``shared/fixtures/asterisk`` (a real
Asterisk 22.10.1) and from ``res/res_agi.c`` (``setup_env``, ``run_agi``,
``parse_args``, ``agi_handle_command`` and the command handlers), including the
uncomfortable parts a server has to survive:

* the environment block is written raw: a caller id holding ``\\n`` really
  breaks lines and can forge the end of the block (callerid-09g);
* commands are answered one at a time; several commands arriving in one
  write are *not* answered until more bytes arrive (res_agi reads through a
  stdio buffer but polls the socket), so a pipelining server stalls;
* when the channel dies an unsolicited ``HANGUP\\n`` line is written, the
  session goes on in "dead" mode (``511`` for media commands), and
  ``HANGUP\\n`` is written once more when the server closes the socket;
* Asterisk never closes the socket first: the session ends when the server
  closes it (or when our overall timeout fires, which we report).

It is used three ways: as the Asterisk test double in the test suite, by the
``edgefilter try-call`` CLI command, and by the load benchmark.  Hence: stdlib
asyncio only, no sleeps on the hot path (prompts "play" instantly, DTMF comes
from a queue), one asyncio Protocol per call.

Split by concern (issue 18); every name importers use is re-exported here:

* ``wire``: constants mirrored from res_agi.c, C-string and argument-splitting rules;
* ``spec``: CallSpec and CallResult;
* ``env``: the env block (``build_env``), the subroutine's calls, golden transcripts;
* ``channel``: the simulated channel and the ``run_agi`` loop;
* ``commands`` and ``apps``: the AGI commands and the dial plan applications behind EXEC;
* ``client``: ``place_call``.
"""

from __future__ import annotations

from edgefilter.asterisk.callsim.apps import _APPS as _APPS
from edgefilter.asterisk.callsim.client import place_call
from edgefilter.asterisk.callsim.env import build_env, load_transcript, subroutine_call, transcript_env
from edgefilter.asterisk.callsim.spec import CallResult, CallSpec
from edgefilter.asterisk.callsim.wire import ASTERISK_VERSION, parse_agi_args
from edgefilter.asterisk.callsim.wire import _separate_args as _separate_args

__all__ = [
    "CallSpec",
    "CallResult",
    "place_call",
    "build_env",
    "parse_agi_args",
    "load_transcript",
    "transcript_env",
    "ASTERISK_VERSION",
    "subroutine_call",
]

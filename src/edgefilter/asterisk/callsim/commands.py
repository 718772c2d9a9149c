"""The AGI commands the double answers, in res_agi's table order, with their usage texts.

Split out of callsim.py (issue 18): one handler per command (``agi_handle_command``'s table),
each answering as the C handler does, ``RESULT_SHOWUSAGE`` included (the 520 usage texts are
in ``_USAGE``); ``EXEC`` runs the dial plan applications of apps.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from edgefilter.asterisk.callsim.apps import _APPS
from edgefilter.asterisk.callsim.wire import (
    GETVAR_BUF,
    RESULT_FAILURE,
    RESULT_SHOWUSAGE,
    RESULT_SUCCESS,
    STATE_UP,
    STREAM_ENDPOS,
    STREAM_INTERRUPTED_ENDPOS,
    _atoi,
    _b,
    _cstr,
    _is_true,
    _scan_int,
)

if TYPE_CHECKING:  # the channel imports this table: a runtime import would be circular
    from edgefilter.asterisk.callsim.channel import _AgiSession

# Usage texts sent between the 520 lines: the <para>s of each command's XML
# description, whitespace collapsed, one line per <para>.  GET VARIABLE's text is
# verified byte for byte against fastagi-reply-formats.txt; the others follow the
# same rendering rule from the same XML.
_USAGE = {
    ("get", "variable"): (
        b"Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set. "
        b"Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set and returns "
        b"the variable in parentheses.\n"
        b"Example return code: 200 result=1 (testvariable)"
    ),
    ("get", "full", "variable"): (
        b"Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set or channel "
        b"does not exist. Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set "
        b"and returns the variable in parenthesis. Understands complex variable names and builtin "
        b"variables, unlike GET VARIABLE.\n"
        b"Example return code: 200 result=1 (testvariable)"
    ),
    ("set", "variable"): b"Sets a variable to the current channel.",
    ("exec",): (
        b"Executes <replaceable>application</replaceable> with given <replaceable>options</replaceable>.\n"
        b"Returns whatever the <replaceable>application</replaceable> returns, or <literal>-2</literal> "
        b"on failure to find <replaceable>application</replaceable>."
    ),
    ("verbose",): (
        b"Sends <replaceable>message</replaceable> to the console via verbose message system. "
        b"<replaceable>level</replaceable> is the verbose level (1-4). Always returns <literal>1</literal>"
    ),
    ("wait", "for", "digit"): (
        b"Waits up to <replaceable>timeout</replaceable> milliseconds for channel to receive a DTMF "
        b"digit. Returns <literal>-1</literal> on channel failure, <literal>0</literal> if no digit is "
        b"received in the timeout, or the numerical value of the ascii of the digit if one is received. "
        b"Use <literal>-1</literal> for the <replaceable>timeout</replaceable> value if you desire the "
        b"call to block indefinitely."
    ),
    ("stream", "file"): (
        b"Send the given file, allowing playback to be interrupted by the given digits, if any. "
        b"Returns <literal>0</literal> if playback completes without a digit being pressed, or the "
        b"ASCII numerical value of the digit if one was pressed, or <literal>-1</literal> on error or "
        b"if the channel was disconnected. If musiconhold is playing before calling stream file it "
        b"will be automatically stopped and will not be restarted after completion."
    ),
    ("get", "data"): (
        b"Stream the given <replaceable>file</replaceable>, and receive DTMF data.\n"
        b"Returns the digits received from the channel at the other end."
    ),
    ("hangup",): (
        b"Hangs up the specified channel. If no channel name is given, hangs up the current channel"
    ),
    ("channel", "status"): (
        b"Returns the status of the specified <replaceable>channelname</replaceable>. If no channel "
        b"name is given then returns the status of the current channel.\n"
        b"Return values:"
    ),
    ("set", "context"): b"Sets the context for continuation upon exiting the application.",
    ("set", "extension"): b"Changes the extension for continuation upon exiting the application.",
    ("set", "priority"): (
        b"Changes the priority for continuation upon exiting the application. The priority must be "
        b"a valid priority or label."
    ),
    ("database", "get"): (
        b"Retrieves an entry in the Asterisk database for a given <replaceable>family</replaceable> "
        b"and <replaceable>key</replaceable>.\n"
        b"Returns <literal>0</literal> if <replaceable>key</replaceable> is not set. Returns "
        b"<literal>1</literal> if <replaceable>key</replaceable> is set and returns the variable in "
        b"parenthesis.\n"
        b"Example return code: 200 result=1 (testvariable)"
    ),
}


def _h_answer(s: _AgiSession, argv: list[bytes]) -> int:
    res = 0
    if s.state != STATE_UP:
        if s.hungup:
            res = -1
        else:
            s.state = STATE_UP
    s.reply(f"200 result={res}")
    return RESULT_SUCCESS if res >= 0 else RESULT_FAILURE


def _h_channel_status(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) == 2:
        s.reply(f"200 result={s.state}")
    elif len(argv) == 3:
        ours = argv[2] == (_b(s.spec.channel) or b"")
        s.reply(f"200 result={s.state}" if ours else "200 result=-1")
    else:
        return RESULT_SHOWUSAGE
    return RESULT_SUCCESS


def _h_exec(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 2:
        return RESULT_SHOWUSAGE
    app = _APPS.get(argv[1].lower())
    if app is None:
        res = -2  # "Could not find application"
    else:
        data = argv[2] if len(argv) > 2 else b""
        if len(argv) > 2 and _is_true(s.vars.get(b"AGIEXECFULL")):
            data = s.substitute(data)
        res = app(s, data)
    s.reply(f"200 result={res}")
    return RESULT_SUCCESS  # handle_exec returns the app's result; never RESULT_FAILURE (2)


def _h_get_data(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 3:
        return RESULT_SHOWUSAGE
    maxlen = _atoi(argv[4]) if len(argv) >= 5 else 1024
    maxlen = min(maxlen, 1023)
    if s.hungup or maxlen <= 0:
        s.reply("200 result=-1")
        return RESULT_SUCCESS
    got = bytearray()
    while True:
        d = s.next_digit()
        if d == 0:  # no more key presses: the inter-digit timeout expires
            s.reply(b"200 result=" + bytes(got) + b" (timeout)")
            return RESULT_SUCCESS
        if d == 0x23:  # '#' ends input and is not returned
            break
        got.append(d)
        if len(got) >= maxlen:
            break
    s.reply(b"200 result=" + bytes(got))
    return RESULT_SUCCESS


def _h_get_full_variable(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) not in (4, 5):
        return RESULT_SHOWUSAGE
    if len(argv) == 5 and argv[4] != (_b(s.spec.channel) or b""):
        s.reply("200 result=0")
        return RESULT_SUCCESS
    s.reply(b"200 result=1 (" + s.substitute(argv[3]) + b")")
    return RESULT_SUCCESS


def _h_get_variable(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    value = s.lookup(argv[2]) if argv[2] else None
    if value is None:
        s.reply("200 result=0")
    else:
        s.reply(b"200 result=1 (" + _cstr(value)[: GETVAR_BUF - 1] + b")")
    return RESULT_SUCCESS


def _h_hangup(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) == 1:
        s.hang_up()
        s.reply("200 result=1")
    elif len(argv) == 2:
        if argv[1] == (_b(s.spec.channel) or b""):
            s.hang_up()
            s.reply("200 result=1")
        else:
            s.reply("200 result=-1")
    else:
        return RESULT_SHOWUSAGE
    return RESULT_SUCCESS


def _h_noop(s: _AgiSession, argv: list[bytes]) -> int:
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_set_variable(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 4:  # an unquoted value with spaces lands here: nothing is set
        return RESULT_SHOWUSAGE
    s.set_var(argv[2], argv[3])
    s.reply("200 result=1")
    return RESULT_SUCCESS


def _h_stream_file(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 4 or len(argv) > 5:
        return RESULT_SHOWUSAGE
    offset = 0
    if len(argv) > 4:
        scanned = _scan_int(argv[4])
        if scanned is None:
            return RESULT_SHOWUSAGE
        offset = scanned
    if s.hungup:
        s.reply(f"200 result=-1 endpos={offset}")
        return RESULT_FAILURE
    # Only a pressed escape digit interrupts; others stay queued for the next command.
    if s.digits and s.digits[0] in argv[3]:
        d = s.next_digit()
        s.reply(f"200 result={d} endpos={offset + STREAM_INTERRUPTED_ENDPOS}")
    else:
        s.reply(f"200 result=0 endpos={offset + STREAM_ENDPOS}")
    return RESULT_SUCCESS


def _h_get_option(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 4 or len(argv) > 5:
        return RESULT_SHOWUSAGE
    if s.hungup:
        s.reply("200 result=-1 endpos=0")
        return RESULT_FAILURE
    d = s.next_digit() if s.digits and s.digits[0] in argv[3] else 0
    s.reply(f"200 result={d} endpos={STREAM_INTERRUPTED_ENDPOS if d else STREAM_ENDPOS}")
    return RESULT_SUCCESS


def _h_verbose(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 2:
        return RESULT_SHOWUSAGE
    s.reply("200 result=1")
    return RESULT_SUCCESS


def _h_wait_for_digit(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 4 or _scan_int(argv[3]) is None:
        return RESULT_SHOWUSAGE
    if s.hungup:
        s.reply("200 result=-1")
        return RESULT_FAILURE
    s.reply(f"200 result={s.next_digit()}")  # 0 = timeout, never actually waited for
    return RESULT_SUCCESS


def _h_set_callerid(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) > 2:
        m = re.match(rb'\s*(?:"?([^"<]*?)"?\s*)?<([^>]*)>', argv[2])
        if m:
            s.cid_name, s.cid_num = (m.group(1) or b"").strip(), m.group(2)
        else:
            s.cid_num, s.cid_name = argv[2], b""
    s.reply("200 result=1")
    return RESULT_SUCCESS


def _h_set_context(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    s.context = argv[2]
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_set_extension(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    s.exten = argv[2]
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_set_priority(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    pri = _scan_int(argv[2])
    if pri is None or pri < 1:
        return RESULT_SHOWUSAGE  # labels are not modelled
    s.priority = pri
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_db_get(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 4:
        return RESULT_SHOWUSAGE
    value = s.astdb.get((argv[2], argv[3]))
    s.reply("200 result=0" if value is None else b"200 result=1 (" + value + b")")
    return RESULT_SUCCESS


def _h_db_put(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 5:
        return RESULT_SHOWUSAGE
    s.astdb[(argv[2], argv[3])] = argv[4]
    s.reply("200 result=1")
    return RESULT_SUCCESS


def _h_db_del(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 4:
        return RESULT_SHOWUSAGE
    found = s.astdb.pop((argv[2], argv[3]), None) is not None
    s.reply("200 result=1" if found else "200 result=0")
    return RESULT_SUCCESS


def _h_db_deltree(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) not in (3, 4):
        return RESULT_SHOWUSAGE
    keys = [k for k in s.astdb if k[0] == argv[2] and (len(argv) == 3 or k[1].startswith(argv[3]))]
    for k in keys:
        del s.astdb[k]
    s.reply("200 result=0" if keys else "200 result=1")  # sic: res_agi inverts this one
    return RESULT_SUCCESS


def _h_say(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 4:
        return RESULT_SHOWUSAGE
    if s.hungup:
        s.reply("200 result=-1")
        return RESULT_FAILURE
    d = s.next_digit() if s.digits and s.digits[0] in argv[3] else 0
    s.reply(f"200 result={d}")
    return RESULT_SUCCESS


def _h_zero(s: _AgiSession, argv: list[bytes]) -> int:
    """Commands whose only visible effect here is ``200 result=0``."""
    s.reply("200 result=0")
    return RESULT_SUCCESS


def _h_receive_char(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    s.reply("200 result=0 (timeout)")
    return RESULT_SUCCESS


def _h_receive_text(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) != 3:
        return RESULT_SHOWUSAGE
    s.reply("200 result=-1")
    return RESULT_SUCCESS


def _h_record_file(s: _AgiSession, argv: list[bytes]) -> int:
    if len(argv) < 6 or _scan_int(argv[5]) is None:
        return RESULT_SHOWUSAGE
    if s.hungup:
        s.reply("200 result=-1 (hangup) endpos=0")
        return RESULT_FAILURE
    s.reply(f"200 result=0 (timeout) endpos={STREAM_ENDPOS}")
    return RESULT_SUCCESS


# In res_agi's table order: find_command returns the first entry whose words all match.
_Handler = Callable[["_AgiSession", list[bytes]], int]
_COMMANDS: list[tuple[tuple[str, ...], _Handler, bool]] = [
    (("answer",), _h_answer, False),
    (("asyncagi", "break"), _h_zero, True),
    (("channel", "status"), _h_channel_status, False),
    (("database", "del"), _h_db_del, True),
    (("database", "deltree"), _h_db_deltree, True),
    (("database", "get"), _h_db_get, True),
    (("database", "put"), _h_db_put, True),
    (("exec",), _h_exec, True),
    (("get", "data"), _h_get_data, False),
    (("get", "full", "variable"), _h_get_full_variable, True),
    (("get", "option"), _h_get_option, False),
    (("get", "variable"), _h_get_variable, True),
    (("hangup",), _h_hangup, False),
    (("noop",), _h_noop, True),
    (("receive", "char"), _h_receive_char, False),
    (("receive", "text"), _h_receive_text, False),
    (("record", "file"), _h_record_file, False),
    (("say", "alpha"), _h_say, False),
    (("say", "digits"), _h_say, False),
    (("say", "number"), _h_say, False),
    (("say", "phonetic"), _h_say, False),
    (("say", "date"), _h_say, False),
    (("say", "time"), _h_say, False),
    (("say", "datetime"), _h_say, False),
    (("send", "image"), _h_zero, False),
    (("send", "text"), _h_zero, False),
    (("set", "autohangup"), _h_zero, False),
    (("set", "callerid"), _h_set_callerid, False),
    (("set", "context"), _h_set_context, False),
    (("set", "extension"), _h_set_extension, False),
    (("set", "music"), _h_zero, False),
    (("set", "priority"), _h_set_priority, False),
    (("set", "variable"), _h_set_variable, True),
    (("stream", "file"), _h_stream_file, False),
    (("control", "stream", "file"), _h_zero, False),
    (("tdd", "mode"), _h_zero, False),
    (("verbose",), _h_verbose, True),
    (("wait", "for", "digit"), _h_wait_for_digit, False),
    (("speech", "create"), _h_zero, False),
    (("speech", "set"), _h_zero, False),
    (("speech", "destroy"), _h_zero, True),
    (("speech", "load", "grammar"), _h_zero, False),
    (("speech", "unload", "grammar"), _h_zero, True),
    (("speech", "activate", "grammar"), _h_zero, False),
    (("speech", "deactivate", "grammar"), _h_zero, False),
    (("speech", "recognize"), _h_zero, False),
    (("gosub",), _h_zero, False),
]


def _find_command(argv: list[bytes]) -> tuple[tuple[str, ...], _Handler, bool] | None:
    """find_command(argv, 0): all words of the command must match, case-insensitively."""
    lowered = [a.lower() for a in argv[:3]]
    for words, handler, dead_ok in _COMMANDS:
        if len(lowered) >= len(words) and all(
            lowered[i] == w.encode() for i, w in enumerate(words)
        ):
            return words, handler, dead_ok
    return None

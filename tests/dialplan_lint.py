"""Run asterisklint's dialplan-check on a dial plan, knowing the applications it lacks.

asterisklint 0.4.3 (the latest release) predates PJSIPHangup (Asterisk 18.21/20.6/21.1) and has
no SendText (core app since 1.0) nor MSet (core since 1.6); registering them as plain apps keeps every other check (unknown
applications, argument syntax, unbalanced brackets, goto targets) strict. Run in a subprocess: the
linter keeps its findings in process-wide singletons.

Usage: python tests/dialplan_lint.py asterisk-conf/extensions-example.conf   (exit 1 on findings)
"""

from __future__ import annotations

import sys

from asterisklint import FileDialplanParser
from asterisklint.app.base import AppBase
from asterisklint.application import AppLoader
from asterisklint.defines import MessageDefManager

#: Applications real Asterisk 22 has and asterisklint 0.4.3 does not know.
EXTRA_APPS = ("PJSIPHangup", "SendText", "MSet")


def main(path: str) -> int:
    loader = AppLoader()
    for name in EXTRA_APPS:
        loader.register(type(name, (AppBase,), {})())
    parser = FileDialplanParser()
    parser.include(path)
    dialplan = next(iter(parser))
    dialplan.walk_jump_destinations()
    return 1 if any(not m[0].muted for m in MessageDefManager.raised.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""A fake Asterisk Manager on loopback that replays the real AMI byte streams of the fixtures.

The fixtures (shared/fixtures/asterisk/ami-*.txt) hold every line a real Asterisk 22 sent, ``A>``
prefixed; on the wire each line ends in CRLF and a message ends with an empty line. The server
answers Login, Ping and Logoff with the recorded replies (ActionID swapped for the client's), can
push the recorded event stream of a call to every logged-in client, drop connections, go silent
(a dead peer that keeps the socket open), refuse logins like the failed-login fixture, and be
stopped and started again on the same port (an Asterisk restart).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from .conftest import FIXTURES

CRLF = b"\r\n"


def parse_fixture(name: str) -> list[tuple[str, list[str]]]:
    """[('banner', [line]), ('A', lines), ('C', lines), ('EOF', [])] in fixture order."""
    out: list[tuple[str, list[str]]] = []
    cur: list[str] | None = None
    cur_dir = ""
    for raw in (FIXTURES / name).read_text(encoding="utf-8").splitlines():
        if raw.startswith("# ") and "EOF" in raw:
            out.append(("EOF", []))
            continue
        if not (raw.startswith("A>") or raw.startswith("C>")):
            continue
        d, text = raw[0], raw[3:] if len(raw) > 2 else ""
        if d == "A" and not out and text.startswith("Asterisk Call Manager/"):
            out.append(("banner", [text]))
            continue
        if text == "":
            if cur is not None:
                out.append((cur_dir, cur))
            cur = None
            continue
        if cur is None:
            cur, cur_dir = [], d
        cur.append(text)
    return out


def wire(lines: list[str], action_id: str | None = None) -> bytes:
    buf = b""
    for line in lines:
        if action_id is not None and line.startswith("ActionID: "):
            line = f"ActionID: {action_id}"
        buf += line.encode("utf-8") + CRLF
    return buf + CRLF


def _reply_after(script, action: str) -> tuple[list[list[str]], bool]:
    """The A messages that follow the client's ``action`` in a script, and whether EOF follows."""
    replies: list[list[str]] = []
    for i, (d, lines) in enumerate(script):
        if d == "C" and any(ln.lower() == f"action: {action.lower()}" for ln in lines):
            for d2, l2 in script[i + 1:]:
                if d2 == "A":
                    replies.append(l2)
                elif d2 == "EOF":
                    return replies, True
                else:
                    break
            return replies, False
    raise KeyError(action)


def call_events(name: str) -> list[list[str]]:
    """The event messages of a recorded call: every event after the client's Ping (the capture
    pinged, then originated the call, or watched another client originate it) until Logoff."""
    script = parse_fixture(name)
    events, started = [], False
    for d, lines in script:
        if d == "C":
            if lines[0] == "Action: Ping":
                started = True
            elif lines[0] == "Action: Logoff":
                break
            continue
        if started and d == "A" and lines[0].startswith("Event: "):
            events.append(lines)
    return events


class FakeAmi:
    def __init__(self, port: int = 0, *, login: str = "ami-login-ping-logoff.txt", close_delay: float = 0.05) -> None:
        self.port = port
        self.good = parse_fixture(login)
        self.bad = parse_fixture("ami-failed-login.txt")
        self.refuse_login = False
        self.silent = False
        self.close_delay = close_delay  # the real Asterisk closes ~1 s after a failed login
        self.server: asyncio.AbstractServer | None = None
        self.clients: list[asyncio.StreamWriter] = []
        self.logged_in: list[asyncio.StreamWriter] = []
        self.received: list[dict[str, str]] = []
        self.connections = 0
        self.connect_times: list[float] = []
        self.replies: dict[str, list[str]] = {}  # action (lower) -> reply lines for other actions

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def drop(self) -> None:
        for w in self.clients:
            w.transport.abort()
        self.clients.clear()
        self.logged_in.clear()

    async def push(self, events: list[list[str]]) -> None:
        for w in list(self.logged_in):
            for lines in events:
                w.write(wire(lines))
            await w.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.connect_times.append(asyncio.get_running_loop().time())
        self.clients.append(writer)
        script = self.bad if self.refuse_login else self.good
        writer.write(script[0][1][0].encode() + CRLF)
        try:
            while True:
                msg = await self._read_message(reader)
                if msg is None:
                    return
                self.received.append(msg)
                action = msg.get("Action", "").lower()
                aid = msg.get("ActionID", "")
                if self.silent:
                    continue
                if action in ("login", "ping", "logoff"):
                    replies, eof = _reply_after(script, action.capitalize())
                    for lines in replies:
                        writer.write(wire(lines, aid if lines[0].startswith("Response:") else None))
                    await writer.drain()
                    if action == "login" and not self.refuse_login:
                        self.logged_in.append(writer)
                    if eof:
                        await asyncio.sleep(self.close_delay)
                        writer.close()
                        return
                else:
                    lines = self.replies.get(action, ["Response: Success", "ActionID: x", "Message: OK"])
                    writer.write(wire(lines, aid))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if writer in self.logged_in:
                self.logged_in.remove(writer)

    @staticmethod
    async def _read_message(reader: asyncio.StreamReader) -> dict[str, str] | None:
        msg: dict[str, str] = {}
        while True:
            try:
                line = await reader.readuntil(CRLF)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            line = line[:-2]
            if not line:
                if msg:
                    return msg
                continue
            k, _, v = line.decode("utf-8", "replace").partition(": ")
            msg[k] = v


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["FakeAmi", "parse_fixture", "call_events", "wire", "free_port", "Path"]

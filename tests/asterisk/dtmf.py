"""RFC 2833 key presses as pcap files for sipp's play_pcap_audio, with the RTP numbering we choose.

sipp replays a capture's RTP headers as they are: dtmf_2833_*.pcap from sip-tester each carry a
fixed sequence number and timestamp, and Asterisk drops a burst whose timestamp is not newer than
the last one (a replay of the same file, or "*" (ts 85760) followed by "0" (ts 17632)). To press
"*0" as a phone does, each key here gets a later sequence number and timestamp than the one
before, in one RTP stream (one SSRC), laid out like sip-tester's files: seven event packets 20 ms
apart, then the end packet three times.
"""

from __future__ import annotations

import struct
from pathlib import Path

EVENTS = {**{str(d): d for d in range(10)}, "*": 10, "#": 11}
SSRC = 0x0E05384E  # sip-tester's stream, so that a press may follow one of its files


def _packet(seq: int, ts: int, event: int, end: bool, duration: int, marker: bool) -> bytes:
    rtp = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | 101, seq & 0xFFFF, ts & 0xFFFFFFFF, SSRC)
    rtp += struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)
    udp = struct.pack("!HHHH", 49176, 10000, 8 + len(rtp), 0) + rtp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([192, 168, 0, 3]), bytes([192, 168, 0, 1]))
    return b"\x00\x50\xbf\x99\x03\x36\x00\x0d\x87\x14\xac\x24\x08\x00" + ip + udp


def write_keys(path: Path, keys: str, *, seq: int = 20000, ts: int = 200000, gap_ms: int = 200) -> Path:
    """A pcap pressing ``keys`` one after another (``gap_ms`` between them)."""
    records = []
    t = 0.0
    for key in keys:
        event = EVENTS[key]
        for i in range(7):
            records.append((t, _packet(seq, ts, event, False, 320 * i, i == 0)))
            seq += 1
            t += 0.02
        for _ in range(3):
            records.append((t, _packet(seq, ts, event, True, 2240, False)))
        seq += 1
        ts += 8 * (140 + gap_ms)  # 8 kHz clock: the next key starts after this one and the gap
        t += gap_ms / 1000
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for when, pkt in records:
        sec = int(when)
        out.append(struct.pack("<IIII", 1_700_000_000 + sec, int((when - sec) * 1e6), len(pkt), len(pkt)) + pkt)
    path.write_bytes(b"".join(out))
    return path

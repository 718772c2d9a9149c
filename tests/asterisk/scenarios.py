"""sipp scenarios the real-Asterisk tests need beyond the shipped ones (asterisk-conf/sipp/).

Each function writes one scenario file and returns its path. The INVITE is the same as the
shipped scenarios' (PCMU + RFC 2833 telephone-event), with the From line, extra headers and what
is expected after it as parameters, so that a test states exactly what the caller sends and what
it must get back: sipp fails (exit code 1) on any response the scenario does not expect, so an
answer where a refusal was expected can never pass.
"""

from __future__ import annotations

import re
from pathlib import Path

SDP = """v=0
      o=sipp 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0 8 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:8 PCMA/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-16
"""

HEAD = '<?xml version="1.0" encoding="ISO-8859-1" ?>\n<!DOCTYPE scenario SYSTEM "sipp.dtd">\n'


def _invite(from_line: str, headers: str = "", cseq: int = 1, auth: bool = False) -> str:
    extra = "".join(f"      {h}\n" for h in headers.splitlines() if h.strip())
    authline = "      [authentication]\n" if auth else ""
    return f"""  <send retrans="500">
    <![CDATA[

      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      {from_line};tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: {cseq} INVITE
      Contact: <sip:[local_ip]:[local_port]>
{authline}{extra}      Max-Forwards: 70
      Subject: edgefilter test
      Content-Type: application/sdp
      Content-Length: [len]

      {SDP}
    ]]>
  </send>
"""


def _ack(cseq: int = 1) -> str:
    return f"""  <send>
    <![CDATA[

      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      [last_From:]
      [last_To:]
      Call-ID: [call_id]
      CSeq: {cseq} ACK
      Contact: <sip:[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""


def _ok_to_request() -> str:
    return """  <send>
    <![CDATA[

      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port]>
      Content-Length: 0

    ]]>
  </send>
"""


def _bye(cseq: int, from_line: str) -> str:
    """The caller hangs up. From/To are written out (with the dialog's tags): after other
    requests (MESSAGE) the last message received is Asterisk's, so [last_From:] would be theirs."""
    return f"""  <send retrans="500">
    <![CDATA[

      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      {from_line};tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} BYE
      Contact: <sip:[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
"""


def _provisional(early_media: bool) -> str:
    out = '  <recv response="100" optional="true"/>\n  <recv response="180" optional="true"/>\n'
    out += '  <recv response="183" optional="true"/>\n'
    return out


def _auth_round(from_line: str, headers: str) -> str:
    """INVITE, 401 with a challenge, ACK, INVITE again with credentials (a softphone's way)."""
    return (_invite(from_line, headers, 1) + '  <recv response="100" optional="true"/>\n  <recv response="401" auth="true"/>\n'
            + _ack(1) + _invite(from_line, headers, 2, auth=True))


def refused(path: Path, code: int, *, from_line: str = 'From: "[field1]" <sip:[field0]@[local_ip]:[local_port]>',
            headers: str = "", auth: bool = False, early_media: bool = False) -> Path:
    """The caller must get exactly ``code`` (never 180, never 200), then ACKs it."""
    cseq = 2 if auth else 1
    body = _auth_round(from_line, headers) if auth else _invite(from_line, headers)
    prov = '  <recv response="100" optional="true"/>\n'
    if early_media:
        prov += '  <recv response="183"/>\n'
    path.write_text(HEAD + f'<scenario name="refused {code}">\n{body}{prov}  <recv response="{code}"/>\n{_ack(cseq)}</scenario>\n')
    return path


def answered(path: Path, *, from_line: str = 'From: "[field1]" <sip:[field0]@[local_ip]:[local_port]>',
             headers: str = "", auth: bool = False, after_answer: str = "", hang_up_ms: int | None = None,
             early_media: bool = False) -> Path:
    """The call must be answered (200); then ``after_answer`` (raw sipp XML) runs, and either
    the caller hangs up after ``hang_up_ms`` or it waits for Asterisk's BYE."""
    cseq = 2 if auth else 1
    body = _auth_round(from_line, headers) if auth else _invite(from_line, headers)
    end = (f'  <pause milliseconds="{hang_up_ms}"/>\n' + _bye(cseq + 1, from_line)) if hang_up_ms is not None else (
        '  <recv request="BYE"/>\n' + _ok_to_request())
    path.write_text(HEAD + f'<scenario name="answered">\n{body}{_provisional(early_media)}  <recv response="200" rtd="true"/>\n'
                    f"{_ack(cseq)}{after_answer}{end}</scenario>\n")
    return path


def cancelled(path: Path, *, after_ms: int, from_line: str = 'From: "[field1]" <sip:[field0]@[local_ip]:[local_port]>',
              headers: str = "") -> Path:
    """The caller gives up after ``after_ms`` while nothing but 100 Trying came back: CANCEL,
    200 to the CANCEL, 487 to the INVITE, ACK."""
    cancel = f"""  <pause milliseconds="{after_ms}"/>
  <send>
    <![CDATA[

      CANCEL sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      {from_line};tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 CANCEL
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
  <recv response="487"/>
"""
    path.write_text(HEAD + f'<scenario name="cancelled">\n{_invite(from_line, headers)}  <recv response="100"/>\n{cancel}{_ack(1)}</scenario>\n')
    return path


def play_audio(pcap: str, then_ms: int = 0) -> str:
    """sipp XML that plays an RTP capture (speech, DTMF) to Asterisk, then pauses."""
    out = f'  <nop>\n    <action>\n      <exec play_pcap_audio="{pcap}"/>\n    </action>\n  </nop>\n'
    if then_ms:
        out += f'  <pause milliseconds="{then_ms}"/>\n'
    return out


def register(path: Path, user: str, expires: int) -> Path:
    """A softphone's REGISTER (digest auth through ``-au``/``-ap``) whose Contact is the port
    given by ``-key phone_port N``: the sipp that plays the phone itself (``phone``)."""
    def req(cseq: int, auth: bool) -> str:
        return f"""  <send retrans="500">
    <![CDATA[

      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:{user}@[remote_ip]:[remote_port]>;tag=[pid]reg
      To: <sip:{user}@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: {cseq} REGISTER
      Contact: <sip:{user}@[local_ip]:[phone_port]>
      Expires: {expires}
{'      [authentication]' + chr(10) if auth else ''}      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""

    path.write_text(HEAD + f'<scenario name="register {user}">\n' + req(1, False)
                    + '  <recv response="401" auth="true"/>\n' + req(2, True) + '  <recv response="200"/>\n</scenario>\n')
    return path


def phone(path: Path, user: str, *, answer: bool = True, ring_ms: int = 200, in_call: str = "") -> Path:
    """The softphone itself (sipp as UAS on the port ``register`` put in the Contact): for each
    INVITE it rings, answers (or refuses with 486 Busy Here) and waits for the BYE. Its message
    trace holds every INVITE that reached the phone (the name on it: the tag). ``in_call`` is sipp
    XML run once the call is up (the user pressing keys: ``play_audio(DTMF...)``)."""
    if answer:
        handle = f"""  <send>
    <![CDATA[

      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]phone[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:{user}@[local_ip]:[local_port]>
      Content-Length: 0

    ]]>
  </send>
  <pause milliseconds="{ring_ms}"/>
  <send retrans="500">
    <![CDATA[

      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]phone[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:{user}@[local_ip]:[local_port]>
      Content-Type: application/sdp
      Content-Length: [len]

      {SDP}
    ]]>
  </send>
  <recv request="ACK"/>
{in_call}  <recv request="BYE"/>
{_ok_to_request()}"""
    else:
        handle = """  <send>
    <![CDATA[

      SIP/2.0 486 Busy Here
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]phone[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <recv request="ACK"/>
"""
    # Asterisk sends the phone a message-summary NOTIFY (the endpoint has a mailbox) in a dialog
    # of its own: sipp runs the scenario for it too, and it must end there with a 200.
    path.write_text(HEAD + f'<scenario name="phone {user}">\n  <recv request="NOTIFY" optional="true" next="notify"/>\n'
                    f'  <recv request="INVITE" crlf="true"/>\n{handle}  <nop next="end"/>\n  <label id="notify"/>\n'
                    f'{_ok_to_request()}  <label id="end"/>\n</scenario>\n')
    return path


DTMF = "/usr/share/sip-tester/dtmf_2833_{}.pcap"


def key_pcap(digit: str) -> str:
    """A pcap pressing ``digit`` with RTP numbering later than every sip-tester file's (dtmf.py):
    sip-tester's "1" (timestamp 13280) is older than its "0" (17632), so Asterisk drops a "1"
    pressed after a "0" as a duplicate, and a retry whose random digit is 1 failed one run in nine."""
    import os
    import tempfile

    from .dtmf import write_keys

    folder = Path(tempfile.gettempdir()) / "edgefilter-sipp-keys"
    folder.mkdir(exist_ok=True)
    path = folder / f"key-{digit}.pcap"
    if not path.exists():
        tmp = folder / f".key-{digit}.{os.getpid()}.pcap"
        write_keys(tmp, digit)
        os.replace(tmp, path)
    return str(path)


def challenge_round(n: int, press: str) -> str:
    """sipp XML for one challenge prompt: take the digit MESSAGE (check it names 1-9), answer it
    200, then press. ``press`` is "right" (the digit asked for, as RFC 2833 from sipp's pcaps),
    a key name ("0", "star", "pound": never a challenge digit) or "" (stay silent)."""
    regs = "".join(f'      <ereg regexp="edgefilter-challenge-digit={d}" search_in="body" assign_to="r{n}d{d}"/>\n' for d in "123456789")
    out = f"""  <recv request="MESSAGE">
    <action>
      <ereg regexp="edgefilter-challenge-digit=[1-9]" search_in="body" check_it="true" assign_to="r{n}prompt"/>
{regs}    </action>
  </recv>
{_ok_to_request()}"""
    if press == "right":
        out += "".join(f'  <nop test="r{n}d{d}" next="r{n}press{d}"/>\n' for d in "123456789")
        out += f'  <nop next="r{n}pressed"/>\n'
        for d in "123456789":
            out += f'  <label id="r{n}press{d}"/>\n' + play_audio(key_pcap(d)) + f'  <nop next="r{n}pressed"/>\n'
        out += f'  <label id="r{n}pressed"/>\n'
    elif press:
        out += play_audio(DTMF.format(press))
    refs = ",".join([f"r{n}prompt"] + [f"r{n}d{d}" for d in "123456789"])
    return out + f'  <Reference variables="{refs}"/>\n'


def expect_message(text: str) -> str:
    """sipp XML: the next request is a MESSAGE whose body holds ``text``; answer it 200."""
    var = "msg_" + re.sub(r"\W", "_", text)
    return f"""  <recv request="MESSAGE">
    <action>
      <ereg regexp="{text}" search_in="body" check_it="true" assign_to="{var}"/>
    </action>
  </recv>
{_ok_to_request()}  <Reference variables="{var}"/>
"""

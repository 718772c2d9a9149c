"""The domain model: plain data, no I/O.

Everything the screening path passes around is here so that protocol adapters (FastAGI, AMI, UDP)
and storage depend on the model and never the reverse.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Action(str, enum.Enum):
    """What the dial plan should do with a call, ordered from mildest to harshest.

    The string values are the exact words the dial plan sees in ``EDGEFILTER_ACTION``.
    """

    ALLOW = "allow"
    TAG = "tag"
    CHALLENGE = "challenge"
    VOICEMAIL = "voicemail"
    REJECT = "reject"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    @classmethod
    def parse(cls, text: str) -> Action:
        try:
            return cls(text)
        except ValueError:
            raise ValueError(
                f"unknown action {text!r}; expected one of: {', '.join(a.value for a in cls)}"
            ) from None


_SEVERITY = {a: i for i, a in enumerate(Action)}

#: Actions that thresholds map to, in ascending order (allow is "below every threshold").
THRESHOLD_ACTIONS = (Action.TAG, Action.CHALLENGE, Action.VOICEMAIL, Action.REJECT)


class NumberKind(str, enum.Enum):
    """How a caller ID looked once normalised; drives the CLI_* rules."""

    VALID = "valid"  # parsed and valid for its region (E.164 known)
    SHORT = "short"  # a valid short/service number (95xxx, 10086, 112); e164 holds the digits
    INVALID = "invalid"  # digits, but not a number any network would present
    WITHHELD = "withheld"  # anonymous / Restricted / unknown / empty / presentation prohibited
    GARBAGE = "garbage"  # not a phone number at all (letters, control bytes, overlong)


@dataclass(frozen=True, slots=True)
class Number:
    """A caller ID after normalisation.

    ``e164`` is the key every list and history lookup uses: ``+8613800138000`` for a valid
    number, the bare digits for a short number, ``None`` when there is nothing to look up.
    ``raw`` is the caller-controlled text, kept only for logs (escaped there).
    """

    raw: str
    kind: NumberKind
    e164: str | None = None
    region: str | None = None
    reason: str = ""

    @property
    def digits(self) -> str | None:
        """E.164 digits without '+', the form prefix rules are matched against."""
        if self.e164 is None:
            return None
        return self.e164.lstrip("+")


@dataclass(frozen=True, slots=True)
class Call:
    """One inbound call as Asterisk described it in the FastAGI env block.

    All text fields are already decoded (invalid UTF-8 replaced) and are caller-controlled where
    noted: never echo them into an AGI command.
    """

    callerid: str  # caller-controlled
    calleridname: str = ""  # caller-controlled
    dnid: str = ""  # the number dialled (DID) as the trunk presented it
    extension: str = ""  # dial-plan extension the call is routed to
    context: str = ""
    uniqueid: str = ""
    channel: str = ""
    callingpres: int = 0
    args: tuple[str, ...] = ()
    params: dict[str, str] = field(default_factory=dict)  # key=value AGI arguments
    forged: str = ""  # non-empty when the env block was forged: why
    route: str = "screen"

    @property
    def called(self) -> str:
        """The number or extension this call was placed to: DID when known, else extension."""
        exten = self.params.get("exten") or self.extension
        if self.dnid and self.dnid != "unknown":
            return self.dnid
        return exten


@dataclass(frozen=True, slots=True)
class Hit:
    """One rule that fired, with the weight it contributed and a human-readable detail."""

    rule: str
    weight: float
    group: str = ""
    detail: str = ""
    force: Action | None = None
    category: str = ""  # the list category behind a LIST_CATEGORY hit


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one call and everything needed to explain it."""

    action: Action
    score: float
    hits: tuple[Hit, ...] = ()
    forced_by: str | None = None  # rule name that forced the action, if any
    policy: str = "default"
    would: Action | None = None  # in log-only mode: the action that would have been taken
    capped: tuple[tuple[str, float, float], ...] = ()  # (group, raw total, capped total)

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(h.rule for h in self.hits)

    @property
    def category(self) -> str:
        return next((h.category for h in self.hits if h.category), "")

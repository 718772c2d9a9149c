"""What to send to a reputation source and how to read what it says back. Pure: no I/O, no clock.

A source answers "listed" (with a score, a category, or just yes) or "unlisted"; anything else
(an unexpected status, a body that is not JSON, a missing path) is an error that counts against
the source's circuit breaker and is never cached. The weight of an answer is computed from the
source's mapping when it is used, not when it is stored, so a changed mapping applies to cached
answers after a reload. Everything read from the remote side is hostile: bounded and reduced to a
strict character set before it reaches a detail line or a log.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import quote

from edgefilter.core.config import ReputationSource

MAX_BODY = 65536  # bytes of an answer read at most; a larger one is garbage
MAX_CATEGORY = 40
_PLACEHOLDER = re.compile(r"\{(e164|digits|sha256|sha256_digits|api_key)\}")
_NUMERIC = re.compile(r"^\s*-?\d+(\.\d+)?\s*$")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_CATEGORY_CHARS = re.compile(r"[^a-z0-9_.:/ -]")

LISTED = "listed"
UNLISTED = "unlisted"
ERROR = "error"  # the source failed (network, status, garbage): breaker failure, not cached
UNAVAILABLE = "unavailable"  # not asked (breaker open, too many in flight)


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: str = ""


@dataclass(frozen=True)
class Answer:
    """What one source said about one number (or why it said nothing)."""

    source: str
    status: str  # LISTED, UNLISTED, ERROR or UNAVAILABLE
    score: float | None = None
    category: str | None = None
    reason: str = ""  # for errors: what went wrong, in words an admin can act on
    http_status: int | None = None
    elapsed_ms: float = 0.0
    cached: bool = False
    fetched_at: float | None = None
    expires_at: float | None = None
    retry_after: float | None = None  # seconds a rate-limited source asked us to wait

    @property
    def ok(self) -> bool:
        return self.status in (LISTED, UNLISTED)

    def describe(self) -> str:
        if self.status == LISTED:
            if self.score is not None:
                return f"score {self.score:g}"
            if self.category is not None:
                return f"category {self.category!r}"
            return "listed"
        if self.status == UNLISTED:
            return "not listed"
        return self.reason or self.status


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _fill(template: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def build_request(src: ReputationSource, e164: str) -> Request:
    """The HTTP request for one number: placeholders filled, URL values percent-encoded."""
    digits = e164.lstrip("+")
    values = {
        "e164": e164,
        "digits": digits,
        "sha256": _sha256(e164),
        "sha256_digits": _sha256(digits),
        "api_key": src.api_key,
    }
    url = _fill(src.url, {k: quote(v, safe="") for k, v in values.items()})
    headers = {k: _fill(v, values) for k, v in src.headers}
    return Request(src.method, url, headers, _fill(src.body, values) if src.body else "")


def redact(text: str, src: ReputationSource) -> str:
    """Never let the API key reach a log line or an explanation (an error may quote the URL)."""
    if src.api_key and src.api_key in text:
        text = text.replace(src.api_key, "***")
        text = text.replace(quote(src.api_key, safe=""), "***")
    return text


def clean_category(value: str) -> str:
    """A category the remote side sent, reduced to a short, safe, lowercase word."""
    text = value.strip().lower()[:MAX_CATEGORY]
    return _CATEGORY_CHARS.sub("?", text)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), bounded to one hour."""
    if not value:
        return None
    value = value.strip()[:64]
    if value.isdigit():
        return min(float(value), 3600.0)
    try:
        return max(0.0, min(parsedate_to_datetime(value).timestamp() - now, 3600.0))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _walk(doc, path: str):
    node = doc
    for name, index in _PATH_PART.findall(path):
        if name:
            if not isinstance(node, dict) or name not in node:
                raise KeyError(path)
            node = node[name]
        else:
            i = int(index)
            if not isinstance(node, list) or i >= len(node):
                raise KeyError(path)
            node = node[i]
    return node


def read_answer(src: ReputationSource, status: int, body: bytes, *, truncated: bool = False) -> Answer:
    """Turn an HTTP status and body into an Answer (LISTED, UNLISTED or ERROR); never raises."""
    name = src.name
    if status in src.unlisted_status:
        return Answer(name, UNLISTED, http_status=status)
    if not src.json_path:
        if status in src.listed_status:
            return Answer(name, LISTED, http_status=status)
        return Answer(name, ERROR, reason=_status_reason(status), http_status=status)
    accepted = status in src.listed_status if src.listed_status else 200 <= status < 300
    if not accepted:
        return Answer(name, ERROR, reason=_status_reason(status), http_status=status)
    if truncated:
        return Answer(name, ERROR, reason=f"garbage: answer larger than {MAX_BODY // 1024} KiB", http_status=status)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return Answer(name, ERROR, reason="garbage: the answer is not JSON", http_status=status)
    try:
        value = _walk(doc, src.json_path)
    except KeyError:
        return Answer(name, ERROR, reason=f"garbage: no {src.json_path} in the answer", http_status=status)
    if value is None or value is False:
        return Answer(name, UNLISTED, http_status=status)
    if value is True:
        return Answer(name, LISTED, http_status=status)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return Answer(name, ERROR, reason=f"garbage: {src.json_path} is not a finite number", http_status=status)
        return Answer(name, LISTED, score=float(value), http_status=status)
    if isinstance(value, str):
        if _NUMERIC.match(value):
            return Answer(name, LISTED, score=float(value), http_status=status)
        cat = clean_category(value)
        if not cat:
            return Answer(name, UNLISTED, http_status=status)
        return Answer(name, LISTED, category=cat, http_status=status)
    return Answer(name, ERROR, reason=f"garbage: {src.json_path} is a {type(value).__name__}, not a score or category", http_status=status)


def _status_reason(status: int) -> str:
    if status == 429:
        return "rate limited (HTTP 429)"
    if 300 <= status < 400:
        return f"HTTP {status} redirect (redirects are not followed)"
    if status in (401, 403):
        return f"HTTP {status}: check the API key"
    return f"HTTP {status}"


def weight_of(src: ReputationSource, answer: Answer) -> tuple[float, str]:
    """The weight an answer carries under the source's mapping, and why (for explanations)."""
    if answer.status != LISTED:
        return 0.0, "not listed" if answer.status == UNLISTED else answer.reason
    if answer.score is not None:
        score = answer.score
        if src.min_score is not None and score < src.min_score:
            return 0.0, f"score {score:g} below min_score {src.min_score:g}"
        if src.score_weights:
            reached = [(t, w) for t, w in src.score_weights if score >= t]
            if not reached:
                return 0.0, f"score {score:g} below the first score_weights step {src.score_weights[0][0]:g}"
            step, weight = reached[-1]
            return round(weight, 3), f"score {score:g} >= {step:g}"
        if src.weight_per_point is not None:
            return round(score * src.weight_per_point, 3), f"score {score:g} x {src.weight_per_point:g}"
        if src.weight is not None:
            return round(src.weight, 3), f"score {score:g}"
        return 0.0, f"score {score:g}, but only category_weights are configured"
    if answer.category is not None:
        w = src.category_weights.get(answer.category, src.weight)
        if w is None:
            return 0.0, f"category {answer.category!r} has no weight in category_weights"
        return round(w, 3), f"category {answer.category!r}"
    return round(src.weight or 0.0, 3), "listed"


def ttl_of(src: ReputationSource, answer: Answer) -> float:
    """Answers that weigh something are kept ttl_positive, the others ttl_negative."""
    weight, _ = weight_of(src, answer)
    return src.ttl_positive if weight != 0 else src.ttl_negative

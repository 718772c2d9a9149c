"""A circuit breaker per reputation source: stop asking a source that keeps failing.

Closed: requests go through, consecutive failures are counted. After ``failures`` in a row (or
at once on a rate limit) it opens: nothing is asked for ``cooldown``. Then it is half-open: one
probe request goes through; its success closes the breaker, its failure opens it again. A dead
or throttling service thus costs one request per cool-down instead of one per call. The clock is
injected (monotonic in the service, a fake one in tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class Breaker:
    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.state = CLOSED
        self.failures = 0  # consecutive
        self.open_until = 0.0
        self.probing = False
        self.opened = 0  # how many times it opened (for `lookup` and logs)

    def allow(self) -> bool:
        """May a request go out now? In half-open state only one probe at a time."""
        if self.state == OPEN:
            if self.clock() < self.open_until:
                return False
            self.state = HALF_OPEN
            self.probing = False
        if self.state == HALF_OPEN:
            if self.probing:
                return False
            self.probing = True
        return True

    def success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.probing = False

    def failure(self, hold: float | None = None) -> bool:
        """Count a failure; ``hold`` (a rate limit's Retry-After) opens at once. True if it opened."""
        self.failures += 1
        if self.state == HALF_OPEN or hold is not None or self.failures >= self.threshold:
            self.state = OPEN
            self.open_until = self.clock() + max(self.cooldown, hold or 0.0)
            self.probing = False
            self.opened += 1
            return True
        return False

    def abandon(self) -> None:
        """A probe that never finished (shutdown): let the next call probe again."""
        self.probing = False

    def remaining(self) -> float:
        return max(0.0, self.open_until - self.clock()) if self.state == OPEN else 0.0

    def describe(self) -> str:
        if self.state == OPEN:
            return f"open for {self.remaining():.0f} s more after {self.failures} failure(s)"
        if self.state == HALF_OPEN:
            return "half-open (probing)"
        return "closed" + (f" ({self.failures} failure(s) in a row)" if self.failures else "")

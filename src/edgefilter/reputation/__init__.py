"""Online reputation sources, asked per call and cached locally, inside the screening budget.

Layer 3 (orchestration, beside ``screen``): ``answers`` and ``breaker`` are pure; ``cache`` is the
in-memory LRU in front of the store's ``reputation`` table; ``client`` owns the HTTP session, the
limits, the breakers and request coalescing; ``lookup`` is the Screener's async fact source that
turns cached or fresh answers into REPUTATION_* hits. See docs/reputation.md.
"""

from edgefilter.reputation.answers import Answer, build_request, read_answer, weight_of
from edgefilter.reputation.breaker import Breaker
from edgefilter.reputation.cache import MemoryCache
from edgefilter.reputation.client import ReputationClient
from edgefilter.reputation.lookup import ReputationLookup

__all__ = [
    "Answer",
    "Breaker",
    "MemoryCache",
    "ReputationClient",
    "ReputationLookup",
    "build_request",
    "read_answer",
    "weight_of",
]

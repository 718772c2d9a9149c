"""``[outputs] prometheus``: the same figures as StatsD, as a Prometheus text endpoint.

Counters per action and per rule, a screening-latency histogram with millisecond-scale buckets
(in seconds, Prometheus' base unit), list-size gauges, and each output's own health counters.

Why a thread and not an asyncio handler: a scrape runs ``generate_latest`` (pure CPU, a few
hundred microseconds to milliseconds) and talks HTTP to a client we do not control; in a thread
(prometheus_client's ThreadingWSGIServer, one daemon thread per scrape) neither can take time
from the event loop that answers calls, and we reuse prometheus_client's tested HTTP handling
(content negotiation, gzip, ``name[]`` filters) instead of writing an HTTP parser. The decision
observer only increments in-memory metrics (a lock held for nanoseconds). Each request has a
10 s socket timeout so an idle or slow client cannot hold a thread for ever.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from edgefilter.core.config import OutputsSettings
from edgefilter.core.model import Action
from edgefilter.outputs.events import DecisionLike

log = logging.getLogger("edgefilter.prometheus")

#: Screening takes tens of microseconds in memory and is capped by [screen] budget (300 ms by
#: default); FastAGI round trips on top are ~1-2 ms. Buckets: 0.1 ms .. 1 s.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 300, 500, 1000)


class _QuietHandler(WSGIRequestHandler):
    timeout = 10.0  # socket timeout per scrape connection

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass


class _OutputsCollector:
    """Reads the other outputs' running counters at scrape time (no per-event work)."""

    def __init__(self, source: Callable[[], dict[str, dict[str, int]]]) -> None:
        self.source = source

    def collect(self) -> Iterable:
        stats = self.source()
        sent = CounterMetricFamily("edgefilter_output_datagrams_sent", "Datagrams sent by each UDP output.", labels=["output"])
        dropped = CounterMetricFamily(
            "edgefilter_output_events_dropped", "Events an output dropped (queue full or collector unreachable).", labels=["output"]
        )
        refused = CounterMetricFamily(
            "edgefilter_output_refused", "Sends the kernel reported refused (ICMP port unreachable: nothing listening).", labels=["output"]
        )
        queued = GaugeMetricFamily("edgefilter_output_queued", "Events waiting in each output's queue.", labels=["output"])
        for name, s in sorted(stats.items()):
            sent.add_metric([name], s.get("sent", 0))
            dropped.add_metric([name], s.get("dropped", 0))
            refused.add_metric([name], s.get("refused", 0))
            queued.add_metric([name], s.get("queued", 0))
        return [sent, dropped, refused, queued]


class PrometheusOutput:
    """Metrics in a registry of our own (tests run several services in one process)."""

    name = "prometheus"

    def __init__(
        self,
        settings: OutputsSettings,
        *,
        rules: Iterable[str] = (),
        outputs_stats: Callable[[], dict[str, dict[str, int]]] = dict,
    ) -> None:
        assert settings.prometheus is not None
        self.address = settings.prometheus
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter("edgefilter_calls", "Calls screened, by the action answered.", ["action"], registry=r)
        self.would = Counter("edgefilter_would_calls", "Log-only mode: calls by the action that would have been taken.", ["action"], registry=r)
        self.rules = Counter("edgefilter_rule_hits", "Times each rule fired.", ["rule"], registry=r)
        self.latency = Histogram(
            "edgefilter_screen_latency_seconds",
            "Time to decide one call (normalise, look up, score), in seconds.",
            buckets=[b / 1000.0 for b in LATENCY_BUCKETS_MS],
            registry=r,
        )
        self.appeals = Counter("edgefilter_appeals", "Appeal events: offered, declined (no or wrong digit), hangup, recorded.",
                               ["event"], registry=r)
        self.lists = Gauge("edgefilter_list_entries", "Entries on each list (refreshed every [outputs] gauge_interval).", ["list"], registry=r)
        r.register(_OutputsCollector(outputs_stats))
        for a in Action:  # every action present from the start, so rate() sees 0 rather than no series
            self.calls.labels(a.value)
        for name in rules:
            self.rules.labels(name)
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_port

    async def start(self) -> None:
        """Bind and serve from a daemon thread (name resolution and bind run off the loop too)."""
        self._server = await asyncio.to_thread(self._bind)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="edgefilter-prometheus", daemon=True
        )
        self._thread.start()
        host, _ = self.address
        log.info("Prometheus metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, self.port)

    def _bind(self) -> ThreadingWSGIServer:
        host, port = self.address

        class Server(ThreadingWSGIServer):
            pass

        # IPv4 or IPv6 as the address says (the first getaddrinfo answer, as prometheus_client does)
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        Server.address_family = family
        return make_server(str(sockaddr[0]), port, make_wsgi_app(self.registry), Server, handler_class=_QuietHandler)

    def __call__(self, d: DecisionLike) -> None:
        v = d.verdict
        self.calls.labels(v.action.value).inc()
        if v.would is not None:
            self.would.labels(v.would.value).inc()
        for rule in dict.fromkeys(v.rules):
            self.rules.labels(rule).inc()
        self.latency.observe(max(d.elapsed_ms, 0.0) / 1000.0)

    def appeal(self, event: str) -> None:
        self.appeals.labels(event).inc()

    def gauges(self, lists: dict[str, int], outputs: dict[str, dict[str, int]]) -> None:
        for name, n in lists.items():
            self.lists.labels(name).set(n)

    def stats(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)  # waits for serve_forever to notice (<= 0.1 s)
            server.server_close()

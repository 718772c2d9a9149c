"""Asking reputation sources over HTTP, with the limits that protect the call path.

- One aiohttp session (connection pooling, TLS, timeouts); redirects are not followed (a
  redirect could send the number to another host) and answers are read up to 64 KiB.
- Bounded requests in flight, overall and per source: past a limit a lookup is skipped at once,
  never queued, so the detached fetches that outlive a call can never pile up.
- A circuit breaker per source (breaker.py); a 429 opens it at once, for Retry-After if given.
- One request per number per source at a time: concurrent calls from the same number share the
  same task (request coalescing).
- A fetch runs as its own task: a call waits for it only within its deadline, and the answer
  still lands in the memory cache and, through a batched writer, in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace as _replace

import aiohttp

from edgefilter.core.config import ReputationSettings, ReputationSource
from edgefilter.reputation.answers import ERROR, MAX_BODY, UNAVAILABLE, Answer, build_request, parse_retry_after, read_answer, redact, ttl_of
from edgefilter.reputation.breaker import Breaker
from edgefilter.reputation.cache import MemoryCache
from edgefilter.store.open import AnyStore
from edgefilter.store.sqlite import ReputationRow

log = logging.getLogger("edgefilter.reputation")

USER_AGENT = "edgefilter (reputation cache; +https://github.com/edgefilter)"


class SourceState:
    """What the client keeps per source across calls: its settings, breaker and counters."""

    def __init__(self, src: ReputationSource, monotonic: Callable[[], float]) -> None:
        self.src = src
        self.breaker = Breaker(src.breaker_failures, src.breaker_cooldown, monotonic)
        self.in_flight = 0
        self.requests = 0
        self.errors = 0

    def update(self, src: ReputationSource) -> None:
        self.src = src
        self.breaker.threshold = src.breaker_failures
        self.breaker.cooldown = src.breaker_cooldown


class ReputationClient:
    """Sources, limits and caches shared by every call; ``start`` then ``close``."""

    def __init__(
        self,
        settings: ReputationSettings,
        store: AnyStore | None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        write_batch: int = 200,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.monotonic = monotonic
        self.cache = MemoryCache(settings.cache_size)
        self.states: dict[str, SourceState] = {}
        self._apply(settings)
        self._tasks: dict[tuple[str, str], asyncio.Task[Answer]] = {}
        self.in_flight = 0
        self.writes: asyncio.Queue[ReputationRow] = asyncio.Queue(10000)
        self.write_batch = write_batch
        self._pending: list[ReputationRow] = []  # taken from the queue, not yet written
        self.written = 0
        self.dropped_writes = 0
        self._session: aiohttp.ClientSession | None = None
        self._background: list[asyncio.Task] = []

    # -- life cycle -----------------------------------------------------------------------
    def _apply(self, settings: ReputationSettings) -> None:
        states = {}
        for src in settings.active:
            st = self.states.get(src.name)
            if st is None:
                st = SourceState(src, self.monotonic)
            else:
                st.update(src)
            states[src.name] = st
        self.states = states
        self.settings = settings

    @property
    def sources(self) -> list[ReputationSource]:
        return [st.src for st in self.states.values()]

    async def start(self, *, warm: bool = True, background: bool = True) -> None:
        """Open the HTTP session; load fresh answers from the store and start the batched writer."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.settings.max_in_flight, ttl_dns_cache=300),
            headers={"User-Agent": USER_AGENT},
        )
        if background:
            self._background.append(asyncio.create_task(self._writer()))
        if warm:
            self._background.append(asyncio.create_task(self.warm()))

    def reload(self, settings: ReputationSettings) -> None:
        """New sources or mappings: keep breakers of unchanged names, reload memory from the store."""
        self._apply(settings)
        self.cache.size = settings.cache_size
        self.cache.drop()  # an admin may have purged the store (`edgefilter cache purge`)
        self._background.append(asyncio.create_task(self.warm()))

    async def warm(self) -> int:
        """Fill the memory cache with the freshest stored answers (up to cache_size)."""
        if self.store is None or self.cache.size <= 0:
            return 0
        try:
            rows = await self.store.reputation_rows(fresh_at=self.clock(), limit=self.cache.size)
        except Exception as e:  # a locked store only costs us cache hits
            log.warning("reputation cache not loaded from the store (%s); answers will be fetched again", e)
            return 0
        known = set(self.states)
        for row in reversed(rows):  # oldest first, so the newest end up most recently used
            if row.source in known:
                self.cache.put(row, if_absent=True)
        log.info("reputation cache: %d answers loaded", len(rows))
        return len(rows)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background.clear()
        await self.flush()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the call path --------------------------------------------------------------------
    def cached(self, source: str, number: str, now: float) -> ReputationRow | None:
        return self.cache.get(source, number, now)

    def fetch(self, src: ReputationSource, number: str) -> asyncio.Task[Answer] | str:
        """The task resolving ``src``'s answer about ``number`` (shared by concurrent calls),
        or why none was started (limits). Never blocks."""
        key = (src.name, number)
        task = self._tasks.get(key)
        if task is not None:
            return task
        st = self.states.get(src.name)
        if st is None:
            return "source not configured"
        if self.in_flight >= self.settings.max_in_flight:
            return f"busy: {self.in_flight} requests in flight ([reputation] max_in_flight)"
        if st.in_flight >= src.max_in_flight:
            return f"busy: {st.in_flight} requests in flight to this source (max_in_flight)"
        self.in_flight += 1
        st.in_flight += 1
        task = asyncio.create_task(self._resolve(st, number), name=f"reputation-{src.name}")
        self._tasks[key] = task
        def forget(t: asyncio.Task[Answer], key: tuple[str, str] = key) -> None:
            if self._tasks.get(key) is t:
                self._tasks.pop(key, None)

        task.add_done_callback(forget)
        return task

    async def _resolve(self, st: SourceState, number: str) -> Answer:
        """Store first (a memory miss may be an evicted answer), then the network."""
        src = st.src
        try:
            row = None
            if self.store is not None:
                try:
                    row = await self.store.get_reputation(src.name, number)
                except Exception as e:
                    log.debug("reputation store read failed: %s", e)
            if row is not None and row.expires_at > self.clock():
                self.cache.put(row)
                return answer_from_row(row)
            if not st.breaker.allow():
                return Answer(src.name, UNAVAILABLE, reason=f"circuit breaker {st.breaker.describe()}")
            reported = False
            try:
                answer = await self._http(st, number)
                if answer.ok:
                    st.breaker.success()
                else:
                    log.debug("reputation source %s failed: %s", src.name, answer.reason)
                    st.errors += 1
                    hold = (answer.retry_after or src.breaker_cooldown) if answer.http_status == 429 else None
                    if st.breaker.failure(hold):
                        log.warning("reputation source %s: breaker opened for %.0f s (%s)", src.name, st.breaker.remaining(), answer.reason)
                reported = True
            finally:
                if not reported:
                    st.breaker.abandon()
            if answer.ok:
                answer = self.remember(src, number, answer)
            return answer
        finally:
            self.in_flight -= 1
            st.in_flight -= 1

    async def _http(self, st: SourceState, number: str) -> Answer:
        src = st.src
        if self._session is None:
            raise RuntimeError("ReputationClient.start() was not awaited")
        req = build_request(src, number)
        st.requests += 1
        t0 = self.monotonic()
        try:
            async with self._session.request(
                req.method,
                req.url,
                headers=req.headers,
                data=req.body.encode() if req.body else None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=src.timeout),
            ) as resp:
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(16384):
                    size += len(chunk)
                    if size > MAX_BODY:
                        break
                    chunks.append(chunk)
                answer = read_answer(src, resp.status, b"".join(chunks), truncated=size > MAX_BODY)
                if resp.status == 429:
                    answer = _replace(answer, retry_after=parse_retry_after(resp.headers.get("Retry-After"), self.clock()))
        except TimeoutError:
            answer = Answer(src.name, ERROR, reason=f"no answer within the source's timeout ({src.timeout:g} s)")
        except aiohttp.ClientError as e:
            answer = Answer(src.name, ERROR, reason=redact(f"{type(e).__name__}: {e}", src)[:200])
        except (OSError, ValueError, UnicodeError) as e:
            answer = Answer(src.name, ERROR, reason=redact(f"{type(e).__name__}: {e}", src)[:200])
        return _replace(answer, elapsed_ms=round((self.monotonic() - t0) * 1000.0, 1))

    def remember(self, src: ReputationSource, number: str, answer: Answer) -> Answer:
        """Cache a good answer in memory at once and queue it for the store."""
        now = self.clock()
        row = ReputationRow(
            number=number,
            source=src.name,
            score=answer.score,
            category=answer.category,
            status=answer.status,
            fetched_at=now,
            expires_at=now + ttl_of(src, answer),
        )
        self.cache.put(row)
        try:
            self.writes.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped_writes += 1
        return _replace(answer, fetched_at=row.fetched_at, expires_at=row.expires_at)

    # -- explicit queries (CLI) -----------------------------------------------------------
    async def ask(self, src: ReputationSource, number: str, *, remember: bool = True) -> Answer:
        """Ask the source now (no cache, no breaker, no coalescing): `edgefilter lookup`."""
        st = self.states.get(src.name) or SourceState(src, self.monotonic)
        answer = await self._http(st, number)
        return self.remember(src, number, answer) if answer.ok and remember else answer

    # -- store writes ---------------------------------------------------------------------
    async def _writer(self) -> None:
        pending = self._pending
        while True:
            if not pending:
                pending.append(await self.writes.get())
            while len(pending) < self.write_batch and not self.writes.empty():
                pending.append(self.writes.get_nowait())
            try:
                if self.store is not None:
                    self.written += await self.store.put_reputation(pending)
                pending.clear()
            except Exception as e:
                log.warning("reputation cache write failed (%s); retrying in 1 s", e)
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.02)

    async def flush(self) -> int:
        """Write every queued answer now (tests, CLI, shutdown)."""
        rows = list(self._pending)
        self._pending.clear()
        while not self.writes.empty():
            rows.append(self.writes.get_nowait())
        if rows and self.store is not None:
            with contextlib.suppress(Exception):
                self.written += await self.store.put_reputation(rows)
        return len(rows)

    async def settle(self) -> None:
        """Wait until every fetch in flight has finished (tests and `lookup`)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def answer_from_row(row: ReputationRow) -> Answer:
    return Answer(
        row.source,
        row.status,
        score=row.score,
        category=row.category,
        cached=True,
        fetched_at=row.fetched_at,
        expires_at=row.expires_at,
    )


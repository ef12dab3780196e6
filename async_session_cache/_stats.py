"""Counters for ``SessionCache.stats()``: plain integers bumped on the hot path."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class RegionStats:
    """What one region did since the SessionCache was created.

    ``hits`` were served from the cache; ``misses`` ran the query to fill it; ``coalesced``
    waited for a concurrent miss of the same key instead of querying; ``fills`` stored a
    result; ``invalidations`` dropped entries (writes or ``invalidate()``); ``bypasses`` ran
    uncached (uncacheable or live-read statements, reads racing a write). Shared regions
    also count ``errors`` (store failures and timeouts, unreadable payloads), ``bytes``
    written, and ``evictions`` (for bounded backends).
    """

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    fills: int = 0
    invalidations: int = 0
    bypasses: int = 0
    errors: int = 0
    bytes: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a new plain dict."""
        return asdict(self)

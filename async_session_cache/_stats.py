"""Counters for ``SessionCache.stats()`` and ``statement_stats()``, bumped on the hot path.

Each region has a ``RegionStats``; each statement shape read through it has a
``StatementStats`` whose ``hit()``/``miss()``/... bump both, so the two views always agree.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field, fields
from typing import Any, Final

_MAX_SHAPES: Final = 1000
_OTHER: Final = "(other statements)"


@dataclass(slots=True)
class RegionStats:
    """What one region did since the SessionCache was created.

    ``hits`` were served from the cache; ``misses`` ran the query to fill it; ``coalesced``
    waited for a concurrent read or miss of the same key in this process instead; ``fills`` stored a
    result; ``invalidations`` dropped entries (writes or ``invalidate()``); ``bypasses`` ran
    uncached (uncacheable or live-read statements); ``verified`` and ``mismatches`` count
    shadow verifications. Shared regions also count ``errors`` (store failures, timeouts,
    unreadable payloads), ``bytes`` written, and ``evictions`` (bounded backends).
    """

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    fills: int = 0
    invalidations: int = 0
    bypasses: int = 0
    errors: int = 0
    bytes: int = 0
    verified: int = 0
    mismatches: int = 0
    statements: dict[Hashable, StatementStats] = field(default_factory=dict, repr=False)

    def snapshot(self) -> dict[str, int]:
        """The counters as a new plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "statements"}

    def of(self, key: Hashable, statement: Any) -> StatementStats:
        """The counters of ``statement``'s shape (``key`` is its in-process cache key)."""
        shape = key[0]  # type: ignore[index]
        stats = self.statements.get(shape)
        if stats is None:
            if len(self.statements) >= _MAX_SHAPES:
                shape = _OTHER
                stats = self.statements.get(shape)
            if stats is None:
                label = _OTHER if shape == _OTHER else _label(statement)
                stats = self.statements[shape] = StatementStats(label, self)
        return stats

    def invalidated(self, key: Hashable) -> None:
        """Count one dropped entry, for its shape too if known."""
        self.invalidations += 1
        stats = self.statements.get(key[0])  # type: ignore[index]
        if stats is not None:
            stats.invalidations += 1


@dataclass(slots=True)
class StatementStats:
    """Counters of one statement shape in one region."""

    label: str
    region: RegionStats = field(repr=False)
    hits: int = 0
    misses: int = 0
    fills: int = 0
    invalidations: int = 0
    bytes: int = 0
    fill_seconds: float = 0.0

    def hit(self) -> None:
        self.hits += 1
        self.region.hits += 1

    def miss(self, seconds: float) -> None:
        self.misses += 1
        self.fill_seconds += seconds
        self.region.misses += 1

    def fill(self, nbytes: int = 0) -> None:
        self.fills += 1
        self.bytes += nbytes
        self.region.fills += 1
        self.region.bytes += nbytes

    def snapshot(self) -> dict[str, Any]:
        """The counters, with the mean time of the queries run to fill (ms)."""
        mean = self.fill_seconds / self.misses * 1000 if self.misses else 0.0
        return {
            "hits": self.hits,
            "misses": self.misses,
            "fills": self.fills,
            "invalidations": self.invalidations,
            "bytes": self.bytes,
            "mean_fill_ms": round(mean, 3),
        }


def _label(statement: Any) -> str:
    """A readable one-line label: the statement's SQL, shortened."""
    resolved = getattr(statement, "_resolved", statement)
    try:
        text = str(resolved)
    except Exception:  # a statement that only compiles on its dialect
        text = type(resolved).__name__
    label = " ".join(text.split())
    return label if len(label) <= 160 else label[:157] + "..."

"""Shadow verification: measure the real stale rate by re-reading a sample of hits.

With ``SessionCache(..., shadow_verify=0.01)`` one hit in a hundred is also executed
uncached, in a fresh session of the same factory, and the two results are compared: rows in
order (as multisets when the statement has no ORDER BY), entities by class, identity and the
column values both sides loaded. ``verified`` and ``mismatches`` count per region, and a
mismatch is logged with the statement. Hits in a session with uncommitted or pending writes
are not verified: a fresh session cannot see them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstanceState
from sqlalchemy.sql import Executable

from ._local import LocalStore
from ._results import has_pending_changes
from ._statements import resolved
from ._stats import RegionStats

logger = logging.getLogger("async_session_cache")


class ShadowVerifier:
    """Re-reads a sampled fraction of hits uncached and counts mismatches."""

    def __init__(
        self,
        rate: float,
        factory: async_sessionmaker[AsyncSession],
        sample: Callable[[], float] = random.random,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("shadow_verify must be a fraction between 0 and 1")
        self.rate = rate
        self.factory = factory
        self._sample = sample

    def wants(self) -> bool:
        """Whether to verify this hit."""
        return self._sample() < self.rate

    async def check(
        self, local: LocalStore, statement: Executable, hit: Result[Any], stats: RegionStats
    ) -> None:
        """Compare a second copy of a hit's result with a fresh uncached execution."""
        if local.uncommitted_writes or has_pending_changes(local.sync_session):
            return
        got = _normal_rows(hit)
        async with self.factory() as fresh:
            expected = _normal_rows(await fresh.execute(statement))
        stats.verified += 1
        ordered = bool(getattr(resolved(statement), "_order_by_clauses", ()))
        if not _same(got, expected, ordered):
            stats.mismatches += 1
            logger.warning(
                "shadow verification: a cache hit differs from the database for %s",
                " ".join(str(resolved(statement)).split())[:200],
            )


def _normal_rows(result: Result[Any]) -> list[tuple[Any, ...]]:
    rows = result.unique().all() if result._unique_filter_state is not None else result.all()
    return [tuple(_normal(value) for value in row) for row in rows]


def _normal(value: Any) -> Any:
    state = getattr(value, "_sa_instance_state", None)
    if isinstance(state, InstanceState):
        keys = [prop.key for prop in state.mapper.column_attrs]
        loaded = {key: state.dict[key] for key in keys if key in state.dict}
        return ("entity", state.key, loaded)
    return value


def _same(got: list[tuple[Any, ...]], expected: list[tuple[Any, ...]], ordered: bool) -> bool:
    if len(got) != len(expected):
        return False
    if not ordered:
        got, expected = sorted(got, key=_sort_key), sorted(expected, key=_sort_key)
    return all(
        len(a) == len(b) and all(_same_cell(x, y) for x, y in zip(a, b, strict=True))
        for a, b in zip(got, expected, strict=True)
    )


def _sort_key(row: tuple[Any, ...]) -> str:
    """Rows ordered by plain values and entity identities (not by their loaded columns)."""
    return repr(tuple(c[:2] if isinstance(c, tuple) and c[:1] == ("entity",) else c for c in row))


def _same_cell(got: Any, expected: Any) -> bool:
    if isinstance(got, tuple) and got[:1] == ("entity",):
        if not (isinstance(expected, tuple) and expected[:2] == got[:2]):
            return False
        common = got[2].keys() & expected[2].keys()
        return all(got[2][key] == expected[2][key] for key in common)
    return bool(got == expected)

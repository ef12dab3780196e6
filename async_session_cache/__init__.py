"""async_session_cache: an asyncio-native query cache for SQLAlchemy 2.x ``AsyncSession``.

Open a scope per unit of work (a request, a job); inside it ``await cached_execute(stmt)``
returns what ``session.execute(stmt)`` would, served from the scope's cache when it can be::

    cache = SessionCache(async_sessionmaker(engine, expire_on_commit=False))
    async with cache.scope() as session:
        user = (await cached_execute(select(User).where(User.id == 5))).scalar_one()
"""

from ._cache import SessionCache
from ._exceptions import (
    AsyncSessionCacheError,
    NotASelectError,
    OutsideScopeError,
    UncacheableStatementWarning,
    UnknownRegionError,
)
from ._execute import cached_execute, invalidate
from ._local import ScopedSessionBackend
from ._options import FromCache, RelationshipCache
from ._stats import RegionStats

__all__ = [
    "AsyncSessionCacheError",
    "FromCache",
    "NotASelectError",
    "OutsideScopeError",
    "RegionStats",
    "RelationshipCache",
    "ScopedSessionBackend",
    "SessionCache",
    "UncacheableStatementWarning",
    "UnknownRegionError",
    "cached_execute",
    "invalidate",
]

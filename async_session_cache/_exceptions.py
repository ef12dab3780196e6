"""The exceptions and warnings this library raises.

Every error derives from one root, so callers can catch the library as a whole::

    AsyncSessionCacheError
    ├── OutsideScopeError        no scope is active and no session was given
    ├── UnknownRegionError       a region name that the SessionCache does not configure
    └── NotASelectError          a statement that is not a read (INSERT, UPDATE, text(), ...)

    UncacheableStatementWarning  a SELECT that SQLAlchemy cannot key; it runs uncached
"""

from __future__ import annotations

from collections.abc import Iterable


class AsyncSessionCacheError(Exception):
    """The root of every error raised by async_session_cache."""


class OutsideScopeError(AsyncSessionCacheError):
    """Raised when a cached call needs a scope and none is active."""

    def __init__(self, what: str = "cached_execute()") -> None:
        super().__init__(
            f"{what} was called outside any cache scope: wrap the work in "
            "`async with cache.scope():` (or pass session=... of a SessionCache)"
        )


class UnknownRegionError(AsyncSessionCacheError, KeyError):
    """Raised for a region name that the SessionCache was not configured with."""

    def __init__(self, name: str, configured: Iterable[str]) -> None:
        self.name = name
        self.configured = sorted(configured)
        super().__init__(
            f"unknown cache region {name!r}; configured regions: {', '.join(self.configured)}"
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class NotASelectError(AsyncSessionCacheError, TypeError):
    """Raised when a statement given to the cache is not a SELECT."""

    def __init__(self, statement: object) -> None:
        super().__init__(
            f"only SELECT statements can be cached; got {type(statement).__name__}: "
            "execute writes with `await session.execute(...)`"
        )


class UncacheableStatementWarning(UserWarning):
    """Warned when a SELECT cannot be keyed (e.g. a TypeDecorator without cache_ok).

    The statement still runs, uncached, so the caller gets correct rows.
    """

"""The local region: a cache dict owned by one session, dropped with it.

A ``LocalStore`` lives in ``session.info`` and holds the frozen results the session has read,
each with the tables it depends on. Listeners on the session's sync ``Session`` (pitfall 2:
not on ``AsyncSession``) record what the session writes: a flush, ORM bulk or Core DML,
``text()``; entries that read a written table are dropped at once, and a rollback drops the
entries that may hold the transaction's discarded writes.

``ScopedSessionBackend`` exposes the current scope's dict as a dogpile.cache backend named
``async_session_cache.local``, the async form of SQLAlchemy's ``local_session_caching`` recipe.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from dogpile.cache import register_backend
from dogpile.cache.api import NO_VALUE, CacheBackend, NoValue
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

from ._exceptions import AsyncSessionCacheError
from ._results import FrozenRows
from ._statements import ALL_TABLES, tables_written_by_flush, tables_written_by_statement
from ._stats import RegionStats

if TYPE_CHECKING:
    from ._cache import SessionCache

INFO_KEY: Final = "async_session_cache.local"
"""Key of the ``LocalStore`` in ``Session.info``."""

BACKEND_NAME: Final = "async_session_cache.local"
"""The dogpile.cache backend name of the local region."""


@dataclass(slots=True)
class Entry:
    """One cached result and what it depends on."""

    rows: FrozenRows
    tables: frozenset[str]
    expires_at: float
    filled_at: int
    """The store's ``write_seq`` when the fill started."""


class LocalStore:
    """The cache of one session: entries, in-flight fills, and the session's writes."""

    def __init__(self, session: AsyncSession, owner: SessionCache, stats: RegionStats) -> None:
        self.session = session
        self.owner = owner
        """The ``SessionCache`` that attached this store."""
        self.sync_session: Session = session.sync_session
        self.stats = stats
        self.entries: dict[Hashable, Any] = {}
        """``Entry`` objects under statement keys; dogpile values under string keys."""
        self.inflight: dict[Hashable, asyncio.Future[FrozenRows]] = {}
        self.lock = asyncio.Lock()
        """Serialises this session's database work: an AsyncSession is not safe for
        concurrent use, yet sibling tasks of one scope share it (pitfall 7)."""
        self.write_seq = 0
        self._last_write: dict[str, int] = {}
        self._transaction_writes: set[str] = set()
        self._first_write_at: int | None = None
        """``write_seq`` of the open transaction's first write."""
        self.on_commit: Callable[[frozenset[str]], None] | None = None
        """Called inside ``commit()`` with the tables the transaction wrote (the owner
        invalidates shared regions there, so ``commit()`` returns only after that)."""
        self._dialect: Dialect | None = None
        self._listeners: list[tuple[str, Callable[..., Any]]] = []
        self.sync_session.info[INFO_KEY] = self

    def listen(self, name: str, listener: Callable[..., Any]) -> None:
        """Listen to a ``SessionEvents`` event of this one session until the store closes
        (for sessions whose class the SessionCache does not listen to already)."""
        event.listen(self.sync_session, name, listener)
        self._listeners.append((name, listener))

    @property
    def dialect(self) -> Dialect:
        """The dialect the session's statements run on."""
        if self._dialect is None:
            self._dialect = self.sync_session.get_bind().dialect
        return self._dialect

    @property
    def uncommitted_writes(self) -> set[str]:
        """Tables written in the session's open transaction (``"*"``: any table)."""
        return self._transaction_writes

    # -- reads ---------------------------------------------------------------------------

    def lookup(self, key: Hashable) -> FrozenRows | None:
        """The frozen rows under ``key`` if they may be served now, else ``None``."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires_at != math.inf and entry.expires_at <= time.monotonic():
            del self.entries[key]
            return None
        rows: FrozenRows = entry.rows
        if rows.holds_instances and not rows.is_current_in(self.sync_session):
            del self.entries[key]
            return None
        return rows

    def put(
        self,
        key: Hashable,
        rows: FrozenRows,
        tables: frozenset[str],
        *,
        started_at: int,
        expiration_time: float | None,
    ) -> bool:
        """Store a fill unless a write to one of its tables happened since ``started_at``."""
        if self._written_since(started_at, tables):
            return False
        expires_at = math.inf if expiration_time is None else time.monotonic() + expiration_time
        self.entries[key] = Entry(rows, tables, expires_at, started_at)
        return True

    def discard(self, key: Hashable) -> bool:
        """Drop the entry under ``key``; whether there was one."""
        return self.entries.pop(key, None) is not None

    def _written_since(self, seq: int, tables: frozenset[str]) -> bool:
        if self.write_seq == seq:
            return False
        last_write = self._last_write
        if last_write.get(ALL_TABLES, 0) > seq or ALL_TABLES in tables:
            return True
        return any(last_write.get(table, 0) > seq for table in tables)

    # -- writes --------------------------------------------------------------------------

    def record_write(self, tables: frozenset[str]) -> None:
        """Note that the session wrote ``tables`` and drop the entries that read them."""
        if not tables:
            return
        self.write_seq += 1
        for table in tables:
            self._last_write[table] = self.write_seq
        if self._first_write_at is None:
            self._first_write_at = self.write_seq
        self._transaction_writes |= tables
        self._drop(lambda entry: _reads_any(entry, tables))

    def _drop(self, stale: Callable[[Entry], bool]) -> None:
        keys = [
            key for key, entry in self.entries.items() if isinstance(entry, Entry) and stale(entry)
        ]
        for key in keys:
            del self.entries[key]
            self.stats.invalidated(key)

    def after_flush(self, flush_context: Any) -> None:
        """A flush wrote its mappers' tables."""
        self.record_write(tables_written_by_flush(flush_context))

    def before_write(self, orm_execute_state: ORMExecuteState) -> None:
        """A non-SELECT statement (DML, ``text()``) is about to run on the session."""
        self.record_write(
            tables_written_by_statement(
                orm_execute_state.statement, orm_execute_state.execution_options
            )
        )

    def after_commit(self) -> None:
        """The session's outermost transaction committed."""
        # Fires once per real (outermost) commit; the session still reports the transaction
        # as open at this point, so do not ask it.
        if self._transaction_writes and self.on_commit is not None:
            self.on_commit(frozenset(self._transaction_writes))
        self._end_transaction()

    def after_rollback(self, previous: SessionTransaction) -> None:
        """A transaction of the session (``previous``) rolled back."""
        # Every entry filled since the transaction's first write may hold rows the rollback
        # discarded, and so may any entry reading a table it wrote: drop them all.
        first_write_at = self._first_write_at
        if first_write_at is not None:
            written = frozenset(self._transaction_writes)
            self.write_seq += 1
            for table in written:
                self._last_write[table] = self.write_seq
            self._drop(
                lambda entry: entry.filled_at >= first_write_at or _reads_any(entry, written)
            )
        if previous.parent is None:  # the outermost transaction ended
            self._end_transaction()

    def _end_transaction(self) -> None:
        self._transaction_writes.clear()
        self._first_write_at = None

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Forget everything and detach from the session (the scope has ended)."""
        for future in self.inflight.values():
            future.cancel()
        self.inflight.clear()
        self.entries.clear()
        for name, listener in self._listeners:
            if event.contains(self.sync_session, name, listener):
                event.remove(self.sync_session, name, listener)
        self.sync_session.info.pop(INFO_KEY, None)


def _reads_any(entry: Entry, tables: frozenset[str] | set[str]) -> bool:
    """Whether ``entry`` depends on one of ``tables`` (``ALL_TABLES`` on either side: yes)."""
    return ALL_TABLES in tables or ALL_TABLES in entry.tables or not entry.tables.isdisjoint(tables)


def store_of(session: AsyncSession) -> LocalStore | None:
    """The ``LocalStore`` attached to ``session``, if any."""
    store: LocalStore | None = session.sync_session.info.get(INFO_KEY)
    return store


class ScopedSessionBackend(CacheBackend):
    """A dogpile.cache backend over the current scope's local dict.

    Configure it with ``arguments={"scoped_session": cache.session}``. Values live in the
    dict of the session the scope owns, so they die with the session; identity is
    preserved because nothing is serialised.
    """

    def __init__(self, arguments: dict[str, Any]) -> None:
        self.scoped_session: async_scoped_session[AsyncSession] = arguments["scoped_session"]

    def _dictionary(self) -> dict[Hashable, Any]:
        session = self.scoped_session()
        store = store_of(session)
        if store is None:
            raise AsyncSessionCacheError("the local region's session has no cache store")
        return store.entries

    def get(self, key: Any) -> Any | NoValue:
        return self._dictionary().get(key, NO_VALUE)

    def set(self, key: Any, value: Any) -> None:
        self._dictionary()[key] = value

    def delete(self, key: Any) -> None:
        self._dictionary().pop(key, None)


register_backend(BACKEND_NAME, __name__, "ScopedSessionBackend")  # type: ignore[no-untyped-call]

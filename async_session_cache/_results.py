"""Results: freeze a buffered ``Result`` once, replay it cheaply many times.

A local-region payload keeps the session's own ORM instances, so a replay hands back the very
objects of the identity map (no merge, no per-object cost) and keeps the ``Row`` objects the
first execution built, so ``.all()`` on a hit is a list copy. Before serving, the instances
are checked to still be current in the session (pitfalls 3 and 4).

With ``_statements.py`` this is the only module that uses SQLAlchemy private APIs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import FrozenResult, IteratorResult, Result
from sqlalchemy.orm import InstanceState, Session


class FrozenRows:
    """An immutable snapshot of a result, replayable as a fresh ``Result`` on each hit."""

    __slots__ = ("_states", "_unique_guard", "frozen", "row_count")

    def __init__(self, result: Result[Any]) -> None:
        unique_state = result._unique_filter_state
        if unique_state is not None and not result._source_supports_scalars:
            # Joined eager loads of collections: the ORM refuses to hand out rows before
            # unique() is called. Freeze the uniqued rows, and keep the guard so a replay
            # refuses exactly as the original would.
            result = result.unique()
        self._unique_guard: Callable[[Any], Any] | None = (
            unique_state[1] if unique_state is not None else None
        )
        self.frozen = FrozenResult(result)
        self._states = _instance_states(self.frozen)
        self.row_count = len(self.frozen.data)

    def replay(self) -> Result[Any]:
        """A new ``Result`` over the frozen rows, as ``AsyncSession.execute`` would return."""
        frozen = self.frozen
        result = ReplayResult(frozen.metadata, iter(frozen.data))
        result._attributes = frozen._attributes
        result._source_supports_scalars = frozen._source_supports_scalars
        result._replay_metadata = frozen.metadata
        if self._unique_guard is not None:
            result._unique_filter_state = (set(), self._unique_guard)
        return result

    def is_current_in(self, session: Session) -> bool:
        """Whether every ORM instance is still attached to ``session``, unexpired, undeleted.

        An uncached execute would refresh expired instances and skip deleted or expunged
        ones, so a payload holding any of those must not be served.
        """
        session_id = session.hash_key
        for state, loaded, expired in self._states:
            if (
                state.session_id != session_id
                or state._deleted
                or len(state.dict) < loaded  # an attribute or collection was unloaded since
                or len(state.expired_attributes) > expired  # more expired than the load left
            ):
                return False
        return True

    @property
    def requires_unique(self) -> bool:
        """Whether the result, like the original, refuses rows until ``unique()``."""
        return self._unique_guard is not None

    @property
    def holds_instances(self) -> bool:
        """Whether the payload holds ORM instances (and so depends on session state)."""
        return bool(self._states)


class ReplayResult(IteratorResult[Any]):
    """An ``IteratorResult`` whose raw rows are already finished ``Row`` objects.

    When nothing reshapes the rows (no ``columns()``, ``unique()``, scalar or mapping view),
    ``all()``/``fetchall()`` hand back the stored rows instead of building new ones; every
    other path is SQLAlchemy's own.
    """

    _replay_metadata: Any = None

    def _allrows(self) -> Sequence[Any]:
        if (
            self._metadata is self._replay_metadata
            and not self._source_supports_scalars
            and self._unique_filter_state is None
            and self._post_creational_filter is None
        ):
            return self._fetchall_impl()
        return super()._allrows()


def _instance_states(frozen: FrozenResult[Any]) -> list[tuple[InstanceState[Any], int, int]]:
    """The states of the top-level ORM instances in the frozen rows, with how many
    attributes each had loaded and expired after the load. A later ``expire()`` or commit
    expiry grows the second; a ``populate_existing`` load that resets an eager collection
    without expiring it shrinks the first. (A polymorphic load leaves subclass columns
    expired by design: that alone must not make the entry unservable.)"""
    rows: Sequence[Any] = frozen.data
    if frozen._source_supports_scalars:
        values: Any = rows
    else:
        values = (value for row in rows for value in row)
    states = []
    for value in values:
        state = getattr(value, "_sa_instance_state", None)
        if isinstance(state, InstanceState):
            states.append((state, len(state.dict), len(state.expired_attributes)))
    return states


def has_pending_changes(session: Session) -> bool:
    """Whether a flush would write anything (cheaper than building ``session.dirty``)."""
    return not session._is_clean()


def autoflush(session: Session) -> None:
    """Flush pending changes as ``execute()`` would: not under ``no_autoflush``, not while
    the session is already flushing (a load triggered inside a flush)."""
    if has_pending_changes(session):
        session._autoflush()

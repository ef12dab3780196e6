"""Session events: how the cache learns what its sessions write, commit and ask to cache.

A ``SessionCache`` gives its sessions a sync session class of their own, a subclass of the
factory's (pitfall 2: the listeners belong on the sync ``Session`` class, not on
``AsyncSession``), with these listeners registered once on the class: opening a scope then
registers nothing, and every session the factory makes is tracked, in a scope or not. Each
listener finds the session's ``LocalStore`` in ``session.info``, attaching one on first need.
Sessions of other classes handed to the cache get the same listeners on the instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import async_session
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

from ._local import INFO_KEY, LocalStore
from ._options import serve_from_cache
from ._payload import PLAIN_CLASS_ATTRIBUTE

if TYPE_CHECKING:
    from ._cache import SessionCache

OWNER_ATTRIBUTE = "_async_session_cache"


def tracking_session_class(cache: SessionCache, base: type[Session]) -> type[Session]:
    """A subclass of ``base`` whose instances report their events to ``cache``."""
    tracked = type(
        f"{base.__name__}WithCache",
        (base,),
        {OWNER_ATTRIBUTE: cache, PLAIN_CLASS_ATTRIBUTE: base, "__module__": __name__},
    )
    for name, listener in LISTENERS:
        event.listen(tracked, name, listener)
    return tracked


def _store(session: Session, *, attach: bool) -> LocalStore | None:
    store: LocalStore | None = session.info.get(INFO_KEY)
    if store is None and attach:
        cache: SessionCache | None = getattr(type(session), OWNER_ATTRIBUTE, None)
        proxy = async_session(session)
        if cache is not None and proxy is not None:
            store = cache.attach(proxy)
    return store


def _after_flush(session: Session, flush_context: Any) -> None:
    store = _store(session, attach=True)
    if store is not None:
        store.after_flush(flush_context)


def _do_orm_execute(orm_execute_state: ORMExecuteState) -> Result[Any] | None:
    if orm_execute_state.is_select:
        if not orm_execute_state.user_defined_options:
            return None  # the common case: nothing asked of the cache
        store = _store(orm_execute_state.session, attach=True)
        return None if store is None else serve_from_cache(store, orm_execute_state)
    store = _store(orm_execute_state.session, attach=True)
    if store is not None:
        store.before_write(orm_execute_state)
    return None


def _after_commit(session: Session) -> None:
    store = _store(session, attach=False)
    if store is not None:
        store.after_commit()


def _after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
    store = _store(session, attach=False)
    if store is not None:
        store.after_rollback(previous)


LISTENERS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("after_flush", _after_flush),
    ("do_orm_execute", _do_orm_execute),
    ("after_commit", _after_commit),
    ("after_soft_rollback", _after_soft_rollback),
)

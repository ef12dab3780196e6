"""Single-flight: concurrent callers of one key share one run, on asyncio primitives only.

dogpile's own lock is a ``threading.Lock`` per key: a second task missing the same key while
the first awaits its query would block the whole event loop (pitfall 1). Here the first
caller runs, the others await an ``asyncio.Future``; if the runner is cancelled, a waiter
takes over rather than failing with a cancellation that was not its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


async def run_once(
    inflight: dict[Hashable, asyncio.Future[T]],
    key: Hashable,
    run: Callable[[], Awaitable[T]],
) -> tuple[T, bool]:
    """``run()``'s value and whether this caller ran it, sharing one run per key.

    An exception of the run reaches every waiter; the run is not retried for them.
    """
    while (pending := inflight.get(key)) is not None:
        try:
            return await asyncio.shield(pending), False
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if pending.cancelled() and task is not None and not task.cancelling():
                continue  # the runner was cancelled, not us: run it ourselves
            raise
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    inflight[key] = future
    try:
        value = await run()
    except asyncio.CancelledError:
        future.cancel()
        raise
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # waiters re-raise it; nobody waiting is not an error
        raise
    finally:
        if inflight.get(key) is future:
            del inflight[key]
    future.set_result(value)
    return value, True

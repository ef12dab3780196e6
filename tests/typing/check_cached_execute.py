"""Static checks, run by mypy in ``make check``: cached_execute types flow like execute()."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, assert_type

from sqlalchemy import Result, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from async_session_cache import cached_execute
from tests.models import User


async def typed_results(session: AsyncSession) -> None:
    """Entity and column selects keep their row types; untyped statements give Any rows."""
    users = await cached_execute(select(User))
    assert_type(users, Result[User])
    assert_type(users.scalars().all(), Sequence[User])
    columns = await cached_execute(select(User.id, User.name), region="default")
    assert_type(columns, Result[int, str])
    assert_type(await session.execute(select(User.id)), Result[int])
    assert_type(await cached_execute(select(User.id), session=session), Result[int])
    textual = await cached_execute(text("SELECT 1").columns())
    assert_type(textual, Result[*tuple[Any, ...]])

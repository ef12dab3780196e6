"""The public surface: exactly the documented names, sorted."""

from __future__ import annotations

import types

import async_session_cache


def test_all_is_exactly_the_public_names() -> None:
    """__all__ lists every public name the package exports, in sorted order."""
    public = {
        name
        for name, value in vars(async_session_cache).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)  # submodules
    }
    assert set(async_session_cache.__all__) == public
    assert async_session_cache.__all__ == sorted(async_session_cache.__all__)


def test_design_contract_names_are_importable() -> None:
    """The names DESIGN.md fixes for users import from the package root."""
    from async_session_cache import (
        FromCache,
        RelationshipCache,
        SessionCache,
        cached_execute,
        invalidate,
    )

    assert callable(cached_execute) and callable(invalidate)
    assert all(isinstance(cls, type) for cls in (SessionCache, FromCache, RelationshipCache))

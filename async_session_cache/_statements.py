"""Statement analysis: cache keys, the tables a read depends on, the tables a write touches.

This module and ``_results.py`` are the only places that use SQLAlchemy's private APIs
(``_generate_cache_key``, ``_with_options``, loader-option paths, the flush context), so an
upgrade of SQLAlchemy touches these two files.

Table names (``Table.fullname``) identify dependencies rather than ``Table`` objects because
the ORM hands out annotated copies of tables, and because shared stores need strings.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from functools import lru_cache
from typing import Any, Final

from sqlalchemy import Table, inspect
from sqlalchemy.orm import Mapper, RelationshipProperty
from sqlalchemy.sql import Executable
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.lambdas import StatementLambdaElement
from sqlalchemy.sql.selectable import CompoundSelect, Select, TextualSelect
from sqlalchemy.sql.util import find_tables

from ._exceptions import NotASelectError

ALL_TABLES: Final = "*"
"""Dependency/write marker meaning "every table" (``text()`` statements, DDL)."""

_EAGER_STRATEGIES: Final = frozenset({"joined", "selectin", "subquery", "immediate"})

_FRESH_READ_OPTIONS: Final = ("populate_existing", "yield_per", "stream_results")
"""Execution options that ask for a live database read, so a cached answer is wrong."""


_SELECTS: Final = (Select, CompoundSelect, TextualSelect)


def require_select(statement: object) -> Executable:
    """Return ``statement`` if it is a SELECT (plain, compound, textual or a ``lambda_stmt``
    around one); raise ``NotASelectError`` otherwise."""
    if isinstance(statement, _SELECTS):
        return statement
    if isinstance(statement, StatementLambdaElement) and isinstance(statement._resolved, _SELECTS):
        return statement
    raise NotASelectError(statement)


def resolved(statement: Executable) -> Any:
    """The statement itself, or the one a ``lambda_stmt`` stands for."""
    return statement._resolved if isinstance(statement, StatementLambdaElement) else statement


def must_read_live(statement: Executable) -> bool:
    """Whether the statement must reach the database: locking reads and fresh-read options."""
    if getattr(resolved(statement), "_for_update_arg", None) is not None:
        return True
    options = statement._execution_options
    return bool(options) and any(options.get(name) for name in _FRESH_READ_OPTIONS)


def statement_key(
    statement: Executable,
    parameters: Any = None,
    execution_options: Mapping[str, Any] | None = None,
) -> Hashable | None:
    """An in-process key for ``statement``, or ``None`` when SQLAlchemy cannot key it.

    The key covers the statement's structure (entities, criteria, loader options: pitfall 5),
    its bound values (IN-lists, limit/offset included) and ``.params()`` values, its
    execution options, and the parameters and execution options given at execution time.
    It holds live ``Table`` objects, so it is valid only inside this process.
    """
    cache_key = statement._generate_cache_key()  # type: ignore[attr-defined]
    if cache_key is None:
        return None
    values = tuple([_hashable(bind.effective_value) for bind in cache_key.bindparams])
    options = statement._execution_options
    statement_params = cache_key.params  # .params() values: not in the binds since 2.1
    return (
        _Shape(cache_key.key),
        values,
        _hashable(dict(statement_params)) if statement_params else (),
        _hashable(dict(options)) if options else (),
        _hashable(parameters) if parameters else (),
        _hashable(dict(execution_options)) if execution_options else (),
    )


class _Shape(tuple[Any, ...]):
    """SQLAlchemy's structural cache key, hashed once: a hit looks it up several times
    (entries, shapes, statistics), and a large nested tuple rehashes in full each time."""

    _hash: int

    def __hash__(self) -> int:
        try:
            return self._hash
        except AttributeError:
            self._hash = tuple.__hash__(self)
            return self._hash


def _hashable(value: Any) -> Any:
    """Turn lists, dicts and sets (IN-lists, JSON values, option maps) into hashable twins."""
    if isinstance(value, list | tuple):
        return tuple([_hashable(item) for item in value])
    if isinstance(value, Mapping):
        return ("__dict__", tuple(sorted((repr(k), _hashable(v)) for k, v in value.items())))
    if isinstance(value, set | frozenset):
        return ("__set__", frozenset(_hashable(item) for item in value))
    return value


_SHAPE_MEMO_SIZE: Final = 4096
_tables_by_shape: dict[Hashable, frozenset[str]] = {}


def tables_read(statement: Executable, key: Hashable) -> frozenset[str]:
    """``_tables_read(statement)``, remembered per statement shape (the structural part of
    ``key``): the shape alone decides it, and working it out costs tens of microseconds."""
    shape = key[0]  # type: ignore[index]
    tables = _tables_by_shape.get(shape)
    if tables is None:
        tables = _tables_read(resolved(statement))
        if len(_tables_by_shape) >= _SHAPE_MEMO_SIZE:
            del _tables_by_shape[next(iter(_tables_by_shape))]
        _tables_by_shape[shape] = tables
    return tables


def _tables_read(statement: Executable) -> frozenset[str]:
    """Names of every table whose rows can change the result of ``statement``.

    Covers FROM clauses, joins, subqueries and CTEs; for ORM entities, their inheritance
    tables, column properties and default eager loads; and the targets of loader options.
    A textual SELECT could read anything, so it depends on ``ALL_TABLES``.
    """
    if isinstance(statement, TextualSelect):
        return frozenset({ALL_TABLES})
    names = _table_names(statement)
    for mapper in _entity_mappers(statement):
        names |= _mapper_reads(mapper)
    for option in getattr(statement, "_with_options", ()):
        for element in getattr(option, "context", ()):
            for token in element.path.path:
                if isinstance(token, RelationshipProperty):
                    names |= _relationship_reads(token)
    return frozenset(names)


WRITES_OPTION: Final = "cache_writes"
"""Execution option declaring what a ``text()`` statement writes: table names or ``Table``
objects (an empty tuple: nothing), e.g. ``text("UPDATE ...").execution_options(
cache_writes=["users"])``."""


def tables_written_by_statement(
    statement: Executable, execution_options: Mapping[str, Any]
) -> frozenset[str]:
    """Names of the tables an executed non-SELECT statement may change.

    INSERT/UPDATE/DELETE (Core or ORM bulk) write their target table and, for ORM entities,
    the entity's inheritance tables. ``text()``, DDL and anything else unknown may write any
    table, so they return ``ALL_TABLES`` unless the ``cache_writes`` execution option
    declares the tables.
    """
    if getattr(statement, "is_select", False):
        return frozenset()
    if getattr(statement, "is_dml", False):
        assert isinstance(statement, ClauseElement)
        names = {table.fullname for table in find_tables(statement, include_crud=True)}
        entity = getattr(statement, "entity_description", {}).get("entity")
        mapper = inspect(entity, raiseerr=False) if entity is not None else None
        if isinstance(mapper, Mapper):
            names |= _mapper_tables(mapper)
        return frozenset(names)
    declared = execution_options.get(WRITES_OPTION)
    if declared is not None:
        if isinstance(declared, str | Table):
            declared = [declared]
        return frozenset(t if isinstance(t, str) else t.fullname for t in declared)
    return frozenset({ALL_TABLES})


def tables_written_by_flush(flush_context: Any) -> frozenset[str]:
    """Names of the tables a completed ORM flush may have written.

    Every mapper whose instances took part (new, dirty, deleted, or touched by a
    relationship's foreign-key sync) contributes its tables and its many-to-many
    association tables.
    """
    mappers = {state.mapper for state in flush_context.states}
    names: set[str] = set()
    for mapper in mappers:
        names |= _mapper_writes(mapper)
    return frozenset(names)


def _table_names(clause: Any) -> set[str]:
    return {
        table.fullname
        for table in find_tables(clause, include_joins=True, include_aliases=True)
        if hasattr(table, "fullname")
    }


def _entity_mappers(statement: Executable) -> Iterable[Mapper[Any]]:
    descriptions = getattr(statement, "column_descriptions", None)
    if descriptions is None:
        return ()
    mappers = []
    for description in descriptions:
        entity = description.get("entity")
        if entity is not None:
            info = inspect(entity, raiseerr=False)
            mapper = getattr(info, "mapper", None)
            if isinstance(mapper, Mapper):
                mappers.append(mapper)
    return mappers


def _mapper_tables(mapper: Mapper[Any]) -> set[str]:
    names: set[str] = set()
    for each in mapper.self_and_descendants:
        names |= {table.fullname for table in each.tables}
    return names


@lru_cache(maxsize=1024)
def _mapper_reads(mapper: Mapper[Any]) -> frozenset[str]:
    """Tables read when loading ``mapper`` entities: own tables, column expressions and
    default eager relationships, followed transitively."""
    names: set[str] = set()
    seen: set[Mapper[Any]] = set()
    pending = [mapper]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        names |= _mapper_tables(current)
        for column in current.columns:
            names |= _table_names(column)
        for relationship in current.relationships:
            if relationship.lazy in _EAGER_STRATEGIES:
                names |= _secondary_tables(relationship)
                pending.append(relationship.mapper)
    return frozenset(names)


def _relationship_reads(relationship: RelationshipProperty[Any]) -> set[str]:
    return set(_mapper_reads(relationship.mapper)) | _secondary_tables(relationship)


@lru_cache(maxsize=1024)
def _mapper_writes(mapper: Mapper[Any]) -> frozenset[str]:
    names = _mapper_tables(mapper)
    for relationship in mapper.relationships:
        names |= _secondary_tables(relationship)
    return frozenset(names)


def _secondary_tables(relationship: RelationshipProperty[Any]) -> set[str]:
    secondary = relationship.secondary
    return _table_names(secondary) if secondary is not None else set()

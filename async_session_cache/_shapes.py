"""Statement shapes for shared regions: stable keys, result metadata, what to capture.

A shape is everything about a statement except its bound values: the same ``select()``
written twice, or in two processes, has one shape. It is worked out once per process (by
compiling the statement for the session's dialect) and remembered under SQLAlchemy's
structural cache key, so a hit pays for a dict lookup, not a compile.

The stable key of an execution is ``asc:<shape digest>:<digest of bound values>``. The shape
digest covers the dialect, the compiled SQL, loader strategies and their options, execution
options, the result's columns and entities, and the columns and types of every table read
(the schema namespace: a deploy that changes a mapped table reads no payload of the old
shape), so equal keys mean equal statements in every process (pitfall 9).

Uses SQLAlchemy private APIs (compile state entities, result columns, loader paths).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm import Mapper, RelationshipProperty
from sqlalchemy.sql import Executable
from sqlalchemy.sql.util import find_tables

from ._statements import resolved, tables_read

PAYLOAD_VERSION: Final = 3
"""Bumped whenever the payload layout changes; part of every shape digest."""

_EAGER: Final = frozenset({"joined", "selectin", "subquery", "immediate"})
_MEMO_SIZE: Final = 4096


class UnstableKeyError(Exception):
    """A bound value whose text form is not the same in every process (an object id)."""


@dataclass(slots=True)
class Shape:
    """What a shared region needs to know about one statement shape in this process."""

    digest: str
    tables: frozenset[str]
    metadata: SimpleResultMetaData
    mappers: dict[str, Mapper[Any]]
    """Mappers an entity payload may name, by ``module.QualName``."""
    capture: dict[Mapper[Any], tuple[str, ...]]
    """Relationships whose loaded values are part of the result, per mapper."""

    def captured(self, mapper: Mapper[Any]) -> tuple[str, ...]:
        """Relationship keys to capture on instances of ``mapper`` (subclasses included)."""
        keys = self.capture.get(mapper)
        if keys is None:
            keys = tuple(
                sorted(
                    {
                        key
                        for base, base_keys in self.capture.items()
                        if mapper.isa(base)
                        for key in base_keys
                    }
                )
            )
            self.capture[mapper] = keys
        return keys


_shapes: dict[str, dict[Hashable, Shape]] = {}
"""Shapes by dialect name, then by SQLAlchemy's structural key (its hash is cached)."""


def shape_of(statement: Executable, key: Hashable, dialect: Dialect) -> Shape:
    """The shape of ``statement`` as executed on ``dialect``; ``key`` is its in-process key."""
    structure = key[0]  # type: ignore[index]
    shapes = _shapes.get(dialect.name)
    if shapes is None:
        shapes = _shapes[dialect.name] = {}
    shape = shapes.get(structure)
    if shape is None:
        shape = _build_shape(statement, key, dialect)
        if len(shapes) >= _MEMO_SIZE:
            del shapes[next(iter(shapes))]
        shapes[structure] = shape
    return shape


def stable_key(shape: Shape, key: Hashable) -> str:
    """The cross-process string key of one execution: shape digest plus bound values."""
    values = repr(key[1:])  # type: ignore[index]
    if " at 0x" in values:
        raise UnstableKeyError(values)
    return f"asc:{shape.digest}:{_digest(values)}"


def _build_shape(statement: Executable, key: Hashable, dialect: Dialect) -> Shape:
    select = resolved(statement)
    compiled = select.compile(dialect=dialect)
    tables = tables_read(statement, key)
    entities = getattr(compiled.compile_state, "_entities", None)
    if entities is not None:
        labels = [entity._label_name for entity in entities]
        extras = [entity._extra_entities for entity in entities]
        columns = [
            (entity._label_name, type(entity).__name__, _name_of(getattr(entity, "mapper", None)))
            for entity in entities
        ]
    else:
        result_columns = compiled._result_columns
        labels = [column.keyname for column in result_columns]
        extras = [column.objects for column in result_columns]
        columns = [(column.keyname, repr(column.type), None) for column in result_columns]
    entity_mappers = _mappers_in(select, entities or ())
    capture = _capture_plan(select, entity_mappers)
    parts = [
        f"v{PAYLOAD_VERSION}",
        dialect.name,
        str(compiled),
        repr(columns),
        repr(_loader_strategies(select)),
        repr(sorted((k, repr(v)) for k, v in select._execution_options.items())),
        repr(_schema(select, entity_mappers + list(capture))),
    ]
    return Shape(
        digest=_digest("\x1f".join(parts)),
        tables=tables,
        metadata=SimpleResultMetaData(labels, extras),
        mappers=_mapper_names(entity_mappers),
        capture=capture,
    )


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _name_of(mapper: Mapper[Any] | None) -> str | None:
    if mapper is None:
        return None
    cls = mapper.class_
    return f"{cls.__module__}.{cls.__qualname__}"


def _mappers_in(select: Any, entities: Iterable[Any]) -> list[Mapper[Any]]:
    mappers = [
        entity.mapper for entity in entities if isinstance(getattr(entity, "mapper", None), Mapper)
    ]
    for option in getattr(select, "_with_options", ()):
        for element in getattr(option, "context", ()):
            mappers.extend(token for token in element.path.path if isinstance(token, Mapper))
    return mappers


def _mapper_names(mappers: Iterable[Mapper[Any]]) -> dict[str, Mapper[Any]]:
    """Every mapper reachable from the statement's, by name: entity payloads name them."""
    names: dict[str, Mapper[Any]] = {}
    for mapper in mappers:
        for each in mapper.registry.mappers:
            name = _name_of(each)
            assert name is not None
            names[name] = each
    return names


def _capture_plan(
    select: Any, mappers: Iterable[Mapper[Any]]
) -> dict[Mapper[Any], tuple[str, ...]]:
    """Relationships the statement loads eagerly: loader options plus mapper defaults."""
    plan: dict[Mapper[Any], set[str]] = {}
    for option in getattr(select, "_with_options", ()):
        for element in getattr(option, "context", ()):
            strategy = dict(element.strategy or ())
            path = element.path.path
            if strategy.get("lazy") in _EAGER and len(path) >= 2:
                prop = path[-2] if isinstance(path[-1], Mapper) else path[-1]
                if isinstance(prop, RelationshipProperty):
                    plan.setdefault(prop.parent, set()).add(prop.key)
    seen: set[Mapper[Any]] = set()
    pending = list(mappers)
    while pending:
        mapper = pending.pop()
        if mapper in seen:
            continue
        seen.add(mapper)
        for relationship in mapper.relationships:
            if relationship.lazy in _EAGER:
                plan.setdefault(relationship.parent, set()).add(relationship.key)
                pending.append(relationship.mapper)
    return {mapper: tuple(sorted(keys)) for mapper, keys in plan.items()}


def _loader_strategies(select: Any) -> list[Any]:
    strategies = []
    for option in getattr(select, "_with_options", ()):
        for element in getattr(option, "context", ()):
            path = [
                _name_of(token) if isinstance(token, Mapper) else getattr(token, "key", repr(token))
                for token in element.path.path
            ]
            options = sorted((k, repr(v)) for k, v in (element.local_opts or {}).items())
            strategies.append((type(element).__name__, path, element.strategy, options))
    return strategies


def _schema(select: Any, mappers: Iterable[Mapper[Any]]) -> list[Any]:
    """Columns and types of the tables the statement names or its entities load, and the
    attributes of those entities: a change to any of them changes the shape digest."""
    tables = {
        table.fullname: table
        for table in find_tables(select, include_joins=True, include_aliases=True)
        if isinstance(table, Table)
    }
    described: dict[str, Any] = {}
    family = {each for entity in mappers for each in entity.self_and_descendants}
    for mapper in family:
        for table in mapper.tables:
            if isinstance(table, Table):
                tables.setdefault(table.fullname, table)
        described[f"mapper:{_name_of(mapper)}"] = [
            [prop.key for prop in mapper.column_attrs],
            [
                (rel.key, str(rel.lazy), rel.mapper.class_.__qualname__)
                for rel in mapper.relationships
            ],
        ]
    for name, table in tables.items():
        described[name] = [(c.key, repr(c.type), c.nullable) for c in table.columns]
    return sorted(described.items())

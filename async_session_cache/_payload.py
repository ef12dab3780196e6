"""Shared-region payloads: a result as plain column data, rebuilt in the reader's session.

A ``Payload`` holds no ORM instance and nothing session-bound: each entity is a record of its
mapper's name, its column values and the entities its eagerly loaded relationships hold.
A reader rebuilds the rows in its own session the way the ORM's loader does for a fresh
instance (identity key, dict, identity map) but without SQL and without ``merge()``'s
per-object cost; instances already in the session are reused, their unloaded attributes
filled in.

In process (memory regions) payloads are stored as they are; ``dumps``/``loads`` turn them
into versioned JSON bytes for network stores. Nothing is unpickled: a payload that cannot be
read (other version, foreign or truncated bytes, a mapper this process lacks) raises
``UnreadablePayload``, which the policy treats as a miss.

Uses SQLAlchemy private APIs (instance state internals, identity map, result internals).
"""

from __future__ import annotations

import base64
import copy
import datetime
import decimal
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy.engine import FrozenResult, IteratorResult, Result
from sqlalchemy.orm import InstanceState, Mapper, Session
from sqlalchemy.orm.attributes import set_committed_value

from ._results import FrozenRows, ReplayResult
from ._shapes import PAYLOAD_VERSION, Shape

MAGIC: Final = b"ASC"


class UnreadablePayload(Exception):
    """A stored payload this process cannot turn back into rows."""


class UnencodableResult(Exception):
    """A result holding something a payload cannot carry (an unsupported value type)."""


class _Unloaded:
    """Marks a column attribute that was not loaded on the cached instance."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNLOADED"


UNLOADED: Final = _Unloaded()
_MUTABLE: Final = (dict, list, set)


@dataclass(slots=True, eq=False)
class Payload:
    """A result as plain data. ``rows`` cells in ``entity_columns`` are entity indexes."""

    width: int
    single_entity: bool
    filtered: bool
    requires_unique: bool
    entity_columns: tuple[int, ...]
    mappers: tuple[str, ...]
    entities: tuple[tuple[int, tuple[Any, ...], tuple[tuple[str, Any], ...]], ...]
    rows: tuple[Any, ...]
    has_mutable: bool
    has_unloaded: bool
    nbytes: int
    # Worked out on the first rebuild and kept: an in-process payload is rebuilt by every hit.
    _rows_cache: list[Any] | None = field(default=None, repr=False)
    _plans_cache: list[MapperPlan] | None = field(default=None, repr=False)
    _attributes_cache: Any = field(default=None, repr=False)
    _columns_cache: list[dict[str, Any]] | None = field(default=None, repr=False)
    _identities_cache: list[tuple[Any, ...]] | None = field(default=None, repr=False)

    def identities(self, plans: list[MapperPlan]) -> list[tuple[Any, ...]]:
        """The identity key of each entity record, made once per payload (checking each
        record has its mapper's number of columns)."""
        identities = self._identities_cache
        if identities is None:
            identities = []
            for mapper_index, values, _ in self.entities:
                plan = plans[mapper_index]
                if len(plan.keys) != len(values):
                    raise UnreadablePayload(
                        f"{len(plan.keys)} columns expected, {len(values)} stored"
                    )
                identities.append((plan.identity_class, plan.identity(values), None))
            self._identities_cache = identities
        return identities

    def record_columns(self, plans: list[MapperPlan]) -> list[dict[str, Any]] | None:
        """Each entity record's column values by attribute key, made once per payload: an
        instance dict updated from a dict costs a fifth of an update from ``zip``. None
        when values must be copied or skipped one by one (mutable or unloaded ones)."""
        if self.has_mutable or self.has_unloaded:
            return None
        columns = self._columns_cache
        if columns is None:
            columns = [
                dict(zip(plans[mapper_index].keys, values, strict=True))
                for mapper_index, values, _ in self.entities
            ]
            self._columns_cache = columns
        return columns

    def plans(self, shape: Shape) -> list[MapperPlan]:
        """The ``MapperPlan`` of each mapper the payload names, in ``mappers`` order."""
        plans = self._plans_cache
        if plans is None:
            plans = self._plans_cache = [plan_of(shape.mappers[name]) for name in self.mappers]
        return plans

    def result_attributes(self, base: Any) -> Any:
        """``Result._attributes`` of a rebuilt result (``base``: a new result's own)."""
        attributes = self._attributes_cache
        if attributes is None:
            attributes = self._attributes_cache = base.union(
                {"filtered": self.filtered, "is_single_entity": self.single_entity}
            )
        return attributes


def encode(frozen: FrozenResult[Any], requires_unique: bool, shape: Shape) -> Payload:
    """Turn a frozen result (its rows already uniqued where required) into a payload."""
    encoder = _Encoder(shape)
    single = frozen._source_supports_scalars
    if single:
        rows: tuple[Any, ...] = tuple(encoder.cell(value) for value in frozen.data)
        entity_columns: tuple[int, ...] = (0,) if encoder.records else ()
        width = 1
    else:
        rows = tuple(tuple(encoder.cell(value) for value in row) for row in frozen.data)
        entity_columns = tuple(sorted(encoder.entity_columns_of(frozen.data)))
        width = len(shape.metadata.keys)
    return Payload(
        width=width,
        single_entity=single,
        filtered=bool(frozen._attributes.get("filtered", False)),
        requires_unique=requires_unique,
        entity_columns=entity_columns,
        mappers=tuple(encoder.mapper_names),
        entities=tuple(encoder.records),
        rows=rows,
        has_mutable=encoder.has_mutable,
        has_unloaded=encoder.has_unloaded,
        nbytes=encoder.nbytes,
    )


class _Encoder:
    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.records: list[Any] = []
        self.mapper_names: list[str] = []
        self._mapper_index: dict[Mapper[Any], int] = {}
        self._entity_index: dict[int, int] = {}
        self._entity_ids: set[int] = set()
        self.has_mutable = False
        self.has_unloaded = False
        self.nbytes = 64

    def cell(self, value: Any) -> Any:
        state = getattr(value, "_sa_instance_state", None)
        if isinstance(state, InstanceState):
            return self.entity(state)
        self.value(value)
        return value

    def value(self, value: Any) -> None:
        if isinstance(value, _MUTABLE):
            self.has_mutable = True
        self.nbytes += sys.getsizeof(value)

    def entity(self, state: InstanceState[Any]) -> int:
        index = self._entity_index.get(id(state))
        if index is not None:
            return index
        if state.key is None:
            raise UnencodableResult("a result row holds an instance that is not persistent")
        mapper = state.mapper
        mapper_index = self._mapper_index.get(mapper)
        if mapper_index is None:
            mapper_index = self._mapper_index[mapper] = len(self.mapper_names)
            name = f"{mapper.class_.__module__}.{mapper.class_.__qualname__}"
            if self.shape.mappers.get(name) is not mapper:
                raise UnencodableResult(f"{name} is not reachable from the statement")
            self.mapper_names.append(name)
        index = self._entity_index[id(state)] = len(self.records)
        self._entity_ids.add(index)
        self.records.append(None)  # placeholder: relationships may refer back to it
        dict_ = state.dict
        plan = plan_of(mapper)
        values = tuple(dict_.get(key, UNLOADED) for key in plan.keys)
        self.nbytes += plan.columns_nbytes  # kept beside the values once rebuilt in process
        for value in values:
            if value is UNLOADED:
                self.has_unloaded = True
            else:
                self.value(value)
        relations: list[tuple[str, Any]] = []
        for key in self.shape.captured(mapper):
            if key not in dict_:
                continue
            loaded = dict_[key]
            if loaded is None:
                relations.append((key, None))
            elif isinstance(loaded, list | set | tuple):
                relations.append((key, [self.entity(_state_of(child)) for child in loaded]))
            elif hasattr(loaded, "_sa_instance_state"):
                relations.append((key, self.entity(_state_of(loaded))))
            else:
                raise UnencodableResult(f"relationship {key!r} holds a {type(loaded).__name__}")
        self.records[index] = (mapper_index, values, tuple(relations))
        return index

    def entity_columns_of(self, data: Sequence[Any]) -> set[int]:
        columns: set[int] = set()
        for row in data:
            for position, value in enumerate(row):
                if hasattr(value, "_sa_instance_state"):
                    columns.add(position)
        return columns


PLAIN_CLASS_ATTRIBUTE: Final = "_async_session_cache_plain_class"
"""Names, on the cache's session class, the user's own class it extends."""


def fetch_payload(
    session: Session,
    statement: Any,
    shape: Shape,
    parameters: Any = None,
    execution_options: Any = None,
) -> Payload:
    """Run ``statement`` on ``session``'s connection in a new, empty session of the user's
    own session class (its listeners, e.g. criteria hooks, apply; the cache's do not) and
    encode what the database returned.

    A shared payload must hold the rows, not the filling session's view of them: its
    identity map may hold instances loaded before another session's commit, or changes it
    never flushed, and the ORM hands those back instead of the row's values. The new
    session joins the connection's transaction and leaves it as it was.
    """
    session_class: type[Session] = getattr(type(session), PLAIN_CLASS_ATTRIBUTE, type(session))
    with session_class(bind=session.connection()) as clean:
        rows = FrozenRows(
            clean.execute(statement, parameters, execution_options=execution_options or {})
        )
        return encode(rows.frozen, rows.requires_unique, shape)


def _state_of(instance: Any) -> InstanceState[Any]:
    state: InstanceState[Any] = instance._sa_instance_state
    return state


def materialize(payload: Payload, shape: Shape, session: Session) -> Result[Any]:
    """Rebuild the payload's rows in ``session``: a ``Result`` as ``execute`` returns it."""
    try:
        instances = _Materializer(payload, shape, session).instances() if payload.entities else []
        if payload.single_entity:
            rows: list[Any] = [
                instances[cell] if payload.entity_columns else cell for cell in payload.rows
            ]
        elif payload.entity_columns or payload.has_mutable:
            columns = payload.entity_columns
            thaw = copy.deepcopy if payload.has_mutable else _same
            rows = [
                tuple(
                    (instances[cell] if cell is not None else None)
                    if position in columns
                    else thaw(cell)
                    for position, cell in enumerate(row)
                )
                for row in payload.rows
            ]
        else:
            rows = _plain_rows(payload, shape)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise UnreadablePayload(f"payload does not fit this process: {exc!r}") from exc
    result = ReplayResult(shape.metadata, iter(rows))
    result._source_supports_scalars = payload.single_entity
    result._attributes = payload.result_attributes(result._attributes)
    if payload.requires_unique:
        result._unique_filter_state = (set(), _require_unique)
    if not payload.single_entity and not payload.entity_columns and not payload.has_mutable:
        result._replay_metadata = shape.metadata  # rows are finished Row objects
    return result


def _same(value: Any) -> Any:
    return value


def _plain_rows(payload: Payload, shape: Shape) -> list[Any]:
    """Rows of a payload without entities or mutable values as ``Row`` objects, built once
    per payload object (in-process payloads are shared by every hit; rows are immutable)."""
    rows = payload._rows_cache
    if rows is None:
        rows = payload._rows_cache = IteratorResult(shape.metadata, iter(payload.rows)).all()  # type: ignore[assignment]
    return rows  # type: ignore[return-value]


def _require_unique(row: Any) -> Any:
    from sqlalchemy.exc import InvalidRequestError

    raise InvalidRequestError(
        "The unique() method must be invoked on this Result, as it contains results that "
        "include joined eager loads against collections"
    )


@dataclass(slots=True, frozen=True)
class MapperPlan:
    """How payloads store one mapper's instances: column keys in order, where the primary
    key sits, and how to make an empty instance and reach its ``__dict__``."""

    keys: tuple[str, ...]
    pk_positions: tuple[int, ...]
    identity_class: type[Any]
    new_instance: Callable[[], Any]
    dict_of: Callable[[Any], dict[str, Any]]
    """The instrumentation's instance-dict getter (``state.dict`` without the weakref)."""
    columns_nbytes: int
    """The size of a record's values as a dict (``Payload.record_columns``)."""

    def identity(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """The primary key part of the identity key of a record."""
        positions = self.pk_positions
        if len(positions) == 1:
            return (values[positions[0]],)
        return tuple([values[p] for p in positions])


_plans: dict[Mapper[Any], MapperPlan] = {}


def plan_of(mapper: Mapper[Any]) -> MapperPlan:
    """The (remembered) ``MapperPlan`` of ``mapper``."""
    plan = _plans.get(mapper)
    if plan is None:
        keys = tuple(prop.key for prop in mapper.column_attrs)
        pk_keys = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
        manager = mapper.class_manager
        plan = _plans[mapper] = MapperPlan(
            keys=keys,
            pk_positions=tuple(keys.index(key) for key in pk_keys),
            identity_class=mapper._identity_class,
            new_instance=manager.new_instance,
            dict_of=manager.dict_getter(),
            columns_nbytes=sys.getsizeof(dict.fromkeys(keys)),
        )
    return plan


class _Materializer:
    def __init__(self, payload: Payload, shape: Shape, session: Session) -> None:
        self.payload = payload
        self.session = session
        self.plans = payload.plans(shape)

    def instances(self) -> list[Any]:
        """Every entity record as an instance of the session: existing ones reused (their
        unloaded attributes filled in), the others created persistent, without SQL.

        This is the hot loop of a shared hit: everything per mapper is looked up once, and
        a record of plain, fully loaded values goes into the instance dict in one
        dict-to-dict update."""
        session = self.session
        identity_map = session.identity_map
        get_state = identity_map.fast_get_state
        add = identity_map._add_unpresent
        session_id = session.hash_key
        plans = self.plans
        identities = self.payload.identities(plans)  # checks every record's length
        columns = self.payload.record_columns(plans)
        made: list[Any] = []
        related: list[tuple[Any, bool, tuple[tuple[str, Any], ...]]] = []
        for position, (mapper_index, values, relations) in enumerate(self.payload.entities):
            identity = identities[position]
            state: InstanceState[Any] | None = get_state(identity)
            instance = state.obj() if state is not None else None
            fresh = instance is None
            if instance is None:
                plan = plans[mapper_index]
                instance = plan.new_instance()
                state = instance._sa_instance_state
                if columns is not None:
                    plan.dict_of(instance).update(columns[position])
                else:
                    self._set(plan.dict_of(instance), plan.keys, values)
                state.key = identity  # identity_token stays None, its class default
                state.session_id = session_id
                add(state, identity)
            else:
                self._fill_unloaded(instance._sa_instance_state, plans[mapper_index].keys, values)
            made.append(instance)
            if relations:
                related.append((instance, fresh, relations))
        for instance, fresh, relations in related:
            self._relate(made, instance, fresh, relations)
        return made

    def _set(self, dict_: dict[str, Any], keys: tuple[str, ...], values: tuple[Any, ...]) -> None:
        thaw = self.payload.has_mutable
        for key, value in zip(keys, values, strict=True):
            if value is not UNLOADED:
                dict_[key] = copy.deepcopy(value) if thaw else value

    def _fill_unloaded(
        self, state: InstanceState[Any], keys: tuple[str, ...], values: tuple[Any, ...]
    ) -> None:
        """Give an instance already in the session the attributes it lacks, as a load would."""
        unloaded = state.unloaded
        if not unloaded:
            return
        filled = {
            key: value
            for key, value in zip(keys, values, strict=True)
            if key in unloaded and value is not UNLOADED
        }
        if filled:
            self._set(state.dict, tuple(filled), tuple(filled.values()))
            state._commit(state.dict, list(filled))

    def _relate(
        self,
        made: list[Any],
        instance: Any,
        is_fresh: bool,
        relations: tuple[tuple[str, Any], ...],
    ) -> None:
        """Set the eagerly loaded relationships the payload carries (unloaded ones only on
        instances that were already in the session)."""
        unloaded = None if is_fresh else instance._sa_instance_state.unloaded
        for key, ref in relations:
            if unloaded is not None and key not in unloaded:
                continue
            related: Any
            if ref is None:
                related = None
            elif isinstance(ref, list):
                related = [made[i] for i in ref]
            else:
                related = made[ref]
            set_committed_value(instance, key, related)


# -- bytes for network stores -------------------------------------------------------------


_PLAIN: Final = (str, int, float, bool, type(None))


def dumps(tokens: Sequence[str], payload: Payload) -> bytes:
    """The versioned JSON envelope of ``payload`` filled under table ``tokens``.

    Only values JSON cannot carry as they are get tagged (dates, decimals, bytes, ...), and
    the envelope says where they are: a reader decodes those cells and takes the rest as
    they come out of ``json.loads``."""
    entities_tagged = any(
        type(value) not in _PLAIN for _, values, _ in payload.entities for value in values
    )
    rows, tagged_columns = _rows_to_json(payload)
    body = [
        list(tokens),
        payload.width,
        payload.single_entity,
        payload.filtered,
        payload.requires_unique,
        payload.has_unloaded,
        list(payload.entity_columns),
        list(payload.mappers),
        entities_tagged,
        [
            [
                mapper,
                [_to_json(v) for v in values] if entities_tagged else list(values),
                [[k, r] for k, r in relations],
            ]
            for mapper, values, relations in payload.entities
        ],
        tagged_columns,
        rows,
    ]
    header = MAGIC + str(PAYLOAD_VERSION).encode() + b"\n"
    return header + json.dumps(body, separators=(",", ":"), allow_nan=True).encode()


def loads(data: bytes) -> tuple[tuple[str, ...], Payload]:
    """The tokens and payload of an envelope; ``UnreadablePayload`` for anything else."""
    header = MAGIC + str(PAYLOAD_VERSION).encode() + b"\n"
    if not isinstance(data, bytes) or not data.startswith(header):
        raise UnreadablePayload("not a payload of this version")
    try:
        (
            tokens,
            width,
            single,
            filtered,
            unique,
            unloaded,
            entity_columns,
            mappers,
            entities_tagged,
            entities,
            tagged_columns,
            rows,
        ) = json.loads(data[len(header) :])
        decode_values = _decode_all if entities_tagged else tuple
        payload = Payload(
            width=int(width),
            single_entity=bool(single),
            filtered=bool(filtered),
            requires_unique=bool(unique),
            entity_columns=tuple(int(c) for c in entity_columns),
            mappers=tuple(str(m) for m in mappers),
            entities=tuple(
                (int(mapper), decode_values(values), tuple((str(k), r) for k, r in relations))
                for mapper, values, relations in entities
            ),
            rows=_rows_from_json(rows, bool(single), [int(c) for c in tagged_columns]),
            has_mutable=False,
            has_unloaded=bool(unloaded),
            nbytes=len(data),
        )
        return tuple(str(t) for t in tokens), payload
    except UnreadablePayload:
        raise
    except Exception as exc:  # any malformed JSON/structure is unreadable, never a crash
        raise UnreadablePayload(f"malformed payload: {exc!r}") from exc


def _decode_all(values: list[Any]) -> tuple[Any, ...]:
    return tuple(_from_json(v) for v in values)


def _rows_to_json(payload: Payload) -> tuple[list[Any], list[int]]:
    """Rows for JSON, and the positions of the columns holding tagged values."""
    if payload.single_entity:
        if payload.entity_columns:
            return list(payload.rows), []
        rows = [_to_json(cell) for cell in payload.rows]
        tagged = any(type(cell) not in _PLAIN for cell in payload.rows)
        return rows, [0] if tagged else []
    entity_columns = payload.entity_columns
    tagged_columns = sorted(
        {
            position
            for row in payload.rows
            for position, cell in enumerate(row)
            if position not in entity_columns and type(cell) not in _PLAIN
        }
    )
    if not tagged_columns:
        return [list(row) for row in payload.rows], []
    return [
        [
            _to_json(cell) if position in tagged_columns else cell
            for position, cell in enumerate(row)
        ]
        for row in payload.rows
    ], tagged_columns


def _rows_from_json(rows: list[Any], single: bool, tagged_columns: list[int]) -> tuple[Any, ...]:
    if single:
        return tuple(_from_json(cell) for cell in rows) if tagged_columns else tuple(rows)
    if not tagged_columns:
        return tuple(map(tuple, rows))
    for row in rows:
        for position in tagged_columns:
            row[position] = _from_json(row[position])
    return tuple(map(tuple, rows))


_ENCODERS: dict[type, Callable[[Any], Any]] = {
    bytes: lambda v: {"$b": base64.b64encode(v).decode()},
    datetime.datetime: lambda v: {"$dt": v.isoformat()},
    datetime.date: lambda v: {"$d": v.isoformat()},
    datetime.time: lambda v: {"$t": v.isoformat()},
    datetime.timedelta: lambda v: {"$td": [v.days, v.seconds, v.microseconds]},
    decimal.Decimal: lambda v: {"$dec": str(v)},
    uuid.UUID: lambda v: {"$u": str(v)},
}
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$b": lambda v: base64.b64decode(v),
    "$dt": datetime.datetime.fromisoformat,
    "$d": datetime.date.fromisoformat,
    "$t": datetime.time.fromisoformat,
    "$td": lambda v: datetime.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "$dec": decimal.Decimal,
    "$u": uuid.UUID,
    "$x": lambda v: UNLOADED,
    "$o": lambda v: {k: _from_json(item) for k, item in v.items()},
}


def _to_json(value: Any) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if value is UNLOADED:
        return {"$x": 1}
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$o": {k: _to_json(item) for k, item in value.items()}}
    encoder = _ENCODERS.get(type(value))
    if encoder is None:
        raise UnencodableResult(f"cannot store a {type(value).__name__} value in a shared region")
    return encoder(value)


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        ((tag, inner),) = value.items()
        return _DECODERS[tag](inner)
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value

"""Randomized differential test: every cached read against the uncached truth of its session.

Workload
--------
Three clients, each with its own ``contextvars.Context`` holding its own ``cache.scope()``,
are stepped by a seeded scheduler (``random.Random(seed)``). Every step runs to completion as
an asyncio task in its client's context before the next one starts, so the scopes stay open
side by side, interleave operation by operation, and a seed replays exactly. A step is a cached
read (local region or the shared region), a write, the end of a transaction (commit or
rollback), a flush, ``expire_all``/``expunge_all``, or the end of the client's scope (a new one
opens). At most one client holds uncommitted writes at a time (a "writer token"): two open
write transactions on one event loop could wait on each other's row locks (PostgreSQL) or the
database lock (SQLite) forever.

The oracle
----------
The contract: ``cached_execute(stmt)`` returns what ``session.execute(stmt)`` would return in
that session at that moment (the committed state plus the session's own writes, ORM entities
being the session's instances). For every cached read the test works out that answer without
the cache, right after the cached read, from a freshly built equivalent statement:

* Column reads (Core columns, joins, aggregates, subqueries, CTEs): ``session.execute(stmt)``
  on the same session. Plain values do not depend on the identity map: this is the truth.
* Entity reads: ``session.execute`` on the same session is no oracle here, because the cached
  read itself puts instances into the identity map and an uncached read then returns those
  very instances unrefreshed: a stale instance planted by the cache would be its own witness.
  The truth is built from two independent sources instead. (1) The same ORM statement run by
  a second, empty ``AsyncSession`` bound to the same connection (it sees the committed state
  plus this session's flushed, uncommitted writes) gives the identities, their order, their
  column values and their eager-loaded related ids as the database has them. (2) A snapshot
  of the identity map taken *before* the cached read: an execute without populate_existing
  returns an instance already in the session as it is, filling in only what is unloaded
  (expired attributes, unloaded collections) from the row. So the expected entity has the
  identity and position of (1); it is the very object of the snapshot when one was there;
  each attribute or collection the snapshot had loaded keeps the snapshot's value, the
  others take (1)'s. The actual entities are read with ``getattr`` (a ``MissingGreenlet`` or
  any error is a mismatch); eager-loaded collections are compared as sorted related ids.
  ``test_oracle_accepts_uncached_execute`` shows the oracle finds no mismatch when the
  "cached" read is plain ``session.execute``; ``test_oracle_catches_a_stale_cache`` shows it
  does find them for a cache that never invalidates.

The local region's documented limit (README, "Limits": it does not see commits made by
other sessions during its scope) has its own rule. A read that the local region may serve
(a local read; a shared read while the client has uncommitted writes, which the design
routes to the local region) of tables another client committed to since this scope opened
passes if it equals the truth, or else equals an answer the same statement gave in this
scope since the client last wrote (or rolled back writes to) one of its tables, its entities
being the session's own instances with their in-memory values. Every other read (all shared
reads of a client without uncommitted writes, local reads of tables nobody else committed
to) must equal the truth exactly.

What a client wrote is taken from the INSERT/UPDATE/DELETE statements its session sent to
the database (a ``before_cursor_execute`` listener), never from the library's own analysis
nor from what a write operation meant to do (an insert of a user without addresses writes
no ``addresses`` row). A client that changed nothing sending one is a mismatch too.

The main test runs 10,000 operations (cached reads plus writes) on sqlite+memory and
postgresql+redis, 2,000 on the two other cases, each case with its own fixed seed. Reproduce
a case with ``ASC_DIFF_SEED=<seed> ASC_DIFF_OPS=<n> pytest ... -k <case>``.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pytest
from dogpile.cache import CacheRegion, make_region
from sqlalchemy import (
    Select,
    bindparam,
    delete,
    event,
    exists,
    func,
    insert,
    inspect,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, joinedload, selectinload
from sqlalchemy.util import await_only

from async_session_cache import SessionCache, cached_execute
from tests.models import Address, Tag, User, user_tags
from tests.unit.conftest import SQLLog

BASE_SEED: Final = 20_240_611
CLIENTS: Final = 3
FULL_OPS: Final = 10_000
"""Operations (cached reads + writes) per main case."""
OP_TIMEOUT: Final = 30.0
"""Seconds one step may take; a lock wait between clients would otherwise hang the run."""
MIN_HIT_FRACTION: Final = 0.45
MAX_USER_ID: Final = 14
REPORTED = 10
"""Mismatches described in full in the failure message."""

USERS: Final = frozenset({"users"})
ADDRESSES: Final = frozenset({"addresses"})
TAGS: Final = frozenset({"tags"})
USER_TAGS: Final = frozenset({"user_tags"})

COLUMN_KEYS: Final = {
    cls: tuple(prop.key for prop in inspect(cls).column_attrs) for cls in (User, Address, Tag)
}
COLLECTION_KEYS: Final = {User: ("addresses", "tags"), Address: (), Tag: ()}

Ident = tuple[str, Any]
Plain = tuple[tuple[Any, ...], ...]
Attributes = tuple[dict[str, Any], dict[str, Any]]
"""Column values by key, and eager collections as sorted related ids by key."""
Observed = list[tuple[Any, Ident, Attributes]]


# -- the reads --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadKind:
    """One statement family: how to build it, its parameters, the tables it depends on."""

    build: Callable[..., Select[Any]]
    choose: Callable[[random.Random], tuple[Any, ...]]
    tables: frozenset[str]
    entity: bool = False
    unique: bool = False
    collections: tuple[str, ...] = ()
    """User collections the statement loads eagerly."""


@dataclass(frozen=True, slots=True)
class Read:
    """One statement: a kind and its parameters."""

    kind: str
    params: tuple[Any, ...]

    def statement(self) -> Select[Any]:
        """A freshly built statement (never a shared statement object)."""
        return KINDS[self.kind].build(*self.params)


AGE_RANGES: Final = [(low, low + width) for low in (20, 22, 24, 26, 28) for width in (1, 4)]
ID_SETS: Final = [(1, 2, 3), (4, 5), (2, 6, 9, 11), (7, 12, 13)]


USER_BY_PK: Final = select(User).where(User.id == bindparam("k"))
AGES: Final = (
    select(User.id, User.age).where(User.age.between(bindparam("low"), bindparam("high")))
).order_by(User.id)


def _pk(rng: random.Random) -> tuple[Any, ...]:
    return (rng.randint(1, 12),)


def _range(rng: random.Random) -> tuple[Any, ...]:
    return rng.choice(AGE_RANGES)


def _ids(rng: random.Random) -> tuple[Any, ...]:
    return (rng.choice(ID_SETS),)


def _n(rng: random.Random) -> tuple[Any, ...]:
    return (rng.randint(0, 2),)


def _none(rng: random.Random) -> tuple[Any, ...]:
    return ()


def _users_with_more_addresses(n: int) -> Select[Any]:
    many = select(Address.user_id).group_by(Address.user_id).having(func.count(Address.id) > n)
    return select(User).where(User.id.in_(many)).order_by(User.id)


def _address_counts(n: int) -> Select[Any]:
    counts = (
        select(Address.user_id, func.count(Address.id).label("n"))
        .group_by(Address.user_id)
        .subquery()
    )
    return (
        select(User.id, User.name, counts.c.n)
        .join(counts, counts.c.user_id == User.id)
        .where(counts.c.n > n)
        .order_by(User.id)
    )


def _tag_counts(n: int) -> Select[Any]:
    counts = (
        select(user_tags.c.tag_id, func.count().label("n"))
        .group_by(user_tags.c.tag_id)
        .cte("tag_counts")
    )
    return (
        select(Tag.id, Tag.label, counts.c.n)
        .join(counts, counts.c.tag_id == Tag.id)
        .where(counts.c.n >= n)
        .order_by(Tag.id)
    )


KINDS: Final[dict[str, ReadKind]] = {
    # ORM entities
    "user_by_pk": ReadKind(lambda k: select(User).where(User.id == k), _pk, USERS, entity=True),
    "users_in_age_range": ReadKind(
        lambda a, b: select(User).where(User.age.between(a, b)).order_by(User.id),
        _range,
        USERS,
        entity=True,
    ),
    "users_join_addresses": ReadKind(
        lambda a, b: (
            select(User, Address)
            .join(User.addresses)
            .where(User.age.between(a, b))
            .order_by(Address.id)
        ),
        _range,
        USERS | ADDRESSES,
        entity=True,
    ),
    "users_selectin_addresses": ReadKind(
        lambda ids: (
            select(User)
            .options(selectinload(User.addresses))
            .where(User.id.in_(ids))
            .order_by(User.id)
        ),
        _ids,
        USERS | ADDRESSES,
        entity=True,
        collections=("addresses",),
    ),
    "users_joined_addresses": ReadKind(
        lambda a, b: (
            select(User)
            .options(joinedload(User.addresses))
            .where(User.age.between(a, b))
            .order_by(User.id)
        ),
        _range,
        USERS | ADDRESSES,
        entity=True,
        unique=True,
        collections=("addresses",),
    ),
    "users_selectin_tags": ReadKind(
        lambda ids: (
            select(User).options(selectinload(User.tags)).where(User.id.in_(ids)).order_by(User.id)
        ),
        _ids,
        USERS | TAGS | USER_TAGS,
        entity=True,
        collections=("tags",),
    ),
    "users_with_more_addresses": ReadKind(
        _users_with_more_addresses, _n, USERS | ADDRESSES, entity=True
    ),
    "addresses_of_user": ReadKind(
        lambda k: select(Address).where(Address.user_id == k).order_by(Address.id),
        _pk,
        ADDRESSES,
        entity=True,
    ),
    "all_tags": ReadKind(lambda: select(Tag).order_by(Tag.id), _none, TAGS, entity=True),
    # one statement built once, values given by .params() (not in its binds since 2.1)
    "user_by_pk_params": ReadKind(lambda k: USER_BY_PK.params(k=k), _pk, USERS, entity=True),
    "ages_params": ReadKind(lambda a, b: AGES.params(low=a, high=b), _range, USERS),
    # Core columns
    "name_by_pk": ReadKind(lambda k: select(User.name, User.age).where(User.id == k), _pk, USERS),
    "columns_in_age_range": ReadKind(
        lambda a, b: (
            select(User.id, User.name, User.age).where(User.age.between(a, b)).order_by(User.id)
        ),
        _range,
        USERS,
    ),
    "emails_join": ReadKind(
        lambda a, b: (
            select(User.name, Address.email)
            .join(Address, Address.user_id == User.id)
            .where(User.age.between(a, b))
            .order_by(Address.id)
        ),
        _range,
        USERS | ADDRESSES,
    ),
    "age_stats": ReadKind(
        lambda a: select(func.count(User.id), func.sum(User.age), func.avg(User.age)).where(
            User.age >= a
        ),
        lambda rng: (rng.choice((18, 22, 26)),),
        USERS,
    ),
    "age_histogram": ReadKind(
        lambda: select(User.age, func.count(User.id)).group_by(User.age).order_by(User.age),
        _none,
        USERS,
    ),
    "addresses_per_user": ReadKind(
        lambda n: (
            select(Address.user_id, func.count(Address.id))
            .group_by(Address.user_id)
            .having(func.count(Address.id) >= n)
            .order_by(Address.user_id)
        ),
        _n,
        ADDRESSES,
    ),
    "address_counts_subquery": ReadKind(_address_counts, _n, USERS | ADDRESSES),
    "tag_counts_cte": ReadKind(_tag_counts, _n, TAGS | USER_TAGS),
    "user_tag_labels": ReadKind(
        lambda k: (
            select(User.id, Tag.label)
            .join(user_tags, user_tags.c.user_id == User.id)
            .join(Tag, Tag.id == user_tags.c.tag_id)
            .where(User.id == k)
            .order_by(Tag.id)
        ),
        _pk,
        USERS | TAGS | USER_TAGS,
    ),
}
KIND_NAMES: Final = sorted(KINDS)


# -- observing results --------------------------------------------------------------------------


def _ident_id(instance: Any) -> Any:
    identity = inspect(instance).identity
    return identity[0] if identity else -1


def _ident(instance: Any) -> Ident:
    return (type(instance).__name__, _ident_id(instance))


def _is_entity(value: Any) -> bool:
    return hasattr(value, "_sa_instance_state")


def _plain(rows: Sequence[Any]) -> Plain:
    """Rows with entities replaced by their identity: what membership and order compare."""
    return tuple(
        tuple(("E", *_ident(value)) if _is_entity(value) else ("V", value) for value in row)
        for row in rows
    )


def _entities(rows: Sequence[Any]) -> list[Any]:
    seen: dict[int, Any] = {}
    for row in rows:
        for value in row:
            if _is_entity(value):
                seen.setdefault(id(value), value)
    return list(seen.values())


def _read_attributes(instance: Any, collections: Sequence[str]) -> Attributes:
    """Column values and eager collections' sorted ids, read as a caller would (getattr)."""
    columns: dict[str, Any] = {}
    for key in COLUMN_KEYS[type(instance)]:
        try:
            columns[key] = getattr(instance, key)
        except Exception as exc:  # MissingGreenlet on an unloaded attribute, ...
            columns[key] = f"<{type(exc).__name__}>"
    related: dict[str, Any] = {}
    for key in collections if isinstance(instance, User) else ():
        try:
            related[key] = sorted(_ident_id(child) for child in getattr(instance, key))
        except Exception as exc:
            related[key] = f"<{type(exc).__name__}>"
    return columns, related


@dataclass(slots=True)
class Before:
    """An instance of the identity map before a read: what it had loaded."""

    instance: Any
    columns: dict[str, Any]
    collections: dict[str, list[Any]]

    def collection_ids(self, key: str) -> list[Any]:
        return sorted(_ident_id(child) for child in self.collections[key])


def _snapshot(session: AsyncSession) -> dict[Ident, Before]:
    """Loaded column values and collections of every instance in the session, no SQL."""
    snapshot: dict[Ident, Before] = {}
    for state in session.sync_session.identity_map.all_states():
        instance = state.obj()
        if instance is None or state.key is None:
            continue
        loaded = state.dict
        cls = type(instance)
        snapshot[_ident(instance)] = Before(
            instance,
            {key: loaded[key] for key in COLUMN_KEYS[cls] if key in loaded},
            {key: list(loaded[key]) for key in COLLECTION_KEYS[cls] if key in loaded},
        )
    return snapshot


def _consume(result: Any, kind: ReadKind) -> list[Any]:
    return list((result.unique() if kind.unique else result).all())


@dataclass(slots=True)
class Truth:
    """The uncached answer: rows as identities/values, and each entity's attributes."""

    plain: Plain
    entities: dict[Ident, Attributes]


async def _truth(session: AsyncSession, read: Read) -> Truth:
    """The database's answer as this session's transaction sees it (see the module docs)."""
    kind = KINDS[read.kind]
    if not kind.entity:
        rows = (await session.execute(read.statement())).all()
        return Truth(_plain(rows), {})
    connection = await session.connection()
    fresh = AsyncSession(bind=connection)
    try:
        rows = _consume(await fresh.execute(read.statement()), kind)
        return Truth(
            _plain(rows),
            {_ident(e): _read_attributes(e, kind.collections) for e in _entities(rows)},
        )
    finally:
        await fresh.close()


# -- clients and the scheduler ------------------------------------------------------------------


Fetch = Callable[[AsyncSession, Read, str], Awaitable[list[Any]]]


async def fetch_cached(session: AsyncSession, read: Read, region: str) -> list[Any]:
    """The reads under test: ``cached_execute`` in the local or the shared region."""
    if region == "local":
        result = await cached_execute(read.statement())
    else:
        result = await cached_execute(read.statement(), region=region)
    return _consume(result, KINDS[read.kind])


async def fetch_uncached(session: AsyncSession, read: Read, region: str) -> list[Any]:
    """Plain ``session.execute``: the oracle must accept it (no false positives)."""
    return _consume(await session.execute(read.statement()), KINDS[read.kind])


class NeverInvalidated:
    """A broken cache for column reads (one dict, never invalidated): the oracle must object."""

    def __init__(self) -> None:
        self.rows: dict[Read, list[Any]] = {}

    async def __call__(self, session: AsyncSession, read: Read, region: str) -> list[Any]:
        if KINDS[read.kind].entity:
            return await fetch_cached(session, read, region)
        if read not in self.rows:
            self.rows[read] = await fetch_uncached(session, read, region)
        return self.rows[read]


class Client:
    """One request-like user of the cache: a context holding its scope, and what it saw."""

    def __init__(self, index: int, cache: SessionCache) -> None:
        self.index = index
        self.cache = cache
        self.context = contextvars.Context()
        self.scope: Any = None
        self.session: AsyncSession | None = None
        self.history: dict[Read, list[Plain]] = {}
        """Answers each statement gave in this scope since its tables were last written."""
        self.foreign: set[str] = set()
        """Tables other clients committed writes to since this scope opened."""
        self.txn_tables: set[str] = set()
        """Tables the open transaction sent INSERT/UPDATE/DELETE statements to."""
        self.recent: deque[Read] = deque(maxlen=6)

    async def run(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``function(*args)`` to completion as a task in this client's context."""
        task = asyncio.get_running_loop().create_task(function(*args), context=self.context)
        return await asyncio.wait_for(task, OP_TIMEOUT)

    async def open(self) -> None:
        self.scope = self.cache.scope()
        self.session = await self.run(self.scope.__aenter__)
        self.history.clear()
        self.foreign.clear()
        self.txn_tables.clear()
        self.recent.clear()

    async def close(self) -> None:
        scope, self.scope, self.session = self.scope, None, None
        if scope is not None:
            await self.run(scope.__aexit__, None, None, None)

    def forget(self, tables: set[str] | frozenset[str]) -> None:
        """Answers seen before a write (or a rollback) to ``tables`` may be served no more."""
        for read in [read for read in self.history if KINDS[read.kind].tables & tables]:
            del self.history[read]


@dataclass(slots=True)
class Tally:
    """What a run did and found."""

    reads: int = 0
    local_reads: int = 0
    shared_reads: int = 0
    writes: int = 0
    exact: int = 0
    """Reads equal to the truth."""
    by_limit: int = 0
    """Reads that differed from the truth in the documented local-region way."""
    mismatches: int = 0
    commits: int = 0
    rollbacks: int = 0
    flushes: int = 0
    restarts: int = 0
    expiries: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ops(self) -> int:
        return self.reads + self.writes


DML: Final = re.compile(r"\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+\"?(\w+)", re.IGNORECASE)


class WriteLog:
    """Tables the database was sent INSERT/UPDATE/DELETE statements for (a
    ``before_cursor_execute`` listener): what a client really wrote, independent of the
    library's own analysis. One step runs at a time, so the writes are the step's client's."""

    def __init__(self) -> None:
        self.tables: set[str] = set()

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        match = DML.match(statement)
        if match:
            self.tables.add(match.group(1).lower())

    def drain(self) -> set[str]:
        tables, self.tables = self.tables, set()
        return tables


WRITES: Final = (
    ("update_user", 8),
    ("insert_user", 3),
    ("delete_user", 2),
    ("add_address", 2),
    ("update_address", 2),
    ("tag_user", 2),
    ("untag_user", 2),
    ("bulk_update_ages", 3),
    ("bulk_delete_addresses", 2),
    ("insert_tag", 1),
    ("link_tag_core", 1),
    ("unlink_tag_core", 1),
    ("relabel_tag", 1),
    ("text_update", 1),
)
WRITER_MIX: Final = (
    ("write", 0.40),
    ("read", 0.40),
    ("end", 0.12),
    ("flush", 0.05),
    ("restart", 0.03),
)
"""What the client holding uncommitted writes does next (weights sum to 1)."""
READER_MIX: Final = (
    ("write", 0.08),
    ("end", 0.015),
    ("expire", 0.01),
    ("restart", 0.01),
    ("read", 0.885),
)
"""What any other client does next; "write" starts a transaction if nobody holds one."""
P_CLIENT_REPEAT: Final = 0.55
"""Chance a read repeats one of the client's last six statements ..."""
P_GLOBAL_REPEAT: Final = 0.35
"""... or one of the last twelve statements of any client (else: a random new one)."""
NAMES: Final = ("ann", "bob", "cy", "dee", "u1", "u2", "u3")


class Differential:
    """The seeded run: clients, the writer token, and the checks of every read."""

    def __init__(
        self,
        cache: SessionCache,
        engine: AsyncEngine,
        seed: int,
        ops: int,
        fetch: Fetch = fetch_cached,
    ) -> None:
        self.cache = cache
        self.engine = engine
        self.written = WriteLog()
        self.seed = seed
        self.ops = ops
        self.fetch = fetch
        self.rng = random.Random(seed)
        self.clients = [Client(i, cache) for i in range(CLIENTS)]
        self.writer: Client | None = None
        self.tally = Tally()
        self.log: deque[str] = deque(maxlen=30)
        self.recent: deque[Read] = deque(maxlen=12)
        self.next_address_id = 1000
        self.next_tag_id = 100
        self.step_no = 0

    async def run(self) -> Tally:
        event.listen(self.engine.sync_engine, "before_cursor_execute", self.written)
        try:
            for client in self.clients:
                await client.open()
            while self.tally.ops < self.ops:
                self.step_no += 1
                try:
                    await self.step()
                except Exception as exc:
                    raise AssertionError(
                        f"seed {self.seed}: step {self.step_no} raised {exc!r}\n"
                        + "\n".join(self.log)
                    ) from exc
        finally:
            for client in self.clients:
                try:
                    await client.close()
                except Exception as exc:  # pragma: no cover - report, keep closing the rest
                    self.tally.failures.append(f"closing client {client.index}: {exc!r}")
            event.remove(self.engine.sync_engine, "before_cursor_execute", self.written)
        return self.tally

    def wrote(self, client: Client) -> None:
        """Account the SQL writes of the step so far to ``client``'s transaction."""
        tables = self.written.drain()
        if not tables:
            return
        if client is not self.writer:  # it made no change: a cached read made it write
            self.tally.mismatches += 1
            if len(self.tally.failures) < REPORTED:
                self.tally.failures.append(
                    f"step {self.step_no} client {client.index} sent writes to {sorted(tables)}"
                    " though it changed nothing\n      " + "\n      ".join(list(self.log)[-12:])
                )
        client.txn_tables |= tables
        client.forget(tables)

    # -- one step --------------------------------------------------------------------------

    async def step(self) -> None:
        rng = self.rng
        client = rng.choice(self.clients)
        draw = rng.random()
        if client is self.writer:
            action = _pick(WRITER_MIX, draw)
            if action == "write":
                await self.write(client)
            elif action == "read":
                await self.read(client)
            elif action == "end":
                await self.end_transaction(client, commit=rng.random() < 0.7)
            elif action == "flush":
                await self.flush(client)
            else:
                await self.restart(client)
            return
        action = _pick(READER_MIX, draw)
        if action == "write" and self.writer is None:
            self.writer = client
            await self.write(client)
        elif action == "end":
            await self.end_transaction(client, commit=rng.random() < 0.5)
        elif action == "expire":
            await self.expire(client, expunge=rng.random() < 0.4)
        elif action == "restart":
            await self.restart(client)
        else:
            await self.read(client)

    async def read(self, client: Client) -> None:
        rng = self.rng
        draw = rng.random()
        if draw < P_CLIENT_REPEAT and client.recent:
            read = rng.choice(client.recent)
        elif draw < P_CLIENT_REPEAT + P_GLOBAL_REPEAT and self.recent:
            read = rng.choice(self.recent)
        else:
            name = rng.choice(KIND_NAMES)
            read = Read(name, KINDS[name].choose(rng))
        client.recent.append(read)
        self.recent.append(read)
        region = "shared" if rng.random() < 0.5 else "local"
        self.log.append(f"{self.step_no} c{client.index} read {region} {read}")
        self.tally.reads += 1
        if region == "local":
            self.tally.local_reads += 1
        else:
            self.tally.shared_reads += 1
        await client.run(self.check_read, client, read, region)

    async def check_read(self, client: Client, read: Read, region: str) -> None:
        """The cached read, then the truth; the verdict goes to the tally."""
        session = client.session
        assert session is not None
        kind = KINDS[read.kind]
        before = _snapshot(session) if kind.entity else {}
        rows = await self.fetch(session, read, region)
        self.wrote(client)  # the read's autoflush of pending changes
        plain = _plain(rows)
        observed = [(e, _ident(e), _read_attributes(e, kind.collections)) for e in _entities(rows)]
        truth = await _truth(session, read)

        problems = self._exact_problems(session, plain, observed, truth, before)
        if not problems:
            self.tally.exact += 1
        else:
            local_may_serve = region == "local" or bool(client.txn_tables)
            limited = local_may_serve and bool(kind.tables & client.foreign)
            if (
                limited
                and plain in client.history.get(read, ())
                and not self._in_memory_problems(observed, before, kind)
            ):
                self.tally.by_limit += 1
            else:
                self.tally.mismatches += 1
                if len(self.tally.failures) < REPORTED:
                    self.tally.failures.append(
                        f"step {self.step_no} client {client.index} {region} {read}: "
                        + "; ".join(problems)
                        + f" (local region may serve it: {local_may_serve}, others committed"
                        f" to {sorted(client.foreign)}, uncommitted {sorted(client.txn_tables)})"
                        + "\n    recent steps:\n      "
                        + "\n      ".join(list(self.log)[-12:])
                    )
        seen = client.history.setdefault(read, [])
        if truth.plain not in seen:
            seen.append(truth.plain)

    @staticmethod
    def _exact_problems(
        session: AsyncSession,
        plain: Plain,
        observed: Observed,
        truth: Truth,
        before: dict[Ident, Before],
    ) -> list[str]:
        if plain != truth.plain:
            return [f"rows {_short(plain)} != truth {_short(truth.plain)}"]
        problems = []
        identity_map = session.sync_session.identity_map
        for instance, ident, (columns, related) in observed:
            had = before.get(ident)
            if had is not None:
                if instance is not had.instance:
                    problems.append(f"{ident} is not the instance the session holds")
            elif identity_map.get(inspect(instance).key) is not instance:
                problems.append(f"{ident} is not in the session's identity map")
            db_columns, db_related = truth.entities[ident]
            want_columns = {**db_columns, **(had.columns if had else {})}
            want_related = dict(db_related)
            if had is not None:
                for key in db_related:
                    if key in had.collections:
                        want_related[key] = had.collection_ids(key)
            if columns != want_columns:
                problems.append(f"{ident} columns {columns} != expected {want_columns}")
            if related != want_related:
                problems.append(f"{ident} collections {related} != expected {want_related}")
        return problems

    @staticmethod
    def _in_memory_problems(
        observed: Observed,
        before: dict[Ident, Before],
        kind: ReadKind,
    ) -> list[str]:
        """An older answer served by the local region holds the session's own instances,
        fully loaded, as they were in memory."""
        problems = []
        for instance, ident, (columns, related) in observed:
            had = before.get(ident)
            if had is None or instance is not had.instance:
                problems.append(f"{ident} was not in the session")
                continue
            if columns != had.columns:
                problems.append(f"{ident} columns {columns} != in memory {had.columns}")
            for key in kind.collections if isinstance(instance, User) else ():
                if key not in had.collections or related.get(key) != had.collection_ids(key):
                    problems.append(f"{ident}.{key} is not the loaded collection")
        return problems

    # -- writes and transactions -------------------------------------------------------------

    def _new_address_id(self) -> int:
        self.next_address_id += 1
        return self.next_address_id

    def _write_params(self, name: str) -> tuple[Any, ...]:
        rng = self.rng
        user_id = rng.randint(1, MAX_USER_ID)
        if name == "update_user":
            return (user_id, rng.choice(NAMES), rng.choice((None, rng.randint(19, 31))))
        if name == "insert_user":
            addresses = tuple(self._new_address_id() for _ in range(rng.randint(0, 3)))
            return (user_id, rng.choice(NAMES), rng.randint(19, 31), addresses)
        if name == "add_address":
            return (user_id, self._new_address_id())
        if name == "update_address":
            return (user_id, f"{rng.choice(NAMES)}-{rng.randint(0, 1)}@example.org")
        if name in ("tag_user", "untag_user", "link_tag_core", "unlink_tag_core"):
            return (user_id, rng.randint(1, 3))
        if name == "bulk_update_ages":
            return (*rng.choice(AGE_RANGES), rng.choice((-1, 1)))
        if name == "bulk_delete_addresses":
            return (user_id, rng.choice((None, "%-1@%", "%-0@%")))
        if name == "insert_tag":
            self.next_tag_id += 1
            return (self.next_tag_id, f"t{self.next_tag_id}")
        if name == "relabel_tag":
            return (rng.randint(1, 3), rng.choice(("red", "green", "blue")))
        return (user_id,)

    async def write(self, client: Client) -> None:
        names, weights = zip(*WRITES, strict=True)
        name = self.rng.choices(names, weights)[0]
        params = self._write_params(name)
        self.log.append(f"{self.step_no} c{client.index} write {name}{params}")
        self.tally.writes += 1
        await client.run(apply_write, client.session, name, params)
        self.wrote(client)
        if self.rng.random() < 0.3:
            await self.flush(client)

    async def flush(self, client: Client) -> None:
        self.log.append(f"{self.step_no} c{client.index} flush")
        self.tally.flushes += 1
        assert client.session is not None
        await client.run(client.session.flush)
        self.wrote(client)

    async def end_transaction(self, client: Client, *, commit: bool) -> None:
        session = client.session
        assert session is not None
        self.log.append(f"{self.step_no} c{client.index} {'commit' if commit else 'rollback'}")
        if commit:
            self.tally.commits += 1
            await client.run(session.commit)
            self.wrote(client)  # commit() flushes what is pending
            for other in self.clients:
                if other is not client:
                    other.foreign |= client.txn_tables
        else:
            self.tally.rollbacks += 1
            await client.run(session.rollback)
            self.wrote(client)
            client.forget(client.txn_tables)
        client.txn_tables.clear()
        if client is self.writer:
            self.writer = None

    async def expire(self, client: Client, *, expunge: bool) -> None:
        session = client.session
        assert session is not None
        self.log.append(f"{self.step_no} c{client.index} {'expunge' if expunge else 'expire'}_all")
        self.tally.expiries += 1
        await client.run(session.flush)
        self.wrote(client)
        if expunge:
            session.expunge_all()
        else:
            session.expire_all()

    async def restart(self, client: Client) -> None:
        """End the client's scope (uncommitted writes are discarded) and open a new one."""
        self.log.append(f"{self.step_no} c{client.index} new scope")
        self.tally.restarts += 1
        await client.close()
        self.written.drain()  # nothing: closing rolls back
        if client is self.writer:
            self.writer = None
        await client.open()


async def apply_write(session: AsyncSession, name: str, params: tuple[Any, ...]) -> None:
    """Perform one write in ``session`` (some leave changes pending for the next flush)."""
    await session.flush()  # the previous write's pending changes first
    if name == "update_user":
        user_id, new_name, new_age = params
        user = await session.get(User, user_id, populate_existing=True)
        if user is None:
            return
        user.name = new_name
        if new_age is not None:
            user.age = new_age
        return
    if name == "insert_user":
        user_id, new_name, age, address_ids = params
        if await session.get(User, user_id, populate_existing=True) is not None:
            return
        key = inspect(User).identity_key_from_primary_key((user_id,))
        stale = session.sync_session.identity_map.get(key)
        if stale is not None:  # deleted by another client since this session loaded it
            session.expunge(stale)
        session.add(
            User(
                id=user_id,
                name=new_name,
                age=age,
                addresses=[
                    Address(id=address_id, email=f"{new_name}-{address_id % 2}@example.org")
                    for address_id in address_ids
                ],
            )
        )
        return
    if name == "delete_user":
        (user_id,) = params
        user = await session.get(User, user_id, populate_existing=True)
        if user is None:
            return
        await session.refresh(user, ["addresses", "tags"])
        await session.delete(user)
        return
    if name == "add_address":
        user_id, address_id = params
        user = await session.get(User, user_id, populate_existing=True)
        if user is None:
            return
        await session.refresh(user, ["addresses"])
        user.addresses.append(Address(id=address_id, email=f"new-{address_id % 2}@example.org"))
        return
    if name == "update_address":
        user_id, email = params
        address = (
            await session.execute(
                select(Address)
                .where(Address.user_id == user_id)
                .order_by(Address.id)
                .limit(1)
                .execution_options(populate_existing=True)
            )
        ).scalar_one_or_none()
        if address is None:
            return
        address.email = email
        return
    if name in ("tag_user", "untag_user"):
        user_id, tag_id = params
        user = await session.get(User, user_id, populate_existing=True)
        tag = await session.get(Tag, tag_id)
        if user is None or tag is None:
            return
        await session.refresh(user, ["tags"])
        if name == "tag_user" and tag not in user.tags:
            user.tags.append(tag)
        elif name == "untag_user" and tag in user.tags:
            user.tags.remove(tag)
        return
    if name == "bulk_update_ages":
        low, high, delta = params
        await session.execute(
            update(User).where(User.age.between(low, high)).values(age=User.age + delta)
        )
        return
    if name == "bulk_delete_addresses":
        user_id, pattern = params
        criteria = (
            [Address.user_id == user_id]
            if pattern is None
            else [Address.user_id <= user_id, Address.email.like(pattern)]
        )
        await session.execute(delete(Address).where(*criteria))
        return
    if name == "insert_tag":
        tag_id, label = params
        await session.execute(insert(Tag.__table__).values(id=tag_id, label=label))
        return
    if name == "link_tag_core":
        user_id, tag_id = params
        linked = exists().where(user_tags.c.user_id == user_id, user_tags.c.tag_id == tag_id)
        await session.execute(
            insert(user_tags).from_select(
                ["user_id", "tag_id"],
                select(User.id, literal(tag_id)).where(User.id == user_id, ~linked),
            )
        )
        return
    if name == "unlink_tag_core":
        user_id, tag_id = params
        await session.execute(
            delete(user_tags).where(user_tags.c.user_id == user_id, user_tags.c.tag_id == tag_id)
        )
        return
    if name == "relabel_tag":
        tag_id, label = params
        await session.execute(update(Tag).where(Tag.id == tag_id).values(label=label))
        return
    if name == "text_update":
        (user_id,) = params
        await session.execute(
            text("UPDATE users SET age = age + 1 WHERE id = :id"), {"id": user_id}
        )
        return
    raise AssertionError(name)


def _pick(mix: Sequence[tuple[str, float]], draw: float) -> str:
    """The action whose share of [0, 1) holds ``draw``."""
    for action, weight in mix:
        if draw < weight:
            return action
        draw -= weight
    return mix[-1][0]


def _short(plain: Plain, limit: int = 6) -> str:
    text_ = repr(plain[:limit])
    return text_ if len(plain) <= limit else f"{text_[:-1]}, ... {len(plain)} rows)"


def _case(engine: AsyncEngine, region: CacheRegion) -> tuple[str, str]:
    store = "redis" if "redis" in type(region.actual_backend).__module__ else "memory"
    return engine.dialect.name, store


FULL_CASES: Final = {("sqlite", "memory"), ("postgresql", "redis")}
CASE_SEEDS: Final = {
    ("sqlite", "memory"): 0,
    ("sqlite", "redis"): 1,
    ("postgresql", "memory"): 2,
    ("postgresql", "redis"): 3,
}


def _verdict(seed: int, ops: int, tally: Tally) -> str:
    return (
        f"seed {seed} (ASC_DIFF_SEED={seed} ASC_DIFF_OPS={ops}): {tally.mismatches} mismatches"
        f" in {tally.reads} reads\n" + "\n".join(tally.failures)
    )


# -- the main test ----------------------------------------------------------------------------


async def test_cached_reads_match_uncached_reads(
    shared_cache: SessionCache, engine: AsyncEngine, shared_region: CacheRegion
) -> None:
    """Random interleavings of reads and writes across three open scopes: every cached read
    equals the uncached truth of its session at that moment."""
    case = _case(engine, shared_region)
    seed = int(os.environ.get("ASC_DIFF_SEED", BASE_SEED + CASE_SEEDS[case]))
    default_ops = FULL_OPS if case in FULL_CASES else FULL_OPS // 5
    ops = int(os.environ.get("ASC_DIFF_OPS", default_ops))
    started = time.perf_counter()
    tally = await Differential(shared_cache, engine, seed, ops).run()
    elapsed = time.perf_counter() - started
    stats = shared_cache.stats()
    local, shared = stats["local"], stats["shared"]
    hits = local["hits"] + shared["hits"]
    print(
        f"\n{case} seed {seed}: {tally.ops} ops ({tally.reads} reads: {tally.local_reads} local,"
        f" {tally.shared_reads} shared; {tally.writes} writes; {tally.commits} commits,"
        f" {tally.rollbacks} rollbacks, {tally.flushes} flushes, {tally.expiries} expiries,"
        f" {tally.restarts} new scopes) in {elapsed:.1f}s; hits {hits / tally.reads:.0%}"
        f" (local {local['hits']}, shared {shared['hits']}, local misses {local['misses']},"
        f" shared misses {shared['misses']}); exact {tally.exact}, older answers within the"
        f" local region's documented limit {tally.by_limit}, mismatches {tally.mismatches}"
    )
    assert tally.mismatches == 0 and not tally.failures, _verdict(seed, ops, tally)
    assert tally.ops >= ops
    assert hits >= MIN_HIT_FRACTION * tally.reads, (seed, stats)
    assert local["hits"] > 0.3 * tally.local_reads, (seed, stats)
    assert shared["hits"] > 0.3 * tally.shared_reads, (seed, stats)
    assert tally.exact >= 0.9 * tally.reads, "most reads must be checked exactly"


# -- the oracle's own checks --------------------------------------------------------------------


@pytest.fixture
def memory_cache(engine: AsyncEngine) -> SessionCache:
    """A SessionCache with an in-process shared region (the oracle checks need no redis)."""
    return SessionCache(
        async_sessionmaker(engine, expire_on_commit=False),
        regions={"shared": make_region().configure("async_session_cache.memory")},
    )


async def test_oracle_accepts_uncached_execute(
    memory_cache: SessionCache, engine: AsyncEngine
) -> None:
    """The oracle finds no mismatch when the "cached" read is plain session.execute."""
    tally = await Differential(memory_cache, engine, BASE_SEED, 1_500, fetch=fetch_uncached).run()
    assert tally.mismatches == 0, _verdict(BASE_SEED, 1_500, tally)
    assert tally.by_limit == 0


async def test_oracle_catches_a_stale_cache(
    memory_cache: SessionCache, engine: AsyncEngine
) -> None:
    """The oracle reports mismatches for a cache of column reads that never invalidates."""
    tally = await Differential(
        memory_cache, engine, BASE_SEED, 1_500, fetch=NeverInvalidated()
    ).run()
    assert tally.mismatches > 50, tally


# -- targeted regressions: where peers fail (DESIGN.md) -----------------------------------------


def _name_of_3() -> Select[Any]:
    return select(User.name).where(User.id == 3)


async def test_reader_between_flush_and_commit_gets_committed_rows(
    shared_cache: SessionCache,
) -> None:
    """A reader between the writer's flush and commit fills the shared region with committed
    rows only, and reads the writer's rows once commit() has returned."""
    async with shared_cache.scope() as writer:
        user = await writer.get(User, 3)
        assert user is not None
        user.name = "flushed"
        await writer.flush()
        assert (await cached_execute(_name_of_3(), region="shared")).scalar_one() == "flushed"
        async with shared_cache.scope():
            for _ in range(2):  # a miss that fills, then a hit of that fill
                assert (await cached_execute(_name_of_3(), region="shared")).scalar_one() == "u2"
        assert shared_cache.stats()["shared"]["hits"] == 1
        await writer.commit()
    async with shared_cache.scope():
        assert (await cached_execute(_name_of_3(), region="shared")).scalar_one() == "flushed"


async def test_fill_just_before_the_database_commit_is_stale_after_it(
    shared_cache: SessionCache,
) -> None:
    """A reader filling the shared region in the commit window (before_commit: flushed, not
    yet committed) does not outlive the commit: invalidation runs after the COMMIT."""
    seen: list[str] = []
    async with shared_cache.scope() as reader, shared_cache.scope() as writer:
        user = await writer.get(User, 3)
        assert user is not None
        user.name = "committed"
        await writer.flush()

        def fill_in_window(session: Any) -> None:
            result = await_only(cached_execute(_name_of_3(), region="shared", session=reader))
            seen.append(result.scalar_one())

        event.listen(writer.sync_session, "before_commit", fill_in_window)
        await writer.commit()
    assert seen == ["u2"]
    assert shared_cache.stats()["shared"]["fills"] == 1
    async with shared_cache.scope():
        assert (await cached_execute(_name_of_3(), region="shared")).scalar_one() == "committed"


async def test_fill_whose_query_ran_before_a_commit_is_not_stored(
    shared_cache: SessionCache,
) -> None:
    """A fill whose SELECT saw the old rows but which finishes after a commit replaced the
    tables' versions is dropped, not served as current."""
    fired: list[bool] = []
    async with shared_cache.scope() as writer:
        user = await writer.get(User, 3)
        assert user is not None
        user.name = "raced"
        await writer.flush()

        def commit_after_query(state: Any) -> Any:
            if fired or not state.is_select:
                return None
            fired.append(True)
            frozen = state.invoke_statement().freeze()  # the query sees the old row
            await_only(writer.commit())  # ... and the commit lands before the fill is stored
            return frozen()

        # The fill runs in a clean session of the plain Session class: hook the class.
        event.listen(Session, "do_orm_execute", commit_after_query)
        try:
            async with shared_cache.scope():
                assert (await cached_execute(_name_of_3(), region="shared")).scalar_one() == "u2"
        finally:
            event.remove(Session, "do_orm_execute", commit_after_query)
    assert fired == [True]
    assert shared_cache.stats()["shared"]["fills"] == 0
    async with shared_cache.scope():
        assert (await cached_execute(_name_of_3(), region="shared")).scalar_one() == "raced"


def _origin(task: asyncio.Task[Any]) -> str:
    """The file defining the coroutine a task runs."""
    code = getattr(task.get_coro(), "cr_code", None)
    return code.co_filename if code is not None else ""


async def test_commit_returns_after_invalidating(shared_cache: SessionCache) -> None:
    """Once commit() returns, another scope's read is fresh with no sleep, and commit() spawned
    no task to do it (no fire-and-forget invalidation)."""
    statement = select(User.name, User.age).where(User.id == 5)
    async with shared_cache.scope():
        assert (await cached_execute(statement, region="shared")).one() == ("u4", 24)
    loop = asyncio.get_running_loop()
    spawned: list[asyncio.Task[Any]] = []

    def recording_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        spawned.append(task)
        return task

    async with shared_cache.scope() as writer:
        await writer.execute(update(User).where(User.id == 5).values(name="now", age=50))
        previous = loop.get_task_factory()
        loop.set_task_factory(recording_factory)
        try:
            await writer.commit()
        finally:
            loop.set_task_factory(previous)
        # The store's client may use short tasks of its own; none may outlive the commit,
        # and none may be the cache's own work.
        leftovers = [
            task for task in spawned if not task.done() or "async_session_cache" in _origin(task)
        ]
        assert leftovers == []
        async with shared_cache.scope():
            assert (await cached_execute(statement, region="shared")).one() == ("now", 50)


async def test_rollback_leaves_the_shared_region_untouched(
    shared_cache: SessionCache, sql: SQLLog
) -> None:
    """Reads inside a transaction that is rolled back neither fill the shared region with
    its rows nor invalidate the entries other scopes filled."""
    statement = select(User).options(selectinload(User.addresses)).where(User.id == 6)
    async with shared_cache.scope():
        (await cached_execute(statement, region="shared")).scalar_one()
    async with shared_cache.scope() as writer:
        user = await writer.get(User, 6)
        assert user is not None
        user.name = "discarded"
        await writer.refresh(user, ["addresses"])
        user.addresses.append(Address(id=900, email="discarded@example.org"))
        await writer.flush()
        mine = (await cached_execute(statement, region="shared")).scalar_one()
        assert (mine.name, len(mine.addresses)) == ("discarded", 3)
        await writer.rollback()
    assert shared_cache.stats()["shared"]["fills"] == 1
    async with shared_cache.scope():
        queries = sql.count()
        other = (await cached_execute(statement, region="shared")).scalar_one()
        assert sql.count() == queries, "the entry filled before the transaction still serves"
        assert (other.name, [a.id for a in other.addresses]) == ("u5", [11, 12])


# -- minimal reproductions of what the differential test found ----------------------------------


async def test_commit_ends_the_sessions_uncommitted_writes(shared_cache: SessionCache) -> None:
    """After commit() the session's shared reads of tables it wrote use the shared region
    again (so they see later commits of other sessions), and a read-only commit invalidates
    nothing."""
    statement = select(User.name).where(User.id == 2)
    async with shared_cache.scope() as session:
        await session.execute(update(User).where(User.id == 1).values(name="mine"))
        await session.commit()
        assert (await cached_execute(statement, region="shared")).scalar_one() == "u1"
        async with shared_cache.scope() as other:
            await other.execute(update(User).where(User.id == 2).values(name="theirs"))
            await other.commit()
        assert (await cached_execute(statement, region="shared")).scalar_one() == "theirs"
        invalidations = shared_cache.stats()["shared"]["invalidations"]
        await session.commit()
        assert shared_cache.stats()["shared"]["invalidations"] == invalidations


async def test_shared_fill_does_not_publish_a_stale_identity_map(
    shared_cache: SessionCache,
) -> None:
    """A session holding an instance loaded before another session's commit is served that
    instance (as execute() would), but its outdated values must not fill the shared region:
    other scopes read the committed row."""
    statement = select(User).where(User.id == 6)
    async with shared_cache.scope() as holder:
        held = await holder.get(User, 6)
        async with shared_cache.scope() as writer:
            await writer.execute(update(User).where(User.id == 6).values(age=99))
            await writer.commit()
        mine = (await cached_execute(statement, region="shared")).scalar_one()
        assert mine is held and mine.age == 25  # the identity map wins, as in execute()
    async with shared_cache.scope():
        assert (await cached_execute(statement, region="shared")).scalar_one().age == 99


async def test_shared_fill_does_not_publish_a_stale_loaded_collection(
    shared_cache: SessionCache,
) -> None:
    """A session whose instance holds a collection loaded before another session's commit
    keeps it (as execute() would), but the outdated collection must not fill the shared
    region: other scopes get the committed related rows."""
    statement = select(User).options(selectinload(User.addresses)).where(User.id == 3)
    async with shared_cache.scope() as holder:
        held = (await holder.execute(statement)).scalar_one()
        assert [address.id for address in held.addresses] == [5, 6]
        async with shared_cache.scope() as writer:
            await writer.execute(delete(Address).where(Address.id == 6))
            await writer.commit()
        mine = (await cached_execute(statement, region="shared")).scalar_one()
        assert [address.id for address in mine.addresses] == [5, 6]  # as execute() would
    async with shared_cache.scope():
        other = (await cached_execute(statement, region="shared")).scalar_one()
        assert [address.id for address in other.addresses] == [5]


async def test_unflushed_change_never_reaches_the_shared_region(
    engine: AsyncEngine, shared_region: CacheRegion
) -> None:
    """With autoflush off, a shared read in a session holding an unflushed change must not
    publish the change: other scopes never see data that was not committed."""
    cache = SessionCache(
        async_sessionmaker(engine, expire_on_commit=False, autoflush=False),
        regions={"shared": shared_region},
    )
    statement = select(User).where(User.id == 7)
    try:
        async with cache.scope() as session:
            user = await session.get(User, 7)
            assert user is not None
            user.name = "never committed"
            mine = (await cached_execute(statement, region="shared")).scalar_one()
            assert mine is user and mine.name == "never committed"  # as execute() would
            async with cache.scope():
                other = (await cached_execute(statement, region="shared")).scalar_one()
                assert other.name == "u6"
            await session.rollback()
        async with cache.scope():
            assert (await cached_execute(statement, region="shared")).scalar_one().name == "u6"
    finally:
        await cache.aclose()


async def test_local_hit_after_populate_existing_has_its_eager_collection(
    cache: SessionCache,
) -> None:
    """A populate_existing load resets an instance's lazy collections without expiring them;
    a later local hit of a statement that eager-loads the collection must still have it
    loaded (not raise MissingGreenlet on access)."""
    statement = select(User).options(selectinload(User.tags)).where(User.id == 1)
    async with cache.scope() as session:
        (await cached_execute(statement)).scalar_one()
        await session.get(User, 1, populate_existing=True)
        user = (await cached_execute(statement)).scalar_one()
        assert "tags" not in inspect(user).unloaded
        assert [tag.id for tag in user.tags] == [1, 2]

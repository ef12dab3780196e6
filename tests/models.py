"""The ORM models and seed data the tests share."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, ForeignKey, Integer, String, Table, TypeDecorator, func, select
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship


class Base(AsyncAttrs, DeclarativeBase):
    pass


user_tags = Table(
    "user_tags",
    Base.metadata,
    Column("user_id", ForeignKey("users.id"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id"), primary_key=True),
)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    age: Mapped[int] = mapped_column(Integer)
    addresses: Mapped[list[Address]] = relationship(
        back_populates="user", order_by="Address.id", cascade="all, delete-orphan"
    )
    tags: Mapped[list[Tag]] = relationship(secondary=user_tags, order_by="Tag.id")


class Address(Base):
    __tablename__ = "addresses"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    email: Mapped[str] = mapped_column(String(100))
    user: Mapped[User] = relationship(back_populates="addresses")


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


class UserTag(Base):
    """The association rows as entities: a composite primary key."""

    __table__ = user_tags


class Audit(Base):
    """A table no read in the tests depends on, to show unrelated writes keep entries."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(String(100))


class Employee(Base):
    """Joined-table inheritance: a Manager's rows live in two tables."""

    __tablename__ = "employees"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {  # noqa: RUF012  (SQLAlchemy's declarative convention)
        "polymorphic_on": "kind",
        "polymorphic_identity": "employee",
    }


class Manager(Employee):
    __tablename__ = "managers"

    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    budget: Mapped[int] = mapped_column(Integer)
    __mapper_args__ = {"polymorphic_identity": "manager"}  # noqa: RUF012


class UserWithCount(Base):
    """A second mapping of users whose column property reads the addresses table."""

    __table__ = User.__table__
    address_count: Mapped[int] = column_property(
        select(func.count(Address.id))
        .where(Address.user_id == User.__table__.c.id)
        .scalar_subquery()
    )


class NoCacheKeyString(TypeDecorator[str]):
    """A TypeDecorator that does not declare cache_ok, so SQLAlchemy cannot key it."""

    impl = String


USER_COUNT = 10


async def seed(session: AsyncSession) -> None:
    """Ten users (u0..u9, ages 20..29) with two addresses each and two tags apiece; an
    employee and a manager."""
    tags = [Tag(id=i + 1, label=f"t{i}") for i in range(3)]
    session.add_all(tags)
    for i in range(USER_COUNT):
        user = User(id=i + 1, name=f"u{i}", age=20 + i)
        user.addresses = [Address(email=f"u{i}-{j}@example.com") for j in range(2)]
        user.tags = [tags[i % 3], tags[(i + 1) % 3]]
        session.add(user)
    session.add_all([Employee(id=1, name="eve"), Manager(id=2, name="max", budget=100)])
    await session.commit()


def as_plain(rows: Any) -> list[Any]:
    """Rows with ORM instances replaced by their identity, for comparing across sessions."""
    plain = []
    for row in rows:
        values = row if isinstance(row, tuple) else (row,)
        plain.append(tuple(_plain(value) for value in values))
    return plain


def _plain(value: Any) -> Any:
    if isinstance(value, Base):
        return (type(value).__name__, getattr(value, "id", None))
    return value

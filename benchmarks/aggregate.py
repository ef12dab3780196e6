"""The expensive query the shared-region and comparison benchmarks share: sales by city and
age bucket, a join of 200,000 orders with the users, grouped, aggregated and ordered."""

from __future__ import annotations

from typing import Any

from bench_local import users_table
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func, select

ORDERS = 200_000

orders_table = Table(
    "orders",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, nullable=False),
    Column("amount_cents", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime),
)


def sales_by_city_and_age() -> Any:
    """Top 20 (city, age bucket) groups of non-cancelled orders by total amount."""
    users, orders = users_table, orders_table
    age_from = ((users.c.age // 5) * 5).label("age_from")
    total = func.sum(orders.c.amount_cents).label("total")
    return (
        select(
            users.c.city,
            age_from,
            func.count(orders.c.id).label("orders"),
            total,
            func.round(func.avg(orders.c.amount_cents), 2).label("average"),
        )
        .join_from(orders, users, orders.c.user_id == users.c.id)
        .where(orders.c.status != "cancelled")
        .group_by(users.c.city, age_from)
        .order_by(total.desc(), users.c.city, age_from)
        .limit(20)
    )

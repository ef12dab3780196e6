"""Create the tables and, when they are empty, fill them with the same data every time."""

from __future__ import annotations

import random

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import Base, Category, Product, Review

CATEGORIES, PRODUCTS, REVIEWS = 20, 2_000, 10_000
ADJECTIVES = ("Small", "Large", "Ergonomic", "Rustic", "Sleek", "Sturdy", "Handmade", "Smart")
MATERIALS = ("Steel", "Wooden", "Cotton", "Granite", "Rubber", "Plastic", "Bronze", "Wool")
NOUNS = ("Chair", "Table", "Lamp", "Shirt", "Bottle", "Clock", "Bag", "Knife", "Mug", "Hat")
WORDS = ("great", "fine", "poor", "sturdy", "cheap", "lovely", "broken", "solid")


def rows(seed: int = 42) -> tuple[list[dict[str, object]], ...]:
    """The seed rows: categories, products and reviews (ids follow insertion order)."""
    rng = random.Random(seed)
    categories: list[dict[str, object]] = [
        {"name": f"Category {c:02d}"} for c in range(1, CATEGORIES + 1)
    ]
    products = [
        {
            "category_id": rng.randint(1, CATEGORIES),
            "name": f"{rng.choice(ADJECTIVES)} {rng.choice(MATERIALS)} {rng.choice(NOUNS)} {p:04d}",
            "price_cents": rng.randint(100, 100_000),
        }
        for p in range(1, PRODUCTS + 1)
    ]
    reviews = [
        {
            "product_id": rng.randint(1, PRODUCTS),
            "rating": rng.randint(1, 5),
            "body": " ".join(rng.choices(WORDS, k=6)),
        }
        for _ in range(REVIEWS)
    ]
    return categories, products, reviews


async def create_and_seed(engine: AsyncEngine) -> bool:
    """Create missing tables and seed them if there are no categories; whether it seeded."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        if await conn.scalar(select(func.count()).select_from(Category)):
            return False
        categories, products, reviews = rows()
        await conn.execute(insert(Category), categories)
        await conn.execute(insert(Product), products)
        await conn.execute(insert(Review), reviews)
    return True

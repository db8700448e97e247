"""Fixtures for the bridge's tests: a stockward schema in the real Postgres, and
Redis keys of their own in the real Redis."""

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as redis_asyncio

from server.wal.schema import ensure_schema
from tests.conftest import DATABASE_URL
from tests.erp.redis_support import new_client

# The shard count of schemas made here; the reader and store take any.
SHARDS = 3


@pytest.fixture
async def pool(schema: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh schema holding stockward's tables, as a server makes them."""
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await admin.close()
    pool_ = await asyncpg.create_pool(
        DATABASE_URL,
        min_size=1,
        max_size=6,
        server_settings={"search_path": schema},
    )
    async with pool_.acquire() as conn:
        await ensure_schema(conn, shard_count=SHARDS)
    yield pool_
    await pool_.close()


@pytest.fixture
async def key_prefix() -> AsyncIterator[str]:
    """A Redis key prefix no other test uses; its keys are deleted afterwards."""
    prefix = f"test-erp-{uuid.uuid4().hex}"
    yield prefix

    client = new_client()
    try:
        keys = [key async for key in client.scan_iter(match=f"{{{prefix}}}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def client() -> AsyncIterator[redis_asyncio.Redis]:
    client = new_client()
    yield client
    await client.aclose()

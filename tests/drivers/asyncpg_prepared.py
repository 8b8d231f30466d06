"""asyncpg through pgheal in transaction mode: its statement cache, fetch in
a loop, explicit prepared statements and a concurrent pool larger than
pgheal's server pool. Exits non-zero with a message on any wrong result."""

import asyncio
import os
import sys

import asyncpg

URL = os.environ["DATABASE_URL"]
TASKS = 8
ROUNDS = 40


async def worker(pool, k):
    for r in range(ROUNDS):
        i = (k * ROUNDS + r) % 100 + 1
        async with pool.acquire() as conn:
            name = await conn.fetchval("SELECT name FROM items WHERE id = $1", i)
            assert name == f"item-{i}", name
            async with conn.transaction():
                await conn.execute("UPDATE items SET n = n + 1 WHERE id = $1", i)
                n = await conn.fetchval("SELECT n FROM items WHERE id = $1", i)
                assert n >= 1, n


async def one_connection():
    conn = await asyncpg.connect(URL)
    try:
        stmt = await conn.prepare("SELECT id, name FROM items WHERE id <= $1 ORDER BY id")
        for r in range(1, 60):
            rows = await stmt.fetch(r)
            assert [x["id"] for x in rows] == list(range(1, r + 1)), rows
        for r in range(1, 60):
            rows = await conn.fetch("SELECT $1::int + 1 AS v, $2::text AS t", r, "x")
            assert rows[0]["v"] == r + 1 and rows[0]["t"] == "x", rows
    finally:
        await conn.close()


async def main():
    pool = await asyncpg.create_pool(URL, min_size=TASKS, max_size=TASKS)
    try:
        await asyncio.gather(*(worker(pool, k) for k in range(TASKS)), one_connection())
        total = await pool.fetchval("SELECT sum(n) FROM items")
    finally:
        await pool.close()
    if total != TASKS * ROUNDS:
        sys.exit(f"updates lost or doubled: sum(n) = {total}, expected {TASKS * ROUNDS}")
    print(f"asyncpg {asyncpg.__version__}: {TASKS} tasks x {ROUNDS} rounds ok")


asyncio.run(main())

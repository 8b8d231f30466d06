"""asyncpg's command_timeout cancels the query that ran too long and
nothing else: asyncpg waits for its cancel connection to be closed by the
server before it goes on, so a cancel that lands late would cancel the
next query (QueryCanceledError). Run against DATABASE_URL."""

import asyncio
import os
import sys

import asyncpg


async def main():
    conn = await asyncpg.connect(os.environ["DATABASE_URL"], command_timeout=0.2)
    try:
        for i in range(10):
            method = ["fetch", "fetchrow", "fetchval", "execute"][i % 4]
            try:
                await getattr(conn, method)("SELECT pg_sleep(10)")
                sys.exit(f"round {i}: pg_sleep(10) was not cut short")
            except asyncio.TimeoutError:
                pass
            value = await conn.fetchval("SELECT 1")
            if value != 1:
                sys.exit(f"round {i}: got {value!r}")
    finally:
        await conn.close()
    print("ok")


asyncio.run(main())

"""asyncpg across schema changes made by another session: what a client
sees of its cached statements must be what PostgreSQL itself gives it.
Run against DATABASE_URL (pgheal) and ADMIN_URL (a session on the same
server that changes the schema). Exits non-zero on any wrong result."""

import asyncio
import datetime
import os
import sys

import asyncpg

URL = os.environ["DATABASE_URL"]
ADMIN = os.environ["ADMIN_URL"]


async def admin(sql):
    conn = await asyncpg.connect(ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def check(what, got, expected):
    if got != expected:
        sys.exit(f"{what}: got {got!r}, expected {expected!r}")


async def result_type_change():
    await admin("DROP TABLE IF EXISTS t; CREATE TABLE t (a int, b int); INSERT INTO t VALUES (1, 2)")
    conn = await asyncpg.connect(URL)
    other = await asyncpg.connect(URL)
    try:
        check("before", tuple(await conn.fetchrow("SELECT * FROM t")), (1, 2))
        # Another client has the same statement in its cache.
        check("other before", tuple(await other.fetchrow("SELECT * FROM t")), (1, 2))
        await admin("ALTER TABLE t ALTER COLUMN b TYPE real")
        # asyncpg re-prepares on InvalidCachedStatementError outside a
        # transaction: the right value, in the new type, never the old
        # description laid over new bytes (1073741824).
        check("after", tuple(await conn.fetchrow("SELECT * FROM t")), (1, 2.0))
        check("other after", tuple(await other.fetchrow("SELECT * FROM t")), (1, 2.0))
        # A client that never saw the old shape gets the new one at once.
        fresh = await asyncpg.connect(URL)
        try:
            check("fresh client", tuple(await fresh.fetchrow("SELECT * FROM t")), (1, 2.0))
        finally:
            await fresh.close()
        # In a transaction asyncpg cannot re-prepare by itself: the error
        # reaches the caller, as from PostgreSQL.
        await admin("ALTER TABLE t ALTER COLUMN b TYPE bigint")
        try:
            async with conn.transaction():
                row = await conn.fetchrow("SELECT * FROM t")
                sys.exit(f"in a transaction: got {tuple(row)!r}, expected InvalidCachedStatementError")
        except asyncpg.exceptions.InvalidCachedStatementError:
            pass
        check("after the error", tuple(await conn.fetchrow("SELECT * FROM t")), (1, 2))
    finally:
        await conn.close()
        await other.close()


async def parameter_type_change():
    await admin("DROP TABLE IF EXISTS p; CREATE TABLE p (d date); INSERT INTO p VALUES ('2024-01-02')")
    conn = await asyncpg.connect(URL)
    try:
        day = datetime.date(2024, 1, 2)
        check("date", await conn.fetchval("SELECT count(*) FROM p WHERE d = $1", day), 1)
        await admin("ALTER TABLE p ALTER COLUMN d TYPE int USING 7")
        fresh = await asyncpg.connect(URL)
        try:
            # The statement's parameter is an int now; a client preparing it
            # afresh must be told so (a date would be refused).
            check("int", await fresh.fetchval("SELECT count(*) FROM p WHERE d = $1", 7), 1)
        finally:
            await fresh.close()
    finally:
        await conn.close()


async def type_recreated():
    await admin("DROP TABLE IF EXISTS e; DROP TYPE IF EXISTS mood; "
                "CREATE TYPE mood AS ENUM ('sad', 'ok'); CREATE TABLE e (m mood); INSERT INTO e VALUES ('ok')")
    conn = await asyncpg.connect(URL)
    try:
        check("enum", await conn.fetchval("SELECT m::text FROM e"), "ok")
        await admin("DROP TABLE e; DROP TYPE mood; CREATE TYPE mood AS ENUM ('ok', 'happy'); "
                    "CREATE TABLE e (m mood); INSERT INTO e VALUES ('happy')")
        fresh = await asyncpg.connect(URL)
        try:
            check("recreated enum", await fresh.fetchval("SELECT m::text FROM e"), "happy")
        finally:
            await fresh.close()
    finally:
        await conn.close()


async def main():
    await result_type_change()
    await parameter_type_change()
    await type_recreated()
    print("ok")


asyncio.run(main())

"""psycopg 3 through pgheal in transaction mode, every statement prepared
on the server (prepare_threshold=0), from more threads than pgheal has
server connections. Exits non-zero with a message on any wrong result."""

import os
import sys
import threading

import psycopg

URL = os.environ["DATABASE_URL"]
THREADS = 8
ROUNDS = 40
errors = []


def worker(k):
    try:
        with psycopg.connect(URL, prepare_threshold=0) as conn:
            for r in range(ROUNDS):
                i = (k * ROUNDS + r) % 100 + 1
                # An implicit transaction per round (psycopg's default).
                row = conn.execute("SELECT name FROM items WHERE id = %s", (i,)).fetchone()
                assert row == (f"item-{i}",), row
                conn.execute("UPDATE items SET n = n + 1 WHERE id = %s", (i,))
                conn.commit()
            conn.autocommit = True
            for r in range(ROUNDS):
                i = r % 100 + 1
                rows = conn.execute(
                    "SELECT id, name FROM items WHERE id BETWEEN %s AND %s ORDER BY id", (i, i + 2)
                ).fetchall()
                assert [x[0] for x in rows] == [j for j in range(i, i + 3) if j <= 100], rows
            # The driver really prepared: its cache holds the statements.
            assert conn._prepared._names, "psycopg prepared nothing"
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors.append(f"thread {k}: {type(e).__name__}: {e}")


threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
for t in threads:
    t.start()
for t in threads:
    t.join()

with psycopg.connect(URL) as conn:
    total = conn.execute("SELECT sum(n) FROM items").fetchone()[0]
if errors:
    sys.exit("\n".join(errors))
if total != THREADS * ROUNDS:
    sys.exit(f"updates lost or doubled: sum(n) = {total}, expected {THREADS * ROUNDS}")
print(f"psycopg {psycopg.__version__}: {THREADS} threads x {2 * ROUNDS} prepared statements ok")

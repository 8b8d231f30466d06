#!/usr/bin/env python3
"""Opens N connections to a PostgreSQL-protocol server, logs each in as a
trust user (no password round trip), holds them idle, and prints the
server process's RSS before and after. Usage:
    idle_clients.py HOST PORT USER DB N PID
"""
import asyncio
import struct
import sys


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def startup(user, db):
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def login(host, port, packet):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(packet)
    buf = b""
    while True:
        chunk = await reader.read(4096)
        if not chunk:
            raise RuntimeError("closed during login")
        buf += chunk
        # ReadyForQuery 'Z' len=5 'I' ends the login.
        if b"Z\x00\x00\x00\x05I" in buf:
            return reader, writer
        if buf[:1] == b"E":
            raise RuntimeError(buf)


async def main():
    host, port, user, db, n, pid = sys.argv[1:7]
    port, n, pid = int(port), int(n), int(pid)
    packet = startup(user, db)
    before = rss_kib(pid)
    conns = []
    sem = asyncio.Semaphore(200)

    async def one():
        async with sem:
            conns.append(await login(host, port, packet))

    await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(2)  # let the server settle into idle
    after = rss_kib(pid)
    print(f"{len(conns)} {before} {after} {(after - before) * 1024 / max(len(conns), 1):.0f}")
    for _, w in conns:
        w.close()


asyncio.run(main())

#!/usr/bin/env python3
"""Opens N connections to a PostgreSQL-protocol server, logs each in as a
trust user (no password round trip) with the startup parameters a driver
sends, runs one query on each, holds them idle for SETTLE seconds (default
12), and prints the server process's RSS before and after (then holds the
clients HOLD more seconds, default 0, e.g. to read the allocator's stats):

    idle_clients.py HOST PORT USER DB N PID
    -> "N RSS_BEFORE_KIB RSS_AFTER_KIB BYTES_PER_CLIENT"

Clients are spread over source addresses 127.0.0.1, 127.0.0.2, ... (one
per 20,000 connections) so that more connections than one address's
ephemeral port range can be opened to one port. The caller raises the file
limit of both processes (this one needs N descriptors).
"""
import asyncio
import os
import resource
import socket
import struct
import sys

PER_SOURCE = 20_000
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# What libpq-based drivers (psql, psycopg) send besides user and database.
PARAMS = (("application_name", "idle_clients"), ("client_encoding", "UTF8"))
QUERY = b"SELECT 1"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def startup(user, db):
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db)) + PARAMS:
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def query(sql):
    return b"Q" + struct.pack("!i", len(sql) + 5) + sql + b"\0"


async def until_ready(reader):
    buf = b""
    while True:
        chunk = await reader.read(4096)
        if not chunk:
            raise RuntimeError("closed")
        buf += chunk
        if buf[:1] == b"E":
            raise RuntimeError(buf)
        # ReadyForQuery 'Z' len=5 'I' ends a login or a query.
        if b"Z\x00\x00\x00\x05I" in buf:
            return


async def login(host, port, source, packet):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    # Linux: pick the port at connect(), per destination, so that ports of
    # an earlier run still in TIME_WAIT do not make bind() fail.
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(packet)
    await until_ready(reader)
    writer.write(query(QUERY))
    await until_ready(reader)
    return reader, writer


async def main():
    host, port, user, db, n, pid = sys.argv[1:7]
    port, n, pid = int(port), int(n), int(pid)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 100), hard))
    packet = startup(user, db)
    before = rss_kib(pid)
    conns = []
    sem = asyncio.Semaphore(200)

    async def one(i):
        source = f"127.0.0.{1 + i // PER_SOURCE}"
        async with sem:
            conns.append(await login(host, port, source, packet))

    await asyncio.gather(*(one(i) for i in range(n)))
    # Let the server settle into idle: pgheal's idle clients rest after
    # 30-50 ms and its allocator returns freed pages every 10 s.
    await asyncio.sleep(float(os.environ.get("SETTLE", "12")))
    after = rss_kib(pid)
    print(f"{len(conns)} {before} {after} {(after - before) * 1024 / max(len(conns), 1):.0f}", flush=True)
    await asyncio.sleep(float(os.environ.get("HOLD", "0")))
    for _, w in conns:
        w.close()


asyncio.run(main())

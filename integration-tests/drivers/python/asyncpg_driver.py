"""asyncpg driver program for shardgate's driver suite (integration-tests/drivers.rs).

Connection parameters come from the libpq environment variables asyncpg reads itself
(PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE); TABLE_PREFIX makes the
table names unique per run. Each step opens its own connections (or pool) and asserts
its results; the program prints "ok <step>" or "FAIL <step>: <error>" per step and exits
non-zero if any failed. Reads on another connection retry for a few seconds: through the
proxy they may be served by a replica that lags. asyncpg's statement cache is on (the
default), so every parameterised query below is a named prepared statement.
"""

import asyncio
import datetime
import decimal
import io
import os
import sys
import threading
import time
import traceback

import asyncpg

PREFIX = os.environ.get("TABLE_PREFIX") or f"drv_apg_{os.getpid()}"
T_ITEMS = f"{PREFIX}_items"
T_POOL = f"{PREFIX}_pool"
T_COPY = f"{PREFIX}_copy"
T_COPY2 = f"{PREFIX}_copy2"
T_MANY = f"{PREFIX}_many"
T_ALTER = f"{PREFIX}_alter"
T_TX = f"{PREFIX}_tx"
ALL_TABLES = ", ".join([T_ITEMS, T_POOL, T_COPY, T_COPY2, T_MANY, T_ALTER, T_TX])
ITEMS = 2000
DEADLINE = float(os.environ.get("DRIVER_TIMEOUT_MS", "150000")) / 1000
current_step = "start"


def watchdog():
    time.sleep(DEADLINE)
    print(f"FAIL {current_step}: timed out after {DEADLINE:.0f} s (hung driver or proxy)", flush=True)
    os._exit(3)


SETTINGS = {"application_name": "drivers-asyncpg"}


async def connect():
    # timeout bounds a hung handshake; the watchdog bounds everything else.
    return await asyncpg.connect(timeout=10, server_settings=SETTINGS)


async def create_pool(min_size=2, max_size=4):
    return await asyncpg.create_pool(min_size=min_size, max_size=max_size, timeout=10, server_settings=SETTINGS)


class Connection:
    async def __aenter__(self):
        self.conn = await connect()
        return self.conn

    async def __aexit__(self, *exc):
        await self.conn.close(timeout=10)


async def eventually(what, check):
    deadline = time.monotonic() + 10
    while True:
        try:
            return await check()
        except (AssertionError, asyncpg.PostgresError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} (still failing after 10 s): {e!r}") from e
            await asyncio.sleep(0.1)


def _assert_eq(actual, expected, what):
    assert actual == expected, f"{what}: expected {expected!r}, got {actual!r}"


async def step_setup():
    async with Connection() as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {ALL_TABLES}")
        await conn.execute(f"CREATE TABLE {T_ITEMS} (id int PRIMARY KEY, val text NOT NULL)")
        status = await conn.execute(
            f"INSERT INTO {T_ITEMS} SELECT g, 'item-' || g FROM generate_series(1, $1::int) g", ITEMS
        )
        _assert_eq(status, f"INSERT 0 {ITEMS}", "setup insert status")
        await conn.execute(f"CREATE TABLE {T_POOL} (worker int, n int, payload text, PRIMARY KEY (worker, n))")
        for table in (T_COPY, T_COPY2):
            await conn.execute(
                f"CREATE TABLE {table} (id int PRIMARY KEY, name text, amount numeric, tags text[],"
                " at timestamptz, data bytea, note text)"
            )
        await conn.execute(f"CREATE TABLE {T_MANY} (id int PRIMARY KEY, name text, score double precision)")
        await conn.execute(f"CREATE TABLE {T_ALTER} (id int PRIMARY KEY, v text)")
        await conn.execute(f"INSERT INTO {T_ALTER} SELECT g, 'v' || g FROM generate_series(1, 10) g")
        await conn.execute(f"CREATE TABLE {T_TX} (id int PRIMARY KEY, state text)")
    async with Connection() as conn:

        async def check():
            _assert_eq(await conn.fetchval(f"SELECT count(*) FROM {T_ITEMS}"), ITEMS, "items")
            _assert_eq(await conn.fetchval(f"SELECT count(*) FROM {T_ALTER}"), 10, "alter rows")

        await eventually("setup rows visible", check)


async def step_pool_concurrent_workers():
    # 8 workers share a pool of 4 client connections (which share the proxy's 2 server
    # connections): parameterised inserts, reads of their own writes, transactions.
    pool = await create_pool(min_size=2, max_size=4)
    try:
        _assert_eq(pool.get_min_size(), 2, "pool min size")
        rounds = 40

        async def worker(w):
            for n in range(rounds):
                async with pool.acquire() as c:
                    if n % 4 == 3:
                        # A transaction: insert, read back, then roll back every other one.
                        tx = c.transaction()
                        await tx.start()
                        await c.execute(f"INSERT INTO {T_POOL} VALUES ($1, $2, $3)", w, n, f"tx-{w}-{n}")
                        got = await c.fetchval(f"SELECT payload FROM {T_POOL} WHERE worker = $1 AND n = $2", w, n)
                        _assert_eq(got, f"tx-{w}-{n}", f"worker {w} read inside its transaction")
                        if n % 8 == 7:
                            await tx.rollback()
                        else:
                            await tx.commit()
                    else:
                        row = await c.fetchrow(
                            f"INSERT INTO {T_POOL} VALUES ($1, $2, $3) RETURNING worker, n, payload",
                            w,
                            n,
                            f"p-{w}-{n}",
                        )
                        _assert_eq(tuple(row), (w, n, f"p-{w}-{n}"), "RETURNING")
                        got = await c.fetchval(f"SELECT payload FROM {T_POOL} WHERE worker = $1 AND n = $2", w, n)
                        _assert_eq(got, f"p-{w}-{n}", f"worker {w} read its own write")
                        typed = await c.fetchrow(
                            "SELECT $1::int + 1 AS i, $2::text || '!' AS t, $3::numeric * 2 AS d, $4::int[] AS a",
                            n,
                            f"w{w}",
                            decimal.Decimal("1.25"),
                            [w, n],
                        )
                        _assert_eq(
                            tuple(typed), (n + 1, f"w{w}!", decimal.Decimal("2.50"), [w, n]), "typed parameters"
                        )

        await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(8))), 90)
        rolled_back = len([n for n in range(rounds) if n % 8 == 7])
        expected = 8 * (rounds - rolled_back)

        async def check():
            async with pool.acquire() as c:
                _assert_eq(await c.fetchval(f"SELECT count(*) FROM {T_POOL}"), expected, "pool rows")
                _assert_eq(
                    await c.fetchval(f"SELECT count(*) FROM {T_POOL} WHERE payload LIKE 'tx-%'"),
                    8 * (rounds // 4 - rolled_back),
                    "committed transaction rows",
                )

        await eventually("pool rows visible", check)
    finally:
        await asyncio.wait_for(pool.close(), 20)


async def step_cursor_prefetch():
    async with Connection() as conn:
        async with conn.transaction():
            expected = 1
            async for row in conn.cursor(f"SELECT id, val FROM {T_ITEMS} WHERE id > $1 ORDER BY id", 0, prefetch=7):
                _assert_eq(row["id"], expected, "cursor row order")
                _assert_eq(row["val"], f"item-{expected}", "cursor value")
                if expected % 500 == 0:
                    # Another query in the same transaction while the portal is open.
                    _assert_eq(await conn.fetchval("SELECT $1::int", expected), expected, "interleaved query")
                expected += 1
            _assert_eq(expected - 1, ITEMS, "cursor row count")
            # A cursor object: fetch, forward, fetchrow, then abandoned half way.
            cur = await conn.cursor(f"SELECT id FROM {T_ITEMS} ORDER BY id DESC")
            batch = await cur.fetch(300)
            _assert_eq([r["id"] for r in batch[:2]], [ITEMS, ITEMS - 1], "first rows of DESC cursor")
            _assert_eq(len(batch), 300, "cursor fetch size")
            moved = await cur.forward(100)
            _assert_eq(moved, 100, "cursor forward")
            _assert_eq((await cur.fetchrow())["id"], ITEMS - 400, "row after forward")
            _assert_eq(await conn.fetchval(f"SELECT count(*) FROM {T_ITEMS}"), ITEMS, "count with a cursor open")
        # A second transaction on the same connection, large prefetch.
        async with conn.transaction():
            total = 0
            async for row in conn.cursor("SELECT g FROM generate_series(1, 3000) g", prefetch=400):
                total += row[0]
            _assert_eq(total, 3000 * 3001 // 2, "cursor sum")
        # Outside a transaction a cursor is refused by asyncpg itself.
        try:
            await conn.cursor("SELECT 1")
            raise AssertionError("cursor outside a transaction did not fail")
        except asyncpg.NoActiveSQLTransactionError:
            pass
        _assert_eq(await conn.fetchval("SELECT 42"), 42, "connection usable after the cursors")


def copy_records(start, n):
    base = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    return [
        (
            i,
            f"name {i}",
            decimal.Decimal(i) / 100,
            ["a", f"b{i % 7}"],
            base + datetime.timedelta(seconds=i),
            bytes([i % 256, (i * 7) % 256]),
            None if i % 10 == 0 else f"note, with comma {i}",
        )
        for i in range(start, start + n)
    ]


async def step_copy_records_binary():
    # copy_records_to_table: binary COPY FROM STDIN, asyncpg streams the data right after
    # the COPY query without waiting for the server's CopyInResponse.
    pool = await create_pool(min_size=2, max_size=4)
    try:
        chunks = 6
        per_chunk = 1000

        async def load(k):
            async with pool.acquire() as c:
                if k % 2 == 0:
                    status = await c.copy_records_to_table(T_COPY, records=copy_records(k * per_chunk + 1, per_chunk))
                else:
                    # An async iterable, inside a transaction.
                    async def rows():
                        for r in copy_records(k * per_chunk + 1, per_chunk):
                            yield r

                    async with c.transaction():
                        status = await c.copy_records_to_table(T_COPY, records=rows())
                _assert_eq(status, f"COPY {per_chunk}", f"chunk {k} status")
                # The same connection sees its rows and keeps working.
                got = await c.fetchval(
                    f"SELECT count(*) FROM {T_COPY} WHERE id BETWEEN $1 AND $2",
                    k * per_chunk + 1,
                    (k + 1) * per_chunk,
                )
                _assert_eq(got, per_chunk, f"chunk {k} rows read back")

        await asyncio.wait_for(asyncio.gather(*(load(k) for k in range(chunks))), 60)
        n = chunks * per_chunk
        async with pool.acquire() as c:

            async def check():
                row = await c.fetchrow(f"SELECT count(*), count(note), sum(amount) FROM {T_COPY}")
                _assert_eq(tuple(row), (n, n - n // 10, decimal.Decimal(n * (n + 1) // 2) / 100), "copied rows")

            await eventually("copied rows visible", check)
            got = await c.fetchrow(f"SELECT * FROM {T_COPY} WHERE id = $1", 1234)
            _assert_eq(tuple(got), copy_records(1234, 1)[0], "a copied row round trip")
            # A failing binary COPY (duplicate key) raises and the connection goes on.
            try:
                await c.copy_records_to_table(T_COPY, records=copy_records(n + 1, 50) + copy_records(1, 1))
                raise AssertionError("COPY with a duplicate key succeeded")
            except asyncpg.UniqueViolationError:
                pass
            _assert_eq(await c.fetchval(f"SELECT count(*) FROM {T_COPY}"), n, "rows after the failed COPY")
            # A binary COPY of selected columns only.
            status = await c.copy_records_to_table(
                T_COPY, records=[(n + 1000 + i, f"few {i}") for i in range(10)], columns=["id", "name"]
            )
            _assert_eq(status, "COPY 10", "column list COPY")
            _assert_eq(await c.fetchval(f"SELECT count(*) FROM {T_COPY} WHERE name LIKE 'few %'"), 10, "few rows")
            await c.execute(f"DELETE FROM {T_COPY} WHERE name LIKE 'few %'")
        # Every connection went back to the pool: all of them can still run queries.
        conns = [await pool.acquire() for _ in range(4)]
        try:
            for i, c in enumerate(conns):
                _assert_eq(await c.fetchval("SELECT $1::int", i), i, f"pool connection {i} after COPY")
        finally:
            for c in conns:
                await pool.release(c)
    finally:
        await asyncio.wait_for(pool.close(), 20)


async def step_copy_out_and_back():
    n = 6000
    async with Connection() as conn:

        async def loaded():
            _assert_eq(await conn.fetchval(f"SELECT count(*) FROM {T_COPY}"), n, "rows from the previous step")

        await eventually("copied rows visible", loaded)
        # COPY (query) TO STDOUT in CSV.
        out = io.BytesIO()
        status = await conn.copy_from_query(
            f"SELECT id, note FROM {T_COPY} WHERE id BETWEEN $1 AND $2 ORDER BY id", 9, 11, output=out, format="csv"
        )
        _assert_eq(status, "COPY 3", "copy_from_query status")
        _assert_eq(out.getvalue(), b'9,"note, with comma 9"\n10,\n11,"note, with comma 11"\n', "CSV COPY out")
        # Streamed to a callback.
        chunks = []

        async def sink(data):
            chunks.append(bytes(data))

        status = await conn.copy_from_query(f"SELECT id, name FROM {T_COPY} ORDER BY id", output=sink)
        _assert_eq(status, f"COPY {n}", "copy_from_query to a callback")
        lines = b"".join(chunks).decode().splitlines()
        _assert_eq(len(lines), n, "text COPY lines")
        _assert_eq(lines[41], "42\tname 42", "a text COPY line")
        # Binary COPY TO of the whole table, then binary COPY FROM (copy_to_table) into
        # a second table: both tables must be equal.
        binary = io.BytesIO()
        status = await conn.copy_from_table(T_COPY, output=binary, format="binary")
        _assert_eq(status, f"COPY {n}", "copy_from_table status")
        binary.seek(0)
        status = await conn.copy_to_table(T_COPY2, source=binary, format="binary")
        _assert_eq(status, f"COPY {n}", "copy_to_table status")
        diff = await conn.fetchval(
            f"SELECT count(*) FROM ((TABLE {T_COPY} EXCEPT TABLE {T_COPY2}) UNION ALL"
            f" (TABLE {T_COPY2} EXCEPT TABLE {T_COPY})) d"
        )
        _assert_eq(diff, 0, "rows differing after the binary round trip")
        # CSV back in, from a file-like object, inside a transaction that commits...
        async with conn.transaction():
            await conn.execute(f"TRUNCATE {T_COPY2}")
            csv = io.BytesIO(b"".join(f"{i},csv {i}\n".encode() for i in range(1, 101)))
            status = await conn.copy_to_table(T_COPY2, source=csv, columns=["id", "name"], format="csv")
            _assert_eq(status, "COPY 100", "CSV copy_to_table status")
            _assert_eq(await conn.fetchval(f"SELECT count(*) FROM {T_COPY2}"), 100, "rows inside the transaction")
        # ...and one that rolls back.
        try:
            async with conn.transaction():
                csv = io.BytesIO(b"".join(f"{i},csv {i}\n".encode() for i in range(101, 201)))
                await conn.copy_to_table(T_COPY2, source=csv, columns=["id", "name"], format="csv")
                _assert_eq(await conn.fetchval(f"SELECT count(*) FROM {T_COPY2}"), 200, "rows before the rollback")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        _assert_eq(await conn.fetchval(f"SELECT count(*) FROM {T_COPY2}"), 100, "CSV rows after the rollback")


async def step_executemany():
    rows = [(i, f"name-{i}", i * 0.5) for i in range(1, 501)]
    async with Connection() as conn:
        await conn.executemany(f"INSERT INTO {T_MANY} (id, name, score) VALUES ($1, $2, $3)", rows)
        await conn.executemany(f"UPDATE {T_MANY} SET score = score + $1 WHERE id = $2", [(1, i) for i in range(1, 51)])
        row = await conn.fetchrow(f"SELECT count(*), sum(score), min(name), max(id) FROM {T_MANY}")
        _assert_eq(tuple(row), (500, sum(r[2] for r in rows) + 50, "name-1", 500), "rows after executemany")
        # executemany is atomic: a duplicate in the middle leaves nothing behind.
        try:
            await conn.executemany(
                f"INSERT INTO {T_MANY} (id, name, score) VALUES ($1, $2, $3)",
                [(1000 + i, "doomed", 0.0) for i in range(20)] + [(1, "duplicate", 0.0)] + [(2000, "after", 0.0)],
            )
            raise AssertionError("executemany with a duplicate key succeeded")
        except asyncpg.UniqueViolationError:
            pass
        _assert_eq(await conn.fetchval(f"SELECT count(*) FROM {T_MANY}"), 500, "rows after the failed executemany")
        # Inside a transaction too.
        async with conn.transaction():
            await conn.executemany(
                f"INSERT INTO {T_MANY} (id, name, score) VALUES ($1, $2, $3)", [(600 + i, "tx", 1.0) for i in range(30)]
            )
            _assert_eq(
                await conn.fetchval(f"SELECT count(*) FROM {T_MANY} WHERE name = 'tx'"), 30, "rows inside transaction"
            )
    async with Connection() as other:

        async def check():
            _assert_eq(await other.fetchval(f"SELECT count(*) FROM {T_MANY}"), 530, "rows seen by another connection")

        await eventually("executemany rows visible from another connection", check)


async def step_reprepare_after_alter():
    # The same statement cached on all four pool connections, ALTER TABLE through one of
    # them, then each must see the new column: asyncpg re-prepares by itself on
    # "cached plan must not change result type" (0A000) outside a transaction.
    query = f"SELECT * FROM {T_ALTER} WHERE id = $1"
    pool = await create_pool(min_size=2, max_size=4)
    try:
        conns = [await pool.acquire() for _ in range(4)]
        try:
            _assert_eq(len({id(c) for c in conns}), 4, "distinct pool connections")
            for i, c in enumerate(conns):
                for k in range(3):
                    row = await c.fetchrow(query, 5)
                    _assert_eq(dict(row), {"id": 5, "v": "v5"}, f"connection {i} before ALTER")
            await conns[0].execute(f"ALTER TABLE {T_ALTER} ADD COLUMN w int DEFAULT 7")
            # The connection that ran the DDL sees it at once.
            _assert_eq(dict(await conns[0].fetchrow(query, 5)), {"id": 5, "v": "v5", "w": 7}, "after ALTER, same conn")
            for i, c in enumerate(conns):

                async def check(c=c, i=i):
                    _assert_eq(dict(await c.fetchrow(query, 5)), {"id": 5, "v": "v5", "w": 7}, f"connection {i}")

                await eventually(f"connection {i} sees the new column", check)
                rows = await c.fetch(f"SELECT * FROM {T_ALTER} WHERE id <= $1 ORDER BY id", 3)
                _assert_eq([tuple(r) for r in rows], [(1, "v1", 7), (2, "v2", 7), (3, "v3", 7)], f"conn {i} rows")
            # Inside a transaction asyncpg cannot re-prepare: it raises
            # InvalidCachedStatementError (0A000) and the transaction is retried.
            await conns[1].execute(f"ALTER TABLE {T_ALTER} ADD COLUMN x text DEFAULT 'x'")
            saw_invalid = False
            deadline = time.monotonic() + 10
            while True:
                try:
                    async with conns[2].transaction():
                        row = await conns[2].fetchrow(query, 5)
                    if "x" in list(row.keys()):
                        break
                    assert time.monotonic() < deadline, f"new column x never seen: {dict(row)}"
                except asyncpg.InvalidCachedStatementError:
                    saw_invalid = True
                await asyncio.sleep(0.1)
            _assert_eq(dict(row), {"id": 5, "v": "v5", "w": 7, "x": "x"}, "row after the second ALTER")
            _assert_eq(saw_invalid, True, "InvalidCachedStatementError inside a transaction, as directly")
        finally:
            for c in conns:
                await pool.release(c)
        # New connections see the newest shape.
        async with pool.acquire() as c:

            async def check_new():
                _assert_eq(list((await c.fetchrow(query, 5)).keys()), ["id", "v", "w", "x"], "columns seen by a pool connection")

            await eventually("pool connection sees both new columns", check_new)
    finally:
        await asyncio.wait_for(pool.close(), 20)


async def step_listen_notify():
    channel = f"{PREFIX}_chan"
    async with Connection() as listener, Connection() as notifier:
        received = []
        arrived = asyncio.Event()

        def on_notify(conn, pid, chan, payload):
            received.append((chan, payload))
            if len(received) >= 4:
                arrived.set()

        await listener.add_listener(channel, on_notify)
        _assert_eq(await listener.fetchval("SELECT $1::text", "listening"), "listening", "query while listening")
        await notifier.execute(f"NOTIFY {channel}, 'one'")
        await notifier.fetchval("SELECT pg_notify($1, $2)", channel, "two")
        async with notifier.transaction():
            await notifier.execute(f"NOTIFY {channel}, 'three'")
            await notifier.execute(f"NOTIFY {channel}, 'four'")
        try:
            await asyncio.wait_for(arrived.wait(), 10)
        except asyncio.TimeoutError:
            raise AssertionError(f"notifications not delivered within 10 s, got {received!r}") from None
        _assert_eq(received, [(channel, p) for p in ("one", "two", "three", "four")], "notifications")
        # The listener keeps working, and a notification sent by itself arrives too.
        await listener.execute(f"NOTIFY {channel}, 'self'")
        deadline = time.monotonic() + 10
        while len(received) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        _assert_eq(received[4:], [(channel, "self")], "self notification")
        await listener.remove_listener(channel, on_notify)
        await notifier.execute(f"NOTIFY {channel}, 'late'")
        await asyncio.sleep(0.5)
        _assert_eq(len(received), 5, "notifications after remove_listener")
        _assert_eq(await listener.fetchval("SELECT 1"), 1, "listener usable after UNLISTEN")


async def step_transaction_rollback():
    async with Connection() as conn:
        await conn.execute(f"INSERT INTO {T_TX} VALUES ($1, $2)", 1, "committed")
        # An exception in the block rolls back.
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {T_TX} VALUES ($1, $2)", 2, "rolled back")
                await conn.execute(f"UPDATE {T_TX} SET state = 'changed' WHERE id = $1", 1)
                _assert_eq(await conn.fetchval(f"SELECT count(*) FROM {T_TX}"), 2, "rows inside the transaction")
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        rows = await conn.fetch(f"SELECT id, state FROM {T_TX} ORDER BY id")
        _assert_eq([tuple(r) for r in rows], [(1, "committed")], "after rollback")
        # A failing statement aborts the transaction; asyncpg rolls it back.
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {T_TX} VALUES ($1, $2)", 3, "doomed")
                try:
                    await conn.execute(f"INSERT INTO {T_TX} VALUES ($1, $2)", 1, "duplicate")
                    raise AssertionError("duplicate key insert succeeded")
                except asyncpg.UniqueViolationError:
                    pass
                await conn.fetchval("SELECT 1")
                raise AssertionError("query in an aborted transaction succeeded")
        except asyncpg.InFailedSQLTransactionError:
            pass
        _assert_eq(conn.is_in_transaction(), False, "in a transaction after the rollback")
        # Nested transactions are savepoints.
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {T_TX} VALUES ($1, $2)", 4, "kept")
            try:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {T_TX} VALUES ($1, $2)", 5, "undone")
                    await conn.execute(f"INSERT INTO {T_TX} VALUES ($1, $2)", 4, "duplicate")
            except asyncpg.UniqueViolationError:
                pass
            await conn.execute(f"INSERT INTO {T_TX} VALUES ($1, $2)", 6, "kept too")
        # Manual control, rolled back.
        tx = conn.transaction(isolation="repeatable_read")
        await tx.start()
        await conn.execute(f"INSERT INTO {T_TX} VALUES ($1, $2)", 7, "manual rollback")
        _assert_eq(
            await conn.fetchval("SHOW transaction_isolation"), "repeatable read", "isolation inside the transaction"
        )
        await tx.rollback()
        rows = await conn.fetch(f"SELECT id FROM {T_TX} ORDER BY id")
        _assert_eq([r["id"] for r in rows], [1, 4, 6], "rows after the transaction sequence")
        _assert_eq(await conn.fetchval("SHOW transaction_isolation"), "read committed", "isolation after rollback")
    async with Connection() as other:

        async def check():
            rows = await other.fetch(f"SELECT id, state FROM {T_TX} ORDER BY id")
            _assert_eq([tuple(r) for r in rows], [(1, "committed"), (4, "kept"), (6, "kept too")], "other connection")

        await eventually("committed rows visible from another connection", check)


STEPS = [
    ("setup", step_setup),
    ("pool_concurrent_workers", step_pool_concurrent_workers),
    ("cursor_prefetch_in_transaction", step_cursor_prefetch),
    ("copy_records_to_table_binary", step_copy_records_binary),
    ("copy_out_and_back", step_copy_out_and_back),
    ("executemany", step_executemany),
    ("reprepare_after_alter_on_pool", step_reprepare_after_alter),
    ("listen_notify", step_listen_notify),
    ("transaction_rollback", step_transaction_rollback),
]


async def main():
    global current_step
    threading.Thread(target=watchdog, daemon=True).start()
    failures = []
    for name, step in STEPS:
        current_step = name
        started = time.monotonic()
        try:
            await step()
            print(f"ok {name} ({(time.monotonic() - started) * 1000:.0f} ms)", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failures.append(name)
            detail = traceback.format_exc(limit=4)
            code = getattr(e, "sqlstate", None)
            print(f"FAIL {name}: {'SQLSTATE ' + code + ': ' if code else ''}{e!r}\n{detail}", flush=True)
            if name == "setup":
                break
    current_step = "cleanup"
    try:
        async with Connection() as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {ALL_TABLES}")
    except Exception as e:  # noqa: BLE001
        print(f"warning: cleanup failed: {e!r}")
    if failures:
        print(f"asyncpg: {len(failures)} step(s) failed: {', '.join(failures)}", flush=True)
        sys.exit(1)
    print(f"asyncpg {asyncpg.__version__}: all steps passed", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

"""psycopg 3 driver program for shardgate's driver suite (integration-tests/drivers.rs).

Connection parameters come from the libpq environment variables psycopg reads through
libpq (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE); TABLE_PREFIX makes
the table names unique per run. Each step opens its own connections and asserts its
results; the program prints "ok <step>" or "FAIL <step>: <error>" per step and exits
non-zero if any failed. Reads on another connection retry for a few seconds: through the
proxy they may be served by a replica that lags.

psycopg prepares a query server-side (named statement `_pg3_N`) once it has run
prepare_threshold (5) times on a connection, and sends `DEALLOCATE ALL` after DDL
(ALTER/DROP) or ROLLBACK.
"""

import datetime
import decimal
import os
import sys
import threading
import time
import traceback

import psycopg
import psycopg.errors

try:
    import psycopg_pool
except ImportError:  # several plain connections in threads instead
    psycopg_pool = None

PREFIX = os.environ.get("TABLE_PREFIX") or f"drv_pg3_{os.getpid()}"
T_ITEMS = f"{PREFIX}_items"
T_PREP = f"{PREFIX}_prep"
T_PIPE = f"{PREFIX}_pipe"
T_COPY = f"{PREFIX}_copy"
T_ALTER = f"{PREFIX}_alter"
T_RO = f"{PREFIX}_ro"
T_POOL = f"{PREFIX}_pool"
ALL_TABLES = ", ".join([T_ITEMS, T_PREP, T_PIPE, T_COPY, T_ALTER, T_RO, T_POOL])
ITEMS = 2000
DEADLINE = float(os.environ.get("DRIVER_TIMEOUT_MS", "150000")) / 1000
current_step = "start"


def watchdog():
    time.sleep(DEADLINE)
    print(f"FAIL {current_step}: timed out after {DEADLINE:.0f} s (hung driver or proxy)", flush=True)
    os._exit(3)


CONNECT_ARGS = {"application_name": "drivers-psycopg3", "connect_timeout": 10}


def connect(autocommit=False):
    # connect_timeout bounds a hung handshake; the watchdog bounds everything else.
    return psycopg.connect(autocommit=autocommit, **CONNECT_ARGS)


def eventually(what, check):
    deadline = time.monotonic() + 10
    while True:
        try:
            return check()
        except (AssertionError, psycopg.Error) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} (still failing after 10 s): {e!r}") from e
            time.sleep(0.1)


def _assert_eq(actual, expected, what):
    assert actual == expected, f"{what}: expected {expected!r}, got {actual!r}"


def scalar(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def prepared_names(conn):
    # psycopg's own record of what it prepared on this connection (not public API, but
    # the only way to tell that the threshold was crossed from the client side).
    return set(getattr(conn._prepared, "_names", {}).values())


def step_setup():
    with connect(autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {ALL_TABLES}")
        conn.execute(f"CREATE TABLE {T_ITEMS} (id int PRIMARY KEY, val text NOT NULL)")
        cur = conn.execute(f"INSERT INTO {T_ITEMS} SELECT g, 'item-' || g FROM generate_series(1, %s) g", (ITEMS,))
        _assert_eq(cur.rowcount, ITEMS, "setup rowcount")
        conn.execute(
            f"CREATE TABLE {T_PREP} (id int PRIMARY KEY, name text, amount numeric, at timestamptz,"
            " tags text[], doc jsonb, data bytea)"
        )
        conn.execute(f"CREATE TABLE {T_PIPE} (id int PRIMARY KEY, v text)")
        conn.execute(
            f"CREATE TABLE {T_COPY} (id int PRIMARY KEY, name text, amount numeric, tags text[],"
            " at timestamptz, note text)"
        )
        conn.execute(f"CREATE TABLE {T_ALTER} (id int PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO {T_ALTER} SELECT g, 'v' || g FROM generate_series(1, 10) g")
        conn.execute(f"CREATE TABLE {T_RO} (id int PRIMARY KEY)")
        conn.execute(f"CREATE TABLE {T_POOL} (worker int, n int, payload text, PRIMARY KEY (worker, n))")
    with connect(autocommit=True) as conn:

        def check():
            _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_ITEMS}"), ITEMS, "items")
            _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_ALTER}"), 10, "alter rows")

        eventually("setup rows visible", check)


def prep_row(i):
    return (
        i,
        f"name {i}",
        decimal.Decimal(i) / 4,
        datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(minutes=i),
        [f"t{i % 3}", "x"],
        {"i": i, "even": i % 2 == 0},
        bytes([i % 256]),
    )


def step_prepared_past_threshold():
    # Autocommit: every statement its own transaction. After 5 runs psycopg prepares the
    # statement and from then on only Binds/Executes it.
    with connect(autocommit=True) as conn:
        _assert_eq(conn.prepare_threshold, 5, "default prepare_threshold")
        insert = f"INSERT INTO {T_PREP} (id, name, amount, at, tags, doc, data) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        select = f"SELECT id, name, amount, at, tags, doc, data FROM {T_PREP} WHERE id = %s"
        for i in range(1, 31):
            row = prep_row(i)
            conn.execute(insert, row[:5] + (psycopg.types.json.Jsonb(row[5]), row[6]))
            got = conn.execute(select, (i,)).fetchone()
            _assert_eq(got, row, f"row {i} read back (round {i})")
            # The same query with binary results.
            with conn.cursor(binary=True) as cur:
                _assert_eq(cur.execute(select, (i,)).fetchone(), row, f"row {i} read back in binary")
        _assert_eq(len(prepared_names(conn)) >= 2, True, f"prepared statements {prepared_names(conn)}")
        # Explicitly prepared from the first run.
        for i in range(1, 4):
            got = conn.execute(f"SELECT count(*) FROM {T_PREP} WHERE id <= %s", (i * 10,), prepare=True).fetchone()
            _assert_eq(got[0], i * 10, "prepare=True query")
        # An error in a prepared statement, then the same statement again.
        for _ in range(2):
            try:
                conn.execute(insert, prep_row(1)[:5] + (psycopg.types.json.Jsonb({}), b""))
                raise AssertionError("duplicate insert succeeded")
            except psycopg.errors.UniqueViolation:
                pass
        _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_PREP}"), 30, "rows after the failed inserts")
        # executemany (pipelined by psycopg) of the prepared insert.
        cur = conn.cursor()
        cur.executemany(insert, [prep_row(i)[:5] + (psycopg.types.json.Jsonb({}), b"") for i in range(31, 131)])
        _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_PREP}"), 130, "rows after executemany")
    with connect(autocommit=True) as other:
        eventually(
            "prepared inserts visible from another connection",
            lambda: _assert_eq(scalar(other, f"SELECT count(*) FROM {T_PREP}"), 130, "rows"),
        )


def step_pipeline():
    with connect(autocommit=True) as conn:
        with conn.pipeline():
            for i in range(1, 101):
                conn.execute(f"INSERT INTO {T_PIPE} VALUES (%s, %s)", (i, f"pipe {i}"))
            # A read inside the pipeline, its result fetched when the pipeline syncs.
            cur = conn.execute(f"SELECT count(*) FROM {T_PIPE}")
        _assert_eq(cur.fetchone()[0], 100, "count read inside the pipeline")
        got = conn.execute(f"SELECT count(*), min(id), max(id) FROM {T_PIPE}").fetchone()
        _assert_eq(got, (100, 1, 100), "rows after the pipeline")
        # A second pipeline with an error in its second segment: the first segment (before
        # sync()) is committed, the failed segment is rolled back as a whole, as directly.
        try:
            with conn.pipeline() as p:
                for i in range(201, 206):
                    conn.execute(f"INSERT INTO {T_PIPE} VALUES (%s, %s)", (i, "first segment"))
                p.sync()
                for i in range(206, 209):
                    conn.execute(f"INSERT INTO {T_PIPE} VALUES (%s, %s)", (i, "second segment"))
                conn.execute(f"INSERT INTO {T_PIPE} VALUES (%s, %s)", (1, "duplicate"))
                for i in range(210, 215):
                    conn.execute(f"INSERT INTO {T_PIPE} VALUES (%s, %s)", (i, "after the error"))
            raise AssertionError("pipeline with a duplicate key succeeded")
        except psycopg.errors.UniqueViolation:
            pass
        _assert_eq(conn.info.transaction_status, psycopg.pq.TransactionStatus.IDLE, "status after the pipeline")
        ids = [r[0] for r in conn.execute(f"SELECT id FROM {T_PIPE} WHERE id > 200 ORDER BY id")]
        _assert_eq(ids, list(range(201, 206)), "rows after the failed pipeline (autocommit)")
    # The same in a transaction: everything rolls back.
    with connect() as conn:
        try:
            with conn.pipeline():
                for i in range(301, 311):
                    conn.execute(f"INSERT INTO {T_PIPE} VALUES (%s, %s)", (i, "tx"))
                conn.execute(f"INSERT INTO {T_PIPE} VALUES (%s, %s)", (2, "duplicate"))
                for i in range(311, 316):
                    conn.execute(f"INSERT INTO {T_PIPE} VALUES (%s, %s)", (i, "tx after the error"))
            raise AssertionError("pipeline with a duplicate key succeeded (transaction)")
        except psycopg.errors.UniqueViolation:
            pass
        _assert_eq(conn.info.transaction_status, psycopg.pq.TransactionStatus.INERROR, "status after the error")
        conn.rollback()
        _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_PIPE} WHERE id > 300"), 0, "rows after rollback")
        # A pipeline inside conn.transaction() that commits.
        with conn.pipeline():
            with conn.transaction():
                for i in range(401, 451):
                    conn.execute(f"INSERT INTO {T_PIPE} VALUES (%s, %s)", (i, "committed tx"))
        _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_PIPE} WHERE id > 400"), 50, "rows of the committed tx")
        conn.commit()
    with connect(autocommit=True) as other:
        eventually(
            "pipelined rows visible from another connection",
            lambda: _assert_eq(scalar(other, f"SELECT count(*) FROM {T_PIPE}"), 155, "rows"),
        )


def copy_row(i):
    return (
        i,
        f"name {i}",
        decimal.Decimal(i) / 100,
        ["a", f"b{i % 7}"],
        datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=i),
        None if i % 10 == 0 else f"note, with comma {i}",
    )


COPY_TYPES = ["int4", "text", "numeric", "text[]", "timestamptz", "text"]


def step_copy():
    n = 3000
    with connect() as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {T_COPY} (id, name, amount, tags, at, note) FROM STDIN") as copy:
                for i in range(1, n + 1):
                    copy.write_row(copy_row(i))
            _assert_eq(cur.rowcount, n, "COPY FROM rowcount")
            # Binary COPY in.
            with cur.copy(f"COPY {T_COPY} (id, name, amount, tags, at, note) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(COPY_TYPES)
                for i in range(n + 1, 2 * n + 1):
                    copy.write_row(copy_row(i))
        conn.commit()
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT id, name, amount, tags, at, note FROM {T_COPY} ORDER BY id) TO STDOUT") as copy:
                copy.set_types(COPY_TYPES)
                rows = list(copy.rows())
            _assert_eq(len(rows), 2 * n, "rows copied out")
            _assert_eq(rows == [copy_row(i) for i in range(1, 2 * n + 1)], True, "text COPY out equals what went in")
            with cur.copy(f"COPY (SELECT id, name FROM {T_COPY} WHERE id <= 500 ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                rows = list(copy.rows())
            _assert_eq(rows, [(i, f"name {i}") for i in range(1, 501)], "binary COPY out")
            cur.execute(f"SELECT count(*), count(note) FROM {T_COPY}")
            _assert_eq(cur.fetchone(), (2 * n, 2 * n - 2 * n // 10), "counts after COPY")
        conn.commit()
        # A failing COPY raises, and the connection is usable after rollback.
        try:
            with conn.cursor() as cur:
                with cur.copy(f"COPY {T_COPY} (id, name) FROM STDIN") as copy:
                    copy.write_row((2 * n + 1, "ok"))
                    copy.write_row((1, "duplicate"))
            raise AssertionError("COPY with a duplicate key succeeded")
        except psycopg.errors.UniqueViolation:
            pass
        conn.rollback()
        _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_COPY}"), 2 * n, "rows after the failed COPY")
        conn.commit()


def step_named_cursor():
    with connect() as conn:
        with conn.transaction():
            with conn.cursor(name="items_cursor") as cur:
                cur.itersize = 150
                cur.execute(f"SELECT id, val FROM {T_ITEMS} WHERE id > %s ORDER BY id", (0,))
                expected = 1
                for row_id, val in cur:
                    _assert_eq(row_id, expected, "named cursor row order")
                    _assert_eq(val, f"item-{expected}", "named cursor value")
                    if expected % 500 == 0:
                        # Another query in the same transaction while the cursor is open.
                        _assert_eq(scalar(conn, "SELECT %s::int", (expected,)), expected, "interleaved query")
                    expected += 1
                _assert_eq(expected - 1, ITEMS, "named cursor row count")
            # Scrollable, fetchmany, scroll, abandoned half way.
            with conn.cursor(name="scroll_cursor", scrollable=True) as cur:
                cur.execute(f"SELECT id FROM {T_ITEMS} ORDER BY id DESC")
                batch = cur.fetchmany(300)
                _assert_eq([r[0] for r in batch[:2]], [ITEMS, ITEMS - 1], "first rows of DESC cursor")
                cur.scroll(100)
                _assert_eq(cur.fetchone()[0], ITEMS - 400, "row after scroll")
                cur.scroll(0, mode="absolute")
                _assert_eq(cur.fetchone()[0], ITEMS, "row after absolute scroll")
            _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_ITEMS}"), ITEMS, "count after the cursors")
        # A second transaction, binary named cursor.
        with conn.transaction():
            with conn.cursor(name="sum_cursor", binary=True) as cur:
                cur.itersize = 400
                cur.execute("SELECT g FROM generate_series(1, 3000) g")
                _assert_eq(sum(r[0] for r in cur), 3000 * 3001 // 2, "named cursor sum")
        _assert_eq(conn.info.transaction_status, psycopg.pq.TransactionStatus.IDLE, "status after the cursors")


def step_alter_reprepare():
    query = f"SELECT * FROM {T_ALTER} WHERE id = %s"
    with connect(autocommit=True) as a, connect(autocommit=True) as b:
        for c in (a, b):
            for _ in range(8):
                _assert_eq(c.execute(query, (5,)).fetchone(), (5, "v5"), "before ALTER")
            assert prepared_names(c), "query not prepared after 8 runs"
        a.execute(f"ALTER TABLE {T_ALTER} ADD COLUMN w int DEFAULT 7")
        # The connection that ran the DDL dropped its statements (DEALLOCATE ALL) and
        # sees the new column at once, first unprepared, then prepared again.
        for k in range(8):
            _assert_eq(a.execute(query, (5,)).fetchone(), (5, "v5", 7), f"same connection after ALTER, run {k}")
        assert prepared_names(a), "query not prepared again after ALTER"
        # The other connection still holds its prepared statement: as directly, it fails
        # with 0A000 "cached plan must not change result type" (psycopg does not
        # re-prepare by itself); after DEALLOCATE ALL it sees the new column.
        saw_0a000 = []

        def check():
            try:
                row = b.execute(query, (5,)).fetchone()
            except psycopg.errors.FeatureNotSupported as e:
                saw_0a000.append(e.sqlstate)
                b.execute("DEALLOCATE ALL")
                raise
            _assert_eq(row, (5, "v5", 7), "other connection after ALTER")

        eventually("other connection sees the new column", check)
        _assert_eq(saw_0a000[:1], ["0A000"], "0A000 on the other connection's prepared statement, as directly")
        for k in range(8):
            _assert_eq(b.execute(query, (5,)).fetchone(), (5, "v5", 7), f"other connection, run {k}")
        assert prepared_names(b), "query not prepared again on the other connection"


def step_read_only_session():
    with connect() as conn:
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        conn.commit()
        for i in range(4):
            _assert_eq(scalar(conn, "SHOW transaction_read_only"), "on", f"transaction_read_only, transaction {i}")
            _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_ITEMS}"), ITEMS, f"read in transaction {i}")
            try:
                conn.execute(f"INSERT INTO {T_RO} VALUES (%s)", (i,))
                raise AssertionError(f"INSERT in read-only transaction {i} succeeded")
            except psycopg.errors.ReadOnlySqlTransaction as e:
                _assert_eq(e.sqlstate, "25006", "SQLSTATE")
            conn.rollback()
        # Autocommit statements too.
        conn.autocommit = True
        for i in range(4):
            try:
                conn.execute(f"INSERT INTO {T_RO} VALUES (%s)", (100 + i,))
                raise AssertionError(f"autocommit INSERT {i} on a read-only session succeeded")
            except psycopg.errors.ReadOnlySqlTransaction:
                pass
            _assert_eq(scalar(conn, "SELECT %s::int", (i,)), i, "autocommit read")
        # Back to read-write.
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        conn.execute(f"INSERT INTO {T_RO} VALUES (%s)", (1000,))
        _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_RO}"), 1, "rows after READ WRITE")
    # Nobody else sharing the server connections is read-only.
    for k in range(3):
        with connect() as conn:
            _assert_eq(scalar(conn, "SHOW transaction_read_only"), "off", f"plain connection {k}")
            conn.execute(f"INSERT INTO {T_RO} VALUES (%s)", (2000 + k,))
            conn.commit()


def step_connection_pool():
    workers, rounds = 8, 30
    errors = []

    def work(w, get_conn):
        try:
            for n in range(rounds):
                with get_conn() as conn:
                    cur = conn.execute(
                        f"INSERT INTO {T_POOL} VALUES (%s, %s, %s) RETURNING payload", (w, n, f"p-{w}-{n}")
                    )
                    _assert_eq(cur.fetchone()[0], f"p-{w}-{n}", "RETURNING")
                    got = scalar(conn, f"SELECT count(*) FROM {T_POOL} WHERE worker = %s", (w,))
                    _assert_eq(got, n + 1, f"worker {w} count in its transaction")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"worker {w}: {e!r}")

    if psycopg_pool is not None:
        with psycopg_pool.ConnectionPool(
            "", min_size=2, max_size=4, kwargs=CONNECT_ARGS, open=True, timeout=30
        ) as pool:
            pool.wait(timeout=10)
            threads = [threading.Thread(target=work, args=(w, pool.connection)) for w in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stats = pool.get_stats()
            assert stats.get("connections_num", 0) <= 4, stats
    else:
        print("note: psycopg_pool not installed, plain connections in threads", flush=True)
        conns = [connect() for _ in range(4)]
        locks = [threading.Lock() for _ in conns]

        class Checkout:
            def __init__(self, w):
                self.i = w % len(conns)

            def __enter__(self):
                locks[self.i].acquire()
                return conns[self.i]

            def __exit__(self, exc_type, *exc):
                conn = conns[self.i]
                (conn.rollback if exc_type else conn.commit)()
                locks[self.i].release()

        threads = [threading.Thread(target=work, args=(w, lambda w=w: Checkout(w))) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for conn in conns:
            conn.close()
    assert not errors, "; ".join(errors)
    with connect(autocommit=True) as other:
        eventually(
            "pool rows visible from another connection",
            lambda: _assert_eq(scalar(other, f"SELECT count(*) FROM {T_POOL}"), workers * rounds, "rows"),
        )


STEPS = [
    ("setup", step_setup),
    ("prepared_past_threshold_autocommit", step_prepared_past_threshold),
    ("pipeline_and_error_rollback", step_pipeline),
    ("copy_write_row_and_rows", step_copy),
    ("named_cursor_itersize", step_named_cursor),
    ("alter_table_then_prepared_query", step_alter_reprepare),
    ("read_only_session_characteristics", step_read_only_session),
    ("connection_pool", step_connection_pool),
]


def main():
    global current_step
    threading.Thread(target=watchdog, daemon=True).start()
    failures = []
    for name, step in STEPS:
        current_step = name
        started = time.monotonic()
        try:
            step()
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
        with connect(autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {ALL_TABLES}")
    except Exception as e:  # noqa: BLE001
        print(f"warning: cleanup failed: {e!r}")
    if failures:
        print(f"psycopg3: {len(failures)} step(s) failed: {', '.join(failures)}", flush=True)
        sys.exit(1)
    pool = f", psycopg_pool {psycopg_pool.__version__}" if psycopg_pool else ""
    print(f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}){pool}: all steps passed", flush=True)


if __name__ == "__main__":
    main()

"""psycopg2 driver program for shardgate's driver suite (integration-tests/drivers.rs).

Connection parameters come from the libpq environment variables psycopg2 reads itself
(PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE); TABLE_PREFIX makes the table names
unique per run. Each step opens its own connections and asserts its results; the program
prints "ok <step>" or "FAIL <step>: <error>" per step and exits non-zero if any failed.
Reads on another connection retry for a few seconds: through the proxy they may be
served by a replica that lags.
"""

import io
import os
import sys
import threading
import time
import traceback

import psycopg2
import psycopg2.errors
import psycopg2.extras

PREFIX = os.environ.get("TABLE_PREFIX") or f"drv_py_{os.getpid()}"
T_ITEMS = f"{PREFIX}_items"
T_COPY = f"{PREFIX}_copy"
T_MANY = f"{PREFIX}_many"
T_TX = f"{PREFIX}_tx"
ALL_TABLES = ", ".join([T_ITEMS, T_COPY, T_MANY, T_TX])
ITEMS = 2000
DEADLINE = float(os.environ.get("DRIVER_TIMEOUT_MS", "150000")) / 1000
current_step = "start"


def watchdog():
    time.sleep(DEADLINE)
    print(f"FAIL {current_step}: timed out after {DEADLINE:.0f} s (hung driver or proxy)", flush=True)
    os._exit(3)


def connect():
    # connect_timeout bounds a hung handshake; the watchdog bounds everything else.
    return psycopg2.connect(application_name="drivers-psycopg2", connect_timeout=10)


class Connection:
    def __enter__(self):
        self.conn = connect()
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()


def eventually(what, check):
    deadline = time.monotonic() + 10
    while True:
        try:
            return check()
        except (AssertionError, psycopg2.Error) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} (still failing after 10 s): {e!r}") from e
            time.sleep(0.1)


def scalar(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


def step_setup():
    with Connection() as conn:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {ALL_TABLES}")
            cur.execute(f"CREATE TABLE {T_ITEMS} (id int PRIMARY KEY, val text NOT NULL)")
            cur.execute(
                f"INSERT INTO {T_ITEMS} SELECT g, 'item-' || g FROM generate_series(1, %s) g",
                (ITEMS,),
            )
            assert cur.rowcount == ITEMS, cur.rowcount
            cur.execute(f"CREATE TABLE {T_COPY} (id int PRIMARY KEY, name text, tags text[], note text)")
            cur.execute(f"CREATE TABLE {T_MANY} (id int PRIMARY KEY, name text, score double precision)")
            cur.execute(f"CREATE TABLE {T_TX} (id int PRIMARY KEY, state text)")
        conn.commit()
    with Connection() as conn:
        conn.autocommit = True
        eventually(
            "setup rows visible",
            lambda: _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_ITEMS}"), ITEMS, "items"),
        )


def _assert_eq(actual, expected, what):
    assert actual == expected, f"{what}: expected {expected!r}, got {actual!r}"


def step_named_cursor():
    # Server-side cursors: DECLARE ... CURSOR and FETCH FORWARD itersize, inside the
    # transaction psycopg2 opens implicitly.
    with Connection() as conn:
        with conn.cursor(name="items_cursor") as cur:
            cur.itersize = 150
            cur.execute(f"SELECT id, val FROM {T_ITEMS} WHERE id > %s ORDER BY id", (0,))
            expected = 1
            for row_id, val in cur:
                _assert_eq(row_id, expected, "named cursor row order")
                _assert_eq(val, f"item-{expected}", "named cursor value")
                if expected % 500 == 0:
                    # Another query in the same transaction while the cursor is open.
                    with conn.cursor() as other:
                        other.execute("SELECT %s::int", (expected,))
                        _assert_eq(other.fetchone()[0], expected, "interleaved query")
                expected += 1
            _assert_eq(expected - 1, ITEMS, "named cursor row count")
        conn.commit()
        # fetchmany on a named cursor, abandoned half way, then more work.
        with conn.cursor(name="partial_cursor", cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(f"SELECT id, val FROM {T_ITEMS} ORDER BY id DESC")
            batch = cur.fetchmany(300)
            _assert_eq(len(batch), 300, "fetchmany size")
            _assert_eq(batch[0]["id"], ITEMS, "first row of DESC cursor")
            _assert_eq(batch[-1]["id"], ITEMS - 299, "last row of batch")
            more = cur.fetchmany(10)
            _assert_eq(more[0]["id"], ITEMS - 300, "second batch")
        _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_ITEMS}"), ITEMS, "count after partial cursor")
        conn.rollback()
        with conn.cursor(name="sum_cursor") as cur:
            cur.itersize = 400
            cur.execute("SELECT g FROM generate_series(1, 3000) g")
            total = sum(row[0] for row in cur)
            _assert_eq(total, 3000 * 3001 // 2, "named cursor sum")
        conn.commit()


def step_named_cursor_with_hold():
    # A WITH HOLD cursor outlives the transaction that declared it: psycopg2 commits after
    # DECLARE, then FETCHes in later transactions. The proxy must keep this client's
    # server connection until the cursor is closed.
    with Connection() as conn:
        with conn.cursor(name="held_cursor", withhold=True) as cur:
            cur.itersize = 400
            cur.execute(f"SELECT id, val FROM {T_ITEMS} ORDER BY id")
            conn.commit()
            expected = 1
            for row_id, val in cur:
                _assert_eq(row_id, expected, "WITH HOLD cursor row order")
                _assert_eq(val, f"item-{expected}", "WITH HOLD cursor value")
                if expected % 500 == 0:
                    conn.commit()
                expected += 1
            _assert_eq(expected - 1, ITEMS, "WITH HOLD cursor row count")
        conn.commit()
        # Closed: the connection is ordinary again.
        _assert_eq(scalar(conn, "SELECT count(*) FROM pg_cursors"), 0, "open cursors after close")
        conn.commit()


def step_copy_expert():
    n = 3000
    buf = io.StringIO()
    null = "\\N"
    for i in range(1, n + 1):
        note = null if i % 10 == 0 else f"note, with comma {i}"
        buf.write(f"{i}\tname {i}\t{{a,b{i % 7}}}\t{note}\n")
    data = buf.getvalue()
    with Connection() as conn:
        with conn.cursor() as cur:
            cur.copy_expert(f"COPY {T_COPY} (id, name, tags, note) FROM STDIN", io.StringIO(data))
            _assert_eq(cur.rowcount, n, "COPY FROM rowcount")
        conn.commit()
        with conn.cursor() as cur:
            out = io.StringIO()
            cur.copy_expert(f"COPY (SELECT id, name, tags, note FROM {T_COPY} ORDER BY id) TO STDOUT", out)
            _assert_eq(out.getvalue() == data, True, "COPY TO text equals what COPY FROM loaded")
            csv = io.StringIO()
            cur.copy_expert(
                f"COPY (SELECT id, note FROM {T_COPY} WHERE id IN (9, 10) ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)",
                csv,
            )
            _assert_eq(csv.getvalue(), 'id,note\n9,"note, with comma 9"\n10,\n', "CSV COPY TO")
            cur.execute(f"SELECT count(*), count(note) FROM {T_COPY}")
            _assert_eq(cur.fetchone(), (n, n - n // 10), "counts after COPY")
        conn.commit()
        # A failing COPY FROM raises, rolls back, and the connection is usable again.
        with conn.cursor() as cur:
            try:
                cur.copy_expert(
                    f"COPY {T_COPY} (id, name) FROM STDIN", io.StringIO(f"{n + 1}\tok\nnot-a-number\tbad\n")
                )
                raise AssertionError("COPY of a bad row did not fail")
            except psycopg2.errors.InvalidTextRepresentation:
                pass
        conn.rollback()
        _assert_eq(scalar(conn, f"SELECT count(*) FROM {T_COPY}"), n, "rows after failed COPY")
        conn.commit()


def step_executemany():
    rows = [(i, f"name-{i}", i * 0.5) for i in range(1, 401)]
    with Connection() as conn:
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {T_MANY} (id, name, score) VALUES (%s, %s, %s)", rows[:200])
            _assert_eq(cur.rowcount, 200, "executemany rowcount")
            psycopg2.extras.execute_batch(
                cur, f"INSERT INTO {T_MANY} (id, name, score) VALUES (%s, %s, %s)", rows[200:300], page_size=25
            )
            psycopg2.extras.execute_values(cur, f"INSERT INTO {T_MANY} (id, name, score) VALUES %s", rows[300:])
            cur.executemany(f"UPDATE {T_MANY} SET score = score + %s WHERE id = %s", [(1, i) for i in range(1, 51)])
        conn.commit()
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*), sum(score), min(name), max(id) FROM {T_MANY}")
            count, total, min_name, max_id = cur.fetchone()
            _assert_eq(count, 400, "rows")
            _assert_eq(total, sum(r[2] for r in rows) + 50, "sum of scores")
            _assert_eq(min_name, "name-1", "min name")
            _assert_eq(max_id, 400, "max id")
        conn.commit()
    # Committed rows are visible to another connection.
    with Connection() as other:
        def check():
            try:
                _assert_eq(scalar(other, f"SELECT count(*) FROM {T_MANY}"), 400, "rows seen by another connection")
            finally:
                other.rollback()
        eventually("executemany rows visible from another connection", check)


def step_transactions():
    with Connection() as conn:
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {T_TX} VALUES (1, 'committed')")
        conn.commit()
        # Rolled back: gone, in this session and for others.
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {T_TX} VALUES (2, 'rolled back')")
            cur.execute(f"UPDATE {T_TX} SET state = 'changed' WHERE id = 1")
            cur.execute(f"SELECT count(*) FROM {T_TX}")
            _assert_eq(cur.fetchone()[0], 2, "rows inside the transaction")
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute(f"SELECT id, state FROM {T_TX} ORDER BY id")
            _assert_eq(cur.fetchall(), [(1, "committed")], "after rollback")
        conn.commit()
        # An error aborts the transaction until rollback.
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {T_TX} VALUES (3, 'doomed')")
            try:
                cur.execute(f"INSERT INTO {T_TX} VALUES (1, 'duplicate')")
                raise AssertionError("duplicate key insert succeeded")
            except psycopg2.errors.UniqueViolation:
                pass
            try:
                cur.execute("SELECT 1")
                raise AssertionError("query in an aborted transaction succeeded")
            except psycopg2.errors.InFailedSqlTransaction:
                pass
        conn.rollback()
        # Savepoints.
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {T_TX} VALUES (4, 'kept')")
            cur.execute("SAVEPOINT sp")
            cur.execute(f"INSERT INTO {T_TX} VALUES (5, 'undone')")
            cur.execute("ROLLBACK TO SAVEPOINT sp")
            cur.execute(f"INSERT INTO {T_TX} VALUES (6, 'kept too')")
        conn.commit()
        # The `with conn:` block: commit on success, rollback on exception.
        try:
            with conn:
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {T_TX} VALUES (7, 'context rolled back')")
                    raise RuntimeError("boom")
        except RuntimeError:
            pass
        with conn:
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {T_TX} VALUES (8, 'context committed')")
        _assert_eq(
            [r[0] for r in _fetchall(conn, f"SELECT id FROM {T_TX} ORDER BY id")],
            [1, 4, 6, 8],
            "rows after the transaction sequence",
        )
        conn.commit()
        # Autocommit: every statement its own transaction.
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {T_TX} VALUES (9, 'autocommit')")
            cur.execute("SELECT now() = statement_timestamp()")
            _assert_eq(cur.fetchone()[0], True, "autocommit connection outside a transaction")
    # Another connection sees exactly the committed rows.
    with Connection() as other:
        other.autocommit = True

        def check():
            _assert_eq(
                [r[0] for r in _fetchall(other, f"SELECT id FROM {T_TX} ORDER BY id")],
                [1, 4, 6, 8, 9],
                "committed rows seen by another connection",
            )

        eventually("committed rows visible from another connection", check)


def _fetchall(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def step_concurrent_connections():
    # Several threads, each its own connection with its own transactions.
    errors = []

    def worker(w):
        try:
            with Connection() as conn:
                committed = 0
                for n in range(15):
                    with conn.cursor() as cur:
                        cur.execute(f"INSERT INTO {T_TX} VALUES (%s, %s) RETURNING state", (1000 + w * 100 + n, f"w{w}"))
                        _assert_eq(cur.fetchone()[0], f"w{w}", "RETURNING")
                        cur.execute(f"SELECT count(*) FROM {T_TX} WHERE state = %s", (f"w{w}",))
                        _assert_eq(cur.fetchone()[0], committed + 1, f"worker {w} count in transaction")
                    if n % 3 == 2:
                        conn.rollback()
                    else:
                        conn.commit()
                        committed += 1
                    with conn.cursor() as cur:
                        cur.execute(f"SELECT count(*) FROM {T_TX} WHERE state = %s", (f"w{w}",))
                        _assert_eq(cur.fetchone()[0], committed, f"worker {w} count after round {n}")
                    conn.commit()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"worker {w}: {e!r}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, "; ".join(errors)


STEPS = [
    ("setup", step_setup),
    ("named_cursor_itersize", step_named_cursor),
    ("named_cursor_with_hold", step_named_cursor_with_hold),
    ("copy_expert", step_copy_expert),
    ("executemany", step_executemany),
    ("transactions_rollback", step_transactions),
    ("concurrent_connections", step_concurrent_connections),
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
            code = getattr(e, "pgcode", None)
            print(f"FAIL {name}: {'SQLSTATE ' + code + ': ' if code else ''}{e!r}\n{detail}", flush=True)
            if name == "setup":
                break
    current_step = "cleanup"
    try:
        with Connection() as conn:
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {ALL_TABLES}")
            conn.commit()
    except Exception as e:  # noqa: BLE001
        print(f"warning: cleanup failed: {e!r}")
    if failures:
        print(f"psycopg2: {len(failures)} step(s) failed: {', '.join(failures)}", flush=True)
        sys.exit(1)
    print("psycopg2: all steps passed", flush=True)


if __name__ == "__main__":
    main()

// pgjdbc driver program for shardgate's driver suite (integration-tests/drivers.rs).
//
// Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE;
// TABLE_PREFIX makes the table names unique per run. Each step opens its own connections
// and asserts its results; the program prints "ok <step>" or "FAIL <step>: <error>" per
// step and exits non-zero if any step failed.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class DriverTest {
    static final String HOST = env("PGHOST", "127.0.0.1");
    static final String PORT = env("PGPORT", "5432");
    static final String USER = env("PGUSER", "app");
    static final String PASSWORD = env("PGPASSWORD", "");
    static final String DATABASE = env("PGDATABASE", USER);
    static final String PREFIX = env("TABLE_PREFIX", "drv_java_" + ProcessHandle.current().pid());
    static final String T_ITEMS = PREFIX + "_items";
    static final String T_BATCH = PREFIX + "_batch";
    static final String T_COPY = PREFIX + "_copy";
    static final String T_RO = PREFIX + "_ro";
    static final String T_SHAPE = PREFIX + "_shape";
    static final String T_PREP = PREFIX + "_prep";

    static volatile String currentStep = "start";

    static String env(String name, String dflt) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? dflt : v;
    }

    interface Step {
        void run() throws Exception;
    }

    static class Failure extends RuntimeException {
        private static final long serialVersionUID = 1L;

        Failure(String message) {
            super(message);
        }
    }

    static void check(boolean condition, String message) {
        if (!condition) throw new Failure(message);
    }

    static void checkEq(Object expected, Object actual, String what) {
        if (expected == null ? actual != null : !expected.equals(actual)) {
            if (expected instanceof String && actual instanceof String
                    && (((String) expected).length() > 200 || ((String) actual).length() > 200)) {
                String e = (String) expected;
                String a = (String) actual;
                int at = 0;
                while (at < e.length() && at < a.length() && e.charAt(at) == a.charAt(at)) at++;
                int from = Math.max(0, at - 40);
                throw new Failure(what + ": texts of " + e.length() + " and " + a.length()
                        + " chars differ at " + at + ": expected <..." + e.substring(from, Math.min(e.length(), at + 60))
                        + "...> but got <..." + a.substring(from, Math.min(a.length(), at + 60)) + "...>");
            }
            throw new Failure(what + ": expected <" + expected + "> but got <" + actual + ">");
        }
    }

    static Connection connect(String extra) throws SQLException {
        String url = "jdbc:postgresql://" + HOST + ":" + PORT + "/" + DATABASE
                + "?ApplicationName=drivers-java&connectTimeout=10&socketTimeout=60"
                + (extra.isEmpty() ? "" : "&" + extra);
        Properties props = new Properties();
        props.setProperty("user", USER);
        props.setProperty("password", PASSWORD);
        return DriverManager.getConnection(url, props);
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement()) {
            s.execute(sql);
        }
    }

    static long scalarLong(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            check(rs.next(), "no row from " + sql);
            return rs.getLong(1);
        }
    }

    interface Check {
        void run() throws Exception;
    }

    // Retries `check` for up to 10 s: through the proxy a fresh connection's reads may be
    // served by a replica that has not replayed the write yet.
    static void eventually(String what, Check check) throws Exception {
        long deadline = System.currentTimeMillis() + 10_000;
        while (true) {
            try {
                check.run();
                return;
            } catch (Exception e) {
                if (System.currentTimeMillis() > deadline) {
                    throw new Failure(what + " (still failing after 10 s): " + describe(e));
                }
                Thread.sleep(100);
            }
        }
    }

    static String describe(Throwable e) {
        if (e instanceof SQLException) {
            return "SQLSTATE " + ((SQLException) e).getSQLState() + ": " + e.getMessage();
        }
        return e.toString();
    }

    // ---- steps ----

    static void setup() throws Exception {
        try (Connection c = connect("")) {
            exec(c, "DROP TABLE IF EXISTS " + String.join(", ", T_ITEMS, T_BATCH, T_COPY, T_RO, T_SHAPE, T_PREP));
            exec(c, "CREATE TABLE " + T_ITEMS + " (id int PRIMARY KEY, val text NOT NULL)");
            exec(c, "INSERT INTO " + T_ITEMS + " SELECT g, 'item-' || g FROM generate_series(1, 3000) g");
            exec(c, "CREATE TABLE " + T_BATCH + " (id int PRIMARY KEY, name text, qty int)");
            exec(c, "CREATE TABLE " + T_COPY + " (id int PRIMARY KEY, name text, ratio double precision)");
            exec(c, "CREATE TABLE " + T_RO + " (id int)");
            exec(c, "CREATE TABLE " + T_SHAPE + " (id int PRIMARY KEY, name text)");
            exec(c, "INSERT INTO " + T_SHAPE + " VALUES (1, 'one'), (2, 'two')");
            exec(c, "CREATE TABLE " + T_PREP + " (threshold int, n int, val text, PRIMARY KEY (threshold, n))");
        }
        try (Connection c = connect("")) {
            eventually("setup rows visible", () -> checkEq(3000L, scalarLong(c, "SELECT count(*) FROM " + T_ITEMS), "items"));
        }
    }

    // The same statements executed more times than prepareThreshold, so pgjdbc switches to
    // named server-side statements (S_n) and then reuses them on later executions.
    static void prepareThreshold(int threshold) throws Exception {
        try (Connection c = connect("prepareThreshold=" + threshold)) {
            String insert = "INSERT INTO " + T_PREP + " (threshold, n, val) VALUES (?, ?, ?)";
            String select = "SELECT val, n FROM " + T_PREP + " WHERE threshold = ? AND n = ?";
            String lookup = "SELECT id, val FROM " + T_ITEMS + " WHERE id = ?";
            try (PreparedStatement keep = c.prepareStatement(lookup)) {
                for (int n = 0; n < 12; n++) {
                    // A fresh PreparedStatement each time: pgjdbc's statement cache hands back
                    // the server-prepared statement once the threshold is reached.
                    try (PreparedStatement ins = c.prepareStatement(insert)) {
                        ins.setInt(1, threshold);
                        ins.setInt(2, n);
                        ins.setString(3, "v" + threshold + "-" + n);
                        checkEq(1, ins.executeUpdate(), "insert count");
                    }
                    try (PreparedStatement sel = c.prepareStatement(select)) {
                        sel.setInt(1, threshold);
                        sel.setInt(2, n);
                        try (ResultSet rs = sel.executeQuery()) {
                            check(rs.next(), "row " + n + " not read back (threshold " + threshold + ")");
                            checkEq("v" + threshold + "-" + n, rs.getString(1), "val");
                            checkEq(n, rs.getInt(2), "n");
                            check(!rs.next(), "more than one row");
                        }
                    }
                    // And one PreparedStatement object reused across executions.
                    int id = 1 + (n * 37) % 3000;
                    keep.setInt(1, id);
                    try (ResultSet rs = keep.executeQuery()) {
                        check(rs.next(), "item " + id + " missing");
                        checkEq(id, rs.getInt(1), "id");
                        checkEq("item-" + id, rs.getString(2), "item val");
                    }
                }
            }
            // The same again inside explicit transactions.
            c.setAutoCommit(false);
            for (int round = 0; round < 7; round++) {
                try (PreparedStatement ins = c.prepareStatement(insert)) {
                    ins.setInt(1, threshold);
                    ins.setInt(2, 100 + round);
                    ins.setString(3, "tx" + round);
                    checkEq(1, ins.executeUpdate(), "insert count in transaction");
                }
                try (PreparedStatement sel = c.prepareStatement("SELECT count(*) FROM " + T_PREP + " WHERE threshold = ?")) {
                    sel.setInt(1, threshold);
                    try (ResultSet rs = sel.executeQuery()) {
                        check(rs.next(), "no count");
                        checkEq(12L + round + 1, rs.getLong(1), "count in transaction");
                    }
                }
                if (round % 2 == 0) {
                    c.commit();
                } else {
                    c.rollback();
                    try (PreparedStatement ins = c.prepareStatement(insert)) {
                        ins.setInt(1, threshold);
                        ins.setInt(2, 100 + round);
                        ins.setString(3, "tx" + round);
                        checkEq(1, ins.executeUpdate(), "re-insert after rollback");
                    }
                    c.commit();
                }
            }
            c.setAutoCommit(true);
            checkEq(19L, scalarLong(c, "SELECT count(*) FROM " + T_PREP + " WHERE threshold = " + threshold), "final count");
        }
    }

    static void executeBatch() throws Exception {
        try (Connection c = connect("prepareThreshold=5")) {
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + T_BATCH + " (id, name, qty) VALUES (?, ?, ?)")) {
                for (int i = 1; i <= 500; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "name-" + i);
                    ps.setInt(3, i % 17);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                checkEq(500, counts.length, "batch result length");
                for (int n : counts) {
                    check(n == 1 || n == Statement.SUCCESS_NO_INFO, "batch update count " + n);
                }
            }
            c.commit();
            c.setAutoCommit(true);
            try (Statement s = c.createStatement();
                 ResultSet rs = s.executeQuery("SELECT count(*), sum(qty), min(name), max(id) FROM " + T_BATCH)) {
                check(rs.next(), "no row");
                checkEq(500L, rs.getLong(1), "batch rows");
                long sum = 0;
                for (int i = 1; i <= 500; i++) sum += i % 17;
                checkEq(sum, rs.getLong(2), "sum qty");
                checkEq("name-1", rs.getString(3), "min name");
                checkEq(500, rs.getInt(4), "max id");
            }
            // A batch that fails part way rolls back as a whole.
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + T_BATCH + " (id, name, qty) VALUES (?, ?, ?)")) {
                for (int i : new int[] {501, 502, 1, 503}) {
                    ps.setInt(1, i);
                    ps.setString(2, "dup");
                    ps.setInt(3, 0);
                    ps.addBatch();
                }
                boolean failed = false;
                try {
                    ps.executeBatch();
                } catch (SQLException e) {
                    failed = true;
                    SQLException next = e.getNextException();
                    String state = next != null ? next.getSQLState() : e.getSQLState();
                    checkEq("23505", state, "duplicate key SQLSTATE");
                }
                check(failed, "batch with a duplicate key did not fail");
            }
            c.rollback();
            c.setAutoCommit(true);
            checkEq(500L, scalarLong(c, "SELECT count(*) FROM " + T_BATCH), "rows after failed batch");
        }
        // Batched with reWriteBatchedInserts (multi-row VALUES), another common setting.
        try (Connection c = connect("reWriteBatchedInserts=true")) {
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + T_BATCH + " (id, name, qty) VALUES (?, ?, ?)")) {
                for (int i = 1001; i <= 1300; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "rw-" + i);
                    ps.setInt(3, 1);
                    ps.addBatch();
                }
                ps.executeBatch();
            }
            checkEq(300L, scalarLong(c, "SELECT count(*) FROM " + T_BATCH + " WHERE id > 1000"), "rewritten batch rows");
        }
    }

    static void fetchSize() throws Exception {
        try (Connection c = connect("prepareThreshold=5")) {
            c.setAutoCommit(false);
            // A cursor-based read: Execute with a row limit, PortalSuspended, more Executes.
            try (PreparedStatement ps = c.prepareStatement("SELECT id, val FROM " + T_ITEMS + " WHERE id > ? ORDER BY id")) {
                ps.setFetchSize(100);
                ps.setInt(1, 0);
                int expected = 1;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        checkEq(expected, rs.getInt(1), "row order");
                        checkEq("item-" + expected, rs.getString(2), "row value");
                        if (expected % 700 == 0) {
                            // Another statement on the same connection while the portal is
                            // suspended: both live in this transaction's server connection.
                            checkEq((long) expected, scalarLong(c, "SELECT " + expected), "interleaved query");
                        }
                        expected++;
                    }
                }
                checkEq(3001, expected, "rows fetched");
            }
            try (Statement s = c.createStatement()) {
                s.setFetchSize(250);
                long count = 0;
                long sum = 0;
                try (ResultSet rs = s.executeQuery("SELECT g FROM generate_series(1, 10000) g")) {
                    while (rs.next()) {
                        count++;
                        sum += rs.getLong(1);
                    }
                }
                checkEq(10000L, count, "generate_series rows");
                checkEq(50005000L, sum, "generate_series sum");
            }
            // A fetch abandoned part way, then more work in the same transaction.
            try (PreparedStatement ps = c.prepareStatement("SELECT id FROM " + T_ITEMS + " ORDER BY id")) {
                ps.setFetchSize(10);
                try (ResultSet rs = ps.executeQuery()) {
                    for (int i = 1; i <= 25; i++) {
                        check(rs.next(), "short read");
                        checkEq(i, rs.getInt(1), "partial read");
                    }
                }
            }
            checkEq(3000L, scalarLong(c, "SELECT count(*) FROM " + T_ITEMS), "count after partial fetch");
            c.commit();
        }
    }

    static void copy() throws Exception {
        StringBuilder data = new StringBuilder();
        for (int i = 1; i <= 4000; i++) {
            data.append(i).append('\t').append("row ").append(i).append(" \\\\ slash").append('\t').append(new java.math.BigDecimal(i).divide(java.math.BigDecimal.valueOf(8)).stripTrailingZeros().toPlainString()).append('\n');
        }
        try (Connection c = connect("")) {
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            long in = cm.copyIn("COPY " + T_COPY + " (id, name, ratio) FROM STDIN", new StringReader(data.toString()));
            checkEq(4000L, in, "copyIn row count");
            checkEq(4000L, scalarLong(c, "SELECT count(*) FROM " + T_COPY), "rows after copyIn");
            StringWriter out = new StringWriter();
            long outRows = cm.copyOut("COPY (SELECT id, name, ratio FROM " + T_COPY + " ORDER BY id) TO STDOUT", out);
            checkEq(4000L, outRows, "copyOut row count");
            checkEq(data.toString(), out.toString(), "copyOut text");
            // CSV both ways too.
            StringWriter csv = new StringWriter();
            cm.copyOut("COPY (SELECT id, name FROM " + T_COPY + " WHERE id <= 3 ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)", csv);
            checkEq("id,name\n1,row 1 \\ slash\n2,row 2 \\ slash\n3,row 3 \\ slash\n", csv.toString(), "csv copyOut");
            // A failing copyIn leaves the connection usable.
            boolean failed = false;
            try {
                cm.copyIn("COPY " + T_COPY + " (id, name, ratio) FROM STDIN", new StringReader("5001\tok\t1\nbad\tbad\tbad\n"));
            } catch (SQLException e) {
                failed = true;
                checkEq("22P02", e.getSQLState(), "bad copy SQLSTATE");
            }
            check(failed, "copyIn of a bad row did not fail");
            checkEq(4000L, scalarLong(c, "SELECT count(*) FROM " + T_COPY), "rows after failed copyIn");
        }
    }

    static void readOnly() throws Exception {
        // readOnlyMode=always: pgjdbc runs SET SESSION CHARACTERISTICS AS TRANSACTION READ
        // ONLY for autocommit, BEGIN READ ONLY otherwise. Writes must fail with 25006.
        try (Connection c = connect("readOnly=true&readOnlyMode=always")) {
            check(c.isReadOnly(), "connection not read-only");
            for (int i = 0; i < 4; i++) {
                try {
                    exec(c, "INSERT INTO " + T_RO + " VALUES (" + i + ")");
                    throw new Failure("INSERT #" + i + " on a readOnly=true&readOnlyMode=always connection succeeded (autocommit)");
                } catch (SQLException e) {
                    checkEq("25006", e.getSQLState(), "SQLSTATE of a write on a read-only connection (autocommit): " + e.getMessage());
                }
                checkEq(3000L, scalarLong(c, "SELECT count(*) FROM " + T_ITEMS), "read on read-only connection");
            }
            c.setAutoCommit(false);
            try {
                exec(c, "INSERT INTO " + T_RO + " VALUES (100)");
                throw new Failure("INSERT in a read-only transaction succeeded");
            } catch (SQLException e) {
                checkEq("25006", e.getSQLState(), "SQLSTATE of a write in a read-only transaction: " + e.getMessage());
            }
            c.rollback();
            c.setAutoCommit(true);
        }
    }

    // Read-only must not leak to anyone else sharing the server connections.
    static void readOnlyDoesNotLeak() throws Exception {
        try (Connection ro = connect("readOnly=true&readOnlyMode=always")) {
            checkEq(3000L, scalarLong(ro, "SELECT count(*) FROM " + T_ITEMS), "read on read-only connection");
        }
        try (Connection c = connect("")) {
            check(!c.isReadOnly(), "plain connection read-only");
            for (int i = 0; i < 8; i++) {
                exec(c, "INSERT INTO " + T_RO + " VALUES (" + (1000 + i) + ")");
            }
            checkEq(8L, scalarLong(c, "SELECT count(*) FROM " + T_RO + " WHERE id >= 1000"), "rows written by a plain connection");
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SHOW transaction_read_only")) {
                check(rs.next(), "no transaction_read_only");
                checkEq("off", rs.getString(1), "transaction_read_only on a plain connection");
            }
        }
    }

    static List<String> columns(ResultSet rs) throws SQLException {
        ResultSetMetaData md = rs.getMetaData();
        List<String> names = new ArrayList<>();
        for (int i = 1; i <= md.getColumnCount(); i++) names.add(md.getColumnName(i));
        return names;
    }

    static void alterTableReprepare() throws Exception {
        try (Connection c = connect("prepareThreshold=1")) {
            try (PreparedStatement ps = c.prepareStatement("SELECT * FROM " + T_SHAPE + " WHERE id = ?")) {
                for (int i = 0; i < 3; i++) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        checkEq(List.of("id", "name"), columns(rs), "columns before ALTER");
                        check(rs.next(), "row 1 missing");
                        checkEq("one", rs.getString("name"), "name");
                    }
                }
                exec(c, "ALTER TABLE " + T_SHAPE + " ADD COLUMN extra text NOT NULL DEFAULT 'x'");
                // The server answers the old statement with "cached plan must not change result
                // type" (0A000); pgjdbc re-prepares and retries in autocommit mode.
                for (int i = 0; i < 3; i++) {
                    ps.setInt(1, 2);
                    try (ResultSet rs = ps.executeQuery()) {
                        checkEq(List.of("id", "name", "extra"), columns(rs), "columns after ADD COLUMN (run " + i + ")");
                        check(rs.next(), "row 2 missing");
                        checkEq("two", rs.getString("name"), "name");
                        checkEq("x", rs.getString("extra"), "new column value");
                    }
                }
                exec(c, "ALTER TABLE " + T_SHAPE + " DROP COLUMN name");
                for (int i = 0; i < 3; i++) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        checkEq(List.of("id", "extra"), columns(rs), "columns after DROP COLUMN (run " + i + ")");
                        check(rs.next(), "row 1 missing after DROP COLUMN");
                        checkEq("x", rs.getString("extra"), "extra");
                    }
                }
                // DDL from another connection (a migration) while this one keeps its
                // prepared statement. Until the change is visible (through the proxy this
                // connection may read from a replica that lags) the old shape may come back;
                // an error never may: pgjdbc heals 0A000 by itself in autocommit mode.
                try (Connection other = connect("")) {
                    exec(other, "ALTER TABLE " + T_SHAPE + " ADD COLUMN later int NOT NULL DEFAULT 7");
                }
                long deadline = System.currentTimeMillis() + 10_000;
                while (true) {
                    ps.setInt(1, 2);
                    try (ResultSet rs = ps.executeQuery()) {
                        List<String> cols = columns(rs);
                        if (cols.equals(List.of("id", "extra", "later"))) {
                            check(rs.next(), "row 2 missing after another connection's ADD COLUMN");
                            checkEq(7, rs.getInt("later"), "column added by another connection");
                            break;
                        }
                        checkEq(List.of("id", "extra"), cols, "columns before another connection's ADD COLUMN is visible");
                        check(System.currentTimeMillis() < deadline,
                                "column added by another connection still not visible after 10 s");
                    }
                    Thread.sleep(100);
                }
                for (int i = 0; i < 6; i++) {
                    ps.setInt(1, 1 + i % 2);
                    try (ResultSet rs = ps.executeQuery()) {
                        checkEq(List.of("id", "extra", "later"), columns(rs), "columns after another connection's ADD COLUMN (run " + i + ")");
                        check(rs.next(), "row missing");
                    }
                }
            }
        }
    }

    public static void main(String[] args) throws Exception {
        long deadlineMs = Long.parseLong(env("DRIVER_TIMEOUT_MS", "150000"));
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(deadlineMs);
            } catch (InterruptedException e) {
                return;
            }
            System.out.println("FAIL " + currentStep + ": timed out after " + deadlineMs + " ms (hung driver or proxy)");
            System.out.flush();
            Runtime.getRuntime().halt(3);
        });
        watchdog.setDaemon(true);
        watchdog.start();

        Map<String, Step> steps = new LinkedHashMap<>();
        steps.put("setup", DriverTest::setup);
        steps.put("prepare_threshold_1", () -> prepareThreshold(1));
        steps.put("prepare_threshold_5", () -> prepareThreshold(5));
        steps.put("execute_batch", DriverTest::executeBatch);
        steps.put("fetch_size_autocommit_off", DriverTest::fetchSize);
        steps.put("copy_manager", DriverTest::copy);
        steps.put("read_only_mode_always", DriverTest::readOnly);
        steps.put("read_only_does_not_leak", DriverTest::readOnlyDoesNotLeak);
        steps.put("alter_table_reprepare", DriverTest::alterTableReprepare);

        List<String> failures = new ArrayList<>();
        for (Map.Entry<String, Step> e : steps.entrySet()) {
            currentStep = e.getKey();
            long started = System.currentTimeMillis();
            try {
                e.getValue().run();
                System.out.println("ok " + e.getKey() + " (" + (System.currentTimeMillis() - started) + " ms)");
            } catch (Exception err) {
                failures.add(e.getKey());
                System.out.println("FAIL " + e.getKey() + ": " + describe(err));
                for (StackTraceElement el : err.getStackTrace()) {
                    if (el.getClassName().startsWith("DriverTest")) {
                        System.out.println("    at " + el);
                    }
                }
                if (e.getKey().equals("setup")) break;
            }
            System.out.flush();
        }
        currentStep = "cleanup";
        try (Connection c = connect("")) {
            exec(c, "DROP TABLE IF EXISTS " + String.join(", ", T_ITEMS, T_BATCH, T_COPY, T_RO, T_SHAPE, T_PREP));
        } catch (Exception e) {
            System.out.println("warning: cleanup failed: " + describe(e));
        }
        if (!failures.isEmpty()) {
            System.out.println("pgjdbc: " + failures.size() + " step(s) failed: " + String.join(", ", failures));
            System.exit(1);
        }
        System.out.println("pgjdbc: all steps passed");
        System.exit(0);
    }
}

// pgjdbc over a sharded map, for shardgate's driver suite (integration-tests/drivers.rs).
//
// The same program runs directly against one server (the control) and through shardgate
// over two shards whose map hashes `users` by `id`: what it does must mean the same on
// both. pgjdbc sends BEGIN as Parse/Bind/Execute in the same batch as the transaction's
// first statement, so each transaction here starts on whichever shard its first
// statement's key belongs to; transactions write one user's row and read others'.
//
// Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE (a
// database of its own, without tables). Prints "ok <step>" or "FAIL <step>: <error>"
// per step and exits non-zero if any step failed.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;

public class ShardedTest {
    static final String HOST = env("PGHOST", "127.0.0.1");
    static final String PORT = env("PGPORT", "5432");
    static final String USER = env("PGUSER", "app");
    static final String PASSWORD = env("PGPASSWORD", "");
    static final String DATABASE = env("PGDATABASE", USER);
    static final int USERS = 100;

    static String env(String name, String dflt) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? dflt : v;
    }

    interface Step {
        void run() throws Exception;
    }

    static void checkEq(Object expected, Object actual, String what) {
        if (!expected.equals(actual)) {
            throw new RuntimeException(what + ": expected " + expected + ", got " + actual);
        }
    }

    static Connection connect() throws SQLException {
        String url = "jdbc:postgresql://" + HOST + ":" + PORT + "/" + DATABASE
                + "?ApplicationName=drivers-java-sharded&connectTimeout=10&socketTimeout=60";
        Properties props = new Properties();
        props.setProperty("user", USER);
        props.setProperty("password", PASSWORD);
        return DriverManager.getConnection(url, props);
    }

    static long count(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static String name(Connection c, long id) throws SQLException {
        try (PreparedStatement p = c.prepareStatement("SELECT name FROM users WHERE id = ?")) {
            p.setLong(1, id);
            try (ResultSet rs = p.executeQuery()) {
                return rs.next() ? rs.getString(1) : null;
            }
        }
    }

    static int rename(Connection c, long id, String name) throws SQLException {
        try (PreparedStatement p = c.prepareStatement("UPDATE users SET name = ? WHERE id = ?")) {
            p.setString(1, name);
            p.setLong(2, id);
            return p.executeUpdate();
        }
    }

    static void setup() throws Exception {
        try (Connection c = connect(); Statement s = c.createStatement()) {
            s.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL)");
            StringBuilder insert = new StringBuilder("INSERT INTO users (id, name) VALUES ");
            for (int i = 1; i <= USERS; i++) {
                insert.append(i > 1 ? ", " : "").append("(").append(i).append(", 'u").append(i).append("')");
            }
            s.execute(insert.toString());
        }
    }

    // Each transaction writes one user (whichever shard holds it) and reads the others.
    static void transactionsOnEveryShard() throws Exception {
        try (Connection c = connect()) {
            c.setAutoCommit(false);
            for (long id = 1; id <= 16; id++) {
                checkEq(1, rename(c, id, "t" + id), "update of user " + id);
                checkEq((long) USERS, count(c, "SELECT count(*) FROM users"), "count in the transaction");
                checkEq("u42", name(c, 42), "user 42 read in the transaction of user " + id);
                checkEq("t" + id, name(c, id), "own write seen");
                c.commit();
            }
            // A keyless read first, then the write.
            checkEq((long) USERS, count(c, "SELECT count(*) FROM users"), "count first");
            checkEq(1, rename(c, 7, "rolled back"), "update after a keyless read");
            c.rollback();
            checkEq("t7", name(c, 7), "user 7 after rollback");
            c.commit();
        }
    }

    // Under REPEATABLE READ every read of the transaction sees its first snapshot.
    static void repeatableRead() throws Exception {
        try (Connection reader = connect(); Connection writer = connect()) {
            reader.setAutoCommit(false);
            reader.setTransactionIsolation(Connection.TRANSACTION_REPEATABLE_READ);
            checkEq((long) USERS, count(reader, "SELECT count(*) FROM users"), "first read");
            try (Statement s = writer.createStatement()) {
                s.execute("INSERT INTO users (id, name) VALUES (1001, 'n'), (1002, 'n'), (1003, 'n'), (1004, 'n')");
            }
            checkEq((long) USERS, count(reader, "SELECT count(*) FROM users"), "second read, same snapshot");
            String late = name(reader, 1003);
            if (late != null) {
                throw new RuntimeException("a row committed after the snapshot was seen: " + late);
            }
            reader.commit();
            checkEq((long) USERS + 4, count(writer, "SELECT count(*) FROM users"), "after commit");
        }
    }

    // A failed read aborts the transaction; its write is rolled back.
    static void failedReadAborts() throws Exception {
        try (Connection c = connect()) {
            c.setAutoCommit(false);
            checkEq(1, rename(c, 5, "lost"), "update");
            String state = null;
            try {
                count(c, "SELECT count(*) FROM users WHERE 10 / (id - 42) > 0");
            } catch (SQLException e) {
                state = e.getSQLState();
            }
            checkEq("22012", state, "division by zero");
            state = null;
            try {
                name(c, 6);
            } catch (SQLException e) {
                state = e.getSQLState();
            }
            checkEq("25P02", state, "statement after the error");
            c.rollback();
            checkEq("t5", name(c, 5), "user 5 after rollback");
            c.commit();
        }
    }

    public static void main(String[] args) throws Exception {
        Map<String, Step> steps = new LinkedHashMap<>();
        steps.put("setup", ShardedTest::setup);
        steps.put("transactions_on_every_shard", ShardedTest::transactionsOnEveryShard);
        steps.put("repeatable_read", ShardedTest::repeatableRead);
        steps.put("failed_read_aborts", ShardedTest::failedReadAborts);
        List<String> failures = new ArrayList<>();
        for (Map.Entry<String, Step> e : steps.entrySet()) {
            try {
                e.getValue().run();
                System.out.println("ok " + e.getKey());
            } catch (Exception err) {
                failures.add(e.getKey());
                System.out.println("FAIL " + e.getKey() + ": " + err);
            }
        }
        System.out.flush();
        System.exit(failures.isEmpty() ? 0 : 1);
    }
}

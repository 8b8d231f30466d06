// JDBC (pgjdbc) through pgheal in transaction mode with prepareThreshold=1:
// every PreparedStatement becomes a named server-side statement from its
// first use, across autocommit and explicit transactions, from more threads
// than pgheal has server connections. Exits non-zero on any wrong result.
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class JdbcPrepared {
    static final int THREADS = 8;
    static final int ROUNDS = 40;

    public static void main(String[] args) throws Exception {
        String url = args[0] + (args[0].contains("?") ? "&" : "?") + "prepareThreshold=1";
        String user = args[1], password = args[2];
        ExecutorService pool = Executors.newFixedThreadPool(THREADS);
        List<Future<?>> jobs = new ArrayList<>();
        for (int k = 0; k < THREADS; k++) {
            final int id = k;
            jobs.add(pool.submit(() -> { work(url, user, password, id); return null; }));
        }
        for (Future<?> f : jobs) f.get();
        pool.shutdown();
        try (Connection c = DriverManager.getConnection(url, user, password);
             Statement s = c.createStatement();
             ResultSet rs = s.executeQuery("SELECT sum(n) FROM items")) {
            rs.next();
            long total = rs.getLong(1);
            if (total != THREADS * ROUNDS) throw new AssertionError("sum(n) = " + total);
        }
        System.out.println("pgjdbc: " + THREADS + " threads x " + ROUNDS + " rounds ok");
    }

    static void work(String url, String user, String password, int k) throws SQLException {
        try (Connection c = DriverManager.getConnection(url, user, password);
             PreparedStatement get = c.prepareStatement("SELECT name FROM items WHERE id = ?");
             PreparedStatement bump = c.prepareStatement("UPDATE items SET n = n + 1 WHERE id = ?")) {
            for (int r = 0; r < ROUNDS; r++) {
                int i = (k * ROUNDS + r) % 100 + 1;
                c.setAutoCommit(true);
                get.setInt(1, i);
                try (ResultSet rs = get.executeQuery()) {
                    if (!rs.next() || !rs.getString(1).equals("item-" + i))
                        throw new AssertionError("item " + i);
                }
                c.setAutoCommit(false);
                bump.setInt(1, i);
                if (bump.executeUpdate() != 1) throw new AssertionError("update " + i);
                c.commit();
            }
        }
    }
}

#!/usr/bin/env bash
# pgheal's user-space instructions per transaction, counted by valgrind's
# callgrind: unlike CPU time, the count does not depend on what else the
# machine runs, so two builds compare exactly (the kernel's share, the
# sends, receives and context switches, is not counted: benches/e2e.sh
# measures all of it, noise included). Starts its own PostgreSQL and one
# pgheal under callgrind per case, warms it up, counts one pgbench run.
#
#   benches/instructions.sh                       # the release build
#   BIN=/path/to/other/pgheal benches/instructions.sh
#   TX=500 CASES='S-simple' benches/instructions.sh
#   BOUNCER=1 benches/instructions.sh             # PgBouncer counted too
#
# Prints instructions per transaction for each case, and where the
# callgrind profile is (callgrind_annotate reads it). With BOUNCER=1 also
# PgBouncer's (transaction mode, the same pool, trust logins, connection
# logging off as pgheal's is at RUST_LOG=warn): its counters cannot be
# zeroed while it sleeps in epoll_wait, so its count is the difference of
# two runs that differ only in TX transactions per client. PgBouncer 1.18
# cannot run -M prepared in transaction mode: that row shows "-".
#
# Needs: PostgreSQL server binaries, pgbench, valgrind (and pgbouncer for
# BOUNCER=1). Runs PostgreSQL and PgBouncer as the postgres user when
# started as root.
set -euo pipefail
cd "$(dirname "$0")/.."

TX=${TX:-300}
SCALE=${SCALE:-1}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/pgheal}
[ -x "$BIN" ] || { echo "no pgheal at $BIN (cargo build --release)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

BENCH_PREFIX=pgheal-instr
# shellcheck source=benches/common.sh
. benches/common.sh

pg_port=$(free_port)
# Trust on the server side: a server connection opened inside the counted
# run would otherwise add its SCRAM key derivation (millions of
# instructions) to that run's transactions.
"${as_pg[@]}" "$bin/initdb" -D "$work/data" -U postgres --auth-local=trust --auth-host=trust \
    -N -E UTF8 --no-locale >/dev/null
"${as_pg[@]}" "$bin/postgres" -D "$work/data" -p "$pg_port" -k "$work" -c listen_addresses=127.0.0.1 \
    -c fsync=off -c max_connections=100 >"$work/pg.log" 2>&1 &
pg_ready "$work/data"
app_database "$pg_port" "$SCALE"
export PGPASSWORD=apppw PGSSLMODE=disable

# name|clients|pgbench arguments
cases=(
    "S-simple-1|1|-S -M simple"
    "S-simple-16|16|-S -M simple"
    "S-extended-16|16|-S -M extended"
    "S-prepared-16|16|-S -M prepared"
    "tpcb-16|16|-M simple"
    "C-trust-S-4|4|-C -S -U idle"
)
if [ -n "${CASES:-}" ]; then
    selected=()
    for c in "${cases[@]}"; do [[ ${c%%|*} =~ $CASES ]] && selected+=("$c"); done
    cases=("${selected[@]}")
fi

# The whole pool open (min_idle, min_pool_size), so that the counted run
# opens none.
wait_pool_open() {
    local open_sql="SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'
        AND pid <> pg_backend_pid() AND application_name <> 'pgheal health check'"
    for _ in $(seq 300); do
        [ "$(psql -qXAt -h 127.0.0.1 -p "$pg_port" -U app app -c "$open_sql")" -ge 20 ] && break
        sleep 0.2
    done
}

measure() { # name clients args...
    local name=$1 clients=$2; shift 2
    local port out pid prof="$work/$name.callgrind"
    port=$(free_port)
    {
        printf '[proxy]\nlisten = "127.0.0.1:%s"\npool_mode = "transaction"\n' "$port"
        app_toml "$pg_port" 20
        echo "min_idle = 20"
    } > "$work/$name.toml"
    RUST_LOG=warn timeout 900 valgrind --tool=callgrind --callgrind-out-file="$prof" \
        "$BIN" --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
    pid=$!; pids+=("$pid")
    for _ in $(seq 600); do
        psql -qXAt -h 127.0.0.1 -p "$port" -U app app -c 'select 1' >/dev/null 2>&1 && break
        sleep 0.2
    done
    wait_pool_open
    # Warm up (statements, buffers), then count only the measured run.
    # shellcheck disable=SC2068
    timeout 300 pgbench -n -j 2 -c "$clients" -t 100 -h 127.0.0.1 -p "$port" -U app $@ app >/dev/null 2>&1
    # valgrind runs as timeout's child, and callgrind_control wants it.
    local vg
    vg=$(pgrep -P "$pid" | head -1)
    callgrind_control --zero "$vg" >/dev/null 2>&1
    # shellcheck disable=SC2068
    out=$(timeout 600 pgbench -n -j 2 -c "$clients" -t "$TX" -h 127.0.0.1 -p "$port" -U app $@ app 2>&1)
    callgrind_control --dump=measured "$vg" >/dev/null 2>&1
    kill -INT "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    local done tx dump
    done=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    tx=$((clients * TX))
    [ "$done" = "$tx" ] || { echo "$name: pgbench ran $done of $tx transactions" >&2; return 1; }
    dump=$(ls -t "$prof".* | head -1)
    cp "$dump" "/tmp/pgheal-$name.callgrind"
    awk -v tx="$tx" -v n="$name" '/^summary:|^totals:/ { printf "%-16s %8d instructions per transaction\n", n, $2 / tx; exit }' "$dump"
}

# PgBouncer's total instructions for a warm-up and then $3 transactions
# per client, under callgrind from start to exit.
bouncer_total() { # name clients tx args...
    local name=$1 clients=$2 tx=$3; shift 3
    local port prof="$work/$name.bouncer.callgrind" ini="$work/$name.ini"
    port=$(free_port)
    printf '"app" "apppw"\n' > "$work/users.txt"
    cat > "$ini" <<INI
[databases]
app = host=127.0.0.1 port=$pg_port dbname=app user=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $work/users.txt
pool_mode = transaction
default_pool_size = 20
min_pool_size = 20
max_db_connections = 20
log_connections = 0
log_disconnections = 0
logfile = $work/$name.bouncer.log
pidfile = $work/$name.bouncer.pid
INI
    chmod 644 "$ini" "$work/users.txt"
    rm -f "$prof" "$work/$name.bouncer.pid"
    "${as_pg[@]}" timeout 900 valgrind --tool=callgrind --callgrind-out-file="$prof" \
        pgbouncer "$ini" >"$work/$name.bouncer.out" 2>&1 &
    for _ in $(seq 600); do
        psql -qXAt -h 127.0.0.1 -p "$port" -U app app -c 'select 1' >/dev/null 2>&1 && break
        sleep 0.2
    done
    local pid
    pid=$(cat "$work/$name.bouncer.pid")
    pids+=("$pid")
    wait_pool_open
    # shellcheck disable=SC2068
    timeout 300 pgbench -n -j 2 -c "$clients" -t 100 -h 127.0.0.1 -p "$port" -U app $@ app >/dev/null 2>&1
    # shellcheck disable=SC2068
    timeout 600 pgbench -n -j 2 -c "$clients" -t "$tx" -h 127.0.0.1 -p "$port" -U app $@ app >/dev/null 2>&1
    kill -INT "$pid"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    awk '/^summary:|^totals:/ { print $2; exit }' "$prof"
}

bouncer_measure() { # name clients args...
    local name=$1 clients=$2; shift 2
    if [[ " $* " == *" prepared "* ]]; then
        printf '%-16s %8s (PgBouncer 1.18: no prepared statements in transaction mode)\n' "$name" -
        return
    fi
    local one all
    one=$(bouncer_total "$name" "$clients" 1 "$@")
    all=$(bouncer_total "$name" "$clients" $((1 + TX)) "$@")
    awk -v a="$one" -v b="$all" -v tx=$((clients * TX)) -v n="$name" \
        'BEGIN { printf "%-16s %8d instructions per transaction\n", n, (b - a) / tx }'
}

echo "pgheal: $BIN; $TX transactions per client per case"
for c in "${cases[@]}"; do
    IFS='|' read -r name clients args <<<"$c"
    # shellcheck disable=SC2086
    measure "$name" "$clients" $args
done
if [ -n "${BOUNCER:-}" ]; then
    echo "PgBouncer $(pgbouncer --version | head -1 | awk '{print $2}'), the same cases"
    for c in "${cases[@]}"; do
        IFS='|' read -r name clients args <<<"$c"
        # The trust user of the -C case is pgheal's; PgBouncer trusts all.
        args=${args/-U idle/}
        # shellcheck disable=SC2086
        bouncer_measure "$name" "$clients" $args
    done
fi
echo "profiles: /tmp/pgheal-<case>.callgrind (callgrind_annotate --inclusive=yes FILE)"

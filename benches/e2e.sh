#!/usr/bin/env bash
# End-to-end benchmark: pgbench against PostgreSQL directly, through pgheal
# (transaction mode) and through PgBouncer (transaction mode, same pool
# size), in one run, alternating targets; the tls-* rows use sslmode=require
# (PostgreSQL, pgheal and PgBouncer serve one self-signed certificate). Prints TPS, average latency and
# the ratios, then RSS with N idle logged-in clients for both proxies.
#
#   benches/e2e.sh                      # defaults below
#   DURATION=5 ROUNDS=1 IDLE=2000 benches/e2e.sh
#   CASES='S-simple' benches/e2e.sh     # only the cases matching a regex
#   PROXY_CORES=1 benches/e2e.sh        # both proxies pinned to that many
#                                       # cores (taskset); pgheal runs as
#                                       # many workers: TPS per proxy core
#   BIN=target/pgo/release/pgheal benches/e2e.sh   # another pgheal build
#                                       # (scripts/pgo-build's); default:
#                                       # the release build, built first
#
# Columns: TPS (mean of the rounds), average latency, p99 latency (from
# pgbench's per-transaction log), the proxy's own CPU (user + system)
# per transaction, which does not depend on how the cores are shared, and
# its context switches per transaction.
# The tpcb rows also run through a second pgheal with transaction replay
# off ([failover] replay = false): what recording transactions costs.
#
# Needs: PostgreSQL server binaries, pgbench, pgbouncer, python3. Runs
# PostgreSQL and PgBouncer as the postgres user when started as root.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
POOL=${POOL:-20}
IDLE=${IDLE:-10000}
SCALE=${SCALE:-10}

BENCH_PREFIX=pgheal-bench
# shellcheck source=benches/common.sh
. benches/common.sh

pg_port=$(free_port); heal_port=$(free_port); bouncer_port=$(free_port); bsession_port=$(free_port)
noreplay_port=$(free_port)
# One self-signed certificate for the TLS rows, served by all three.
self_signed_cert
echo "apppw" > "$work/pw"; chmod 644 "$work/pw"
"${as_pg[@]}" "$bin/initdb" -D "$work/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile="$work/pw" -N -E UTF8 --no-locale >/dev/null
"${as_pg[@]}" "$bin/postgres" -D "$work/data" -p "$pg_port" -k "$work" -c listen_addresses=127.0.0.1 \
    -c fsync=off -c max_connections=300 -c shared_buffers=256MB \
    -c ssl=on -c ssl_cert_file="$work/tls.crt" -c ssl_key_file="$work/tls.key" >"$work/pg.log" 2>&1 &
pg_ready "$work/data"
# The trust user (idle) runs the -C trust row.
app_database "$pg_port" "$SCALE"

if [ -z "${BIN:-}" ]; then
    cargo build --release -q
fi
heal_bin=${BIN:-${CARGO_TARGET_DIR:-target}/release/pgheal}
[ -x "$heal_bin" ] || { echo "no pgheal at $heal_bin" >&2; exit 1; }
{
    cat <<TOML
[proxy]
listen = "127.0.0.1:$heal_port"
pool_mode = "transaction"
max_client_connections = $((IDLE + 1000))
[tls]
cert = "$work/tls.crt"
key = "$work/tls.key"
TOML
    app_toml "$pg_port" "$POOL"
} > "$work/pgheal.toml"
pin=()
if [ -n "${PROXY_CORES:-}" ]; then
    pin=(taskset -c "0-$((PROXY_CORES - 1))")
    export PGHEAL_WORKERS=$PROXY_CORES
fi
# A file limit of this shell and its children, for the idle clients (the
# hard limit is the ceiling: raise it with `ulimit -Hn` as root, or
# LimitNOFILE= under systemd).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
RUST_LOG=warn "${pin[@]}" "$heal_bin" --config "$work/pgheal.toml" >"$work/pgheal.log" 2>&1 &
heal_pid=$!; pids+=("$heal_pid")
sed "s/^listen = .*/listen = \"127.0.0.1:$noreplay_port\"/" "$work/pgheal.toml" > "$work/noreplay.toml"
printf '[failover]\nreplay = false\n' >> "$work/noreplay.toml"
RUST_LOG=warn "${pin[@]}" "$heal_bin" --config "$work/noreplay.toml" >"$work/noreplay.log" 2>&1 &
noreplay_pid=$!; pids+=("$noreplay_pid")

cat > "$work/userlist.txt" <<TXT
"app" "apppw"
"idle" "apppw"
TXT
cat > "$work/hba.txt" <<TXT
host all idle 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
TXT
cat > "$work/pgbouncer.ini" <<INI
[databases]
app = host=127.0.0.1 port=$pg_port dbname=app user=app password=apppw
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = hba
auth_hba_file = $work/hba.txt
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = $((IDLE + 200))
max_db_connections = $POOL
logfile = $work/pgbouncer.log
client_tls_sslmode = allow
client_tls_cert_file = $work/tls.crt
client_tls_key_file = $work/tls.key
pidfile = $work/pgbouncer.pid
INI
# The prepared rows compare with PgBouncer in session mode: 1.18 cannot
# carry prepared statements in transaction mode, and session mode needs no
# translation at all.
sed -e "s/^pool_mode = .*/pool_mode = session/" -e "s/^listen_port = .*/listen_port = $bsession_port/" \
    -e "s#pgbouncer.log#pgbouncer-session.log#" -e "s#pgbouncer.pid#pgbouncer-session.pid#" \
    "$work/pgbouncer.ini" > "$work/pgbouncer-session.ini"
chmod 644 "$work"/*.ini "$work"/*.txt
# setpriv, unlike runuser, keeps the raised file limit (no PAM session).
as_pg_nopam=()
[ "$(id -u)" -eq 0 ] && as_pg_nopam=(setpriv --reuid=postgres --regid=postgres --init-groups)
(ulimit -n $((IDLE + 1000)) 2>/dev/null || true; "${pin[@]}" "${as_pg_nopam[@]}" pgbouncer -q "$work/pgbouncer.ini") &
for _ in $(seq 100); do [ -s "$work/pgbouncer.pid" ] && break; sleep 0.1; done
bouncer_pid=$(cat "$work/pgbouncer.pid"); pids+=("$bouncer_pid")
("${pin[@]}" "${as_pg_nopam[@]}" pgbouncer -q "$work/pgbouncer-session.ini") &
for _ in $(seq 100); do [ -s "$work/pgbouncer-session.pid" ] && break; sleep 0.1; done
bsession_pid=$(cat "$work/pgbouncer-session.pid"); pids+=("$bsession_pid")
for _ in $(seq 100); do
    PGPASSWORD=apppw psql -qXAt -h 127.0.0.1 -p "$heal_port" -U app app -c 'select 1' >/dev/null 2>&1 &&
    PGPASSWORD=apppw psql -qXAt -h 127.0.0.1 -p "$bouncer_port" -U app app -c 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
done

export PGPASSWORD=apppw PGSSLMODE=disable
mkdir -p "$work/lat"

declare -A tps lat cpu p99 cs
# The 99th percentile of the latencies (microseconds, third column) in
# pgbench's per-transaction logs with this prefix, in milliseconds.
p99_of() { python3 - "$1" <<'PY'
import glob, sys
lat = sorted(int(l.split()[2]) for f in glob.glob(sys.argv[1] + "*") for l in open(f))
print(lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000 if lat else float("nan"))
PY
}
# CPU seconds (user + system) a process has used so far.
cpu_of() { python3 -c "import os,sys; f=open('/proc/%s/stat'%sys.argv[1]).read().rsplit(')',1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK'))" "$1"; }
# Context switches (voluntary and not) of all of a process's threads so far
# (a thread that sleeps and is woken again).
switches_of() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { n += $2 } END { print n + 0 }'; }
run() { # name target-port args...
    local name=$1 port=$2; shift 2
    local out proxy_pid="" before=0 switched=0
    case $port in
        "$heal_port") proxy_pid=$heal_pid;;
        "$bouncer_port") proxy_pid=$bouncer_pid;;
        "$bsession_port") proxy_pid=$bsession_pid;;
        "$noreplay_port") proxy_pid=$noreplay_pid;;
    esac
    [ -n "$proxy_pid" ] && before=$(cpu_of "$proxy_pid") && switched=$(switches_of "$proxy_pid")
    local sslmode=disable
    [[ $name == tls-* ]] && sslmode=require
    local log="$work/lat/${name//\//-}"
    rm -f "$log"*
    out=$(PGSSLMODE=$sslmode pgbench -h 127.0.0.1 -p "$port" -U app -T "$DURATION" -j 2 -n \
        -l --log-prefix="$log" "$@" app 2>&1) || {
        # PgBouncer before 1.21 cannot run -M prepared in transaction mode.
        echo "pgbench failed ($name, port $port): $(grep -m1 -o 'ERROR: .*' <<<"$out")" >&2
        tps[$name]=nan; lat[$name]=nan; p99[$name]=nan; return 0; }
    local t l f
    t=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
    l=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
    f=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
    [ "${f:-0}" = 0 ] || echo "WARNING: $f failed transactions ($name, port $port)" >&2
    if [ -n "$proxy_pid" ]; then
        # The proxy's own CPU per transaction, in microseconds.
        cpu[$name]=$(python3 -c "print(float('${cpu[$name]:-0}') + ($(cpu_of "$proxy_pid") - $before) * 1e6 / ($t * $DURATION))")
        cs[$name]=$(python3 -c "print(float('${cs[$name]:-0}') + ($(switches_of "$proxy_pid") - $switched) / ($t * $DURATION))")
    fi
    tps[$name]=$(python3 -c "print(float('${tps[$name]:-0}') + $t)")
    p99[$name]=$(python3 -c "print(float('${p99[$name]:-0}') + $(p99_of "$log"))")
    lat[$name]=$(python3 -c "print(float('${lat[$name]:-0}') + $l)")
}

cases=(
    "S-simple-1|-S -M simple -c 1"
    "S-simple-16|-S -M simple -c 16"
    "S-simple-64|-S -M simple -c 64"
    "S-extended-1|-S -M extended -c 1"
    "S-extended-16|-S -M extended -c 16"
    "S-extended-64|-S -M extended -c 64"
    "S-prepared-1|-S -M prepared -c 1"
    "S-prepared-16|-S -M prepared -c 16"
    "S-prepared-64|-S -M prepared -c 64"
    "tpcb-prep-16|-M prepared -c 16"
    "tpcb-16|-c 16"
    "tls-S-16|-S -M extended -c 16"
    "tls-C-S-16|-C -S -c 16"
    "C-S-16|-C -S -c 16"
    "C-trust-S-16|-C -S -c 16 -U idle"
)
if [ -n "${CASES:-}" ]; then
    selected=()
    for c in "${cases[@]}"; do [[ ${c%%|*} =~ $CASES ]] && selected+=("$c"); done
    cases=("${selected[@]}")
fi
for round in $(seq "$ROUNDS"); do
    for c in "${cases[@]}"; do
        name=${c%%|*}; args=${c#*|}
        # Alternate the order of targets from round to round.
        if [ $((round % 2)) = 1 ]; then order="direct pgheal pgbouncer"; else order="pgbouncer pgheal direct"; fi
        [[ $name == tpcb* ]] && order="$order noreplay"
        for target in $order; do
            case $target in direct) port=$pg_port;; pgheal) port=$heal_port;; pgbouncer) port=$bouncer_port;;
                noreplay) port=$noreplay_port;; esac
            [[ $target == pgbouncer && $args == *prepared* ]] && port=$bsession_port
            # shellcheck disable=SC2086
            run "$name/$target" "$port" $args
        done
    done
done

[ -n "${PROXY_CORES:-}" ] && echo "proxies pinned to $PROXY_CORES core(s); pgheal with $PROXY_CORES worker(s)"
echo "pgheal and PgBouncer in transaction mode, pool $POOL; -M prepared rows: PgBouncer in session mode"
printf '\n%-16s %12s %12s %12s %9s %9s   %-24s %-24s %-27s %s\n' case "direct tps" "pgheal tps" "bouncer tps" "heal/bnc" "heal/dir" "avg ms (dir/heal/bnc)" "p99 ms (dir/heal/bnc)" "proxy CPU us/tx (heal/bnc)" "switches/tx (heal/bnc)"
for c in "${cases[@]}"; do
    name=${c%%|*}
    python3 - "$name" "$ROUNDS" "${tps[$name/direct]}" "${tps[$name/pgheal]}" "${tps[$name/pgbouncer]}" \
        "${lat[$name/direct]}" "${lat[$name/pgheal]}" "${lat[$name/pgbouncer]}" \
        "${cpu[$name/pgheal]:-nan}" "${cpu[$name/pgbouncer]:-nan}" \
        "${p99[$name/direct]}" "${p99[$name/pgheal]}" "${p99[$name/pgbouncer]}" \
        "${cs[$name/pgheal]:-nan}" "${cs[$name/pgbouncer]:-nan}" <<'PY'
import sys
name, rounds = sys.argv[1], int(sys.argv[2])
d, h, b, ld, lh, lb, ch, cb, pd, ph, pb, sh, sb = (float(x) / rounds for x in sys.argv[3:16])
ratio = lambda a, b: "fails" if b != b else f"{a / b:.2f}"  # nan: pgbench failed
lat = f"{ld:.3f}/{lh:.3f}/{lb:.3f}"
p99 = f"{pd:.2f}/{ph:.2f}/{pb:.2f}"
cpu = f"{ch:.1f}/{cb:.1f}"
print(f"{name:<16} {d:12.0f} {h:12.0f} {b:12.0f} {ratio(h, b):>9} {ratio(h, d):>9}   {lat:<24} {p99:<24} {cpu:<27} {sh:.2f}/{sb:.2f}")
PY
done

for c in "${cases[@]}"; do
    name=${c%%|*}
    [[ $name == tpcb* ]] || continue
    python3 - "$name" "$ROUNDS" "${cpu[$name/pgheal]}" "${cpu[$name/noreplay]}" "${tps[$name/pgheal]}" "${tps[$name/noreplay]}" <<'PY'
import sys
name, rounds = sys.argv[1], int(sys.argv[2])
on, off, tps_on, tps_off = (float(x) / rounds for x in sys.argv[3:7])
print(f"{name}: pgheal CPU us/tx with replay {on:.1f}, without {off:.1f} ({(on / off - 1) * 100:+.1f}%); TPS with/without {tps_on / tps_off:.2f}")
PY
done

[ "$IDLE" -gt 0 ] || exit 0
# Idle clients are measured on fresh processes of both proxies.
idle_heal_port=$(free_port); idle_bouncer_port=$(free_port)
sed "s/^listen = .*/listen = \"127.0.0.1:$idle_heal_port\"/" "$work/pgheal.toml" > "$work/idle.toml"
RUST_LOG=warn "${pin[@]}" "$heal_bin" --config "$work/idle.toml" >"$work/idle-heal.log" 2>&1 &
idle_heal_pid=$!; pids+=("$idle_heal_pid")
sed -e "s/^listen_port = .*/listen_port = $idle_bouncer_port/" \
    -e "s#pgbouncer.log#pgbouncer-idle.log#" -e "s#pgbouncer.pid#pgbouncer-idle.pid#" \
    "$work/pgbouncer.ini" > "$work/pgbouncer-idle.ini"
chmod 644 "$work/pgbouncer-idle.ini"
(ulimit -n $((IDLE + 1000)) 2>/dev/null || true; "${pin[@]}" "${as_pg_nopam[@]}" pgbouncer -q "$work/pgbouncer-idle.ini") &
for _ in $(seq 100); do [ -s "$work/pgbouncer-idle.pid" ] && break; sleep 0.1; done
idle_bouncer_pid=$(cat "$work/pgbouncer-idle.pid"); pids+=("$idle_bouncer_pid")
for _ in $(seq 100); do
    psql -qXAt -h 127.0.0.1 -p "$idle_heal_port" -U idle app -c 'select 1' >/dev/null 2>&1 &&
    psql -qXAt -h 127.0.0.1 -p "$idle_bouncer_port" -U idle app -c 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
done
echo
echo "RSS with $IDLE idle clients, each logged in and ran one SELECT, fresh processes, after ${SETTLE:-12} s idle (clients, KiB before, KiB after, bytes per client):"
heal_mem=$(python3 benches/idle_clients.py 127.0.0.1 "$idle_heal_port" idle app "$IDLE" "$idle_heal_pid" 2>&1 | tail -1 || true)
bouncer_mem=$(python3 benches/idle_clients.py 127.0.0.1 "$idle_bouncer_port" idle app "$IDLE" "$idle_bouncer_pid" 2>&1 | tail -1 || true)
echo "pgheal    $heal_mem"
echo "pgbouncer $bouncer_mem"

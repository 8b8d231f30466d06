# Shared by benches/e2e.sh, benches/instructions.sh and scripts/pgo-build
# (sourced, from the project root): PostgreSQL's binaries, a work directory
# removed on exit with every process listed in `pids` stopped first, free
# ports, and the wait for a PostgreSQL started in the background.

bin=$(dirname "$(readlink -f "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")")
# PostgreSQL refuses to run as root.
as_pg=()
[ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# work=$(...) in /tmp, readable by the postgres user; removed on exit.
work=$(mktemp -d "/tmp/${BENCH_PREFIX:-pgheal-bench}-XXXXXX")
chmod 755 "$work"
[ "$(id -u)" -eq 0 ] && chown postgres "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
    rm -rf "$work"
}
trap cleanup EXIT

# Waits (up to 30 s) until the PostgreSQL of data directory $1 is ready,
# and lists it for cleanup.
pg_ready() {
    for _ in $(seq 300); do [ -f "$1/postmaster.pid" ] && \
        [ "$(sed -n 8p "$1/postmaster.pid" 2>/dev/null | tr -d ' ')" = "ready" ] && break; sleep 0.1; done
    pids+=("$(head -1 "$1/postmaster.pid")")
}

# A self-signed certificate for localhost in $work/tls.crt and tls.key,
# readable by the postgres user.
self_signed_cert() {
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
        -keyout "$work/tls.key" -out "$work/tls.crt" >/dev/null 2>&1
    chmod 600 "$work/tls.key"
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$work/tls.key" "$work/tls.crt"; fi
}

# On the PostgreSQL at port $1 (its socket in $work): the roles app
# (superuser) and idle, both with password apppw, the database app with
# pgbench's tables at scale $2, which idle may read.
app_database() {
    psql -qX -h "$work" -p "$1" -U postgres -c "CREATE ROLE app LOGIN SUPERUSER PASSWORD 'apppw'" \
        -c "CREATE ROLE idle LOGIN PASSWORD 'apppw'" -c "CREATE DATABASE app OWNER app"
    PGPASSWORD=apppw PGSSLMODE=disable pgbench -i -q -s "$2" -h 127.0.0.1 -p "$1" -U app app >/dev/null 2>&1
    PGPASSWORD=apppw PGSSLMODE=disable psql -qX -h 127.0.0.1 -p "$1" -U app app \
        -c "GRANT SELECT ON ALL TABLES IN SCHEMA public TO idle"
}

# pgheal's users (app with a password, idle on trust) and its database app
# on the PostgreSQL at port $1 with a pool of $2, as both benches set them.
app_toml() {
    cat <<TOML
[[users]]
name = "app"
password = "apppw"
[[users]]
name = "idle"
auth = "trust"
[databases.app]
nodes = ["127.0.0.1:$1"]
user = "app"
password = "apppw"
pool_size = $2
TOML
}

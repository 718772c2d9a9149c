# Sourced by .ci/run and .ci/with-postgres (make test): start a private, throw-away PostgreSQL
# cluster for the tests and export
#   EDGEFILTER_TEST_PG_URL   postgresql://edgefilter:...@127.0.0.1:PORT/edgefilter
#   EDGEFILTER_TEST_PG_DATA  the cluster's data directory (tests stop/start it with pg_ctl)
#   EDGEFILTER_TEST_PG_BIN   the directory holding pg_ctl
# It installs Debian's `postgresql` when no server binaries are found (not with PG_NO_INSTALL=1,
# as make test sets: it returns 2 then), runs the server as the
# `postgres` system user when we are root (postgres refuses to run as root), listens only on
# 127.0.0.1:PORT and a unix socket inside the temp directory, and stops it on exit (trap).
# Any failure here fails CI: the PostgreSQL tests must run there, not be skipped.

pg_find_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$d" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then dirname "$(command -v pg_ctl)"; return 0; fi
    return 1
}

pg_as_owner() {  # run a server command as the cluster's owner
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_stop_cluster() {
    if [ -n "${EDGEFILTER_TEST_PG_DATA:-}" ] && [ -d "$EDGEFILTER_TEST_PG_DATA" ]; then
        pg_as_owner "$EDGEFILTER_TEST_PG_BIN/pg_ctl" -D "$EDGEFILTER_TEST_PG_DATA" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    [ -n "${PG_TMP:-}" ] && rm -rf "$PG_TMP"
}

pg_start_cluster() {
    local bin port pw
    if ! bin=$(pg_find_bin); then
        if [ -n "${PG_NO_INSTALL:-}" ]; then
            echo "no PostgreSQL server binaries (initdb, pg_ctl) found" >&2; return 2
        fi
        echo "ci: installing PostgreSQL (Debian package postgresql)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql >/dev/null
        bin=$(pg_find_bin) || { echo "ci: PostgreSQL binaries not found after install" >&2; return 1; }
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        echo "ci: running as root but there is no postgres system user to run the server" >&2; return 1
    fi
    PG_TMP=$(mktemp -d /tmp/edgefilter-pg.XXXXXX)
    chmod 755 "$PG_TMP"
    [ "$(id -u)" = 0 ] && chown postgres: "$PG_TMP"
    pw="ci-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
    printf '%s\n' "$pw" > "$PG_TMP/pwfile"
    [ "$(id -u)" = 0 ] && chown postgres: "$PG_TMP/pwfile"
    chmod 600 "$PG_TMP/pwfile"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    pg_as_owner "$bin/initdb" -D "$PG_TMP/data" -U edgefilter --pwfile="$PG_TMP/pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-sync >"$PG_TMP/initdb.log" 2>&1 \
        || { cat "$PG_TMP/initdb.log" >&2; return 1; }
    # In postgresql.conf, not on the command line, so that a test's plain `pg_ctl start` after a
    # `pg_ctl stop` brings back the same server. Durability settings off: a throw-away cluster.
    cat >>"$PG_TMP/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PG_TMP'
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    pg_as_owner "$bin/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 30 start >/dev/null \
        || { cat "$PG_TMP/server.log" >&2; return 1; }
    pg_as_owner "$bin/createdb" -h "$PG_TMP" -p "$port" -U edgefilter edgefilter \
        || { cat "$PG_TMP/server.log" >&2; return 1; }
    export EDGEFILTER_TEST_PG_URL="postgresql://edgefilter:$pw@127.0.0.1:$port/edgefilter"
    export EDGEFILTER_TEST_PG_DATA="$PG_TMP/data"
    export EDGEFILTER_TEST_PG_BIN="$bin"
    echo "ci: PostgreSQL $("$bin/pg_ctl" --version | awk '{print $3}') on 127.0.0.1:$port (data $PG_TMP/data)"
}

# Throwaway PostgreSQL cluster and MLflow tracking server for tests/test_postgres.py.
#
# Source this file, then call start_test_services: both servers listen on 127.0.0.1 only, on free
# ports, with their data in a temporary folder. It exports RESEARCH_TEST_POSTGRES_URL (an Optuna
# storage URL) and RESEARCH_TEST_MLFLOW_URI (a tracking URI). stop_test_services stops both and
# removes the folder. Debian's postgresql package is installed with apt-get when it is missing.

free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

postgres_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

start_test_services() {
    SERVICES_DIR=$(mktemp -d /tmp/research-ci-services.XXXXXX)
    local pg_bin
    pg_bin=$(postgres_bin)
    if [ -z "$pg_bin" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
        pg_bin=$(postgres_bin)
    fi

    # PostgreSQL refuses to run as root, so root runs it as Debian's postgres user.
    AS_POSTGRES=()
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$SERVICES_DIR"
        AS_POSTGRES=(runuser -u postgres --)
    fi
    PG_BIN=$pg_bin
    PG_DATA=$SERVICES_DIR/pgdata
    local pg_port password
    pg_port=$(free_port)
    password=$(python -c 'import secrets; print(secrets.token_hex(16))')
    "${AS_POSTGRES[@]}" "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 >"$SERVICES_DIR/initdb.log"
    "${AS_POSTGRES[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$SERVICES_DIR/postgres.log" -w \
        -o "-h 127.0.0.1 -p $pg_port -k $PG_DATA" start >/dev/null
    "${AS_POSTGRES[@]}" "$PG_BIN/psql" -h "$PG_DATA" -p "$pg_port" -U postgres -v ON_ERROR_STOP=1 -q \
        -c "CREATE USER research PASSWORD '$password'" -c "CREATE DATABASE optuna OWNER research"
    export RESEARCH_TEST_POSTGRES_URL="postgresql://research:$password@127.0.0.1:$pg_port/optuna"

    local mlflow_port
    mlflow_port=$(free_port)
    # setsid gives the server and its web workers their own process group, stopped as one.
    setsid mlflow server --host 127.0.0.1 --port "$mlflow_port" \
        --backend-store-uri "sqlite:///$SERVICES_DIR/mlflow.db" \
        --artifacts-destination "$SERVICES_DIR/mlflow-artifacts" >"$SERVICES_DIR/mlflow.log" 2>&1 &
    MLFLOW_SERVER_PID=$!
    export RESEARCH_TEST_MLFLOW_URI="http://127.0.0.1:$mlflow_port"
    local waited=0
    until python -c "import urllib.request; urllib.request.urlopen('$RESEARCH_TEST_MLFLOW_URI/health', timeout=2)" 2>/dev/null; do
        waited=$((waited + 1))
        if [ "$waited" -gt 120 ] || ! kill -0 "$MLFLOW_SERVER_PID" 2>/dev/null; then
            echo "mlflow server did not respond on $RESEARCH_TEST_MLFLOW_URI; its log:" >&2
            cat "$SERVICES_DIR/mlflow.log" >&2
            return 1
        fi
        sleep 1
    done
    echo "Test services: PostgreSQL on 127.0.0.1:$pg_port, MLflow server on $RESEARCH_TEST_MLFLOW_URI."
}

stop_test_services() {
    if [ -n "${MLFLOW_SERVER_PID:-}" ]; then
        kill -- "-$MLFLOW_SERVER_PID" 2>/dev/null || true
        wait "$MLFLOW_SERVER_PID" 2>/dev/null || true
    fi
    if [ -n "${PG_DATA:-}" ] && [ -d "$PG_DATA" ]; then
        "${AS_POSTGRES[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null || true
    fi
    if [ -n "${SERVICES_DIR:-}" ]; then
        rm -rf "$SERVICES_DIR"
    fi
}

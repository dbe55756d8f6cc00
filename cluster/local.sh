#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine (127.0.0.1): one head and N worker nodes,
# each a separate `ray start --block` process in a session of its own, token authentication on,
# dashboard and Jobs API on loopback only.
#
#   cluster/local.sh start [--workers N] [--head-cpus N] [--worker-cpus N]
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Environment (all optional):
#   ATTZOOM_CLUSTER_DIR     state: token, PIDs, logs            (default: <repo>/.cluster)
#   ATTZOOM_RAY_PORT        the head's GCS port                  (default: 6379)
#   ATTZOOM_DASHBOARD_PORT  the dashboard and Jobs API port      (default: 8265)
#   ATTZOOM_CLIENT_PORT     the head's Ray Client server port    (default: 10001)
#   ATTZOOM_NODE_PORT_BASE  node k (head 0) uses ports BASE+10k .. BASE+10k+5 for its raylet,
#                           object manager and agents, so nodes never race for one (default: 23000)
#   ATTZOOM_RAY_TEMP        Ray's temp root; node k gets its own folder K in it, because nodes sharing one
#                           would unpack a job's working_dir over each other (default: /tmp/attzoom-ray-GCSPORT)
#   ATTZOOM_WORKERS, ATTZOOM_HEAD_CPUS, ATTZOOM_WORKER_CPUS      (defaults: 1, 0, 1)
#   RAY_health_check_* and other RAY_* settings are passed through to every node.
#
# `stop` kills exactly the sessions this script started (never `ray stop`, which would also stop
# every other Ray instance of this user).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${ATTZOOM_CLUSTER_DIR:-$ROOT/.cluster}"
RAY_PORT="${ATTZOOM_RAY_PORT:-6379}"
DASHBOARD_PORT="${ATTZOOM_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${ATTZOOM_CLIENT_PORT:-10001}"
PORT_BASE="${ATTZOOM_NODE_PORT_BASE:-23000}"
RAY_TEMP="${ATTZOOM_RAY_TEMP:-/tmp/attzoom-ray-$RAY_PORT}"  # short: Ray's socket paths must fit 107 bytes
WORKERS="${ATTZOOM_WORKERS:-1}"
HEAD_CPUS="${ATTZOOM_HEAD_CPUS:-0}"
WORKER_CPUS="${ATTZOOM_WORKER_CPUS:-1}"
IP=127.0.0.1

# Every node (and so every job driver and trial) runs this project's environment.
if [[ -x "$ROOT/.venv/bin/ray" ]]; then
    export PATH="$ROOT/.venv/bin:$PATH"
fi

die() { echo "cluster/local.sh: error: $*" >&2; exit 2; }

usage() {
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"
    exit "${1:-2}"
}

auth_env() {
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    if [[ ! -s "$STATE/token" ]]; then
        (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/token")
    fi
    chmod 600 "$STATE/token"
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH="$STATE/token"
    unset RAY_AUTH_TOKEN  # the file is the one source of truth for the nodes
}

alive() {  # alive PIDFILE: the recorded `ray start` process still runs
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

listening() {  # listening PORT: something accepts connections on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/$IP/$1") 2>/dev/null
}

wait_port() {  # wait_port PORT SECONDS PIDFILE
    local deadline=$((SECONDS + $2))
    until listening "$1"; do
        alive "$3" || die "the node recorded in $3 exited; see its log in $STATE/"
        (( SECONDS < deadline )) || die "nothing listens on 127.0.0.1:$1 after $2 s; see the logs in $STATE/"
        sleep 1
    done
}

launch() {  # launch NAME K ARGS...: `ray start --block ARGS` in a new session, its PID in $STATE/NAME.pid
    local name="$1" k="$2" base=$((PORT_BASE + 10 * $2)); shift 2
    # setsid does not fork here (a script's background job is no process-group leader), so the PID
    # recorded is the session id too: `stop` and the tests kill the node's whole session by it.
    mkdir -p "$RAY_TEMP/$k"
    setsid ray start --block --disable-usage-stats --node-ip-address="$IP" --temp-dir="$RAY_TEMP/$k" "$@" \
        --node-manager-port=$base --object-manager-port=$((base + 1)) --dashboard-agent-listen-port=$((base + 2)) \
        --dashboard-agent-grpc-port=$((base + 3)) --runtime-env-agent-port=$((base + 4)) \
        --metrics-export-port=$((base + 5)) \
        > "$STATE/$name.log" 2>&1 < /dev/null &
    echo $! > "$STATE/$name.pid"
}

start() {
    while (( $# )); do
        case "$1" in
            --workers) WORKERS="${2:?}"; shift 2 ;;
            --head-cpus) HEAD_CPUS="${2:?}"; shift 2 ;;
            --worker-cpus) WORKER_CPUS="${2:?}"; shift 2 ;;
            -h|--help) usage 0 ;;
            *) die "unknown option $1 (see cluster/local.sh --help)" ;;
        esac
    done
    [[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers must be a whole number, got $WORKERS"
    alive "$STATE/head.pid" && die "a cluster already runs from $STATE (pid $(cat "$STATE/head.pid")); stop it first"
    command -v ray > /dev/null || die "no 'ray' on PATH; create the project's .venv first"
    listening "$DASHBOARD_PORT" && die "127.0.0.1:$DASHBOARD_PORT is taken; set ATTZOOM_DASHBOARD_PORT"
    listening "$RAY_PORT" && die "port $RAY_PORT is taken; set ATTZOOM_RAY_PORT"
    for name in DASHBOARD RAY CLIENT; do  # the head's dashboard binds 44227 for its metrics, whatever its own port
        port="${name}_PORT"
        (( ${!port} == 44227 )) && die "ATTZOOM_${name}_PORT is 44227, the Ray dashboard's metrics port; pick another"
    done
    auth_env
    rm -f "$STATE"/*.pid

    launch head 0 --head --port="$RAY_PORT" --num-cpus="$HEAD_CPUS" --ray-client-server-port="$CLIENT_PORT" \
        --dashboard-host="$IP" --dashboard-port="$DASHBOARD_PORT"
    wait_port "$RAY_PORT" 120 "$STATE/head.pid"
    wait_port $((PORT_BASE + 2)) 120 "$STATE/head.pid"
    # One node at a time: raylets starting together on one machine race for the same socket names.
    for ((i = 1; i <= WORKERS; i++)); do
        launch "worker-$i" "$i" --address="$IP:$RAY_PORT" --num-cpus="$WORKER_CPUS"
        wait_port $((PORT_BASE + 10 * i + 2)) 120 "$STATE/worker-$i.pid"  # its agent: the raylet is up
    done
    wait_port "$DASHBOARD_PORT" 120 "$STATE/head.pid"
    echo "$IP:$RAY_PORT" > "$STATE/address"
    cat <<EOF
Ray cluster up: head + $WORKERS worker node(s) on $IP (token authentication on; state in $STATE)
  Jobs API and dashboard: http://$IP:$DASHBOARD_PORT
  Ray address (GCS):      $IP:$RAY_PORT
Use it from this shell with:
  export RAY_AUTH_TOKEN_PATH=$STATE/token RAY_AUTH_MODE=token   # the token for Ray's own CLI too (ray job stop)
  attzoom submit tune_jobs/specs/demo.toml --address http://$IP:$DASHBOARD_PORT
Stop it with: cluster/local.sh stop
EOF
}

kill_session() {  # kill_session PIDFILE: SIGTERM the node, then SIGKILL whatever of its session is left
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 0
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 10); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    # the node's raylet, workers and agents share its session id (= the recorded PID)
    for _ in $(seq 1 20); do
        pkill -KILL -s "$pid" 2>/dev/null || break
        sleep 0.25
    done
    rm -f "$1"
}

stop() {
    local found=0 f
    for f in "$STATE"/worker-*.pid "$STATE"/head.pid; do
        [[ -e "$f" ]] || continue
        found=1
        kill_session "$f"
    done
    rm -f "$STATE/address"
    (( found )) && echo "cluster in $STATE stopped" || echo "no cluster recorded in $STATE"
}

status() {
    local f name
    [[ -e "$STATE/head.pid" ]] || { echo "no cluster recorded in $STATE"; exit 1; }
    for f in "$STATE"/head.pid "$STATE"/worker-*.pid; do
        [[ -e "$f" ]] || continue
        name="$(basename "$f" .pid)"
        if alive "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: gone"; fi
    done
    auth_env
    alive "$STATE/head.pid" && ray status --address="$IP:$RAY_PORT" || true
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    -h|--help|help) usage 0 ;;
    *) usage 2 ;;
esac

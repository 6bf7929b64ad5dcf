#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: one head + N worker nodes (separate raylets, object stores and
# port ranges), for trying `rayhash submit` and multi-node Ray Train/Data without a cloud. The dashboard / Jobs API
# listens on 127.0.0.1 only and every node is started with --node-ip-address 127.0.0.1 (nothing is advertised on
# the machine's network address), but Ray 2.60's GCS and raylet gRPC servers still bind all interfaces: on a shared
# or reachable host, set RAYHASH_LOCAL_TOKEN (token authentication) and firewall the port range.
# The state folder is created private (0700) and refused when it exists with other owners or permissions.
#
#   cluster/local.sh up [N_WORKERS]     start the head and N worker nodes (default 1), print the addresses
#   cluster/local.sh down               stop exactly the nodes this script started (never `ray stop`)
#   cluster/local.sh status             show whether they run and how many nodes are alive
#
# Settings (environment):
#   RAYHASH_LOCAL_PORT=26380        base port: GCS = base, dashboard/Jobs API = base+1, node ports above it
#   RAYHASH_LOCAL_DIR=/tmp/rayhash-local-<port>   Ray temp dir + this script's state (pids, logs, token)
#   RAYHASH_LOCAL_CPUS=2            logical CPUs per worker node (oversubscribing a small machine is fine)
#   RAYHASH_LOCAL_HEAD_CPUS=<CPUS>  logical CPUs on the head (0 = head only schedules drivers, like a cloud head)
#   RAYHASH_LOCAL_OBJECT_STORE=512000000   object store bytes per node
#   RAYHASH_LOCAL_TOKEN=<secret>    turn on Ray token authentication (RAY_AUTH_MODE=token) with this token;
#                                   clients then need it: `rayhash submit --token-file <dir>/auth_token ...`
#   RAYHASH_LOCAL_WAIT_S=180 / RAYHASH_LOCAL_STOP_GRACE_S=10   start timeout / SIGTERM grace before SIGKILL
#   RAYHASH_RAY=<path to ray>       default: .venv/bin/ray of this checkout, else `ray` on PATH
# The nodes run with this checkout's Python first on PATH, so Ray jobs' `python jobs/<stage>.py` has rayhash's deps.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY="${RAYHASH_RAY:-$ROOT/.venv/bin/ray}"
[[ -x "$RAY" ]] || RAY="$(command -v ray || true)"
PORT="${RAYHASH_LOCAL_PORT:-26380}"
DIR="${RAYHASH_LOCAL_DIR:-/tmp/rayhash-local-$PORT}"
CPUS="${RAYHASH_LOCAL_CPUS:-2}"
HEAD_CPUS="${RAYHASH_LOCAL_HEAD_CPUS:-$CPUS}"
OBJECT_STORE="${RAYHASH_LOCAL_OBJECT_STORE:-512000000}"
DASHBOARD_PORT=$((PORT + 1))
WAIT_S="${RAYHASH_LOCAL_WAIT_S:-180}"
STOP_GRACE_S="${RAYHASH_LOCAL_STOP_GRACE_S:-10}"

die() { echo "local.sh: error: $*" >&2; exit 1; }

node_env() {
  # The environment every node (and so every job driver and worker) starts with.
  export PATH="$(dirname "$RAY"):$PATH"
  unset RAY_ADDRESS RAY_AUTH_TOKEN
  if [[ -s "$DIR/auth_token" ]]; then
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
  else
    # Explicit: Ray >= 2.5x turns token auth on by itself when it finds ~/.ray/auth_token.
    export RAY_AUTH_MODE=disabled
    unset RAY_AUTH_TOKEN_PATH
  fi
  export RAY_USAGE_STATS_ENABLED=0
}

start_node() {  # start_node INDEX ARGS... : one `ray start --block` in its own session (process group)
  local i="$1"; shift
  local base=$((PORT + 10 + 10 * i)) wmin=$((PORT + 100 + 100 * i))
  setsid "$RAY" start --block \
    --node-manager-port "$base" --object-manager-port $((base + 1)) \
    --dashboard-agent-listen-port $((base + 2)) --dashboard-agent-grpc-port $((base + 3)) \
    --runtime-env-agent-port $((base + 4)) --metrics-export-port $((base + 5)) \
    --min-worker-port "$wmin" --max-worker-port $((wmin + 99)) \
    --object-store-memory "$OBJECT_STORE" --disable-usage-stats --node-ip-address 127.0.0.1 "$@" \
    >"$DIR/node-$i.log" 2>&1 </dev/null &
  echo $! >"$DIR/node-$i.pid"
}

start_node_retrying() {  # start_node_retrying INDEX "READY COMMAND" ARGS... : start_node, once more if it exits
  # Ray gives a starting node 30 s to register with its GCS; a loaded machine can miss that and the node exits ("The
  # current node timed out during startup"). The second start's own failure is reported by wait_for.
  local i="$1" ready="$2" attempt
  shift 2
  for attempt in 1 2; do
    start_node "$i" "$@"
    # shellcheck disable=SC2086  # READY COMMAND is a command and its words
    if ((attempt == 2)) || wait_or_exit "$DIR/node-$i.pid" $ready >/dev/null; then
      return 0
    fi
    echo "$0: node $i exited while starting (log: $DIR/node-$i.log); starting it once more" >&2
    stop_group "$(cat "$DIR/node-$i.pid")"
    mv "$DIR/node-$i.log" "$DIR/node-$i.failed.log"
  done
}

alive_pids() {
  local f
  for f in "$DIR"/node-*.pid; do
    [[ -e "$f" ]] || continue
    local pid; pid="$(cat "$f")"
    kill -0 "$pid" 2>/dev/null && echo "$pid"
  done
  return 0
}

api() {  # api PATH : GET on the dashboard HTTP API (with the token when auth is on)
  # The header goes to curl on stdin (printf and $(<file) are bash builtins): the token is never in any argv.
  if [[ -s "$DIR/auth_token" ]]; then
    printf 'Authorization: Bearer %s\n' "$(<"$DIR/auth_token")" |
      curl -sf --max-time 5 -H @- "http://127.0.0.1:$DASHBOARD_PORT$1"
  else
    curl -sf --max-time 5 "http://127.0.0.1:$DASHBOARD_PORT$1"
  fi
}

private_dir() {  # the state folder: created 0700 by us, or refused (a name under /tmp can be planted by others)
  if [[ -e "$DIR" || -L "$DIR" ]]; then
    [[ -d "$DIR" && ! -L "$DIR" && -O "$DIR" ]] || die "$DIR exists and is not a folder owned by you; remove it or set RAYHASH_LOCAL_DIR"
    [[ "$(stat -c %a "$DIR")" =~ ^7?00$ ]] || die "$DIR is open to other users (mode $(stat -c %a "$DIR")); chmod 700 it or set RAYHASH_LOCAL_DIR"
  else
    (umask 077 && mkdir -p "$DIR")
  fi
}

alive_nodes() {  # number of ALIVE nodes according to the head
  api "/api/v0/nodes?limit=1000" 2>/dev/null | "$(dirname "$RAY")/python" -c \
    'import json,sys; d=json.load(sys.stdin)["data"]["result"]["result"]; print(sum(n["state"]=="ALIVE" for n in d))' \
    2>/dev/null || echo 0
}

nodes_at_least() { (($(alive_nodes) >= $1)); }

wait_for() {  # wait_for DESCRIPTION COMMAND... : poll until COMMAND succeeds
  local what="$1"; shift
  local t=0
  until "$@"; do
    ((t += 1))
    if ((t > WAIT_S)) || [[ -z "$(alive_pids)" ]]; then
      tail -n 30 "$DIR"/node-*.log >&2 || true
      do_down >/dev/null 2>&1 || true
      die "$what did not come up within ${WAIT_S}s (logs above, in $DIR)"
    fi
    sleep 1
  done
}

wait_or_exit() {  # wait_or_exit PIDFILE COMMAND... : 1 if that node's process ends before COMMAND succeeds, else 0
  local pidfile="$1"; shift
  local t=0
  until "$@"; do
    kill -0 "$(cat "$pidfile")" 2>/dev/null || return 1
    ((t += 1))
    ((t > WAIT_S)) && return 0  # still running but not answering: wait_for reports it
    sleep 1
  done
}

do_up() {
  local n="${1:-1}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "N_WORKERS must be a number, got '$n'"
  ((n <= 8)) || die "at most 8 worker nodes (port layout), got $n"
  [[ -x "$RAY" ]] || die "no 'ray' executable: create .venv (make install) or set RAYHASH_RAY"
  [[ -n "$(alive_pids)" ]] && die "a cluster from this script already runs in $DIR; run '$0 down' first"
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && die "port $PORT is in use; set RAYHASH_LOCAL_PORT"
  private_dir
  rm -f "$DIR"/node-*.pid "$DIR/auth_token"
  if [[ -n "${RAYHASH_LOCAL_TOKEN:-}" ]]; then
    (umask 077 && printf '%s' "$RAYHASH_LOCAL_TOKEN" >"$DIR/auth_token")
  fi
  node_env
  start_node_retrying 0 "api /api/version" --head --port "$PORT" --temp-dir "$DIR/ray" --num-cpus "$HEAD_CPUS" \
    --num-gpus 0 --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port $((PORT + 2))
  wait_for "the head node" api /api/version >/dev/null
  local i
  for ((i = 1; i <= n; i++)); do  # one at a time: each registers before the next starts
    start_node_retrying "$i" "nodes_at_least $((i + 1))" --address "127.0.0.1:$PORT" --num-cpus "$CPUS" --num-gpus 0
  done
  wait_for "$((n + 1)) nodes" nodes_at_least $((n + 1))
  echo "local Ray cluster up: head + $n worker node(s) on 127.0.0.1"
  echo "  Jobs API / dashboard: http://127.0.0.1:$DASHBOARD_PORT"
  echo "  Ray address (drivers): 127.0.0.1:$PORT"
  [[ -s "$DIR/auth_token" ]] && echo "  token auth ON; token file: $DIR/auth_token"
  echo "  submit: rayhash submit --address http://127.0.0.1:$DASHBOARD_PORT$([[ -s "$DIR/auth_token" ]] && echo " --token-file $DIR/auth_token") <stage> ..."
  echo "  stop:   $0 down"
}

stop_group() {  # stop_group PID... : SIGTERM those nodes' process groups, SIGKILL what is left after the grace time
  local pid t=0
  for pid in "$@"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  while ((t < STOP_GRACE_S)); do
    local left=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && left=1; done
    ((left)) || break
    sleep 1; ((t += 1))
  done
  for pid in "$@"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}

do_down() {
  # Worker nodes first, then the head (a raylet whose GCS vanished first waits for it before exiting).
  local workers=() f
  for f in "$DIR"/node-*.pid; do
    [[ -e "$f" && "$f" != "$DIR/node-0.pid" ]] && workers+=("$(cat "$f")")
  done
  ((${#workers[@]})) && stop_group "${workers[@]}"
  [[ -e "$DIR/node-0.pid" ]] && stop_group "$(cat "$DIR/node-0.pid")"
  # Stragglers that left the process groups (Ray workers): only processes naming this cluster's temp dir.
  if [[ -d "$DIR/ray" ]]; then
    pkill -TERM -f -- "$DIR/ray/" 2>/dev/null || true
    sleep 1
    pkill -KILL -f -- "$DIR/ray/" 2>/dev/null || true
  fi
  rm -f "$DIR"/node-*.pid "$DIR/auth_token"
  echo "local Ray cluster in $DIR stopped"
}

do_status() {
  local pids; pids="$(alive_pids)"
  if [[ -z "$pids" ]]; then echo "no local cluster running from $DIR"; return 1; fi
  echo "local cluster in $DIR: $(echo "$pids" | wc -l) node process(es), $(alive_nodes) node(s) alive"
  echo "  Jobs API / dashboard: http://127.0.0.1:$DASHBOARD_PORT"
}

case "${1:-}" in
  up) do_up "${2:-${RAYHASH_LOCAL_WORKERS:-1}}" ;;
  down) do_down ;;
  status) do_status ;;
  *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

#!/usr/bin/env bash
# The cluster stack of README "On a Ray cluster", on one machine, every server on 127.0.0.1:
# a Ray head that takes no trials, WORKERS worker nodes (each with its own ports and temp dir, and
# WORKER_GPUS GPUs for Ray to schedule by), an S3 server (moto) with a bucket, PostgreSQL, and an
# MLflow server on PostgreSQL with its artifacts in the bucket. On real machines run the same
# steps with real addresses (each is printed as it runs) and MinIO/AWS for S3 (docker/compose.yaml).
#
#   bash docker/local_cluster.sh up [DIR]          # DIR (default runs/local_cluster) gets cluster.env
#   source DIR/cluster.env                         # RAY_ADDRESS, AWS_*, BUCKET, MLFLOW_TRACKING_URI, PG_URL
#   ray job submit --working-dir . -- ptmdd study studies/quickstart.yaml \
#       --mlflow-uri $MLFLOW_TRACKING_URI --store s3://$BUCKET/ptm_store --storage s3://$BUCKET/tune
#   bash docker/local_cluster.sh kill-node 1 [DIR]  # SIGKILL worker node 1 (raylet and workers): node loss
#   bash docker/local_cluster.sh down [DIR]
#
# Knobs (environment): WORKERS (2), WORKER_CPUS (1), WORKER_GPUS (1), OBJECT_STORE_MB (512), S3 (1),
# POSTGRES (1), MLFLOW (1, needs S3 and POSTGRES), PYTHON (the interpreter with ptmdd_ray installed).
# Every process runs in a process session of its own, recorded in DIR/pids/, so `down` and
# `kill-node` stop exactly what `up` started and never another Ray on the machine (`ray stop` would).
set -Eeuo pipefail  # -E: the ERR trap of `up` also fires inside functions

ACTION=${1:?usage: local_cluster.sh up|down|kill-node N [DIR]}
if [ "$ACTION" = kill-node ]; then NODE=${2:?kill-node needs a worker number}; shift; fi
DIR=$(mkdir -p "${2:-runs/local_cluster}" && cd "${2:-runs/local_cluster}" && pwd)
PY=${PYTHON:-$(command -v python3)}
BIN=$(dirname "$PY")
export PATH="$BIN:$PATH"
HERE=$(cd "$(dirname "$0")" && pwd)
# One machine, several nodes: keep every Ray server on the loopback (see docker/loopback_node.py).
export RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

say() { echo "+ $*" >&2; }
http_up() {  # any HTTP answer counts (Ray's dashboard answers 401 without the token)
  "$PY" -c 'import sys, urllib.error, urllib.request
try: urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError: pass' "$1"
}
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Run "$@" in a new process session whose id is kept in DIR/pids/NAME; output to DIR/logs/NAME.log.
spawn() {
  local name=$1; shift
  say "$@"
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$DIR/pids/$name" "$@" > "$DIR/logs/$name.log" 2>&1 &
  for _ in $(seq 50); do [ -s "$DIR/pids/$name" ] && return 0; sleep 0.1; done
  echo "local_cluster: $name did not start (see $DIR/logs/$name.log)" >&2; return 1
}

wait_for() {  # wait_for WHAT CMD...: retry CMD for up to 90 s
  local what=$1; shift
  for _ in $(seq 180); do "$@" > /dev/null 2>&1 && return 0; sleep 0.5; done
  echo "local_cluster: $what did not come up (logs in $DIR/logs)" >&2; return 1
}

stop_session() {  # stop_session NAME: SIGTERM its session, SIGKILL what is left after 10 s
  local f="$DIR/pids/$1" sid
  [ -f "$f" ] || return 0
  sid=$(cat "$f")
  pkill -TERM -s "$sid" 2>/dev/null || true
  for _ in $(seq 20); do pgrep -s "$sid" > /dev/null || break; sleep 0.5; done
  pkill -KILL -s "$sid" 2>/dev/null || true
  rm -f "$f"
}

up_ray() {
  local gcs dash i tmp
  tmp=$(mktemp -d /tmp/ptmddc.XXXXXX)  # short: Ray's socket paths live under it (108-byte limit)
  echo "$tmp" > "$DIR/ray_tmp"
  gcs=$(free_port); dash=$(free_port)
  "$BIN/ray" get-auth-token --generate > /dev/null 2>&1 || true
  # The head takes no trials (no CPU, no GPU): it runs the GCS, the dashboard, the job drivers.
  spawn ray-head "$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$gcs" \
    --dashboard-host=127.0.0.1 --dashboard-port="$dash" --num-cpus=0 --num-gpus=0 \
    --temp-dir="$tmp/head" --object-store-memory=$((${OBJECT_STORE_MB:-512} * 1024 * 1024)) \
    --dashboard-agent-listen-port="$(free_port)" --ray-client-server-port="$(free_port)" \
    --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)" --disable-usage-stats
  wait_for "the Ray dashboard" http_up "http://127.0.0.1:$dash/api/version"
  for i in $(seq "${WORKERS:-2}"); do
    # Each node gets its own ports and temp dir, as on a machine of its own (two nodes sharing a
    # temp dir would delete each other's copy of a job's working directory).
    spawn "ray-worker-$i" "$PY" "$HERE/loopback_node.py" start --block --address="127.0.0.1:$gcs" \
      --node-ip-address=127.0.0.1 --num-cpus="${WORKER_CPUS:-1}" --num-gpus="${WORKER_GPUS:-1}" \
      --temp-dir="$tmp/w$i" --object-store-memory=$((${OBJECT_STORE_MB:-512} * 1024 * 1024)) \
      --node-manager-port="$(free_port)" --object-manager-port="$(free_port)" \
      --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
      --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)" \
      --min-worker-port=$((20000 + 1000 * i)) --max-worker-port=$((20999 + 1000 * i)) --disable-usage-stats
  done
  wait_for "$((${WORKERS:-2} + 1)) Ray nodes" "$PY" -c "
import ray, sys
ray.init(address='127.0.0.1:$gcs', logging_level='ERROR', log_to_driver=False)
sys.exit(sum(n['Alive'] for n in ray.nodes()) < ${WORKERS:-2} + 1)"
  env_line "RAY_ADDRESS=http://127.0.0.1:$dash"  # what `ray job submit` talks to
  env_line "RAY_GCS_ADDRESS=127.0.0.1:$gcs"        # what `ptmdd study --address` and workers join
  env_line "RAY_AUTH_MODE=token"
  env_line "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"  # a driver on this machine joins at 127.0.0.1 too
}

up_s3() {
  local port
  port=$(free_port)
  spawn s3 "$BIN/moto_server" -H 127.0.0.1 -p "$port"
  wait_for "the S3 server" http_up "http://127.0.0.1:$port/"
  env_line "AWS_ENDPOINT_URL=http://127.0.0.1:$port"
  env_line "AWS_ACCESS_KEY_ID=ptmdd" "AWS_SECRET_ACCESS_KEY=ptmdd-local" "AWS_DEFAULT_REGION=us-east-1"
  env_line "BUCKET=ptmdd"
  set -a; source "$DIR/cluster.env"; set +a
  say "create bucket s3://ptmdd"
  "$PY" -c "import boto3; boto3.client('s3').create_bucket(Bucket='ptmdd')"
}

up_postgres() {
  local port data as_pg=()
  port=$(free_port)
  data=$(mktemp -d /tmp/ptmddpg.XXXXXX)  # outside DIR: the postgres user must own it
  echo "$data" > "$DIR/pg_data"
  # PostgreSQL refuses to run as root: run it as the postgres user when we are root.
  if [ "$(id -u)" = 0 ]; then chown postgres "$data"; as_pg=(runuser -u postgres --); fi
  local pgbin
  pgbin=$(dirname "$(readlink -f "$(command -v postgres 2>/dev/null || ls /usr/lib/postgresql/*/bin/postgres | tail -1)")")
  say initdb -D "$data/db"
  "${as_pg[@]}" "$pgbin/initdb" -D "$data/db" -U postgres -A trust > "$DIR/logs/initdb.log" 2>&1
  spawn postgres "${as_pg[@]}" "$pgbin/postgres" -D "$data/db" -h 127.0.0.1 -p "$port" -k "$data"
  wait_for PostgreSQL "$pgbin/pg_isready" -h 127.0.0.1 -p "$port"
  for db in mlflow optuna; do
    say createdb "$db"; "$pgbin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
  done
  env_line "PG_URL=postgresql://postgres@127.0.0.1:$port/optuna"
  echo "postgresql://postgres@127.0.0.1:$port/mlflow" > "$DIR/pg_mlflow_url"
}

up_mlflow() {
  local port
  port=$(free_port)
  set -a; source "$DIR/cluster.env"; set +a
  spawn mlflow env MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$BIN/mlflow" server --host 127.0.0.1 \
    --port "$port" --backend-store-uri "$(cat "$DIR/pg_mlflow_url")" \
    --artifacts-destination "s3://$BUCKET/mlflow" --workers 1
  wait_for "the MLflow server" http_up "http://127.0.0.1:$port/health"
  env_line "MLFLOW_TRACKING_URI=http://127.0.0.1:$port"
}

env_line() { for kv in "$@"; do echo "export $kv" >> "$DIR/cluster.env"; done; }

down() {
  local name
  stop_session mlflow
  for f in "$DIR"/pids/ray-worker-*; do [ -e "$f" ] && stop_session "$(basename "$f")"; done
  stop_session ray-head
  if [ -f "$DIR/pg_data" ]; then
    local data; data=$(cat "$DIR/pg_data")
    stop_session postgres
    rm -rf "$data" "$DIR/pg_data" "$DIR/pg_mlflow_url"
  fi
  stop_session s3
  for name in "$DIR"/pids/*; do [ -e "$name" ] && stop_session "$(basename "$name")"; done
  if [ -f "$DIR/ray_tmp" ]; then rm -rf "$(cat "$DIR/ray_tmp")" "$DIR/ray_tmp"; fi
  rm -f "$DIR/cluster.env"
}

case "$ACTION" in
  up)
    if [ -f "$DIR/cluster.env" ]; then echo "local_cluster: $DIR is up already (down first)" >&2; exit 1; fi
    mkdir -p "$DIR/pids" "$DIR/logs"
    : > "$DIR/cluster.env"
    trap 'echo "local_cluster: up failed; stopping what started" >&2; down' ERR
    # (if, not &&: errexit and the ERR trap do not reach into a function called from an && list)
    if [ "${S3:-1}" = 1 ]; then up_s3; fi
    if [ "${POSTGRES:-1}" = 1 ]; then up_postgres; fi
    if [ "${MLFLOW:-1}" = 1 ] && [ "${S3:-1}" = 1 ] && [ "${POSTGRES:-1}" = 1 ]; then up_mlflow; fi
    up_ray
    trap - ERR
    echo "local_cluster: up; source $DIR/cluster.env" >&2 ;;
  kill-node)
    f="$DIR/pids/ray-worker-$NODE"
    [ -f "$f" ] || { echo "local_cluster: no worker node $NODE in $DIR" >&2; exit 1; }
    say "pkill -KILL -s $(cat "$f")   # worker node $NODE: raylet, agents and workers"
    pkill -KILL -s "$(cat "$f")" || true
    rm -f "$f" ;;
  down) down; echo "local_cluster: down" >&2 ;;
  *) echo "usage: local_cluster.sh up|down|kill-node N [DIR]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# End-to-end proxy benchmark, all in one run on one machine so the ratios are comparable:
#   direct      wrk -> simulator
#   gateway     wrk -> vllm-gateway (workers = 1, io_uring, then epoll) -> simulator
#   nginx       wrk -> nginx (1 worker, upstream keepalive 64) -> simulator
# Small non-streaming chat completions (max_tokens 1, ttft 0), wrk -t1 -c64.
# The proxy under test is pinned to CPU 0; the simulator and wrk share CPU 1.
# CPU per request = the proxy's (utime + stime) over the run / requests served.
#
# Needs: wrk and nginx (apt-get install -y wrk nginx-light), a release build.
# Usage: benches/e2e.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
CONNS=${CONNS:-64}
for tool in wrk nginx taskset; do
  command -v "$tool" >/dev/null || { echo "e2e.sh: $tool is missing (apt-get install -y wrk nginx-light util-linux)" >&2; exit 2; }
done
cargo build --release --quiet
BIN=$PWD/target/release/vllm-gateway
WORK=$(mktemp -d /tmp/vgw-e2e.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK=$(getconf CLK_TCK)

UP_PORT=$(free_port)
taskset -c 1 "$BIN" sim --listen 127.0.0.1:"$UP_PORT" --model bench --ttft-ms 0 --tokens-per-s 1000000 >"$WORK/sim.log" 2>&1 &
PIDS+=($!)
wait_port "$UP_PORT"

cat >"$WORK/chat.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"Say hello to the benchmark"}],"max_tokens":1}'
LUA

# run NAME PORT PID: warm up, then measure req/s, latency and the PID's CPU per request.
run() {
  local name=$1 port=$2 pid=$3
  taskset -c 1 wrk -t1 -c"$CONNS" -d2s -s "$WORK/chat.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
  local before after out
  before=$( [ "$pid" = - ] && echo 0 || ticks "$pid")
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/chat.lua" "http://127.0.0.1:$port/v1/chat/completions")
  after=$( [ "$pid" = - ] && echo 0 || ticks "$pid")
  local reqs rps p50 p99 errors cpu rss
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ {printf "%s ", $0}')
  if [ "$pid" = - ]; then cpu="-"; rss="-"; else
    cpu=$(awk -v t=$((after - before)) -v r="$reqs" -v hz="$CLK" 'BEGIN {printf "%.1f", t / hz * 1e6 / r}')
    rss=$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$pid/status")
  fi
  printf "| %-22s | %8s | %8s | %8s | %12s | %8s | %s\n" "$name" "$rps" "$p50" "$p99" "$cpu" "$rss" "${errors:-}"
}

echo "| target                 |   req/s  |   p50    |   p99    | proxy CPU µs/req | RSS MiB |"
echo "|------------------------|----------|----------|----------|--------------|---------|"
run "direct (no proxy)" "$UP_PORT" -

for driver in io_uring epoll; do
  GW_PORT=$(free_port)
  cat >"$WORK/gw-$driver.toml" <<TOML
[gateway]
listen = "127.0.0.1:$GW_PORT"
workers = 1
driver = "$driver"
log_level = "warn"
max_concurrent = 1000
max_queue_size = 1000

[[models]]
name = "bench"
runtime = "static"
endpoints = ["http://127.0.0.1:$UP_PORT"]
TOML
  taskset -c 0 "$BIN" --config "$WORK/gw-$driver.toml" >"$WORK/gw-$driver.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  wait_port "$GW_PORT"
  run "vllm-gateway ($driver)" "$GW_PORT" "$GW_PID"
  kill "$GW_PID"; wait "$GW_PID" 2>/dev/null || true
done

NGX_PORT=$(free_port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX_PORT;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGINX
taskset -c 0 nginx -c "$WORK/nginx.conf" &
NGX_MASTER=$!
PIDS+=("$NGX_MASTER")
wait_port "$NGX_PORT"
NGX_WORKER=$(pgrep -P "$NGX_MASTER" | head -1)
run "nginx (1 worker)" "$NGX_PORT" "$NGX_WORKER"
echo
echo "wrk -t1 -c$CONNS -d${DURATION}s; $(nproc) CPUs; $(uname -r)"

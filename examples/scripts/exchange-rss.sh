#!/usr/bin/env bash
# Resident memory of a release auth-server (in-memory store) under peak
# ExchangeToken load, the budget being <= 100 MB through 5 minutes.
#
#   examples/scripts/exchange-rss.sh            # RSS at 60 s and at 300 s
#   examples/scripts/exchange-rss.sh --quick    # RSS at 10 s and 30 s (a quick check)
#   RSS_AT="20 60" examples/scripts/exchange-rss.sh
#
# The server runs on core 0 and loadgen on core 1 (taskset), unpaced
# (`--rpc exchange`: a service acting as itself, as fast as the server
# answers; RSS_RPC=exchange-for-user exchanges a user's token instead). The
# config it writes lifts the per-client rate limit, so the one client
# identity of the load is never throttled. It prints RSS (VmRSS) at each
# checkpoint, the peak (VmHWM), loadgen's report (exchanges per second,
# latency, server CPU per call) and how many exchanges were answered.
#
# Environment: CARGO_TARGET_DIR (default: target), RSS_AT (seconds),
# RSS_RPC (any loadgen --rpc: exchange, exchange-for-user, refresh, ...),
# RSS_CONNECTIONS (4), RSS_CONCURRENCY (64), RSS_NO_BUILD=1 to skip the
# release build, RSS_STORE=redis://HOST:PORT to run on that Redis instead
# of the in-memory store (then the Redis server's CPU time per answered
# call is printed too, read from the pid Redis reports in INFO).
set -euo pipefail

cd "$(dirname "$0")/../.."
checkpoints=${RSS_AT:-"60 300"}
if [[ ${1:-} == --quick ]]; then
    checkpoints="10 30"
elif [[ -n ${1:-} ]]; then
    echo "usage: $0 [--quick]" >&2
    exit 2
fi
rpc=${RSS_RPC:-exchange}
connections=${RSS_CONNECTIONS:-4}
concurrency=${RSS_CONCURRENCY:-64}
target=${CARGO_TARGET_DIR:-target}

if [[ ${RSS_NO_BUILD:-} != 1 ]]; then
    cargo build --release -q -p auth-server -p examples --bin auth-server --bin loadgen
fi
server_bin=$target/release/auth-server
loadgen_bin=$target/release/loadgen

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

work=$(mktemp -d)
server=
cleanup() {
    if [[ -n $server ]]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

ready() {
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "auth-server did not become ready; its log:" >&2
    cat "$2" >&2
    exit 1
}

# The dev environment (certificates, keys, accounts), created by a first
# `auth-server dev`, stopped once it serves.
http_port=$(free_port)
"$server_bin" dev --dir "$work/dev" --grpc-addr "127.0.0.1:$(free_port)" --http-addr "127.0.0.1:$http_port" \
    >"$work/dev.log" 2>&1 &
server=$!
ready "$http_port" "$work/dev.log"
kill "$server"
wait "$server" 2>/dev/null || true
server=

config=$work/dev/rss.toml
cp "$work/dev/auth-server.toml" "$config"
if [[ -n ${RSS_STORE:-} ]]; then
    sed -i "s|^store = .*|store = \"$RSS_STORE\"|" "$config"
fi
cat >>"$config" <<'EOF'

# One client identity drives the whole load: never throttle it.
[limits]
client_rate_per_sec = 10000000
EOF

grpc_port=$(free_port)
http_port=$(free_port)
taskset -c 0 "$server_bin" serve --config "$config" --grpc-addr "127.0.0.1:$grpc_port" \
    --http-addr "127.0.0.1:$http_port" >"$work/server.log" 2>&1 &
server=$!
ready "$http_port" "$work/server.log"

rss() { awk -v k="$2:" '$1 == k { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

last=0
for at in $checkpoints; do last=$at; done
idle=$(rss "$server" VmRSS)
echo "auth-server (release, ${RSS_STORE:-memory} store) pid $server: idle RSS ${idle} MiB"
# Two seconds past the last checkpoint, so that every checkpoint falls
# within the load.
measured=$((last + 2))
echo "load: loadgen --rpc $rpc --connections $connections --concurrency $concurrency for ${measured} s (+2 s warm-up)"

taskset -c 1 "$loadgen_bin" --addr "https://127.0.0.1:$grpc_port" --dir "$work/dev" --rpc "$rpc" \
    --connections "$connections" --concurrency "$concurrency" --duration "$measured" --server-pid "$server" \
    >"$work/loadgen.out" 2>&1 &
load=$!

redis_cpu() {
    # utime + stime of the Redis server, in clock ticks (1/100 s).
    awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
redis_pid=
if [[ -n ${RSS_STORE:-} ]]; then
    hostport=${RSS_STORE#redis://}
    redis_pid=$(redis-cli -h "${hostport%:*}" -p "${hostport##*:}" INFO server | awk -F: '/^process_id/ { print $2 + 0 }')
fi

started=$(date +%s.%N)
if [[ -n $redis_pid ]]; then
    sleep 2
    redis_before=$(redis_cpu "$redis_pid")
fi
# Checkpoints count from the end of loadgen's 2 s warm-up.
for at in $checkpoints; do
    now=$(date +%s.%N)
    wait_s=$(awk -v s="$started" -v n="$now" -v a="$at" 'BEGIN { d = s + 2 + a - n; print (d > 0 ? d : 0) }')
    sleep "$wait_s"
    echo "after ${at} s of peak $rpc load: RSS $(rss "$server" VmRSS) MiB (peak so far $(rss "$server" VmHWM) MiB)"
done
if [[ -n $redis_pid ]]; then
    redis_after=$(redis_cpu "$redis_pid")
fi
wait "$load" || { cat "$work/loadgen.out"; exit 1; }
echo "--- loadgen"
cat "$work/loadgen.out"
answered=$(awk '/^ok: / { print $2 }' "$work/loadgen.out")
if [[ -n $redis_pid && -n ${answered:-} ]]; then
    awk -v t=$((redis_after - redis_before)) -v n="$answered" -v m="$measured" -v l="$last" \
        'BEGIN { printf "redis-server CPU: %.1f us per answered call (over %d s of the measured %d s)\n", t * 10000 / (n * l / m), l, m }'
fi
echo "--- ${answered:-?} calls answered in the measured ${measured} s; RSS now $(rss "$server" VmRSS) MiB, peak $(rss "$server" VmHWM) MiB"

#!/usr/bin/env bash
# ExchangeToken against its transport floor, interleaved (BENCHMARKS.md).
#
#   examples/scripts/floor.sh                 # memory store, 3 rounds of 8 s
#   examples/scripts/floor.sh --redis         # the auth server on a Redis store
#   ROUNDS=1 DURATION=4 examples/scripts/floor.sh --no-build   # a quick look
#
# Builds the release binaries, creates an `auth-server dev` environment and
# writes a config for it with the per-client rate limits lifted (they would
# cap one client, loadgen, at 10,000/s). Then, ROUNDS times, it measures one
# after the other:
#   auth   the auth server (ExchangeToken, the `order` service acting as itself)
#   sign   the floor server signing a fresh ES256 token per call
#   fixed  the floor server answering one fixed token
# each with `loadgen --rpc exchange --connections 4 --concurrency 64`. Every
# server runs pinned to core 0 (`taskset -c 0`), loadgen to core 1. It prints
# each rate and, per round, the ratios auth/sign and auth/fixed: absolute
# rates swing with the host, ratios from one run do not. It also prints each
# server's CPU time per answered call (user + system from /proc over the
# measured window) and their ratios (sign/auth, fixed/auth): on a core that
# other work shares, CPU per call still says what a dedicated core would
# serve, where the rate says how much of the core the server got.
#
# Options:
#   --redis        the auth server uses a Redis store: a redis-server started
#                  here on a free port (pinned to core 1 with loadgen)
#   --latency      after the rounds, a paced run of the auth server at 80% of
#                  its best rate in this run (4 connections x 16 in flight),
#                  printing its p99 (counted from each request's intended
#                  send time)
#   --perf DIR     record a profile of each server (perf record, DWARF call
#                  graphs) in the first round into DIR/{auth,sign,fixed}.data
#   --no-build     use the binaries already built
# Environment: ROUNDS (3), DURATION (8 s measured, after loadgen's 2 s
# warm-up), CONNECTIONS (4), CONCURRENCY (64), WORK (a new temporary
# directory), CARGO_TARGET_DIR (target/ of the workspace).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="$target/release"
rounds="${ROUNDS:-3}"
duration="${DURATION:-8}"
connections="${CONNECTIONS:-4}"
concurrency="${CONCURRENCY:-64}"
redis=0 latency=0 build=1 perf_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --redis) redis=1 ;;
        --latency) latency=1 ;;
        --perf) perf_dir="$2"; shift ;;
        --no-build) build=0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "floor.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
command -v taskset > /dev/null || { echo "floor.sh: taskset is missing (apt-get install util-linux)" >&2; exit 1; }
[[ -z "$perf_dir" ]] || command -v perf > /dev/null \
    || { echo "floor.sh: perf is missing (apt-get install linux-perf)" >&2; exit 1; }
[[ $redis -eq 0 ]] || command -v redis-server > /dev/null \
    || { echo "floor.sh: redis-server is missing (apt-get install redis-server)" >&2; exit 1; }

if [[ $build -eq 1 ]]; then
    (cd "$root" && cargo build --release --quiet -p auth-server -p examples \
        --bin auth-server --bin loadgen --bin floor)
fi
for b in auth-server loadgen floor; do
    [[ -x "$bin/$b" ]] || { echo "floor.sh: $bin/$b is missing (run without --no-build)" >&2; exit 1; }
done

work="${WORK:-$(mktemp -d -t floor.XXXXXX)}"
mkdir -p "$work"
dev="$work/dev"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
    wait 2> /dev/null || true
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits until 127.0.0.1:$1 accepts connections (or process $2 died).
wait_port() {
    for _ in $(seq 1 200); do
        if (: < "/dev/tcp/127.0.0.1/$1") 2> /dev/null; then return 0; fi
        kill -0 "$2" 2> /dev/null || { echo "floor.sh: the server exited; see $work/*.log" >&2; exit 1; }
        sleep 0.05
    done
    echo "floor.sh: nothing listens on port $1 after 10 s" >&2
    exit 1
}

# Stops process $1 and waits for it.
stop() {
    kill "$1" 2> /dev/null || true
    wait "$1" 2> /dev/null || true
}

# The dev environment (certificates, the ES256 key, accounts): created by
# the first start of `auth-server dev`.
if [[ ! -f "$dev/auth-server.toml" ]]; then
    port="$(free_port)"
    "$bin/auth-server" dev --dir "$dev" --grpc-addr "127.0.0.1:$port" --http-addr "127.0.0.1:$(free_port)" \
        > "$work/dev.log" 2>&1 &
    pid=$!
    wait_port "$port" "$pid"
    stop "$pid"
fi
# The same config with the per-client rate limits lifted.
config="$dev/floor.toml"
{
    cat "$dev/auth-server.toml"
    printf '\n[limits]\nclient_rate_per_sec = 10000000\nclient_rate_burst = 10000000\n'
} > "$config"

store_args=()
store_name=memory
if [[ $redis -eq 1 ]]; then
    redis_port="$(free_port)"
    taskset -c 1 redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        > "$work/redis.log" 2>&1 &
    redis_pid=$!
    pids+=("$redis_pid")
    wait_port "$redis_port" "$redis_pid"
    store_args=(--store "redis://127.0.0.1:$redis_port")
    store_name="redis"
fi

# Starts server $1 (auth, sign or fixed) pinned to core 0 on port $2; sets
# $server.
start_server() {
    local http
    case "$1" in
        auth)
            http="$(free_port)"
            # The audit trail goes to standard output, as by default.
            taskset -c 0 "$bin/auth-server" serve --config "$config" --grpc-addr "127.0.0.1:$2" \
                --http-addr "127.0.0.1:$http" "${store_args[@]}" > /dev/null 2> "$work/auth.log" &
            ;;
        sign | fixed)
            taskset -c 0 "$bin/floor" --dir "$dev" --mode "$1" --addr "127.0.0.1:$2" 2> "$work/$1.log" &
            ;;
    esac
    server=$!
    pids+=("$server")
    wait_port "$2" "$server"
}

# Measures server $1 with loadgen (extra loadgen arguments after it);
# prints loadgen's report to $work and sets $rate (ok/s).
measure() {
    local name="$1" port record=""
    shift
    port="$(free_port)"
    start_server "$name" "$port"
    if [[ -n "$perf_dir" && $round -eq 1 ]]; then
        mkdir -p "$perf_dir"
        # From the end of loadgen's warm-up, for the measured seconds.
        (sleep 2.5 && exec perf record -q -F 999 --call-graph dwarf,16384 -p "$server" \
            -o "$perf_dir/$name.data" -- sleep "$((duration - 1))") > "$work/perf-$name.log" 2>&1 &
        record=$!
    fi
    # The server's CPU time (user + system, clock ticks) over the measured
    # window: CPU per call does not depend on what else shares its core.
    (sleep 2 && t0="$(cpu_ticks "$server")" && sleep "$duration" && t1="$(cpu_ticks "$server")" \
        && echo $((t1 - t0)) > "$work/$name-$round.cpu") &
    sampler=$!
    taskset -c 1 "$bin/loadgen" --addr "https://127.0.0.1:$port" --dir "$dev" --rpc exchange \
        --connections "$connections" --concurrency "$concurrency" --duration "$duration" "$@" \
        > "$work/$name-$round.txt"
    [[ -z "$record" ]] || wait "$record"
    wait "$sampler" || true
    stop "$server"
    rate="$(sed -n 's/^ok: [0-9]* (\([0-9]*\)\/s)$/\1/p' "$work/$name-$round.txt")"
    calls="$(sed -n 's/^ok: \([0-9]*\) .*/\1/p' "$work/$name-$round.txt")"
    # Microseconds of server CPU per answered call.
    cpu="$(awk -v t="$(cat "$work/$name-$round.cpu" 2> /dev/null || echo 0)" -v n="$calls" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "0" }')"
    if grep -q '^errors: [A-Z]' "$work/$name-$round.txt"; then
        echo "floor.sh: $name answered errors:" >&2
        grep '^errors:' "$work/$name-$round.txt" >&2
    fi
}

# User + system CPU ticks of process $1.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f%%", 100 * a / b }'; }

echo "ExchangeToken vs its floor: auth-server ($store_name store), floor sign, floor fixed;" \
    "$connections connections x $concurrency in flight, ${duration} s per run, $rounds rounds; work: $work"
echo "rates are calls/s; cpu is the server's CPU per call (us); the ratios of cpu are sign/auth and fixed/auth"
printf '%-6s %8s %8s %8s %10s %11s %9s %9s %9s %10s %11s\n' round auth/s sign/s fixed/s auth/sign auth/fixed \
    auth-cpu sign-cpu fixed-cpu "cpu a/s" "cpu a/f"
best_auth=0
for round in $(seq 1 "$rounds"); do
    measure auth; auth="$rate" auth_cpu="$cpu"
    measure sign; sign="$rate" sign_cpu="$cpu"
    measure fixed; fixed="$rate" fixed_cpu="$cpu"
    printf '%-6s %8s %8s %8s %10s %11s %9s %9s %9s %10s %11s\n' "$round" "$auth" "$sign" "$fixed" \
        "$(pct "$auth" "$sign")" "$(pct "$auth" "$fixed")" "$auth_cpu" "$sign_cpu" "$fixed_cpu" \
        "$(pct "$sign_cpu" "$auth_cpu")" "$(pct "$fixed_cpu" "$auth_cpu")"
    if ((auth > best_auth)); then best_auth="$auth"; fi
done

if [[ $latency -eq 1 ]]; then
    paced=$((best_auth * 8 / 10))
    round=paced
    measure auth --rate "$paced"
    echo "auth-server paced at ${paced}/s (80% of its best, $connections connections x" \
        "$((concurrency / connections)) in flight each):"
    grep -E '^(ok|latency|pace|errors):' "$work/auth-paced.txt" | sed 's/^/  /'
fi
if [[ -n "$perf_dir" ]]; then
    echo "profiles: $perf_dir/{auth,sign,fixed}.data" \
        "(perf report -i FILE --no-children --sort symbol)"
fi

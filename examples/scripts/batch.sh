#!/usr/bin/env bash
# Batch exchange: tokens per second per server core for ExchangeTokens with
# 1, 4 and 16 audiences per call, next to the floor (the bare auth.v1 server
# of examples/src/floor.rs in `sign` mode, answering each audience with a
# fresh ES256 signature), interleaved: every round runs each server and
# batch size once, so a drift of the host's speed hits all of them alike.
# The server under test runs on core 0, loadgen on core 1.
#
#   examples/scripts/batch.sh            # 3 rounds of 8 s per measurement
#   ROUNDS=2 SECS=5 examples/scripts/batch.sh
#
# Prints one line per measurement and, per batch size, the median tokens/s
# of each server and the auth server's share of the floor.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-8}
CONNS=${CONNS:-4}
INFLIGHT=${INFLIGHT:-64}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
cd "$ROOT"
cargo build --release -q -p auth-server -p examples --bin auth-server --bin loadgen --bin floor
BIN=$TARGET/release

WORK=$(mktemp -d)
DEV=$WORK/dev
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

# A dev environment whose `order` account may ask for batch-2 ... batch-16
# as well as inventory (each with inventory's scopes, so every token has the
# size of a real one).
taskset -c 0 "$BIN/auth-server" dev --dir "$DEV" --grpc-addr 127.0.0.1:51251 --http-addr 127.0.0.1:8281 \
    >"$WORK/first.log" 2>&1 &
PIDS+=($!)
wait_port 51251
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
python3 - "$DEV/accounts.toml" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
extra = "".join(f'batch-{i} = ["inventory:read", "inventory:reserve"]\n' for i in range(2, 17))
s = s.replace("[account.audiences]\n", "[account.audiences]\n" + extra, 1)
open(p, "w").write(s)
PY
# The per-client rate limit (10,000 tokens/s by default, a batch counting
# one per audience) would cap the one client identity loadgen uses long
# before the server's core does: lift it for the measurement.
printf '\n[limits]\nclient_rate_per_sec = 10000000\nclient_rate_burst = 10000000\n' >>"$DEV/auth-server.toml"

taskset -c 0 "$BIN/auth-server" dev --dir "$DEV" --grpc-addr 127.0.0.1:51251 --http-addr 127.0.0.1:8281 \
    >"$WORK/auth.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "$BIN/floor" --dir "$DEV" --mode sign --addr 127.0.0.1:51261 >"$WORK/floor.log" 2>&1 &
PIDS+=($!)
wait_port 51251
wait_port 51261

# Each server gets the whole of core 0 while it is measured: the other one
# is stopped (SIGSTOP) meanwhile.
AUTH_PID=${PIDS[-2]}
FLOOR_PID=${PIDS[-1]}
measure() { # server port pid other-pid batch
    kill -STOP "$4"
    local out
    out=$(taskset -c 1 "$BIN/loadgen" --addr "https://127.0.0.1:$2" --dir "$DEV" --rpc exchange \
        --batch "$5" --connections "$CONNS" --concurrency "$INFLIGHT" --duration "$SECS")
    kill -CONT "$4"
    local tokens calls errors
    tokens=$(sed -n 's/^tokens: [0-9]* (\([0-9]*\)\/s)/\1/p' <<<"$out")
    calls=$(sed -n 's/^ok: [0-9]* (\([0-9]*\)\/s)/\1/p' <<<"$out")
    errors=$(grep '^errors:' <<<"$out" | tr '\n' ' ')
    printf '%-12s batch=%-2s calls/s=%-7s tokens/s=%-7s %s\n' "$1" "$5" "$calls" "$tokens" "$errors"
    echo "$1 $5 $tokens" >>"$WORK/results"
}

echo "ExchangeTokens, ${CONNS} connections x ${INFLIGHT} in flight, ${SECS}s per measurement, ${ROUNDS} rounds"
echo "servers on core 0 (one at a time), loadgen on core 1"
for round in $(seq 1 "$ROUNDS"); do
    echo "-- round $round"
    for batch in 1 4 16; do
        measure auth-server 51251 "$AUTH_PID" "$FLOOR_PID" "$batch"
        measure floor-sign 51261 "$FLOOR_PID" "$AUTH_PID" "$batch"
    done
done

echo "-- medians (tokens/s per server core)"
python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for batch in ("1", "4", "16"):
    med = {s: statistics.median(float(t) for (srv, b, t) in rows if srv == s and b == batch)
           for s in ("auth-server", "floor-sign")}
    ratio = 100 * med["auth-server"] / med["floor-sign"] if med["floor-sign"] else 0
    print(f"batch {batch:>2}: auth-server {med['auth-server']:8.0f}/s   floor-sign {med['floor-sign']:8.0f}/s"
          f"   auth-server/floor {ratio:5.1f}%")
PY

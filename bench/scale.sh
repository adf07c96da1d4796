#!/usr/bin/env bash
# The registry at host scale: starts N instances of `busybox nc -l -p PORT`
# one after another on one multiplexed port (each its own AID, so each
# holds a translation of its own), times every `appshot run -d`, then times
# `ps` and `ports` with all of them running, and stopping them all, twenty
# `appshot stop` at a time.
#
#   bench/scale.sh APPSHOT_BINARY        (SCALE_N=1000 by default)
#
# Every start includes the supervisor's 300 ms start period (`run -d`
# returns once the application has run that long).
#
# Prints the mean start time of each fifth of the starts, the last 100
# starts against the first 100 (the bar: within 1.3x), the `ps` time (the
# bar: under 100 ms) and the stop time. Called by bench/run.sh in full mode
# and by `bench/run.sh --only scale`; never in --quick mode (CI): it takes
# minutes and about 4 GiB of memory at N=1000.
set -euo pipefail

appshot=${1:?usage: bench/scale.sh APPSHOT_BINARY}
n=${SCALE_N:-1000}
port=${SCALE_PORT:-18300}
command -v busybox >/dev/null || { echo "bench/scale.sh: busybox is not installed" >&2; exit 1; }

run_dir=$(mktemp -d /tmp/appshot-scale.XXXXXX)
export APPSHOT_RUN_DIR=$run_dir
cleanup() {
    "$appshot" stop --all --time 1 >/dev/null 2>&1 || true
    rm -rf "$run_dir"
}
trap cleanup EXIT

now_ns() { date +%s%N; }

times=()
for ((i = 1; i <= n; i++)); do
    t0=$(now_ns)
    "$appshot" run -d --aid "s$i" --name "s$i" -- busybox nc -l -p "$port" >/dev/null
    t1=$(now_ns)
    times+=($(((t1 - t0) / 1000)))
done

# Every instance holds its translation before anything is timed with N.
for ((wait = 0; wait < 600; wait++)); do
    bound=$("$appshot" ports --json | grep -c '"real_port"' || true)
    ((bound >= n)) && break
    sleep 0.1
done
((bound >= n)) || { echo "bench/scale.sh: only $bound of $n instances bound port $port" >&2; exit 1; }

best_of_5() {
    local best=0 t0 t1 d
    for _ in 1 2 3 4 5; do
        t0=$(now_ns)
        "$appshot" "$@" >/dev/null
        t1=$(now_ns)
        d=$(((t1 - t0) / 1000))
        ((best == 0 || d < best)) && best=$d
    done
    echo "$best"
}
ps_us=$(best_of_5 ps --json)
ports_us=$(best_of_5 ports --json)

t0=$(now_ns)
seq 1 "$n" | sed 's/^/s/' | xargs -P 20 -n 1 "$appshot" stop --time 5 >/dev/null
t1=$(now_ns)
stop_s=$(awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f", d / 1e9 }')

mean_ms() { # FROM TO (1-based, inclusive)
    printf '%s\n' "${times[@]:$(($1 - 1)):$(($2 - $1 + 1))}" |
        awk '{ s += $1 } END { printf "%.1f", s / NR / 1000 }'
}
fifth=$((n / 5))
echo "scale: $n instances of busybox nc on port $port, $(nproc) CPUs, $(uname -r)"
line="mean ms per start, by fifth:"
for k in 1 2 3 4 5; do
    line+=" $((k * fifth)):$(mean_ms $(((k - 1) * fifth + 1)) $((k * fifth)))"
done
echo "$line"
first=$(mean_ms 1 100)
last=$(mean_ms $((n - 99)) "$n")
echo "first 100 starts: $first ms, last 100: $last ms, ratio $(awk -v a="$first" -v b="$last" 'BEGIN { printf "%.2f", b / a }') (bar: <= 1.3)"
echo "ps with $n instances: $(awk -v u="$ps_us" 'BEGIN { printf "%.1f", u / 1000 }') ms (bar: < 100), ports: $(awk -v u="$ports_us" 'BEGIN { printf "%.1f", u / 1000 }') ms (best of 5)"
echo "stop all $n, 20 at a time: $stop_s s"

#!/usr/bin/env bash
# Cross-host VPM and source rules, measured between network namespaces made
# here (addresses 10.200.x.y only inside them; nothing else is contacted):
#
#   B 10.200.1.2 ---- 10.200.1.1 A 10.200.2.1 ---- C 10.200.2.2
#
#   bench/remote.sh [--quick]
#
# 1. Connection setup B -> A:9000 (connect + close, sequential), per connect:
#    native (no appshot), supervised without negotiation (no cluster key),
#    supervised with negotiation (key + agent on A; pooled agent connection).
# 2. iperf3 bulk throughput C -> A: to an instance behind a source rule
#    (nftables redirect of the fixed port) vs. to a native iperf3 server in
#    the same namespace (same conntrack state), alternating runs, median.
# Prints a markdown table. Needs root, iperf3, nftables, python3, iproute2.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[[ ${1:-} == --quick ]] && quick=1
connects=$((quick ? 500 : 3000))
secs=$((quick ? 3 : 8))
reps=$((quick ? 2 : 3))

for p in ip nft iperf3 python3; do
    command -v "$p" >/dev/null || { echo "bench/remote.sh: $p is not installed" >&2; exit 1; }
done
[[ $(id -u) -eq 0 ]] || { echo "bench/remote.sh: needs root" >&2; exit 1; }

if [[ -z ${APPSHOT_BIN:-} ]]; then
    cargo build --release -q -p appshot >&2
    APPSHOT_BIN=$PWD/target/release/appshot
fi

tag=$$
A=brA$tag B=brB$tag C=brC$tag
work=$(mktemp -d /tmp/appshot-bench-remote.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for ns in $A $B $C; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

for ns in $A $B $C; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add vb netns "$A" type veth peer name va netns "$B"
ip link add vc netns "$A" type veth peer name va netns "$C"
ip -n "$A" addr add 10.200.1.1/24 dev vb; ip -n "$A" link set vb up
ip -n "$A" addr add 10.200.2.1/24 dev vc; ip -n "$A" link set vc up
ip -n "$B" addr add 10.200.1.2/24 dev va; ip -n "$B" link set va up
ip -n "$C" addr add 10.200.2.2/24 dev va; ip -n "$C" link set va up

head -c 32 /dev/urandom >"$work/key"; chmod 600 "$work/key"
mkdir -p "$work/www" "$work/runA" "$work/runB"
cat >"$work/rules.toml" <<EOF
default_aid = "a"
[[source_rules]]
source = "10.200.2.2"
aid = "i"
EOF

asA() { ip netns exec "$A" env APPSHOT_RUN_DIR="$work/runA" APPSHOT_CLUSTER_KEY_FILE="$work/key" "$APPSHOT_BIN" "$@"; }
asB() { ip netns exec "$B" env APPSHOT_RUN_DIR="$work/runB" "$@"; }

# The server accepts and closes as fast as it can, with a deep backlog, so
# that the client side's setup cost is what is measured.
cat >"$work/accept.py" <<'EOF'
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 9000))
s.listen(4096)
print("listening on port", s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.close()
EOF
asA run --aid a --name web-a --detach -- python3 "$work/accept.py" >/dev/null
ip netns exec "$A" env APPSHOT_RUN_DIR="$work/runA" APPSHOT_CLUSTER_KEY_FILE="$work/key" \
    "$APPSHOT_BIN" vpm agent --listen 10.200.1.1:7946 >"$work/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q "agent listening" "$work/agent.log" && break; sleep 0.05; done
for _ in $(seq 100); do grep -q "port 9000" "$work/runA/logs/web-a.log" 2>/dev/null && break; sleep 0.05; done
echo "bench/remote.sh: connect setup, $connects connects each" >&2

cat >"$work/connect.py" <<'EOF'
import socket, sys, time, statistics
n = int(sys.argv[2])
ts = []
for _ in range(n):
    t = time.perf_counter()
    s = socket.create_connection((sys.argv[1], 9000))
    ts.append(time.perf_counter() - t)
    s.close()
ts.sort()
print(f"{statistics.median(ts)*1e6:.0f} {ts[int(len(ts)*0.99)]*1e6:.0f}")
EOF

native=$(asB python3 "$work/connect.py" 10.200.1.1 "$connects")
plain=$(asB "$APPSHOT_BIN" run --aid a -- python3 "$work/connect.py" 10.200.1.1 "$connects")
negotiated=$(asB env APPSHOT_CLUSTER_KEY_FILE="$work/key" "$APPSHOT_BIN" run --aid a -- \
    python3 "$work/connect.py" 10.200.1.1 "$connects")

# iperf3: native server on 5301, appshot instance of AID i on virtual 5201
# reached by C through its source rule.
ip netns exec "$A" iperf3 -s -p 5301 >/dev/null 2>&1 &
pids+=($!)
asA run --aid i --name iperf-i --config "$work/rules.toml" --detach -- iperf3 -s -p 5201 >/dev/null
for _ in $(seq 100); do asA ports --remote --json | grep -q '"iperf-i"' && break; sleep 0.05; done
sleep 0.3

bps() { ip netns exec "$C" iperf3 -c 10.200.2.1 -p "$1" -t "$secs" -J |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])'; }
echo "bench/remote.sh: iperf3, $reps × $secs s each way" >&2
direct=() ruled=()
for _ in $(seq "$reps"); do
    direct+=("$(bps 5301)")
    ruled+=("$(bps 5201)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "%.0f\n", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
d=$(median "${direct[@]}"); r=$(median "${ruled[@]}")
served=$(grep -c "10.200.2.2" "$work/runA/logs/iperf-i.log" || true)

read -r n_med n_p99 <<<"$native"
read -r p_med p_p99 <<<"$plain"
read -r g_med g_p99 <<<"$negotiated"
echo "| measurement | median | p99 | ratio to native |"
echo "| --- | --- | --- | --- |"
echo "| connect B→A:9000, native (no appshot), $connects connects | ${n_med} µs | ${n_p99} µs | 1.00 |"
printf '| connect, supervised, no negotiation | %s µs | %s µs | %.2f |\n' "$p_med" "$p_p99" "$(echo "$p_med / $n_med" | bc -l)"
printf '| connect, supervised, negotiated with A'"'"'s agent | %s µs | %s µs | %.2f |\n' "$g_med" "$g_p99" "$(echo "$g_med / $n_med" | bc -l)"
printf '| iperf3 C→A direct (native server), %ss × %s | %.2f Gbit/s | | 1.00 |\n' "$secs" "$reps" "$(echo "$d / 1000000000" | bc -l)"
printf '| iperf3 C→A:5201 through source rule (nft redirect to the instance) | %.2f Gbit/s | | %.3f |\n' "$(echo "$r / 1000000000" | bc -l)" "$(echo "$r / $d" | bc -l)"
echo
echo "source-rule instance log lines naming C's address: $served"

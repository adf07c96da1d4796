#!/usr/bin/env bash
# Measures appshot side by side with native and with peers.
#
#   bench/run.sh [--quick] [--only syscall|connrate|iperf|redis|snapshot]...
#
# Installs the Debian packages the benchmarks drive (only those `dpkg -s`
# reports missing), builds appshot and the bench in release mode, and runs
# the bench from the repository root. The table goes to stdout; results.json
# and results.md to bench/results/. --quick takes under 2 minutes, the full
# run under 20.
#
# CRIU, the snapshot benchmark's peer, is not installed here: its rows get a
# peer figure only where `criu` is already installed and `criu check` passes
# (Debian 12's criu 3.17.1 fails it on Linux 6.18); otherwise they say why not.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iperf3 socat redis-server redis-tools gcc)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    echo "bench/run.sh: installing ${missing[*]}" >&2
    # iperf3 asks whether to start a daemon; the bench starts its own.
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq >&2
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

cargo build --release -p appshot -p appshot-bench >&2
release="${CARGO_TARGET_DIR:-target}/release"
exec "$release/appshot-bench" "$@" --appshot "$release/appshot" --out bench/results

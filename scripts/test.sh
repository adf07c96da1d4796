#!/usr/bin/env bash
# The test command: installs what the build and the integration tests need
# (Debian 12, as root; only what is missing), builds every target, and runs
# the unit tests of all crates plus the integration tests in tests/.
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh -- --nocapture`.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc/libc6-dev link Rust binaries (and build the test programs),
# ca-certificates lets rustup download, nftables carries source rules,
# memcached is the server that drops privileges before its Unix socket,
# runc runs the containers of the OCI agent test (tests/tests/oci.rs),
# systemd brings systemd-analyze, which checks `appshot generate systemd`;
# dnsmasq-base is the UDP service of tests/tests/udp.rs; clang and
# libbpf-dev build the eBPF programs that route datagrams (sys/bpf/);
# a fresh machine has none of them.
packages=(libseccomp-dev pkg-config python3 curl redis-server redis-tools
          nginx-light iproute2 procps ca-certificates gcc libc6-dev nftables
          memcached runc systemd dnsmasq-base clang libbpf-dev)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "scripts/test.sh: missing packages ${missing[*]}; install them as root" >&2
        exit 1
    fi
    echo "scripts/test.sh: installing ${missing[*]}" >&2
    apt-get update
    # Debian starts redis-server and nginx on install; the tests do not mind
    # (they never assume a virtual port is free on the host), so leave them.
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# nginx lives in /usr/sbin, which non-login shells may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

if ! command -v cargo >/dev/null; then
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "scripts/test.sh: no cargo on PATH or in ~/.cargo/bin; install a Rust toolchain (rust-version in Cargo.toml)" >&2
        exit 1
    fi
fi

cargo build --workspace --all-targets

# All failures in one run, not just those of the first failing test binary;
# the totals close the output, since cargo's own last line is a doc-test
# summary of whichever crate came last.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
# One test at a time: the integration tests bind the same host ports
# (9000, 6379) through registries of their own, and two registries can
# offer the same real port at once, which one registry per host never does.
cargo test --workspace --no-fail-fast "$@" -- --test-threads=1 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The multiplexing suites again with the kernel routing connects and names
# (`--routing kernel`): the same outcomes from the cgroup programs.
# The routing the kernel's programs do by default, the supervisor with
# `--routing notified` (and with a cluster key): the tests of connect and
# the name calls run under both.
APPSHOT_ROUTING=notified cargo test -p appshot-tests --no-fail-fast \
    --test sockname --test http --test udp --test connections --test clone \
    "$@" -- --test-threads=1 2>&1 | tee -a "$log"
((PIPESTATUS[0] == 0)) || status=1
set -e
total() { grep '^test result:' "$log" | grep -Eo "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo "tests: $(total passed) passed, $(total failed) failed"
exit "$status"

#!/usr/bin/env bash
# Measures appshot side by side with native and with peers.
#
#   bench/run.sh [--quick] [--only syscall|connrate|iperf|udp|redis|snapshot|oci|redisconns|nginx|scale]...
#
# Installs the Debian packages the benchmarks drive (only those `dpkg -s`
# reports missing), builds appshot and the bench in release mode, and runs
# the bench from the repository root. The table goes to stdout; results.json
# and results.md to bench/results/. --quick takes about 3 minutes (CRIU included), the full
# run about 9 (both on a shared 2-CPU VM).
#
# CRIU 4.x, the snapshot benchmark's peer, is always measured: the script
# uses $CRIU if set, else `criu` on PATH; when that is missing or not 4.x it
# runs ../shared/peers/build-criu.sh (beside the repository, as in CI), which
# builds CRIU 4.2 and installs it into /usr/local (about 30 s, plus its
# Debian build dependencies). Debian 12's own criu 3.17 fails `criu check` on
# Linux 6.18. If no working criu 4.x can be had, it says why on stderr; with
# CI=true that fails the run (a missing peer is a failure there), otherwise
# the snapshot rows carry the reason instead of a CRIU figure.
#
# The scale row (bench/scale.sh: 1,000 instances on one port) runs after the
# others in full mode, or alone with `--only scale`; never with --quick
# (what CI runs): it takes several minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

# clang and libbpf-dev build appshot's eBPF programs (sys/bpf/); busybox is
# the scale row's server; python3-venv holds the sandlock peer.
packages=(iperf3 socat redis-server redis-tools gcc nginx-light runc clang libbpf-dev busybox python3-venv)
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

# The CRIU peer: $CRIU, or criu on PATH, or built from ../shared/peers/.
criu_version() { { "$1" --version 2>/dev/null || true; } | sed -n 's/^Version: //p'; }
criu_problem() {
    echo "bench/run.sh: WARNING: no CRIU peer: $*" >&2
    echo "bench/run.sh: WARNING: the snapshot/restore rows will have no CRIU figure" >&2
    if [[ ${CI:-} == true ]]; then
        echo "bench/run.sh: CI=true: a missing CRIU peer fails the run" >&2
        exit 1
    fi
}
# Only the snapshot benchmarks have CRIU as their peer.
wants_criu=true
if [[ " $* " == *" --only "* && " $* " != *" snapshot "* && " $* " != *" nginx "* && " $* " != *" redisconns "* ]]; then
    wants_criu=false
fi
criu="${CRIU:-$(command -v criu || true)}"
version=""
if [[ -n $criu ]]; then version="$(criu_version "$criu")"; fi
if $wants_criu && [[ $version != 4.* ]]; then
    builder="$(cd .. && pwd)/shared/peers/build-criu.sh"
    if [[ -n ${CRIU:-} ]]; then
        criu_problem "CRIU=$CRIU is ${version:+criu $version, not 4.x}${version:-not a working criu}"
    elif [[ -x $builder ]]; then
        echo "bench/run.sh: criu ${version:-not found}${criu:+ ($criu)}; building CRIU 4.2 with $builder" >&2
        if [[ $(id -u) -ne 0 ]]; then
            criu_problem "$builder needs root"
        elif ! "$builder" >&2; then
            criu_problem "$builder failed (its output is above)"
        else
            criu=/usr/local/sbin/criu
            version="$(criu_version "$criu")"
        fi
    else
        criu_problem "criu ${version:-not found}${criu:+ at $criu}, and no $builder to build CRIU 4.2 with"
    fi
fi
if $wants_criu && [[ $version == 4.* ]]; then
    # `criu check` is run again by the bench, which puts its errors in the rows.
    if ! "$criu" check >&2; then
        criu_problem "$criu (criu $version) fails \`criu check\` (above)"
    fi
    export CRIU="$criu"
    echo "bench/run.sh: CRIU peer: $criu (criu $version)" >&2
else
    unset CRIU
fi

# The notified-call peer: sandlock 0.9.0 (PyPI; a seccomp-notify sandbox
# whose port_remap rewrites binds and connects), in a virtual environment of
# its own beside the build. Only the syscall and connrate benchmarks run it;
# without it their rows say why, and with CI=true the run fails.
wants_sandlock=true
if [[ " $* " == *" --only "* && " $* " != *" syscall "* && " $* " != *" connrate "* ]]; then
    wants_sandlock=false
fi
SANDLOCK_VERSION=0.9.0
if $wants_sandlock; then
    venv="${CARGO_TARGET_DIR:-target}/peers/sandlock-$SANDLOCK_VERSION"
    if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import sandlock' 2>/dev/null; then
        echo "bench/run.sh: installing sandlock $SANDLOCK_VERSION into $venv" >&2
        rm -rf "$venv"
        if ! { python3 -m venv "$venv" >&2 && "$venv/bin/pip" install -q "sandlock==$SANDLOCK_VERSION" >&2; }; then
            echo "bench/run.sh: WARNING: no sandlock peer: installing sandlock $SANDLOCK_VERSION failed (above)" >&2
            if [[ ${CI:-} == true ]]; then
                echo "bench/run.sh: CI=true: a missing sandlock peer fails the run" >&2
                exit 1
            fi
        fi
    fi
    if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c 'import sandlock' 2>/dev/null; then
        SANDLOCK_PYTHON="$(cd "$venv" && pwd)/bin/python"
        export SANDLOCK_PYTHON SANDLOCK_VERSION
    fi
fi

cargo build --release -p appshot -p appshot-bench >&2
release="${CARGO_TARGET_DIR:-target}/release"

args=()
quick=false
others=false
scale_only=false
while (($#)); do
    case $1 in
        --only)
            if [[ ${2:-} == scale ]]; then scale_only=true; else others=true; args+=("$1" "${2:-}"); fi
            shift 2 || shift
            ;;
        --only=scale) scale_only=true; shift ;;
        --only=*) others=true; args+=("$1"); shift ;;
        --quick) quick=true; args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
# `--only scale` and nothing else: the scale row alone.
if $scale_only && ! $others; then
    run_others=false
else
    run_others=true
fi
# Full mode (neither --quick nor --only) or asked for; never with --quick.
if ! $quick && { $scale_only || ! $others; }; then
    scale=true
else
    scale=false
fi
status=0
if $run_others; then
    "$release/appshot-bench" "${args[@]}" --appshot "$release/appshot" --out bench/results || status=$?
fi
if $scale; then
    echo "== scale: the registry with 1,000 instances on one port (bench/scale.sh)" >&2
    bench/scale.sh "$release/appshot" || status=$?
fi
exit "$status"

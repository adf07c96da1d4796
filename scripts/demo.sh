#!/usr/bin/env bash
# The appshot demo: three copies of `python3 -m http.server 9000` on one
# host, each serving its own directory, each believing it owns port 9000;
# clients reach the copy of their own AID and no other.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "demo: appshot needs root (seccomp listener, pidfd_getfd, PID namespaces)" >&2
  exit 1
fi
for pkg in libseccomp-dev pkg-config python3 curl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="${missing:-} $pkg"
done
if [ -n "${missing:-}" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi
cargo build --release -q -p appshot
appshot="$PWD/target/release/appshot"

APPSHOT_RUN_DIR="$(mktemp -d /tmp/appshot-demo.XXXXXX)"
export APPSHOT_RUN_DIR
www="$(mktemp -d /tmp/appshot-demo-www.XXXXXX)"
cleanup() {
  for aid in a b c; do "$appshot" stop "web-$aid" -t 3 2>/dev/null || true; done
  rm -rf "$www" "$APPSHOT_RUN_DIR"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "three instances of python3 -m http.server 9000, AIDs a, b, c"
for aid in a b c; do
  mkdir -p "$www/$aid"
  echo "hello from instance $aid" > "$www/$aid/hello-$aid.txt"
  (cd "$www/$aid" && "$appshot" run --aid "$aid" --name "web-$aid" --detach -- python3 -m http.server 9000)
done
for aid in a b c; do
  for _ in $(seq 100); do
    grep -q "Serving HTTP" "$APPSHOT_RUN_DIR/logs/web-$aid.log" 2>/dev/null && break
    sleep 0.05
  done
  printf 'web-%s says: ' "$aid"; grep "Serving HTTP" "$APPSHOT_RUN_DIR/logs/web-$aid.log"
done

step "appshot ps"
"$appshot" ps
step "appshot ports"
"$appshot" ports

for aid in a b c; do
  step "curl http://127.0.0.1:9000/ under --aid $aid"
  "$appshot" run --aid "$aid" -- curl -s http://127.0.0.1:9000/ | grep -o 'hello-[a-z]*\.txt' | sort -u
done
step "the same over IPv6, under --aid b"
"$appshot" run --aid b -- curl -s -g 'http://[::1]:9000/' | grep -o 'hello-[a-z]*\.txt' | sort -u

step "curl under --aid z: no instance of z serves port 9000"
if "$appshot" run --aid z -- curl -sS http://127.0.0.1:9000/; then
  echo "demo: AID z reached an instance it must not reach" >&2
  exit 1
fi

step "stop"
for aid in a b c; do "$appshot" stop "web-$aid" && echo "stopped web-$aid"; done
"$appshot" ps

echo
echo "Snapshot, restore and clone are not implemented yet; the demo will show them when they land."

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
# clang and libbpf-dev build the eBPF programs that route datagrams.
for pkg in libseccomp-dev pkg-config python3 curl clang libbpf-dev; do
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
images="$(mktemp -d /tmp/appshot-demo-images.XXXXXX)"
cleanup() {
  for name in web-a web-b web-c web-b2 tpl clone-1 clone-2 clone-3; do
    "$appshot" stop "$name" -t 3 2>/dev/null || true
  done
  rm -rf "$www" "$images" "$APPSHOT_RUN_DIR"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "three instances of python3 -m http.server 9000, AIDs a, b, c"
for aid in a b c; do
  mkdir -p "$www/$aid"
  echo "hello from instance $aid" > "$www/$aid/hello-$aid.txt"
  (cd "$www/$aid" && "$appshot" run --aid "$aid" --name "web-$aid" --detach -- python3 -m http.server 9000 --bind ::)
done
for aid in a b c; do
  for _ in $(seq 100); do
    "$appshot" logs "web-$aid" 2>/dev/null | grep -q "Serving HTTP" && break
    sleep 0.05
  done
  printf 'web-%s says: ' "$aid"; "$appshot" logs "web-$aid" | grep "Serving HTTP"
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

serves() { # AID FILE: curl under AID must list FILE
  "$appshot" run --aid "$1" -- curl -s http://127.0.0.1:9000/ | grep -q "$2"
}

step "snapshot web-b (it stops), then restore it: same process, same PID, new real port"
"$appshot" snapshot web-b -o "$images/web-b.img"
"$appshot" inspect "$images/web-b.img" | head -8
"$appshot" ps
"$appshot" restore "$images/web-b.img" --detach
"$appshot" ps
serves b hello-b.txt && echo "AID b is served by the restored web-b again"

step "snapshot --leave-running, restore a second copy under AID b2 beside the original"
"$appshot" snapshot web-b -o "$images/web-b-live.img" --leave-running
"$appshot" restore "$images/web-b-live.img" --name web-b2 --aid b2 --detach
serves b hello-b.txt && serves b2 hello-b.txt && echo "web-b and its copy web-b2 both serve port 9000, each to its own AID"

step "a template, cloned three times: each clone its own AID and its own identity file"
mkdir -p "$www/tpl"
echo "template" > "$www/tpl/whoami.txt"
(cd "$www/tpl" && "$appshot" run --aid tpl --name tpl --detach -- python3 -m http.server 9000)
for _ in $(seq 100); do serves tpl whoami.txt && break; sleep 0.05; done
"$appshot" snapshot tpl --template -o "$images/tpl.img"
"$appshot" clone "$images/tpl.img" --aid clone --count 3 --identity-file "$www/tpl/whoami.txt"
"$appshot" ps
for i in 1 2 3; do
  printf 'clone-%s serves /whoami.txt: ' "$i"
  "$appshot" run --aid "clone-$i" -- curl -s http://127.0.0.1:9000/whoami.txt | tr '\n' ' '
  echo
done
printf 'on the host the file still says: '; cat "$www/tpl/whoami.txt"

step "stop everything"
for name in web-a web-b web-c web-b2 clone-1 clone-2 clone-3; do
  "$appshot" stop "$name" && echo "stopped $name"
done
"$appshot" ps

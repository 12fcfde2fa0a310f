#!/usr/bin/env bash
# Regenerates pgo/symbol-order.txt: the functions a sidecar runs, hottest first, which
# scripts/release-build.sh hands to the linker (`--symbol-ordering-file`) so that they sit together
# at the front of the binary's code instead of spread over its 14 MB. A fresh sidecar then maps
# about 3 MiB of code pages instead of about 7 (the kernel maps code in 64 KiB blocks around each
# page it faults in). Memory only: instructions and cache misses per request did not change
# (BENCHMARKS.md, "Code layout", twelfth session).
#
# Usage: scripts/symbol-order.sh [--base-port PORT] [BIN]
#
# BIN (default target/pgo/release/meshgate, built by scripts/release-build.sh) runs as the two
# sidecars of the mesh path under valgrind's callgrind, from start to a graceful stop, with the
# default log level: start-up, the mesh path (HTTP/1.1 from the app, HTTP/2 between the sidecars),
# a denied request, a client with an SVID straight to the inbound sidecar over HTTP/1.1 and
# HTTP/2, and the admin endpoints. Every function of BIN that ran is written: first what ran
# before the sidecars were ready, then what both ran serving, then what only the inbound one
# ran, then the outbound one, each part hottest first (instructions of both sidecars summed);
# what never ran is left to the linker. The inbound sidecar runs on one worker thread (tokio's
# current-thread scheduler, what a sidecar with one CPU gets), the outbound one on two (the
# multi-threaded scheduler), so that both schedulers' code is in the layout.
#
# Run it after scripts/pgo-profile.sh (a new profile changes which functions exist and how big
# they are) and commit the file. The names are the linker's symbols: they stay valid across most
# code changes (a symbol's hash comes from its path and crate, not its body); names that no longer
# exist are skipped by the linker, so a stale file costs only some of the gain, never a build.
# Needs valgrind (callgrind_annotate), oha, nginx, python3, curl; takes about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
here=$root/benches/peers
base=19700
mg=
while [ $# -gt 0 ]; do
  case $1 in
    --base-port) base=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) mg=$1; shift ;;
  esac
done
mg=${mg:-target/pgo/release/meshgate}
[ -x "$mg" ] || { echo "$mg is missing: build it with scripts/release-build.sh, or name a binary" >&2; exit 1; }
mg=$(cd "$(dirname "$mg")" && pwd)/$(basename "$mg")
missing=()
for tool in valgrind callgrind_annotate oha nginx python3 curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]} — apt-get install valgrind nginx python3 curl; cargo install oha --locked" >&2
  exit 1
fi

work_name=order
# shellcheck source=../benches/peers/mesh-setup.sh
. "$here/mesh-setup.sh"
start_app

vg=(valgrind --tool=callgrind --dump-instr=no --demangle=no)
MESHGATE_WORKER_THREADS=1 "${vg[@]}" --callgrind-out-file="$work/cg-in.out" "$mg" proxy \
  --app 127.0.0.1:$app_port --svid-cert "$work/svid-app/svid.pem" --svid-key "$work/svid-app/key.pem" \
  --trust-bundle "$work/svid-app/bundle.pem" --policy-dir "$work/policy" \
  --inbound 127.0.0.1:$in_port --outbound 127.0.0.1:$((in_port + 1)) --admin 127.0.0.1:$((in_port + 2)) \
  --no-tracing >"$work/in.log" 2>&1 &
in_pid=$!
pids+=("$in_pid")
MESHGATE_WORKER_THREADS=2 "${vg[@]}" --callgrind-out-file="$work/cg-out.out" "$mg" proxy \
  --app 127.0.0.1:$app_port --svid-cert "$work/svid-client/svid.pem" --svid-key "$work/svid-client/key.pem" \
  --trust-bundle "$work/svid-client/bundle.pem" --policy-dir "$work/policy" --services "$work/services.yaml" \
  --inbound 127.0.0.1:$((out_port - 1)) --outbound 127.0.0.1:$out_port --admin 127.0.0.1:$((out_port + 1)) \
  --no-tracing >"$work/out.log" 2>&1 &
out_pid=$!
pids+=("$out_pid")
ready $((in_port + 2))
ready $((out_port + 1))
# What start-up ran, apart: every sidecar runs it, so it goes first in the layout.
callgrind_control --dump=startup "$in_pid" >/dev/null 2>&1
callgrind_control --dump=startup "$out_pid" >/dev/null 2>&1

expect() { # CODE CURL-ARGS... : one request that must answer CODE
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 20 "${@:2}") || true
  [ "$got" = "$1" ] || { echo "expected $1, got ${got:-no answer} from curl ${*:2} (logs kept in $work)" >&2; keep=1; exit 1; }
}
# The mesh path: the app's HTTP/1.1 to its outbound sidecar, HTTP/2 over mTLS between the two.
oha --no-tui -n 2000 -c 4 -H "Host: app" "http://127.0.0.1:$out_port/api/data" >"$work/oha.txt"
grep -q '\[200\] 2000 responses' "$work/oha.txt" || { echo "mesh path: not every request answered 200 (logs kept in $work):" >&2; cat "$work/oha.txt" >&2; keep=1; exit 1; }
expect 403 -H "Host: app" "http://127.0.0.1:$out_port/admin"
# A client with an SVID straight to the inbound sidecar, HTTP/1.1 and HTTP/2 (--insecure: an SVID
# names a SPIFFE ID, not the host name curl checks; the sidecar still checks the client's).
tls=(--insecure --cert "$work/svid-client/svid.pem" --key "$work/svid-client/key.pem")
for v in --http1.1 --http2; do
  expect 200 "$v" "${tls[@]}" "https://127.0.0.1:$in_port/api/data"
  expect 403 "$v" "${tls[@]}" "https://127.0.0.1:$in_port/admin"
done
for port in $((in_port + 2)) $((out_port + 1)); do
  expect 200 "http://127.0.0.1:$port/ready"
  expect 200 "http://127.0.0.1:$port/metrics"
done
# A graceful stop: callgrind writes its file when the process exits.
kill -TERM "$in_pid" "$out_pid"
wait "$in_pid" "$out_pid" 2>/dev/null || true

out=pgo/symbol-order.txt
{
  echo "# Functions of the meshgate binary, hottest first, for the linker's --symbol-ordering-file."
  echo "# Written by scripts/symbol-order.sh from $(git rev-parse --short HEAD 2>/dev/null || echo 'an unknown commit'); do not edit."
  for side in in out; do
    ls "$work/cg-$side.out".* >/dev/null 2>&1 || { echo "no start-up dump of the $side sidecar" >&2; exit 1; }
    for f in "$work/cg-$side.out".*; do
      callgrind_annotate --threshold=100 "$f" | sed "s/^/start /"
    done
    callgrind_annotate --threshold=100 "$work/cg-$side.out" | sed "s/^/$side /"
  done | awk -v bin="[$mg]" '
    # "PART  1,234 (0.5%)  file:symbol [object]": the symbols of this binary, with their
    # instructions, in start-up or in serving by the inbound or the outbound sidecar.
    index($0, bin) && $2 ~ /^[0-9,]+$/ {
      ir = $2; gsub(",", "", ir)
      sym = $0; sub(/ \[[^]]*\]$/, "", sym); sub(/^.*:/, "", sym); sub(/'"'"'[0-9]+$/, "", sym)
      total[sym] += ir; part[sym] = part[sym] $1 " "
    }
    # First what start-up ran (every sidecar maps it), then what both sidecars ran serving
    # (TLS, HTTP/2, the decision log), then what only the inbound one ran, then what only the
    # outbound one ran, each hottest first: a fresh sidecar maps one block, and one that serves
    # one direction only one more.
    END {
      for (s in total) {
        p = part[s]
        group = p ~ /start/ ? 0 : (p ~ /in/ && p ~ /out/) ? 1 : p ~ /in/ ? 2 : 3
        print group, total[s], s
      }
    }' | sort -k1,1n -k2,2nr -k3 | awk '{print $3}'
} >"$work/order.txt"
n=$(grep -vc '^#' "$work/order.txt" || true)
[ "$n" -gt 500 ] || { echo "only $n functions found in the callgrind files (kept in $work): not written" >&2; keep=1; exit 1; }
mv "$work/order.txt" "$out"
echo "wrote $out: $n functions"

#!/usr/bin/env bash
# Instructions per request on meshgate's mesh path (app → outbound sidecar → mTLS/HTTP2 →
# inbound sidecar → app), counted by valgrind's callgrind: a figure that does not depend on the
# machine's load, so binaries can be compared on a busy machine (wall-clock and CPU-time figures
# need a quiet one: run.sh).
#
# Usage: benches/peers/callgrind.sh [--requests N] [--connections C] [--cache] [--base-port PORT] [--log LEVEL] [--tracing RATIO] [--inbound] [--h2] [--haproxy] [--keep] BIN [BIN...]
#
# --log: the sidecars' MESHGATE_LOG (default warn; `info` is the default a user runs, with the
# per-request decision line). --tracing RATIO: OpenTelemetry tracing on in both sidecars
# (parent-based trace-ID ratio sampler) toward an OTLP/HTTP sink (otlp_sink.py), as pair.sh.
#
# For each binary: both sidecars start under callgrind with the same configuration as run.sh's
# mesh path (static SVIDs, the bench policy, HTTP/1.1 from the client, keep-alive to an nginx
# app), 200 warm-up requests go through, the counters are zeroed, N requests go through (oha,
# --connections C), and the counters are dumped. Prints Ir per request for each sidecar and the
# pair, and writes the callgrind files (for callgrind_annotate) next to a summary in the work dir.
# --haproxy adds a row for the HAProxy pair of run.sh (HTTP/2 between its two proxies, the same
# certificates, ACL and keep-alive), measured the same way: the peers' user-space instructions
# (OpenSSL's included) next to meshgate's, on a machine too busy for CPU times. Like callgrind
# itself, it leaves out the kernel's share (about half of every proxy's CPU here).
# --inbound: run.sh's inbound scenario instead of the mesh path: the load generator, with the
# client's SVID, speaks HTTP/1.1 over mTLS straight to the inbound sidecar (the outbound sidecar
# still runs, and counts about nothing). With --haproxy, HAProxy's inbound proxy alone.
# --connections C: oha's connections (default 4); at 64, as run.sh's saturation, batching on the
# HTTP/2 connection between the proxies changes the per-request cost (HAProxy's more than
# meshgate's). --cache adds callgrind's cache and branch simulation and prints, per request,
# L1 instruction-cache misses, L1 data read and write misses and mispredicted conditional
# branches: what makes the same instruction count cost more time (BENCHMARKS.md, "eleventh
# session").
# --h2: HTTP/2 end to end, as gRPC traffic runs: oha speaks h2c to the outbound proxy over one
# connection with C concurrent streams, and the app speaks h2c only (the inbound sidecar with
# --app-protocol h2c; HAProxy's pair with `proto h2` toward the client and the app).
# Needs valgrind (callgrind_control), oha, nginx, python3; openssl, haproxy and curl for --haproxy.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
requests=2000
connections=4
cache=0
base=19400
keep=0
haproxy=0
inbound=0
h2=0
log=warn
tracing=
bins=()
while [ $# -gt 0 ]; do
  case $1 in
    --requests) requests=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --cache) cache=1; shift ;;
    --base-port) base=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --haproxy) haproxy=1; shift ;;
    --inbound) inbound=1; shift ;;
    --h2) h2=1; shift ;;
    --log) log=$2; shift 2 ;;
    --tracing) tracing=$2; shift 2 ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) bins+=("$1"); shift ;;
  esac
done
[ ${#bins[@]} -gt 0 ] || { echo "usage: $0 [--requests N] BIN [BIN...] (e.g. target/release/meshgate)" >&2; exit 2; }
missing=()
tools=(valgrind callgrind_control oha nginx python3)
[ "$haproxy" = 0 ] || tools+=(openssl haproxy curl)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]} — apt-get install valgrind nginx python3 openssl haproxy curl; cargo install oha --locked" >&2
  exit 1
fi

work_name=callgrind

mg=${bins[0]}
# shellcheck source=mesh-setup.sh
. "$here/mesh-setup.sh"
conc=(-c "$connections")
app_protocol=()
if [ "$h2" = 1 ]; then
  [ "$inbound" = 0 ] || { echo "--h2 measures the mesh path: not with --inbound" >&2; exit 2; }
  app_h2c
  conc=(-c 1 -p "$connections" --http2)
  app_protocol=(--app-protocol h2c)
fi
start_app
telemetry=(--no-tracing)
if [ -n "$tracing" ]; then
  python3 "$here/otlp_sink.py" $((base + 30)) "$work/otlp-count" &
  pids+=($!)
  export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$((base + 30))
  export OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=$tracing
  telemetry=()
fi
last_dump() { # CALLGRIND_OUT_PREFIX → the file of the last dump
  local f
  f=$(ls -t "$1".* 2>/dev/null | grep -v '\.0$' | head -1 || true)
  [ -n "$f" ] || f=$(ls -t "$1"* | head -1)
  echo "$f"
}
per_request() { # DUMP_FILE BASE_DUMP_FILE|- N EVENT... → each event's count per request
  # (with a base dump: the difference between the two, per request)
  python3 - "$@" <<'PY'
import sys
def totals(path):
    events = None
    for line in open(path):
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            counts = [int(x) for x in line.split()[1:]]
    return dict(zip(events, counts))
path, base, n, wanted = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
per, minus = totals(path), totals(base) if base != "-" else {}
print(" ".join(f"{(per.get(k, 0) - minus.get(k, 0)) / n:.0f}" for k in wanted))
PY
}

printf '%-40s %14s %14s %14s\n' binary "inbound Ir/req" "outbound Ir/req" "pair Ir/req" | tee "$work/summary.txt"
vg=(valgrind --tool=callgrind --dump-instr=no --collect-atstart=yes --compress-strings=no)
[ "$cache" = 0 ] || vg+=(--cache-sim=yes --branch-sim=yes)
# NAME IN_PID OUT_PID URL TAG [OHA_ARGS...]: 200 warm-up requests through URL, then N counted
# ones; one row (the callgrind files are cg-in-TAG.out and cg-out-TAG.out).
measure() {
  local name=$1 in_pid=$2 out_pid=$3 url=$4 tag=$5 in_ir out_ir n=$requests side pid
  local -A minus=([in]=- [out]=-)
  shift 5
  oha --no-tui -n 200 "${conc[@]}" -H "Host: app" "$@" "$url" >/dev/null
  if [ "$inbound" = 1 ]; then
    # Each oha run opens its own mTLS connections, and a handshake costs as much as hundreds of
    # requests: a run of one request per connection is counted first, and subtracted.
    for pid in "$in_pid" "$out_pid"; do callgrind_control --zero "$pid" >/dev/null; done
    oha --no-tui -n "$connections" -c "$connections" -H "Host: app" "$@" "$url" >"$work/oha-$tag-handshakes.txt"
    for pid in "$in_pid" "$out_pid"; do callgrind_control --dump=handshakes "$pid" >/dev/null; done
    minus=([in]=$(last_dump "$work/cg-in-$tag.out") [out]=$(last_dump "$work/cg-out-$tag.out"))
    n=$((requests - connections))
  fi
  for pid in "$in_pid" "$out_pid"; do callgrind_control --zero "$pid" >/dev/null; done
  oha --no-tui -n "$requests" "${conc[@]}" -H "Host: app" "$@" "$url" >"$work/oha-$tag.txt"
  grep -q "\[200\] $requests responses" "$work/oha-$tag.txt" || {
    echo "$name: not every request was answered 200:" >&2
    grep -A5 "Status code distribution" "$work/oha-$tag.txt" >&2
    exit 1
  }
  for pid in "$in_pid" "$out_pid"; do callgrind_control --dump=measured "$pid" >/dev/null; done
  sleep 1
  kill "$in_pid" "$out_pid" 2>/dev/null || true
  wait "$in_pid" "$out_pid" 2>/dev/null || true
  in_ir=$(per_request "$(last_dump "$work/cg-in-$tag.out")" "${minus[in]}" "$n" Ir)
  out_ir=$(per_request "$(last_dump "$work/cg-out-$tag.out")" "${minus[out]}" "$n" Ir)
  printf '%-40s %14d %14d %14d\n' "$name" "$in_ir" "$out_ir" $((in_ir + out_ir)) | tee -a "$work/summary.txt"
  if [ "$cache" = 1 ]; then
    printf '%-40s %s\n' "  per request, I1mr D1mr D1mw Bcm" \
      "inbound $(per_request "$(last_dump "$work/cg-in-$tag.out")" "${minus[in]}" "$n" I1mr D1mr D1mw Bcm) / outbound $(per_request "$(last_dump "$work/cg-out-$tag.out")" "${minus[out]}" "$n" I1mr D1mr D1mw Bcm)" | tee -a "$work/summary.txt"
  fi
}
n=0
for bin in "${bins[@]}"; do
  n=$((n + 1))
  MESHGATE_LOG=$log "${vg[@]}" --callgrind-out-file="$work/cg-in-$n.out" "$bin" proxy \
    --app 127.0.0.1:$app_port --svid-cert "$work/svid-app/svid.pem" --svid-key "$work/svid-app/key.pem" \
    --trust-bundle "$work/svid-app/bundle.pem" --policy-dir "$work/policy" \
    --inbound 127.0.0.1:$in_port --outbound 127.0.0.1:$((in_port + 1)) --admin 127.0.0.1:$((in_port + 2)) \
    "${telemetry[@]}" "${app_protocol[@]}" >"$work/in-$n.log" 2>&1 &
  in_pid=$!
  pids+=("$in_pid")
  MESHGATE_LOG=$log "${vg[@]}" --callgrind-out-file="$work/cg-out-$n.out" "$bin" proxy \
    --app 127.0.0.1:$app_port --svid-cert "$work/svid-client/svid.pem" --svid-key "$work/svid-client/key.pem" \
    --trust-bundle "$work/svid-client/bundle.pem" --policy-dir "$work/policy" --services "$work/services.yaml" \
    --inbound 127.0.0.1:$((out_port - 1)) --outbound 127.0.0.1:$out_port --admin 127.0.0.1:$((out_port + 1)) \
    "${telemetry[@]}" >"$work/out-$n.log" 2>&1 &
  out_pid=$!
  pids+=("$out_pid")
  ready $((in_port + 2))
  ready $((out_port + 1))
  if [ "$inbound" = 1 ]; then
    measure "$bin" "$in_pid" "$out_pid" "https://127.0.0.1:$in_port/api/data" "$n" \
      --cert "$work/svid-client/svid.pem" --key "$work/svid-client/key.pem" --insecure
  else
    measure "$bin" "$in_pid" "$out_pid" "http://127.0.0.1:$out_port/api/data" "$n"
  fi
done
if [ "$haproxy" = 1 ]; then
  under_callgrind() { local side=$1; shift; exec "${vg[@]}" --callgrind-out-file="$work/cg-$side-haproxy.out" "$@"; }
  start_haproxy_pair $((base + 40)) $((base + 41)) under_callgrind
  in_pid=$hap_in_pid
  out_pid=$hap_out_pid
  if [ "$inbound" = 1 ]; then
    measure "haproxy (inbound)" "$in_pid" "$out_pid" "https://127.0.0.1:$((base + 40))/api/data" haproxy \
      --cert "$certs/client-chain.pem" --key "$certs/client.key" --insecure
  else
    measure "haproxy (pair over HTTP/2)" "$in_pid" "$out_pid" "http://127.0.0.1:$((base + 41))/api/data" haproxy
  fi
fi
echo "callgrind files and summary: $work (use --keep to keep them; callgrind_annotate FILE)" >&2

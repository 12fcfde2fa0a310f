#!/usr/bin/env bash
# One meshgate sidecar pair on the mesh path (app → outbound sidecar → mTLS → inbound sidecar
# → nginx app), pinned like run.sh (oha on CPU 0, the app and both sidecars on CPU 1), and
# where each sidecar's CPU goes: user and system time per request, and with --syscalls the
# system calls per request (perf stat). For comparing one change or setting quickly; run.sh is
# the comparison with the peers.
#
# Usage: benches/peers/pair.sh [--seconds S] [--base-port PORT] [--syscalls] [--tracing RATIO] [--body BYTES] [--response BYTES] [--path PATH --expect STATUS] [--haproxy] [--accel] [--h2] [--inbound] [--idle N] [--flamegraph DIR] BIN [OUTBOUND-ARGS...]
#   e.g. benches/peers/pair.sh target/release/meshgate --mesh-protocol preserve
#
# Prints one line: latency at a fixed 1000 req/s (-c 16, latency-corrected, end to end), then
# a closed loop at -c 64 for S seconds (default 4): RPS, and per sidecar user/sys µs per request
# (from /proc/PID/stat) and the app's (nginx's worker: what the proxies' way of talking to it
# costs it), plus system calls, context switches and page faults per request with --syscalls
# (perf stat). Needs oha, nginx,
# python3, taskset; perf for --syscalls. MESHGATE_LOG (default warn) and MESHGATE_LOG_FORMAT are
# passed to both sidecars. --tracing RATIO turns OpenTelemetry tracing on in both sidecars
# (parent-based trace-ID ratio sampler at RATIO; denials are exported whatever the ratio) toward
# an OTLP/HTTP sink (otlp_sink.py, on CPU 0 with oha), and reports the exports it received.
# --body BYTES: every request is a POST of BYTES bytes to the app's /api/upload (which reads the
# whole body, then answers "ok") instead of a GET of the 1 KiB /api/data: the upload direction.
# Each run starts only once the proxies are idle again.
# --response BYTES: GET a file of BYTES bytes instead (the download direction).
# --path PATH: GET PATH instead; --expect STATUS: the status every request must get (default
# 200), e.g. `--path /admin --expect 403` for requests the policy refuses.
# --haproxy: the same measurement of run.sh's HAProxy pair (HTTP/2 between its proxies, the same
# certificates, ACL and keep-alive; BIN still makes the CA), so the user/system split, system
# calls and context switches of both can be set side by side (needs haproxy, openssl, curl).
# --accel: meshgate's eBPF local acceleration on the two local hops (the client → the outbound
# proxy, the inbound proxy → the app): the app and the client in one cgroup, the proxies in
# another, `meshgate redirect attach` on them (accel.sh); needs root. With --haproxy it is the
# control: the same kernel path under HAProxy's pair. Prints the acceleration counters too.
# --h2: HTTP/2 end to end, as gRPC traffic runs: the client speaks h2c (prior knowledge) to the
# outbound proxy over 8 connections of 8 concurrent streams each (4 × 4 for the fixed-rate run),
# and the app is nginx speaking h2c only (the inbound sidecar with --app-protocol h2c; with
# --haproxy, `proto h2` on HAProxy's outbound listener and toward the app).
# --inbound: run.sh's inbound scenario instead of the mesh path: the load generator, with the
# client's certificate, speaks HTTP/1.1 over mTLS straight to the inbound proxy (as another
# pod would: with --accel only the proxy's hop to the app is accelerated); the figures are the
# inbound proxy's and the app's. With --haproxy, HAProxy's inbound proxy.
# --idle N: instead of the load runs, N plain HTTP/1.1 connections to the outbound proxy (an
# app's pool), each sending one kept-alive GET of PATH, held idle; prints the RSS each proxy
# gained per connection (the outbound one holds the connections; the inbound one sees one
# multiplexed mTLS connection).
# --flamegraph DIR: perf records each proxy during the saturation run (cpu-clock, DWARF call
# graphs, 1999 samples a second, perf itself on CPU 0), and DIR gets a flame graph of each
# (PROXY-SCENARIO-SIDE.svg, e.g. meshgate-mesh-inbound.svg, with its folded stacks beside it for
# inferno-diff-folded) and PROXY-SCENARIO-components.md: where each proxy's CPU goes by component
# (flame_components.py), in µs per request. The shipped binary has symbols but no debug info, so
# what the compiler inlined shows as its caller; the same binary with line tables
# (scripts/release-build.sh --line-tables, target/pgo-lines/release/meshgate) shows the inlined
# functions too. perf's sampling costs the proxies a little: take the line's CPU figures from a
# run without it. Needs perf and inferno (cargo install inferno --locked).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
seconds=4
base=19600
syscalls=0
tracing=
body=
response=
path=/api/data
expect=200
haproxy=0
accel=0
idle=
h2=0
inbound=0
flamegraph=
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --base-port) base=$2; shift 2 ;;
    --syscalls) syscalls=1; shift ;;
    --tracing) tracing=$2; shift 2 ;;
    --body) body=$2; shift 2 ;;
    --response) response=$2; shift 2 ;;
    --path) path=$2; shift 2 ;;
    --expect) expect=$2; shift 2 ;;
    --haproxy) haproxy=1; shift ;;
    --accel) accel=1; shift ;;
    --idle) idle=$2; shift 2 ;;
    --h2) h2=1; shift ;;
    --inbound) inbound=1; shift ;;
    --flamegraph) flamegraph=$2; shift 2 ;;
    -h|--help) sed -n '2,53p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--seconds S] [--base-port PORT] [--syscalls] [--tracing RATIO] [--body BYTES] [--response BYTES] [--path PATH --expect STATUS] [--haproxy] [--accel] [--h2] [--inbound] [--idle N] [--flamegraph DIR] BIN [OUTBOUND-ARGS...]" >&2; exit 2; }
[ "$inbound" = 0 ] || [ "$h2$idle" = 0 ] || { echo "--inbound measures HTTP/1.1 over mTLS under load: not with --h2 or --idle" >&2; exit 2; }
[ -z "$flamegraph" ] || [ -z "$idle" ] || { echo "--flamegraph records the proxies under load: not with --idle" >&2; exit 2; }
case $path in /*) ;; *) echo "--path takes a path starting with /, e.g. --path /admin" >&2; exit 2 ;; esac
case $expect in [1-5][0-9][0-9]) ;; *) echo "--expect takes an HTTP status, e.g. --expect 403" >&2; exit 2 ;; esac
for n in "$body" "$response" "$idle"; do
  case $n in ''|*[!0-9]*) [ -z "$n" ] || { echo "--body and --response take a number of bytes, e.g. --body 16384; --idle a number of connections" >&2; exit 2; } ;; esac
done
mg=$1
shift
missing=()
for tool in oha nginx python3 taskset pgrep; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ "$syscalls" = 0 ] || command -v perf >/dev/null || missing+=(perf)
[ -z "$flamegraph" ] || for tool in perf inferno-flamegraph; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ "$haproxy" = 0 ] || for tool in haproxy openssl curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]} — apt-get install nginx python3 util-linux linux-perf haproxy openssl curl; cargo install oha --locked; cargo install inferno --locked" >&2
  exit 1
fi

work_name=pair
# shellcheck source=mesh-setup.sh
. "$here/mesh-setup.sh"
# shellcheck source=accel.sh
. "$here/accel.sh"
if [ "$accel" = 1 ]; then
  why=$(accel_unavailable) && { echo "--accel: $why" >&2; exit 1; }
  trap 'cleanup; accel_cleanup' EXIT
  accel_setup "meshgate-pair-$$" "$out_port" "$in_port" "$app_port" || exit 1
fi
if [ "$h2" = 1 ]; then
  [ -z "$idle$body" ] || { echo "--h2 measures GETs under load: not with --idle or --body" >&2; exit 2; }
  app_h2c
fi
start_app "${in_app_cg[@]}" taskset -c 1
app_pid=${pids[-1]}

log=${MESHGATE_LOG:-warn}
export MESHGATE_LOG_FORMAT=${MESHGATE_LOG_FORMAT:-text}
telemetry=(--no-tracing)
if [ -n "$tracing" ]; then
  sink_port=$((base + 30))
  taskset -c 0 python3 "$here/otlp_sink.py" "$sink_port" "$work/otlp-count" &
  pids+=($!)
  export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink_port
  export OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=$tracing
  telemetry=()
fi
app_protocol=()
[ "$h2" = 0 ] || app_protocol=(--app-protocol h2c)
if [ "$haproxy" = 1 ]; then
  pinned() { shift; exec "${in_sidecar_cg[@]}" taskset -c 1 "$@"; }
  start_haproxy_pair "$in_port" "$out_port" pinned
  in_pid=$hap_in_pid
  out_pid=$hap_out_pid
else
  MESHGATE_LOG=$log "${in_sidecar_cg[@]}" taskset -c 1 "$mg" proxy --app 127.0.0.1:$app_port \
    --svid-cert "$work/svid-app/svid.pem" --svid-key "$work/svid-app/key.pem" \
    --trust-bundle "$work/svid-app/bundle.pem" --policy-dir "$work/policy" \
    --inbound 127.0.0.1:$in_port --outbound 127.0.0.1:$((in_port + 1)) --admin 127.0.0.1:$((in_port + 2)) \
    "${telemetry[@]}" "${app_protocol[@]}" >"$work/in.log" 2>&1 &
  in_pid=$!
  pids+=("$in_pid")
  MESHGATE_LOG=$log "${in_sidecar_cg[@]}" taskset -c 1 "$mg" proxy --app 127.0.0.1:$app_port \
    --svid-cert "$work/svid-client/svid.pem" --svid-key "$work/svid-client/key.pem" \
    --trust-bundle "$work/svid-client/bundle.pem" --policy-dir "$work/policy" --services "$work/services.yaml" \
    --inbound 127.0.0.1:$((out_port - 1)) --outbound 127.0.0.1:$out_port --admin 127.0.0.1:$((out_port + 1)) \
    "${telemetry[@]}" "$@" >"$work/out.log" 2>&1 &
  out_pid=$!
  pids+=("$out_pid")
  ready $((in_port + 2))
  ready $((out_port + 1))
fi

if [ -n "$idle" ]; then
  rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
  sleep 0.5
  in0=$(rss "$in_pid"); out0=$(rss "$out_pid")
  taskset -c 0 python3 "$here/idle_conns.py" --plain --port "$out_port" -n "$idle" --request "$path" >"$work/idle.out" 2>&1 &
  ipid=$!
  pids+=("$ipid")
  for _ in $(seq 600); do grep -q ready "$work/idle.out" 2>/dev/null && break; sleep 0.1; done
  sleep ${IDLE_WAIT:-2} # past meshgate's 1 s park delay: what a pool's idle connections hold
  in1=$(rss "$in_pid"); out1=$(rss "$out_pid")
  read -r _ opened failed <"$work/idle.out" || { echo "idle_conns.py failed: $(cat "$work/idle.out")" >&2; exit 1; }
  [ "$opened" -gt 0 ] || { echo "no connection opened: $(cat "$work/idle.out")" >&2; exit 1; }
  awk -v n="$opened" -v f="$failed" -v o0="$out0" -v o1="$out1" -v i0="$in0" -v i1="$in1" 'BEGIN {
    printf "idle after one request: %d connections (%d failed)  outbound fresh %.1f MiB, %.1f KiB per connection  inbound fresh %.1f MiB, %.2f KiB per connection\n",
      n, f, o0 / 1024, (o1 - o0) / n, i0 / 1024, (i1 - i0) / n }'
  exit 0
fi
origin=http://127.0.0.1:$out_port
request=()
client_cg=("${in_app_cg[@]}") # the load generator is the app calling out
if [ "$inbound" = 1 ]; then
  origin=https://127.0.0.1:$in_port
  client_cg=() # another pod, over mTLS
  if [ "$haproxy" = 1 ]; then
    request=(--cert "$certs/client-chain.pem" --key "$certs/client.key" --insecure)
  else
    request=(--cert "$work/svid-client/svid.pem" --key "$work/svid-client/key.pem" --insecure)
  fi
fi
url=$origin$path
if [ -n "$body" ]; then
  url=$origin/api/upload
  head -c "$body" /dev/zero | tr '\0' 'x' >"$work/body"
  request+=(-m POST -D "$work/body")
elif [ -n "$response" ]; then
  url=$origin/api/big
  head -c "$response" /dev/zero | tr '\0' 'x' >"$work/www/api/big"
fi
oha_json() { # OUT ARGS...
  local out=$1
  shift
  "${client_cg[@]}" taskset -c 0 oha --no-tui --output-format json -H "Host: app" "${request[@]}" "$@" "$url" >"$out"
}
# The same concurrency over HTTP/2: C connections become C/P connections of P streams each.
if [ "$h2" = 1 ]; then
  conns() { echo "-c $(($1 / $2)) -p $2 --http2"; }
else
  conns() { echo "-c $1"; }
fi
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
app_ticks() { # the app's user and system ticks: nginx's master and its worker
  local p
  for p in "$app_pid" $(pgrep -P "$app_pid"); do ticks "$p"; done | awk '{u += $1; s += $2} END {print u, s}'
}
# This network namespace's TCP segments sent and pure ACKs (every hop is on loopback, so each
# segment is sent and received here): "OutSegs PureAcks".
tcp_counters() {
  awk '$1 == "Tcp:" { if (!t) { for (i = 2; i <= NF; i++) if ($i == "OutSegs") o = i; t = 1 } else out = $o }
       $1 == "TcpExt:" { if (!x) { for (i = 2; i <= NF; i++) if ($i == "TCPPureAcks") a = i; x = 1 } else pure = $a }
       END { print out, pure }' /proc/net/snmp /proc/net/netstat
}
# Waits until both proxies have been idle for 0.3 s (at most 20 s). oha's -z ends a run with
# requests in flight; an upload's body it had already written stays queued in its sockets (up
# to 4 MiB each; an app that answers before reading the body, as this one did until the
# twenty-fourth session, lets it write several bodies ahead), and the kernel still delivers it
# after oha exits: the next run would start behind the previous run's uploads.
settle() {
  local before now
  for _ in $(seq 67); do
    before=$( (ticks "$in_pid"; ticks "$out_pid") | tr '\n' ' ')
    sleep 0.3
    now=$( (ticks "$in_pid"; ticks "$out_pid") | tr '\n' ' ')
    [ "$before" != "$now" ] || return 0
  done
  echo "warning: the proxies were still busy 20 s after the previous run" >&2
}
# shellcheck disable=SC2046 # conns prints options, split on purpose
oha_json "$work/warm.json" -z 1s $(conns 64 8)
settle
# shellcheck disable=SC2046
oha_json "$work/lat.json" -z "${seconds}s" $(conns 16 4) -q 1000 --latency-correction
settle
read -r iu0 is0 < <(ticks "$in_pid")
read -r ou0 os0 < <(ticks "$out_pid")
read -r au0 as0 < <(app_ticks)
if [ "$syscalls" = 1 ]; then
  tcp_counters >"$work/tcp0"
  events=raw_syscalls:sys_enter,context-switches,page-faults
  perf stat -x, -e "$events" -o "$work/perf-in.txt" -p "$in_pid" -- sleep "$seconds" &
  pin=$!
  perf stat -x, -e "$events" -o "$work/perf-out.txt" -p "$out_pid" -- sleep "$seconds" &
  pout=$!
fi
if [ -n "$flamegraph" ]; then
  sides=(inbound:"$in_pid")
  [ "$inbound" = 1 ] || sides+=(outbound:"$out_pid")
  recorders=()
  record=(-e cpu-clock -F 1999 --call-graph dwarf,16384)
  for side in "${sides[@]}"; do
    taskset -c 0 perf record -q "${record[@]}" -o "$work/${side%%:*}.perf" -p "${side#*:}" -- sleep "$seconds" 2>>"$work/perf-record.log" &
    recorders+=($!)
  done
fi
# shellcheck disable=SC2046
oha_json "$work/sat.json" -z "${seconds}s" $(conns 64 8)
[ "$syscalls" = 0 ] || { wait "$pin" "$pout"; tcp_counters >"$work/tcp1"; }
if [ -n "$flamegraph" ]; then
  for recorder in "${recorders[@]}"; do
    wait "$recorder" || { echo "--flamegraph: perf record failed: $(cat "$work/perf-record.log")" >&2; exit 1; }
  done
fi
read -r iu1 is1 < <(ticks "$in_pid")
read -r ou1 os1 < <(ticks "$out_pid")
read -r au1 as1 < <(app_ticks)
python3 - "$work" "$(getconf CLK_TCK)" "$seconds" "$syscalls" "$tracing" "$expect" "$inbound" "$iu0" "$is0" "$iu1" "$is1" "$ou0" "$os0" "$ou1" "$os1" "$au0" "$as0" "$au1" "$as1" <<'PY'
import json, sys
work, tck, seconds, syscalls = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
tracing, expect, inbound = sys.argv[5], sys.argv[6], sys.argv[7] == "1"
iu0, is0, iu1, is1, ou0, os0, ou1, os1, au0, as0, au1, as1 = map(int, sys.argv[8:20])
lat = json.load(open(f"{work}/lat.json"))
sat = json.load(open(f"{work}/sat.json"))
p = lat["latencyPercentiles"]
codes = {str(k): v for k, v in (sat.get("statusCodeDistribution") or {}).items()}
ok = codes.get(expect, 0)
if not ok or len(codes) > 1:
    sys.exit(f"not every request was answered {expect}: {codes}")
us = lambda t: t * 1e6 / tck / ok
line = (f"p50 {p['p50'] * 1e6:.0f} µs  p90 {p['p90'] * 1e6:.0f} µs  p99 {p['p99'] * 1e6:.0f} µs  |  "
        f"{ok / seconds:,.0f} req/s  inbound user {us(iu1 - iu0):.1f} sys {us(is1 - is0):.1f} µs/req  ")
if not inbound:
    line += f"outbound user {us(ou1 - ou0):.1f} sys {us(os1 - os0):.1f} µs/req  "
line += f"app user {us(au1 - au0):.1f} sys {us(as1 - as0):.1f} µs/req"
if syscalls:
    def per_request(side, event):
        for row in open(f"{work}/perf-{side}.txt"):
            fields = row.split(",")
            if len(fields) > 2 and event in fields[2]:
                return int(fields[0]) / ok
        return float("nan")
    sides = ("in",) if inbound else ("in", "out")
    for label, event, digits in (("syscalls", "sys_enter", 2), ("context switches", "context-switches", 2),
                                 ("page faults", "page-faults", 3)):
        line += f"  {label}/req " + " ".join(f"{side}bound {per_request(side, event):.{digits}f}" for side in sides)
    (segs0, acks0), (segs1, acks1) = ([int(v) for v in open(f"{work}/tcp{i}").read().split()] for i in (0, 1))
    line += f"  TCP segments/req (whole host, app and client included) {(segs1 - segs0) / ok:.2f}, pure ACKs {(acks1 - acks0) / ok:.2f}"
if tracing:
    try:
        exports, size = open(f"{work}/otlp-count").read().split()
    except OSError:
        sys.exit("tracing was on but the OTLP sink received no export")
    line += f"  otlp exports {exports} ({int(size) / 1024:.0f} KiB)"
print(line)
with open(f"{work}/saturation", "w") as f:  # for --flamegraph's titles and components table
    f.write(f"{ok / seconds:.0f} {us(iu1 - iu0 + is1 - is0):.2f} {us(ou1 - ou0 + os1 - os0):.2f}\n")
PY
if [ -n "$flamegraph" ]; then
  mkdir -p "$flamegraph"
  proxy=meshgate
  [ "$haproxy" = 0 ] || proxy=haproxy
  scenario=mesh
  [ "$inbound" = 0 ] || scenario=inbound
  [ "$h2" = 0 ] || scenario=h2
  [ "$accel" = 0 ] || scenario=$scenario-accel
  read -r rps in_us out_us <"$work/saturation"
  columns=()
  for side in "${sides[@]}"; do
    side=${side%%:*}
    name=$proxy-$scenario-$side
    us=$in_us
    [ "$side" = inbound ] || us=$out_us
    perf script -i "$work/$side.perf" -F comm,tid,period,ip,sym,dso,srcline --full-source-path 2>/dev/null \
      | python3 "$here/flame_components.py" fold "$flamegraph/$name.folded" "$work/$name.json"
    inferno-flamegraph --title "$proxy $side proxy, $scenario scenario, closed loop at 64 connections ($rps req/s, $us µs CPU per request)" \
      --subtitle "perf record ${record[*]}; a frame's width is its share of the samples; kernel frames end in _[k], inlined functions in _[i]" \
      <"$flamegraph/$name.folded" >"$flamegraph/$name.svg"
    columns+=(--us-per-request "$name=$us" "$name=$work/$name.json")
  done
  python3 "$here/flame_components.py" table "${columns[@]}" | tee "$flamegraph/$proxy-$scenario-components.md"
  echo "flame graphs: $(for side in "${sides[@]}"; do printf '%s ' "$flamegraph/$proxy-$scenario-${side%%:*}.svg"; done)"
fi
[ "$accel" = 0 ] || echo "local acceleration: $(accel_counters)"

#!/usr/bin/env bash
# meshgate vs nginx and HAProxy, same machine, same app, equivalent configurations.
#
#   benches/peers/run.sh [--quick [--all-rows]] [--rounds N] [--duration SECONDS] [--json FILE]
#                        [--meshgate PATH] [--base-port PORT] [--wait-quiet MINUTES] [--keep]
#
# Installs nothing: it checks for oha, nginx, haproxy, openssl, python3, taskset, curl and a release
# meshgate binary and says how to get what is missing. Everything it writes goes to a temporary
# directory (removed on exit unless --keep); every process it starts is stopped on exit.
# What it measures and how to read the tables: benches/peers/README.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

rounds=3
dur=10
warm=2
quick=0
all_rows=0
json_out=""
mg=${MESHGATE_BIN:-}
base=19000
wait_quiet=0
keep=0
rate=1000
lat_conns=16
sat_conns=64
hs_conns=16
idle_n=1000
first_n=200

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; rounds=1; dur=1; warm=0.5; first_n=50; shift ;;
    --all-rows) all_rows=1; shift ;;
    --rounds) rounds=$2; shift 2 ;;
    --duration) dur=$2; shift 2 ;;
    --json) json_out=$2; shift 2 ;;
    --meshgate) mg=$2; shift 2 ;;
    --base-port) base=$2; shift 2 ;;
    --wait-quiet) wait_quiet=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- tools (nothing is installed)
missing=0
need() { # NAME HOW-TO-GET-IT
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "missing: $1 — install it with: $2" >&2
    missing=1
  fi
}
need oha "cargo install oha --locked   (then make sure ~/.cargo/bin is on PATH)"
need nginx "apt-get install nginx-light   (any nginx ≥ 1.18 with the ssl module)"
need haproxy "apt-get install haproxy   (≥ 2.4 for HTTP/2 to servers)"
need curl "apt-get install curl"
need openssl "apt-get install openssl"
need python3 "apt-get install python3"
need taskset "apt-get install util-linux"
if [ -z "$mg" ]; then
  mg=${CARGO_TARGET_DIR:-$repo/target}/release/meshgate
fi
if [ ! -x "$mg" ]; then
  echo "missing: meshgate release binary at $mg — build it with: cargo build --release -p meshgate" \
       "(or pass --meshgate PATH / MESHGATE_BIN)" >&2
  missing=1
fi
[ "$missing" = 0 ] || exit 1

# ---------------------------------------------------------------- CPU pinning
# The load generator on one core, the app and every proxy on another (they share it, as a
# sidecar shares its pod's CPU): CLIENT_CPU / SERVER_CPU override.
ncpu=$(nproc)
if [ "$ncpu" -ge 2 ]; then
  client_cpu=${CLIENT_CPU:-0}
  server_cpu=${SERVER_CPU:-1}
  pin_client=(taskset -c "$client_cpu")
  pin_server=(taskset -c "$server_cpu")
  pinning="client on CPU $client_cpu; app and proxies on CPU $server_cpu"
else
  pin_client=()
  pin_server=()
  pinning="not pinned (1 CPU)"
fi

# ---------------------------------------------------------------- work dir and cleanup
work=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-peers.XXXXXX")
pids=()
cleanup() {
  local p
  for p in "${pids[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  for p in "${pids[@]:-}"; do
    [ -n "$p" ] && wait "$p" 2>/dev/null || true
  done
  accel_cleanup 2>/dev/null || true
  if [ "$keep" = 1 ]; then echo "kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- identities and certificates
td=mesh.local
client_id=spiffe://$td/ns/bench/sa/client
app_id=spiffe://$td/ns/bench/sa/app
peer_dns=app.bench.$td   # the name nginx/HAProxy outbound verify on the inbound's certificate
certs=$work/certs
mkdir -p "$certs"
"$mg" ca init --dir "$work/ca" --trust-domain "$td" >/dev/null 2>&1 || die "meshgate ca init failed"
# meshgate sidecars: SVIDs straight from the CA (static files; no CA server during the run).
"$mg" ca issue --dir "$work/ca" --id "$app_id" --out "$work/svid-app" --ttl 24h >/dev/null 2>&1
"$mg" ca issue --dir "$work/ca" --id "$client_id" --out "$work/svid-client" --ttl 24h >/dev/null 2>&1
# The load generator's and the peers' certificates (peer-certs.sh says which).
# shellcheck source=peer-certs.sh
. "$here/peer-certs.sh"

# ---------------------------------------------------------------- configurations
render() { # TEMPLATE OUT KEY=VALUE...
  local tmpl=$1 out=$2 expr=() kv
  shift 2
  for kv in "$@"; do expr+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
  sed "${expr[@]}" "$here/$tmpl" >"$out"
  if grep -q '@[A-Z_]*@' "$out"; then die "unfilled placeholder in $out"; fi
}
app_port=$base
chmod 711 "$work" # nginx workers (user nobody when started as root) read the www files
mkdir -p "$work/www/api" "$work/www/admin"
head -c 1024 /dev/zero | tr '\0' 'x' >"$work/www/api/data"
echo admin >"$work/www/admin/index.html"
cp "$work/www/admin/index.html" "$work/www/admin.html"
client_id_re=$(printf '%s' "$client_id" | sed 's/[.]/\\\\./g')
common=(DIR="$work" CERTS="$certs" APP_PORT="$app_port" CLIENT_ID="$client_id"
        CLIENT_ID_RE="$client_id_re" APP_ID="$app_id" PEER_DNS="$peer_dns")
render nginx-app.conf.tmpl "$work/nginx-app.conf" "${common[@]}"
render nginx-inbound.conf.tmpl "$work/nginx-in.conf" "${common[@]}" IN_PORT=$((base + 10))
render nginx-outbound.conf.tmpl "$work/nginx-out.conf" "${common[@]}" IN_PORT=$((base + 10)) OUT_PORT=$((base + 11))
render haproxy-inbound.cfg.tmpl "$work/haproxy-in.cfg" "${common[@]}" IN_PORT=$((base + 20))
render haproxy-outbound.cfg.tmpl "$work/haproxy-out.cfg" "${common[@]}" IN_PORT=$((base + 20)) OUT_PORT=$((base + 21))
mkdir -p "$work/policy"
render meshgate-policy.yaml.tmpl "$work/policy/bench.yaml" "${common[@]}"

# The proxies. meshgate runs three times: MESHGATE_LOG=warn (quiet, like the peers with access
# logs off), the default level (info, text), and the default level with --log-format json; the
# logs go to files in the work dir. A fourth, meshgate-preserve (quiet, `--mesh-protocol preserve`:
# HTTP/1.1 between the sidecars), runs the mesh-path scenario only. A fifth, meshgate-accel
# (quiet, HTTP/2), runs with meshgate's eBPF local acceleration on its local hops (its own app
# instance and, on the mesh path, the load generator in one cgroup, its sidecars in another;
# accel.sh), when run as root: the product as deployed with `meshgate redirect`, where the peers
# have no such datapath (pair.sh --accel --haproxy measures what the same kernel path gives
# HAProxy). It runs the mesh path and the inbound scenario (whose caller is another pod: mTLS
# over TCP; the hop from the inbound sidecar to its app is the local one).
# A sixth, meshgate-traced, is the default log level with JSON lines and OpenTelemetry tracing on
# (a parent-based trace-ID ratio sampler at 1 %; denials are exported whatever the ratio) toward
# an OTLP/HTTP sink (otlp_sink.py, on the load generator's CPU): the configuration the tracing
# goal is about, in every scenario, beside the quiet one.
proxies=(nginx haproxy meshgate meshgate-info meshgate-json meshgate-traced)
trace_ratio=0.01
sink_port=$((base + 6))
mesh_extra=(meshgate-preserve meshgate-accel)
# --quick is the short check of a change against the peers (about a minute): the
# peers and meshgate's quiet row, its accelerated and HTTP/2 rows, 200 idle connections for the
# memory slope. The log configurations, tracing and --mesh-protocol preserve (table 5, and rows
# of tables 1–4) come back with --all-rows (scripts/pgo-profile.sh trains on them).
if [ "$quick" = 1 ] && [ "$all_rows" = 0 ]; then
  proxies=(nginx haproxy meshgate)
  mesh_extra=(meshgate-accel)
  idle_n=200
fi
# (A binary from before --mesh-protocol, for before/after runs, has no such row.)
"$mg" proxy --help 2>/dev/null | grep -q -- --mesh-protocol || mesh_extra=()
# shellcheck source=accel.sh
. "$here/accel.sh"
accel_app_port=$((base + 5))
if why=$(accel_unavailable); then
  log "no meshgate-accel row: $why"
  kept=()
  for v in "${mesh_extra[@]}"; do [ "$v" = meshgate-accel ] || kept+=("$v"); done
  mesh_extra=("${kept[@]}")
fi
# HTTP/2 end to end, as gRPC traffic runs (scenario "h2"): the client speaks h2c (prior
# knowledge) to the outbound proxy, the proxies speak HTTP/2 over mTLS, and the app is its own
# nginx instance speaking h2c only. nginx cannot proxy HTTP/2 to an upstream (but as gRPC), so
# the peer is HAProxy's pair (haproxy-h2: `proto h2` toward the client and the app); meshgate's
# pair (meshgate-h2) runs with `--app-protocol h2c`. (A binary without --app-protocol has no
# such rows.)
h2_rows=(haproxy-h2 meshgate-h2)
"$mg" proxy --help 2>/dev/null | grep -q -- --app-protocol || h2_rows=()
h2_app_port=$((base + 7))
h2_lat=(-c $((lat_conns / 4)) -p 4 --http2)  # the same concurrency as the HTTP/1.1 runs:
h2_sat=(-c $((sat_conns / 8)) -p 8 --http2)  # connections × streams
# meshgate-accel runs the inbound scenario too: the caller is another pod (mTLS over TCP), and
# the inbound sidecar's hop to its app is the local one.
inbound_extra=()
for v in "${mesh_extra[@]}"; do [ "$v" != meshgate-accel ] || inbound_extra=(meshgate-accel); done
declare -A in_port out_port in_pid out_pid
in_port[nginx]=$((base + 10)); out_port[nginx]=$((base + 11))
in_port[haproxy]=$((base + 20)); out_port[haproxy]=$((base + 21))
k=0
for v in meshgate meshgate-info meshgate-json meshgate-preserve meshgate-accel meshgate-traced meshgate-h2; do
  in_port[$v]=$((base + 30 + 10 * k)); out_port[$v]=$((base + 34 + 10 * k))
  render meshgate-services.yaml.tmpl "$work/services-$v.yaml" "${common[@]}" IN_PORT=${in_port[$v]}
  k=$((k + 1))
done
for v in "${mesh_extra[@]}"; do
  [ "$v" = meshgate-accel ] || continue
  render nginx-app.conf.tmpl "$work/nginx-app-accel.conf" APP_PORT=$accel_app_port "${common[@]}" # the first value of a placeholder wins
  sed -i -e 's|/app.pid;|/app-accel.pid;|' -e 's|/app-error.log |/app-accel-error.log |' "$work/nginx-app-accel.conf"
  accel_setup "meshgate-peers-$$" "${out_port[$v]}" "${in_port[$v]}" "$accel_app_port" || die "local acceleration: attach failed"
done

in_port[haproxy-h2]=$((base + 100)); out_port[haproxy-h2]=$((base + 101))
if [ ${#h2_rows[@]} -gt 0 ]; then
  render nginx-app.conf.tmpl "$work/nginx-app-h2.conf" APP_PORT=$h2_app_port "${common[@]}" # the first value of a placeholder wins
  sed -i -e "s|listen 127.0.0.1:$h2_app_port backlog=4096;|listen 127.0.0.1:$h2_app_port backlog=4096 http2;|" \
    -e 's|/app.pid;|/app-h2.pid;|' -e 's|/app-error.log |/app-h2-error.log |' "$work/nginx-app-h2.conf"
  render haproxy-inbound.cfg.tmpl "$work/haproxy-h2-in.cfg" IN_PORT=${in_port[haproxy-h2]} APP_PORT=$h2_app_port "${common[@]}"
  render haproxy-outbound.cfg.tmpl "$work/haproxy-h2-out.cfg" IN_PORT=${in_port[haproxy-h2]} OUT_PORT=${out_port[haproxy-h2]} "${common[@]}"
  sed -i "s|^\( *bind 127.0.0.1:${out_port[haproxy-h2]}\)\$|\1 proto h2|" "$work/haproxy-h2-out.cfg"
  sed -i "s|^\( *server app 127.0.0.1:$h2_app_port\)\$|\1 proto h2|" "$work/haproxy-h2-in.cfg"
  grep -q 'backlog=4096 http2;' "$work/nginx-app-h2.conf" && grep -q "bind 127.0.0.1:${out_port[haproxy-h2]} proto h2" "$work/haproxy-h2-out.cfg" &&
    grep -q 'server app .* proto h2' "$work/haproxy-h2-in.cfg" || die "h2 scenario: a listen, bind or server line was not found in the templates"
fi

# ---------------------------------------------------------------- process control
start_bg() { # LOGFILE ENV... -- CMD... ; sets $started
  local logf=$1; shift
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" "${pin_server[@]}" "$@" >"$logf" 2>&1 &
  started=$!
  pids+=("$started")
}
wait_port() { # PORT PID NAME
  local i
  for i in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || die "$3 exited at start (log in $work)"
    sleep 0.1
  done
  die "$3 did not listen on $1"
}
wait_ready() { # ADMIN_PORT PID NAME
  local i
  for i in $(seq 100); do
    if python3 - "$1" <<'EOF' 2>/dev/null; then return 0; fi
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=1).status == 200 else 1)
EOF
    kill -0 "$2" 2>/dev/null || die "$3 exited at start (log in $work/$3*.log)"
    sleep 0.1
  done
  die "$3 not ready on admin port $1"
}
start_meshgate() { # VARIANT
  local v=$1 ip=${in_port[$1]} op=${out_port[$1]} lvl=() fmt=() carry=() app=$app_port cg=() tel=(--no-tracing) proto=()
  case $v in
    meshgate) lvl=(MESHGATE_LOG=warn) ;;
    meshgate-h2) lvl=(MESHGATE_LOG=warn); app=$h2_app_port; proto=(--app-protocol h2c) ;;
    meshgate-accel) lvl=(MESHGATE_LOG=warn); app=$accel_app_port; cg=("${in_sidecar_cg[@]}") ;;
    meshgate-preserve) lvl=(MESHGATE_LOG=warn); carry=(--mesh-protocol preserve) ;;
    meshgate-info) lvl=(MESHGATE_LOG=info) ;;
    meshgate-json) lvl=(MESHGATE_LOG=info); fmt=(--log-format json) ;;
    meshgate-traced)
      lvl=(MESHGATE_LOG=info OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink_port
           OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=$trace_ratio)
      fmt=(--log-format json); tel=() ;;
  esac
  # Inbound sidecar (the app's): mTLS listener ip, its own outbound and admin ports unused.
  start_bg "$work/$v-in.log" "${lvl[@]}" -- "${cg[@]}" "$mg" proxy "${fmt[@]}" --app 127.0.0.1:$app "${proto[@]}" \
    --svid-cert "$work/svid-app/svid.pem" --svid-key "$work/svid-app/key.pem" \
    --trust-bundle "$work/svid-app/bundle.pem" --policy-dir "$work/policy" \
    --inbound 127.0.0.1:$ip --outbound 127.0.0.1:$((ip + 1)) --admin 127.0.0.1:$((ip + 2)) "${tel[@]}"
  in_pid[$v]=$started
  # Outbound sidecar (the client's): plain HTTP listener op → mTLS/HTTP2 → the inbound sidecar.
  start_bg "$work/$v-out.log" "${lvl[@]}" -- "${cg[@]}" "$mg" proxy "${fmt[@]}" "${carry[@]}" --app 127.0.0.1:$app \
    --svid-cert "$work/svid-client/svid.pem" --svid-key "$work/svid-client/key.pem" \
    --trust-bundle "$work/svid-client/bundle.pem" --policy-dir "$work/policy" \
    --services "$work/services-$v.yaml" \
    --inbound 127.0.0.1:$((op - 1)) --outbound 127.0.0.1:$op --admin 127.0.0.1:$((op + 1)) "${tel[@]}"
  out_pid[$v]=$started
  wait_ready $((ip + 2)) "${in_pid[$v]}" "$v-in"
  wait_ready $((op + 1)) "${out_pid[$v]}" "$v-out"
}
traced() { [[ " ${proxies[*]} " == *" meshgate-traced "* ]]; } # is the traced row measured?
start_all() {
  start_bg "$work/app.log" -- nginx -p "$work" -e "$work/app-error.log" -c "$work/nginx-app.conf"
  app_pid=$started
  wait_port "$app_port" "$app_pid" app
  if [ -n "$accel_dir" ]; then
    # meshgate-accel's own app: the same nginx configuration on its own port, in the app cgroup.
    start_bg "$work/app-accel.log" -- "${in_app_cg[@]}" nginx -p "$work" -e "$work/app-accel-error.log" -c "$work/nginx-app-accel.conf"
    wait_port "$accel_app_port" "$started" app-accel
  fi
  start_bg "$work/nginx-in.log" -- nginx -p "$work" -e "$work/nginx-in-error.log" -c "$work/nginx-in.conf"
  in_pid[nginx]=$started
  start_bg "$work/nginx-out.log" -- nginx -p "$work" -e "$work/nginx-out-error.log" -c "$work/nginx-out.conf"
  out_pid[nginx]=$started
  start_bg "$work/haproxy-in.log" -- haproxy -db -f "$work/haproxy-in.cfg"
  in_pid[haproxy]=$started
  start_bg "$work/haproxy-out.log" -- haproxy -db -f "$work/haproxy-out.cfg"
  out_pid[haproxy]=$started
  local p peers=(nginx haproxy)
  if [ ${#h2_rows[@]} -gt 0 ]; then
    start_bg "$work/app-h2.log" -- nginx -p "$work" -e "$work/app-h2-error.log" -c "$work/nginx-app-h2.conf"
    h2_app_pid=$started
    wait_port "$h2_app_port" "$h2_app_pid" app-h2
    start_bg "$work/haproxy-h2-in.log" -- haproxy -db -f "$work/haproxy-h2-in.cfg"
    in_pid[haproxy-h2]=$started
    start_bg "$work/haproxy-h2-out.log" -- haproxy -db -f "$work/haproxy-h2-out.cfg"
    out_pid[haproxy-h2]=$started
    peers+=(haproxy-h2)
  fi
  for p in "${peers[@]}"; do
    wait_port "${in_port[$p]}" "${in_pid[$p]}" "$p-in"
    wait_port "${out_port[$p]}" "${out_pid[$p]}" "$p-out"
  done
  # meshgate-traced's OTLP receiver, on the load generator's CPU; it counts what it receives.
  rm -f "$work/otlp-count"
  if traced; then
    "${pin_client[@]}" python3 "$here/otlp_sink.py" "$sink_port" "$work/otlp-count" >"$work/otlp-sink.log" 2>&1 &
    pids+=($!)
    wait_port "$sink_port" "$!" otlp-sink
  fi
  for p in "${proxies[@]}" "${mesh_extra[@]}"; do
    case $p in meshgate*) start_meshgate "$p" ;; esac
  done
  [ ${#h2_rows[@]} = 0 ] || start_meshgate meshgate-h2
  sleep 0.5 # let nginx workers settle before reading their RSS
}
stop_all() {
  local p
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  pids=()
}

# The load generator joins the app's cgroup for meshgate-accel (it is the app calling out);
# for every other proxy it stays where it is.
oha_cg=()
client_cgroup() { # PROXY
  if [ "$1" = meshgate-accel ]; then oha_cg=("${in_app_cg[@]}"); else oha_cg=(); fi
}

# A process and its children (nginx: master + worker).
tree() { echo "$1"; pgrep -P "$1" || true; }
cpu_ticks() { # PID → utime+stime of the process tree, in clock ticks
  local t=0 p f
  for p in $(tree "$1"); do
    f=$(cut -d')' -f2- "/proc/$p/stat" 2>/dev/null) || continue
    set -- $f
    t=$((t + ${12} + ${13}))
  done
  echo "$t"
}
rss_kib() { # PID [FIELD] → VmRSS (or another field of /proc/PID/status, e.g. RssFile) of the process tree, KiB
  local t=0 p v field=${2:-VmRSS}
  for p in $(tree "$1"); do
    v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
clk_tck=$(getconf CLK_TCK)

# ---------------------------------------------------------------- measurements
results=$work/results.tsv
: >"$results"
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$results"; } # round scenario proxy metric value

tls_args=(--cert "$certs/client-chain.pem" --key "$certs/client.key" --insecure)
oha_run() { # OUT-JSON DURATION ARGS... (the load generator runs in $oha_cg's cgroup, if set)
  local out=$1 d=$2; shift 2
  "${oha_cg[@]}" "${pin_client[@]}" oha --no-tui --output-format json -z "${d}s" -w "$@" >"$out" 2>"$out.err" \
    || die "oha failed: $* ($(head -c 300 "$out.err"))"
}
url_in() { # PROXY PATH → URL of the inbound side (direct: the app)
  if [ "$1" = direct ]; then echo "http://127.0.0.1:$app_port$2"; else echo "https://127.0.0.1:${in_port[$1]}$2"; fi
}
url_out() { # PROXY PATH → URL of the outbound side (direct: the app)
  if [ "$1" = direct ]; then echo "http://127.0.0.1:$app_port$2"; else echo "http://127.0.0.1:${out_port[$1]}$2"; fi
}
targs() { [ "$1" = direct ] || printf '%s\n' "${tls_args[@]}"; }

# Equivalence check before measuring: every proxy allows /api/data for the client identity and
# refuses /admin and paths outside /api/; the inbound side refuses a caller without a certificate.
check_acl() {
  local p code
  for p in "${proxies[@]}"; do
    for path_code in /api/data=200 /admin=403 /other=403; do
      code=$(python3 - "${in_port[$p]}" "${path_code%=*}" "$certs/client-chain.pem" "$certs/client.key" <<'EOF'
import http.client, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), context=ctx, timeout=5)
c.request("GET", sys.argv[2]); r = c.getresponse(); body = r.read(); print(r.status, len(body), c.sock.cipher()[0])
EOF
)
      read -r status size suite <<<"$code"
      [ "$status" = "${path_code#*=}" ] || die "$p inbound: GET ${path_code%=*} gave $code, expected ${path_code#*=}"
      [ "$path_code" != /api/data=200 ] || [ "$size" = 1024 ] || die "$p inbound: /api/data body is not 1 KiB ($code)"
      # Python's OpenSSL lists AES-256-GCM first; every proxy is configured to choose AES-128-GCM.
      [ "$suite" = TLS_AES_128_GCM_SHA256 ] || die "$p inbound: negotiated $suite, expected TLS_AES_128_GCM_SHA256 (the proxies are configured alike)"
      code=$(python3 - "${out_port[$p]}" "${path_code%=*}" <<'EOF'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=5)
c.request("GET", sys.argv[2], headers={"Host": "app"}); r = c.getresponse(); r.read(); print(r.status)
EOF
)
      [ "$code" = "${path_code#*=}" ] || die "$p mesh path: GET ${path_code%=*} gave $code, expected ${path_code#*=}"
    done
    if python3 - "${in_port[$p]}" <<'EOF' 2>/dev/null; then die "$p inbound: served a caller without a client certificate"; fi
import http.client, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), context=ctx, timeout=5)
c.request("GET", "/api/data"); r = c.getresponse(); r.read(); sys.exit(0 if r.status == 200 else 1)
EOF
  done
  log "ACL check passed: /api/data 200, /admin 403, /other 403, no client certificate refused (inbound and mesh path, every proxy); every inbound proxy chose TLS_AES_128_GCM_SHA256"
  for p in "${h2_rows[@]}"; do
    for path_code in /api/data=200 /admin=403 /other=403; do
      code=$(curl -s -o /dev/null -w '%{http_code} %{http_version}' --http2-prior-knowledge -H 'Host: app' \
        "http://127.0.0.1:${out_port[$p]}${path_code%=*}" || true)
      [ "$code" = "${path_code#*=} 2" ] || die "$p (HTTP/2 end to end): GET ${path_code%=*} gave '$code', expected '${path_code#*=} 2' (status, HTTP version)"
    done
  done
  [ ${#h2_rows[@]} = 0 ] || log "ACL check passed for HTTP/2 end to end (h2c client, ${h2_rows[*]})"
}

quiet_pattern='ci-from-clean-clone|cargo test|cargo build|rustc'
wait_for_quiet() {
  [ "$wait_quiet" != 0 ] || return 0
  # One budget for the whole run: after it is spent, rounds start without waiting.
  [ -n "${quiet_deadline:-}" ] || quiet_deadline=$(( $(date +%s) + wait_quiet * 60 ))
  local deadline=$quiet_deadline others
  while :; do
    others=$(pgrep -f "$quiet_pattern" | grep -vx -e "$$" -e "$BASHPID" || true)
    [ -z "$others" ] && { log "machine quiet"; return 0; }
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "machine not quiet (waiting budget of $wait_quiet min spent); measuring anyway"
      echo "not quiet" >>"$work/quiet"
      return 0
    fi
    log "waiting for a quiet machine (busy: $(echo "$others" | wc -l) processes)"
    sleep 20
  done
}

# Order of proxies within a scenario rotates with the round, so no proxy always runs first.
order() { # ROUND WITH-DIRECT(0/1) [MORE PROXIES...]
  local list=() i n
  [ "$2" = 1 ] && list=(direct)
  list+=("${proxies[@]}" "${@:3}")
  n=${#list[@]}
  for ((i = 0; i < n; i++)); do echo "${list[$(( (i + $1 - 1) % n ))]}"; done
}

# A saturation run on a path through two proxies, and the CPU it cost them (the app's, on the
# direct path): ROUND SCENARIO PROXY APP_PID OHA-ARGS...
sat_with_cpu() {
  local r=$1 scen=$2 p=$3 app=$4 ti to
  shift 4
  if [ "$p" = direct ]; then ti=$(cpu_ticks "$app"); to=0; else ti=$(cpu_ticks "${in_pid[$p]}"); to=$(cpu_ticks "${out_pid[$p]}"); fi
  oha_run "$work/r$r-$scen-sat-$p.json" "$dur" "$@"
  record "$r" "$scen" "$p" sat "$work/r$r-$scen-sat-$p.json"
  if [ "$p" = direct ]; then
    record "$r" "$scen" "$p" cpu_in_ticks $(( $(cpu_ticks "$app") - ti ))
  else
    record "$r" "$scen" "$p" cpu_in_ticks $(( $(cpu_ticks "${in_pid[$p]}") - ti ))
    record "$r" "$scen" "$p" cpu_out_ticks $(( $(cpu_ticks "${out_pid[$p]}") - to ))
  fi
}

# The HTTP/2 end-to-end rows, rotated the same way.
order_h2() { # ROUND
  local list=(direct "${h2_rows[@]}") i n=$((${#h2_rows[@]} + 1))
  for ((i = 0; i < n; i++)); do echo "${list[$(( (i + $1 - 1) % n ))]}"; done
}
url_h2() { # PROXY → oha's host and URL on the HTTP/2 end-to-end path (direct: the h2c app, whose
  # nginx refuses a Host that differs from :authority)
  if [ "$1" = direct ]; then echo "http://127.0.0.1:$h2_app_port/api/data"; else echo "--host app http://127.0.0.1:${out_port[$1]}/api/data"; fi
}

idle_conns() { # PROXY OUT N [idle_conns.py ARGS...]: opens N idle connections in the background
  # (its pid appended to $ipids); wait_idle waits until they are open.
  local p=$1 out=$2 n=$3
  shift 3
  "${pin_client[@]}" python3 "$here/idle_conns.py" --port "${in_port[$p]}" -n "$n" \
    --cert "$certs/client-chain.pem" --key "$certs/client.key" "$@" >"$out" 2>&1 &
  ipids+=($!)
}

wait_idle() { # KIND: waits until every proxy's idle_conns.py writing $work/KIND-PROXY.out has
  # tried all its connections, then 2 s more: past meshgate's 1 s park delay, so the RSS read next
  # is what a pool's idle connections hold.
  local p i
  for p in "${proxies[@]}"; do
    for i in $(seq 600); do grep -q ready "$work/$1-$p.out" 2>/dev/null && break; sleep 0.1; done
  done
  sleep 2
}

idle_rss() { # ROUND SUFFIX [idle_conns.py ARGS...]: for every proxy, RSS fresh, then with one
  # warm-up connection, then with $idle_n idle connections more. Per connection is the slope, from
  # the warm-up on: the first connection also faults in the code of the handshake and of the
  # request path once (file-backed pages, ≈ 1 MiB for meshgate), which is recorded on its own.
  # The proxies are measured side by side (each one's RSS counts only its own connections), so
  # the waits are paid once rather than once per proxy.
  local r=$1 sfx=$2 p ipids=() opened failed
  shift 2
  for p in "${proxies[@]}"; do record "$r" rss "$p" "fresh${sfx}_kib" "$(rss_kib "${in_pid[$p]}")"; done
  for p in "${proxies[@]}"; do idle_conns "$p" "$work/warm-$p.out" 1 "$@"; done
  wait_idle warm
  for p in "${proxies[@]}"; do record "$r" rss "$p" "warm${sfx}_kib" "$(rss_kib "${in_pid[$p]}")"; done
  for p in "${proxies[@]}"; do idle_conns "$p" "$work/idle-$p.out" "$idle_n" "$@"; done
  wait_idle idle
  for p in "${proxies[@]}"; do record "$r" rss "$p" "idle${sfx}_kib" "$(rss_kib "${in_pid[$p]}")"; done
  kill "${ipids[@]}" 2>/dev/null || true; wait "${ipids[@]}" 2>/dev/null || true
  for p in "${proxies[@]}"; do
    read -r _ opened failed <"$work/idle-$p.out" || { opened=0; failed=$idle_n; }
    grep -q '^ready 1 0' "$work/warm-$p.out" || log "warning: $p: the warm-up connection failed${sfx:+ (after a request)}"
    record "$r" rss "$p" "idle${sfx}_opened" "$opened"
    [ "$failed" = 0 ] || log "warning: $p: $failed of $idle_n idle connections failed${sfx:+ (after a request)}"
  done
  sleep 0.5
}

run_round() {
  local r=$1 p t0 pi po
  start_all
  # RSS: fresh (before any request: the ACL check comes after), then with 1000 idle mTLS
  # connections (inbound side) that have sent no request.
  for p in "${proxies[@]}"; do
    # File-backed pages (the binary's code and data, shared libraries): shared with every
    # process that maps the same files, unlike the anonymous rest.
    record "$r" rss "$p" fresh_file_kib "$(rss_kib "${in_pid[$p]}" RssFile)"
  done
  idle_rss "$r" ""
  # Then on fresh processes again (freed memory is not given back, so the same processes would
  # hide it), 1000 connections that each sent one kept-alive request first: idle as a client's
  # pool holds them between requests.
  stop_all
  start_all
  idle_rss "$r" _req --request /api/data
  [ "$r" = 1 ] && check_acl
  # Warm-up: each path once, closed loop, not recorded.
  for p in "${proxies[@]}" "${inbound_extra[@]}"; do
    oha_run "$work/warm.json" "$warm" -c "$sat_conns" --http-version 1.1 $(targs "$p") "$(url_in "$p" /api/data)"
  done
  for p in "${proxies[@]}" "${mesh_extra[@]}"; do
    client_cgroup "$p"
    oha_run "$work/warm.json" "$warm" -c "$sat_conns" --http-version 1.1 --host app "$(url_out "$p" /api/data)"
  done
  # 1. inbound: fixed-rate latency, then saturation with CPU per request.
  for p in $(order "$r" 1 "${inbound_extra[@]}"); do
    oha_run "$work/r$r-inbound-lat-$p.json" "$dur" -q "$rate" --latency-correction -c "$lat_conns" \
      --http-version 1.1 $(targs "$p") "$(url_in "$p" /api/data)"
    record "$r" inbound "$p" lat "$work/r$r-inbound-lat-$p.json"
  done
  for p in $(order "$r" 1 "${inbound_extra[@]}"); do
    [ "$p" = direct ] && pi=$app_pid || pi=${in_pid[$p]}
    t0=$(cpu_ticks "$pi")
    oha_run "$work/r$r-inbound-sat-$p.json" "$dur" -c "$sat_conns" --http-version 1.1 $(targs "$p") "$(url_in "$p" /api/data)"
    record "$r" inbound "$p" sat "$work/r$r-inbound-sat-$p.json"
    record "$r" inbound "$p" cpu_in_ticks $(( $(cpu_ticks "$pi") - t0 ))
  done
  # 2. mesh path: client → outbound proxy → mTLS → inbound proxy → app.
  for p in $(order "$r" 1 "${mesh_extra[@]}"); do
    client_cgroup "$p"
    oha_run "$work/r$r-mesh-lat-$p.json" "$dur" -q "$rate" --latency-correction -c "$lat_conns" \
      --http-version 1.1 --host app "$(url_out "$p" /api/data)"
    record "$r" mesh "$p" lat "$work/r$r-mesh-lat-$p.json"
  done
  for p in $(order "$r" 1 "${mesh_extra[@]}"); do
    client_cgroup "$p"
    sat_with_cpu "$r" mesh "$p" "$app_pid" -c "$sat_conns" --http-version 1.1 --host app "$(url_out "$p" /api/data)"
  done
  oha_cg=()
  # 2b. HTTP/2 end to end: h2c client → outbound proxy → mTLS/HTTP2 → inbound proxy → h2c app.
  if [ ${#h2_rows[@]} -gt 0 ]; then
    for p in "${h2_rows[@]}"; do
      # shellcheck disable=SC2046 # url_h2 prints options and the URL, split on purpose
      oha_run "$work/warm.json" "$warm" "${h2_sat[@]}" $(url_h2 "$p")
    done
    for p in $(order_h2 "$r"); do
      # shellcheck disable=SC2046 # url_h2 prints options and the URL, split on purpose
      oha_run "$work/r$r-h2-lat-$p.json" "$dur" -q "$rate" --latency-correction "${h2_lat[@]}" $(url_h2 "$p")
      record "$r" h2 "$p" lat "$work/r$r-h2-lat-$p.json"
    done
    for p in $(order_h2 "$r"); do
      # shellcheck disable=SC2046 # url_h2 prints options and the URL, split on purpose
      sat_with_cpu "$r" h2 "$p" "$h2_app_pid" "${h2_sat[@]}" $(url_h2 "$p")
    done
  fi
  # 4. handshakes: a new mTLS connection per request, closed loop.
  for p in $(order "$r" 0); do
    t0=$(cpu_ticks "${in_pid[$p]}")
    oha_run "$work/r$r-handshake-$p.json" "$dur" -c "$hs_conns" --disable-keepalive --http-version 1.1 \
      "${tls_args[@]}" "$(url_in "$p" /api/data)"
    record "$r" handshake "$p" sat "$work/r$r-handshake-$p.json"
    record "$r" handshake "$p" cpu_in_ticks $(( $(cpu_ticks "${in_pid[$p]}") - t0 ))
  done
  # 4b. the first request on a new connection from a client with Nagle on (handshake not timed).
  for p in $(order "$r" 0); do
    local line
    line=$("${pin_client[@]}" python3 "$here/first_request.py" --port "${in_port[$p]}" -n "$first_n" \
      --cert "$certs/client-chain.pem" --key "$certs/client.key" 2>&1 | tail -1) || true
    read -r _ p50 p90 ok failed <<<"$line" || true
    if [ "${ok:-0}" -gt 0 ] 2>/dev/null; then
      record "$r" first "$p" p50_us "$p50"
      record "$r" first "$p" p90_us "$p90"
    fi
    [ "${failed:-1}" = 0 ] || log "warning: $p: first requests: $line"
  done
  # meshgate-traced must have exported spans, or its row measured tracing off.
  local exports=0 bytes=0
  if traced; then
    [ -s "$work/otlp-count" ] && read -r exports bytes <"$work/otlp-count"
    record "$r" tracing meshgate-traced exports "$exports"
    record "$r" tracing meshgate-traced export_bytes "$bytes"
    [ "$exports" -gt 0 ] || log "warning: meshgate-traced: the OTLP sink received no export in round $r: its row measured no tracing (logs in $work)"
  fi
  stop_all
}

log "meshgate vs nginx and HAProxy: $rounds round(s) of ${dur}s runs; $pinning; work dir $work"
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for ((r = 1; r <= rounds; r++)); do
  wait_for_quiet
  log "round $r/$rounds"
  run_round "$r"
done

quiet_note="quiet"
if [ "$wait_quiet" = 0 ]; then quiet_note="not checked"; elif [ -s "$work/quiet" ]; then quiet_note="NOT quiet for $(wc -l <"$work/quiet") round(s)"; fi
python3 "$here/report.py" "$results" --clk-tck "$clk_tck" --idle-n "$idle_n" \
  --meta "started=$started_at" --meta "rounds=$rounds" --meta "duration_s=$dur" \
  --meta "pinning=$pinning" --meta "machine_quiet=$quiet_note" --meta "rate=$rate" \
  --meta "lat_conns=$lat_conns" --meta "sat_conns=$sat_conns" --meta "hs_conns=$hs_conns" --meta "first_n=$first_n" \
  ${json_out:+--json "$json_out"}

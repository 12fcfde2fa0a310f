# Shared by callgrind.sh and pair.sh (sourced, not run): one CA, the app's and the client's
# SVIDs, the bench policy and Service, and an nginx app serving a 1 KiB /api/data, in $work.
# Needs: $here (this directory), $mg (a meshgate binary), $base; $work_name names the work
# directory, $keep=1 keeps it.
# Sets: work (a new directory, removed on exit), pids (the caller adds every process it starts:
# they are stopped on exit), td, client_id, app_id, app_port, in_port, out_port; defines
# ready ADMIN_PORT. The caller starts the app (`start_app [PREFIX...]`) and the sidecars.
work=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-${work_name:-bench}.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${keep:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
td=mesh.local
client_id=spiffe://$td/ns/bench/sa/client
app_id=spiffe://$td/ns/bench/sa/app
app_port=$base
in_port=$((base + 10))
out_port=$((base + 20))
"$mg" ca init --dir "$work/ca" --trust-domain "$td" >/dev/null 2>&1
"$mg" ca issue --dir "$work/ca" --id "$app_id" --out "$work/svid-app" --ttl 24h >/dev/null 2>&1
"$mg" ca issue --dir "$work/ca" --id "$client_id" --out "$work/svid-client" --ttl 24h >/dev/null 2>&1
chmod 711 "$work"
mkdir -p "$work/www/api" "$work/policy"
head -c 1024 /dev/zero | tr '\0' 'x' >"$work/www/api/data"
echo ok >"$work/www/api/upload" # /api/upload's handler (nginx-app.conf.tmpl)
render() { # TEMPLATE OUT KEY=VALUE...
  local tmpl=$1 out=$2 expr=() kv
  shift 2
  for kv in "$@"; do expr+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
  sed "${expr[@]}" "$here/$tmpl" >"$out"
}
client_id_re=$(printf '%s' "$client_id" | sed 's/[.]/\\\\./g')
common=(DIR="$work" CERTS="$work" APP_PORT="$app_port" CLIENT_ID="$client_id"
        CLIENT_ID_RE="$client_id_re" APP_ID="$app_id" PEER_DNS="app.bench.$td" IN_PORT="$in_port")
render nginx-app.conf.tmpl "$work/nginx-app.conf" "${common[@]}"
render meshgate-policy.yaml.tmpl "$work/policy/bench.yaml" "${common[@]}"
render meshgate-services.yaml.tmpl "$work/services.yaml" "${common[@]}"

start_app() { # [PREFIX...] (e.g. taskset -c 1)
  "$@" nginx -p "$work" -e "$work/app-error.log" -c "$work/nginx-app.conf" >"$work/app.log" 2>&1 &
  pids+=($!)
}

# HTTP/2 end to end (pair.sh and callgrind.sh --h2): the app's listener speaks h2c only (nginx:
# `http2` on a plain listener takes prior knowledge), and start_haproxy_pair's pair speaks h2c
# to the client and to the app. Before start_app.
app_h2c() {
  sed -i "s|listen 127.0.0.1:$app_port backlog=4096;|listen 127.0.0.1:$app_port backlog=4096 http2;|" "$work/nginx-app.conf"
  grep -q 'backlog=4096 http2;' "$work/nginx-app.conf" || { echo "--h2: the app's listener was not found in nginx-app.conf" >&2; exit 1; }
  hap_h2=1
}

ready() { # ADMIN_PORT
  local i
  for i in $(seq 600); do
    if python3 -c "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$1/ready', timeout=2).status == 200 else 1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  echo "sidecar with admin port $1 did not become ready (logs in $work)" >&2
  exit 1
}

# run.sh's HAProxy pair (HTTP/2 between its proxies, the peers' certificates, the same ACL and
# keep-alive), for callgrind.sh --haproxy and pair.sh --haproxy: the inbound HAProxy listens on
# IN_PORT, the outbound one on OUT_PORT, each started in the background as `LAUNCHER in|out
# haproxy ...` (the caller's pinning or valgrind; a function that must `exec`, so that the PIDs
# are the proxies'). Sets hap_in_pid and hap_out_pid and returns once the pair answers
# /api/data. hap_h2=1: HTTP/2 end to end (h2c on the outbound listener and to the app, whose
# listener must then speak h2c). Needs haproxy, openssl, curl.
start_haproxy_pair() { # IN_PORT OUT_PORT LAUNCHER
  local h_in=$1 h_out=$2 launch=$3 _
  die() { echo "error: $*" >&2; exit 1; }
  certs=$work/certs
  peer_dns=app.bench.$td
  # shellcheck source=peer-certs.sh
  . "$here/peer-certs.sh"
  # Overrides first: the first substitution of a placeholder wins.
  render haproxy-inbound.cfg.tmpl "$work/haproxy-in.cfg" CERTS="$certs" IN_PORT="$h_in" "${common[@]}"
  render haproxy-outbound.cfg.tmpl "$work/haproxy-out.cfg" CERTS="$certs" IN_PORT="$h_in" OUT_PORT="$h_out" "${common[@]}"
  local h2c=()
  if [ "${hap_h2:-0}" = 1 ]; then # HTTP/2 end to end (pair.sh --h2): h2c from the client and to the app
    h2c=(--http2-prior-knowledge)
    sed -i "s|^\( *bind 127.0.0.1:$h_out\)\$|\1 proto h2|" "$work/haproxy-out.cfg"
    sed -i "s|^\( *server app 127.0.0.1:$app_port\)\$|\1 proto h2|" "$work/haproxy-in.cfg"
    grep -q "bind 127.0.0.1:$h_out proto h2" "$work/haproxy-out.cfg" && grep -q 'server app .* proto h2' "$work/haproxy-in.cfg" ||
      die "hap_h2: the listener or the app server line was not found in the HAProxy configurations"
  fi
  "$launch" in haproxy -db -f "$work/haproxy-in.cfg" >"$work/haproxy-in.log" 2>&1 &
  hap_in_pid=$!
  pids+=("$hap_in_pid")
  "$launch" out haproxy -db -f "$work/haproxy-out.cfg" >"$work/haproxy-out.log" 2>&1 &
  hap_out_pid=$!
  pids+=("$hap_out_pid")
  for _ in $(seq 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "${h2c[@]}" -H 'Host: app' "http://127.0.0.1:$h_out/api/data" || true)" = 200 ] && return 0
    sleep 0.2
  done
  echo "the HAProxy pair did not answer on port $h_out (logs in $work)" >&2
  exit 1
}

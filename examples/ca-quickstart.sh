#!/usr/bin/env bash
# meshgate CA quick start: create a CA, serve it, and let a workload obtain an SVID with a join
# token using only openssl and curl. Everything lives in a temporary directory that is removed
# at the end. Needs: cargo, openssl, curl.   Port: MESHGATE_CA_PORT (default 15012).
set -euo pipefail
cd "$(dirname "$0")/.."
port=${MESHGATE_CA_PORT:-15012}
for tool in openssl curl python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed (apt-get install $tool)" >&2; exit 1; }
done

# MESHGATE_BIN: use an already built binary (the test suite does).
if [ -n "${MESHGATE_BIN:-}" ]; then
  mg=$MESHGATE_BIN
else
  cargo build --quiet --bin meshgate
  mg=$PWD/target/debug/meshgate
fi
work=$(mktemp -d)
ca_pid=""
cleanup() { [ -n "$ca_pid" ] && kill "$ca_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
id=spiffe://mesh.local/ns/shop/sa/web

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step meshgate ca init --dir ./ca --trust-domain mesh.local
"$mg" ca init --dir ./ca --trust-domain mesh.local

step meshgate ca serve --dir ./ca --listen 127.0.0.1:$port "&"
"$mg" ca serve --dir ./ca --listen 127.0.0.1:$port 2>ca.log &
ca_pid=$!
for _ in $(seq 50); do
  curl -sf --cacert ./ca/root.pem "https://localhost:$port/healthz" >/dev/null 2>&1 && break
  kill -0 "$ca_pid" 2>/dev/null || { cat ca.log >&2; echo "error: the CA did not start (port $port taken? set MESHGATE_CA_PORT)" >&2; exit 1; }
  sleep 0.1
done

step "TOKEN=\$(meshgate ca token --dir ./ca --id $id --ttl 10m)"
TOKEN=$("$mg" ca token --dir ./ca --id "$id" --ttl 10m)
echo "$TOKEN"

step openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /O=web -addext subjectAltName=URI:$id -keyout key.pem -out csr.pem
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /O=web \
  -addext "subjectAltName=URI:$id" -keyout key.pem -out csr.pem 2>/dev/null

step curl --cacert ./ca/root.pem -H "Authorization: Bearer \$TOKEN" --data-binary @csr.pem https://localhost:$port/v1/svid
curl -sS --fail-with-body --cacert ./ca/root.pem -H "Authorization: Bearer $TOKEN" \
  --data-binary @csr.pem "https://localhost:$port/v1/svid" >svid.json
python3 -c 'import json,sys; d=json.load(open("svid.json")); open("svid.pem","w").write(d["svid_pem"]); print({k: d[k] for k in ("spiffe_id","serial","not_after")})'

step meshgate ca inspect svid.pem --bundle ./ca/bundle.pem
"$mg" ca inspect svid.pem --bundle ./ca/bundle.pem

step openssl verify -CAfile ./ca/root.pem -untrusted ./ca/intermediate.pem svid.pem
openssl verify -CAfile ./ca/root.pem -untrusted ./ca/intermediate.pem svid.pem

step "the same token again (single use) →"
curl -sS --cacert ./ca/root.pem -H "Authorization: Bearer $TOKEN" \
  --data-binary @csr.pem "https://localhost:$port/v1/svid"; echo

step "CA log (one structured line per issuance and refusal):"
cat ca.log

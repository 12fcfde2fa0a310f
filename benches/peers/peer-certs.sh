# Shared by run.sh and callgrind.sh (sourced, not run): the certificates nginx and HAProxy use,
# signed with openssl by the meshgate CA's intermediate (P-256, like the SVIDs). The client
# certificate carries the SPIFFE ID as its URI SAN (what meshgate checks) and as its subject CN
# (what nginx and HAProxy can check); the peers' server certificate adds a DNS name their
# outbound side verifies.
# Needs: $work (with the CA in $work/ca), $certs (a directory), $client_id, $app_id, $peer_dns,
# and a `die MESSAGE` function. Writes NAME.pem, NAME.key, NAME-chain.pem, NAME-full.pem for
# `client` and `peer-in` in $certs, and root.pem.
leaf() { # NAME SUBJECT SAN
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
    -keyout "$certs/$1.key" -out "$certs/$1.csr" 2>"$certs/$1.err" || die "openssl req: $(cat "$certs/$1.err")"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$3" >"$certs/$1.ext"
  openssl x509 -req -in "$certs/$1.csr" -CA "$work/ca/intermediate.pem" \
    -CAkey "$work/ca/intermediate.key" -CAcreateserial -days 2 -sha256 \
    -extfile "$certs/$1.ext" -out "$certs/$1.pem" 2>"$certs/$1.err" || die "openssl x509: $(cat "$certs/$1.err")"
  cat "$certs/$1.pem" "$work/ca/intermediate.pem" >"$certs/$1-chain.pem"
  cat "$certs/$1-chain.pem" "$certs/$1.key" >"$certs/$1-full.pem"
  chmod 600 "$certs/$1.key" "$certs/$1-full.pem"
}
mkdir -p "$certs"
cp "$work/ca/root.pem" "$certs/root.pem"
leaf client "/O=meshgate/CN=${client_id//\//\\/}" "URI:$client_id"
leaf peer-in "/O=meshgate/CN=$peer_dns" "URI:$app_id,DNS:$peer_dns"

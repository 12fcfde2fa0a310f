#!/usr/bin/env bash
# Regenerates pgo/meshgate.profdata.gz, the execution profile the release build is optimized with
# (profile-guided optimization: scripts/release-build.sh, BENCHMARKS.md "Profile-guided
# optimization"). Run it after changes to the request path, and commit the new profile.
#
# Usage: scripts/pgo-profile.sh [--keep]
#
# 1. Builds an instrumented release binary (`-Cprofile-generate`) in target/pgo-instrumented.
# 2. Runs it through the training workloads below, which are the benches' own harnesses
#    (benches/peers: a real nginx app, oha as the client, real mTLS between two sidecars), so
#    the profile is what the sidecar does in production: the mesh path with the default log level,
#    with `warn`, with the JSON log and tracing at 1 %, uploads, large responses, refused requests,
#    HTTP/1.1 between sidecars, HTTP/2 end to end (a gRPC-like client and an h2c app), and the
#    inbound path from a client with an SVID with its
#    handshakes and idle connections (run.sh --quick --all-rows, which also runs nginx and HAProxy).
# 3. Merges the counts (`llvm-profdata merge --sparse`) into pgo/meshgate.profdata.gz and records
#    where it came from in pgo/profile-source.txt.
#
# Needs llvm-profdata of the LLVM major version rustc uses (`rustc -vV`; Debian:
# apt-get install llvm-NN, or rustup component add llvm-tools), and what benches/peers needs:
# oha (cargo install oha --locked), nginx, haproxy, openssl, python3, curl, taskset. Takes about
# 15 minutes (the instrumented build is most of it). --keep keeps the raw profiles.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = --keep ] && keep=1

major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata=
for c in "llvm-profdata-$major" "/usr/lib/llvm-$major/bin/llvm-profdata" \
  "$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata" llvm-profdata; do
  if command -v "$c" >/dev/null 2>&1 && "$c" --version 2>/dev/null | grep -q "LLVM version $major\."; then
    profdata=$c
    break
  fi
done
if [ -z "$profdata" ]; then
  echo "no llvm-profdata of LLVM $major (the version rustc uses): apt-get install llvm-$major, or rustup component add llvm-tools" >&2
  exit 1
fi
missing=()
for tool in oha nginx haproxy openssl python3 curl taskset gzip; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]} — apt-get install nginx haproxy openssl python3 curl util-linux gzip; cargo install oha --locked" >&2
  exit 1
fi

raw=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-pgo.XXXXXX")
cleanup() { if [ "$keep" = 0 ]; then rm -rf "$raw"; else echo "raw profiles kept in $raw" >&2; fi; }
trap cleanup EXIT

echo "== instrumented build (target/pgo-instrumented)"
# The build's own scripts write their profiles under the target directory (a fixed path, so a
# second run reuses the build); the training runs write theirs to LLVM_PROFILE_FILE.
CARGO_TARGET_DIR=target/pgo-instrumented RUSTFLAGS="-Cprofile-generate=$PWD/target/pgo-instrumented/build-profiles" \
  cargo build --release --locked --bin meshgate
bin=target/pgo-instrumented/release/meshgate
# Every process of the binary adds its counts to one file (%m: merged by module), written when
# it exits; the sidecars exit on the harnesses' SIGTERM.
export LLVM_PROFILE_FILE="$raw/run/meshgate-%m.profraw"

train() { # DESCRIPTION COMMAND...
  echo "== training: $1"
  shift
  "$@" | tail -n 1
}
pair=benches/peers/pair.sh
train "mesh path, MESHGATE_LOG=warn" "$pair" --seconds 4 "$bin"
train "mesh path, default log level" env MESHGATE_LOG=info "$pair" --seconds 4 "$bin"
train "mesh path, JSON log, tracing at 1 %" env MESHGATE_LOG=info MESHGATE_LOG_FORMAT=json "$pair" --seconds 3 --tracing 0.01 "$bin"
train "uploads (16 KiB POST)" "$pair" --seconds 2 --body 16384 "$bin"
train "downloads (64 KiB GET)" "$pair" --seconds 2 --response 65536 "$bin"
train "refused requests" env MESHGATE_LOG=info "$pair" --seconds 2 --path /admin --expect 403 "$bin"
train "HTTP/1.1 between sidecars" "$pair" --seconds 2 "$bin" --mesh-protocol preserve
train "HTTP/2 end to end (h2c client, h2c app)" "$pair" --seconds 3 --h2 "$bin"
train "inbound from a client with an SVID, handshakes, idle connections (run.sh --quick --all-rows)" \
  benches/peers/run.sh --quick --all-rows --meshgate "$bin"

files=("$raw"/run/meshgate-*.profraw)
[ -e "${files[0]}" ] || { echo "the training runs left no profile in $raw/run: did the sidecars exit cleanly?" >&2; exit 1; }
mkdir -p pgo
"$profdata" merge --sparse -o "$raw/meshgate.profdata" "${files[@]}"
gzip -9 -n -c "$raw/meshgate.profdata" >pgo/meshgate.profdata.gz
{
  # Uncommitted changes to what goes into the binary (not tests, docs or scripts) are noted.
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- Cargo.toml Cargo.lock src ca ebpf-redirect inject policy policy-tools proxy spiffe xds-lite ':!*/tests/*' || echo ' (with uncommitted changes to the binary'"'"'s sources)')"
  echo "date: $(date -u +%Y-%m-%d)"
  echo "rustc: $(rustc --version) (LLVM $(rustc -vV | sed -n 's/^LLVM version: //p'))"
  echo "llvm-profdata: $("$profdata" --version | sed -n 's/.*LLVM version //p' | head -n 1)"
  echo "workloads: scripts/pgo-profile.sh"
} >pgo/profile-source.txt
echo "== wrote pgo/meshgate.profdata.gz ($(stat -c %s pgo/meshgate.profdata.gz) bytes) and pgo/profile-source.txt"
# The code layout is recorded from a binary built with the profile (which decides what is
# inlined, so which functions exist): a separate step, because it needs that build first.
echo "== next: scripts/release-build.sh && scripts/symbol-order.sh (the code layout, pgo/symbol-order.txt), then commit pgo/"

#!/usr/bin/env bash
# Builds the release binary as shipped (the Docker image's, the one the benches measure):
# `cargo build --release` optimized with the execution profile in pgo/meshgate.profdata.gz
# (profile-guided optimization; figures in BENCHMARKS.md "Profile-guided optimization").
#
# Usage: scripts/release-build.sh [--check]
#   --check: only check that this rustc reads the profile (a second, on a one-line program), which
#   the build also does first: rustc takes a profile it cannot read with a mere warning and builds
#   without it, so a corrupt or foreign profile would quietly cost the optimization.
# PGO_PROFILE=FILE.gz uses another profile than pgo/meshgate.profdata.gz.
# Writes target/pgo/release/meshgate. Its own target directory: the compiler flags differ from a
# plain `cargo build --release` (which still works, without the profile), and one shared
# directory would rebuild every crate at each switch between the two.
#
# Needs the Rust toolchain and gzip, nothing else: rustc reads the profile itself. A profile older
# than the code still builds; functions changed since it was recorded are optimized without it
# (scripts/pgo-profile.sh records a new one).
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
[ "${1:-}" = --check ] && check=1
profile=${PGO_PROFILE:-pgo/meshgate.profdata.gz}
if [ ! -s "$profile" ]; then
  echo "$profile is missing: record one with scripts/pgo-profile.sh, or build without it: cargo build --release" >&2
  exit 1
fi
mkdir -p target/pgo
# Named by its content: a new profile changes the flags, and cargo rebuilds with it (cargo does not
# watch the file itself); an unchanged one rebuilds nothing.
sum=$(gzip -dc "$profile" | sha256sum | cut -c1-16)
data=$PWD/target/pgo/meshgate-$sum.profdata
# Written aside and renamed, so an interrupted run never leaves a truncated profile under that name.
[ -s "$data" ] || { gzip -dc "$profile" >"$data.tmp" && mv "$data.tmp" "$data"; }
probe=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-pgo-check.XXXXXX")
trap 'rm -rf "$probe"' EXIT
echo 'fn main() { println!("pgo"); }' >"$probe/main.rs"
if ! rustc -O -Cprofile-use="$data" -o "$probe/main" "$probe/main.rs" 2>"$probe/stderr" || [ -s "$probe/stderr" ]; then
  sed 's/^/  /' "$probe/stderr" >&2
  echo "$profile is not a profile this rustc ($(rustc --version)) reads: record a new one with scripts/pgo-profile.sh" >&2
  exit 1
fi
if [ "$check" = 1 ]; then
  echo "$profile: read by $(rustc --version)"
  exit 0
fi
CARGO_TARGET_DIR=target/pgo RUSTFLAGS="-Cprofile-use=$data" cargo build --release --locked --bin meshgate
echo "built target/pgo/release/meshgate (profile-guided: $(sed -n 's/^commit: //p' pgo/profile-source.txt 2>/dev/null || echo 'profile of unknown origin'))"

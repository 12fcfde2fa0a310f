#!/usr/bin/env bash
# Builds the release binary as shipped (the Docker image's, the one the benches measure):
# `cargo build --release` optimized with the execution profile in pgo/meshgate.profdata.gz
# (profile-guided optimization; figures in BENCHMARKS.md "Profile-guided optimization"), linked
# with the functions a sidecar runs placed together (pgo/symbol-order.txt; BENCHMARKS.md "Code
# layout") and its relative relocations packed (below).
#
# Usage: scripts/release-build.sh [--check | --strict | --line-tables]
#   --check: only check that this rustc reads the profile (a second, on a one-line program), which
#   the build also does first: rustc takes a profile it cannot read with a mere warning and builds
#   without it, so a corrupt or foreign profile would quietly cost the optimization. It also says
#   whether this rustc's linker applies the code layout.
#   --strict: build, and fail instead of warning when the code layout is stale or cannot be
#   applied (CI runs this: a stale layout and profile cost a fifth of the CPU per request).
#   --line-tables: the same binary with line tables (debug info naming source lines), written to
#   target/pgo-lines/release/meshgate, for profilers: perf's call stacks then show the functions the
#   compiler inlined (benches/peers/pair.sh --flamegraph). The flags go in RUSTFLAGS, which leave
#   the symbol names, and with them the profile's and the layout's match, as they are; the cargo
#   profile's `debug` setting would rename every symbol and lose both.
# PGO_PROFILE=FILE.gz uses another profile than pgo/meshgate.profdata.gz, PGO_LAYOUT=FILE another
# layout than pgo/symbol-order.txt.
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
strict=0
target=target/pgo
extra=()
case ${1:-} in
  --check) check=1 ;;
  --strict) strict=1 ;;
  --line-tables) target=target/pgo-lines; extra=(-Cdebuginfo=line-tables-only -Cstrip=none) ;;
  "") ;;
  *) echo "usage: scripts/release-build.sh [--check | --strict | --line-tables]" >&2; exit 2 ;;
esac
# A warning, or with --strict an error.
flaw() { if [ "$strict" = 1 ]; then echo "error: $*" >&2; exit 1; else echo "warning: $*" >&2; fi; }
if [ "$strict" = 1 ] && ! command -v nm >/dev/null 2>&1; then
  flaw "nm (binutils) is missing: cannot check that the code layout applies; install it with: apt-get install binutils"
fi
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
# The temporary name is the process's own, so that two runs at once (the tests run `--check` in
# parallel) do not rename each other's file away.
[ -s "$data" ] || { gzip -dc "$profile" >"$data.$$.tmp" && mv "$data.$$.tmp" "$data"; }
probe=$(mktemp -d "${TMPDIR:-/tmp}/meshgate-pgo-check.XXXXXX")
trap 'rm -rf "$probe"' EXIT
echo 'fn main() { println!("pgo"); }' >"$probe/main.rs"
if ! rustc -O -Cprofile-use="$data" -o "$probe/main" "$probe/main.rs" 2>"$probe/stderr" || [ -s "$probe/stderr" ]; then
  sed 's/^/  /' "$probe/stderr" >&2
  echo "$profile is not a profile this rustc ($(rustc --version)) reads: record a new one with scripts/pgo-profile.sh" >&2
  exit 1
fi
# The code layout (pgo/symbol-order.txt, scripts/symbol-order.sh): the functions a sidecar runs
# placed together, so that it maps fewer code pages. Only lld takes the option, which rustc uses
# by default on x86_64 Linux; with another linker the build goes on without it, and says so. The
# options go to the final link only (`cargo rustc`), so a new layout relinks without rebuilding
# every crate, through a copy named by its content, so that cargo sees a new one.
link=()
order=${PGO_LAYOUT:-pgo/symbol-order.txt}
layout="default code layout"
# The probe links two functions in the reverse of their source order and checks that the linker
# placed them so: a linker that took the option but ignored it would pass a mere flag check.
ordered() { # → 0 if rustc's linker lays out a probe in the order of an ordering file
  printf '%s\n' \
    '#[no_mangle] #[inline(never)] pub extern "C" fn meshgate_probe_first() -> u32 { std::hint::black_box(1) }' \
    '#[no_mangle] #[inline(never)] pub extern "C" fn meshgate_probe_second() -> u32 { std::hint::black_box(2) }' \
    'fn main() { println!("{}", meshgate_probe_first() + meshgate_probe_second()); }' >"$probe/order.rs"
  printf 'meshgate_probe_second\nmeshgate_probe_first\n' >"$probe/order.txt"
  rustc -O -Clink-arg=-Wl,--symbol-ordering-file="$probe/order.txt" -o "$probe/order" "$probe/order.rs" \
    2>"$probe/stderr" || return 1
  local first second
  first=$(nm "$probe/order" | awk '$3 == "meshgate_probe_first" {print $1}')
  second=$(nm "$probe/order" | awk '$3 == "meshgate_probe_second" {print $1}')
  [ -n "$first" ] && [ -n "$second" ] && [[ "$second" < "$first" ]]
}
if [ -s "$order" ]; then
  if ordered; then
    copy=$PWD/target/pgo/symbol-order-$(sha256sum "$order" | cut -c1-16).txt
    [ -s "$copy" ] || { cp "$order" "$copy.$$.tmp" && mv "$copy.$$.tmp" "$copy"; }
    link=(-Clink-arg=-Wl,--symbol-ordering-file="$copy" -Clink-arg=-Wl,--no-warn-symbol-ordering)
    layout="code layout of $order"
  else
    sed 's/^/  /' "$probe/stderr" >&2
    flaw "this rustc's linker does not lay out code by --symbol-ordering-file (lld does; rustc uses it by default on x86_64 Linux): building without $order"
  fi
else
  flaw "$order is missing: building with the default code layout (record it with scripts/symbol-order.sh)"
fi
# Relative relocations packed (`-z pack-relative-relocs`, DT_RELR: glibc 2.36 and later, the
# Docker image's Debian 12 included). A position-independent binary carries one relocation per
# pointer in its read-only data (vtables, string tables); unpacked they take ≈ 376 KiB, all of
# which the loader reads at every start and which then stays resident. Packed they take ≈ 4 KiB.
# The probe links a program with the option, checks that its dynamic section has the packed table
# (lld only warns about a `-z` value it does not know) and runs it: a linker or C library without
# DT_RELR leaves the binary as it was, and says so.
relocs="relative relocations unpacked"
echo 'fn main() { let v: Vec<&dyn std::fmt::Debug> = vec![&1u8, &"relr"]; println!("{v:?}"); }' >"$probe/relr.rs"
if rustc -O -Clink-arg=-Wl,-z,pack-relative-relocs -o "$probe/relr" "$probe/relr.rs" 2>"$probe/stderr" \
  && { readelf -d "$probe/relr" 2>>"$probe/stderr" | grep -q '(RELR)' \
    || { echo "the probe has no DT_RELR table (readelf -d; readelf is in binutils)" >>"$probe/stderr"; false; }; } \
  && "$probe/relr" >/dev/null 2>>"$probe/stderr"; then
  link+=(-Clink-arg=-Wl,-z,pack-relative-relocs)
  relocs="relative relocations packed"
else
  sed 's/^/  /' "$probe/stderr" >&2
  flaw "this linker or C library does not take packed relative relocations (DT_RELR; glibc >= 2.36 and lld or binutils >= 2.38 do): building without them, a fresh sidecar holds ≈ 0.4 MiB more"
fi
if [ "$check" = 1 ]; then
  echo "$profile: read by $(rustc --version); $layout; $relocs"
  exit 0
fi
CARGO_TARGET_DIR=$target RUSTFLAGS="-Cprofile-use=$data ${extra[*]}" cargo rustc --release --locked --bin meshgate -- "${link[@]}"
# Both the layout and the profile name functions by their linker symbols, whose hashes change
# with a crate's dependency set (Cargo's metadata), not with its code: a dependency added to or
# removed from a workspace crate renames every function of that crate and of the crates built on
# it, and the build quietly loses most of both (the fourteenth session's binary: 1,279 of 2,161
# functions of the layout left, a fresh sidecar 11.9 MiB instead of 7.1, CPU per request +20 %).
# So count what is left of the layout in the binary and say so loudly when it is stale.
bin=$target/release/meshgate
if [ ${#link[@]} -gt 0 ] && command -v nm >/dev/null 2>&1; then
  total=$(grep -v '^#' "$order" | sort -u | wc -l)
  found=$(grep -v '^#' "$order" | sort -u | comm -12 - <(nm --defined-only "$bin" | awk '{print $3}' | sort -u) | wc -l)
  if [ $((found * 100)) -lt $((total * 95)) ]; then
    flaw "only $found of the $total functions of $order are in the binary: the code layout and the execution profile are stale (a workspace crate's dependencies changed?), and the binary runs without most of their gain. Record both again: scripts/pgo-profile.sh, scripts/release-build.sh, scripts/symbol-order.sh, scripts/release-build.sh, and commit pgo/"
  fi
  layout="$layout: $found of $total functions found"
fi
echo "built $bin (profile-guided: $(sed -n 's/^commit: //p' pgo/profile-source.txt 2>/dev/null || echo 'profile of unknown origin'); $layout; $relocs)"

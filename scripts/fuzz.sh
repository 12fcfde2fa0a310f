#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (see fuzz/README.md).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   fuzz each target (default 20 s, all targets)
#   scripts/fuzz.sh --regress [TARGET...]              run each committed corpus once, no mutation
#
# New corpus entries go to fuzz/target/corpus-scratch/<target>/ (kept between local runs, never
# committed); the committed seeds in fuzz/corpus/<target>/ are only read. A crash, panic, failed
# assertion, timeout or out-of-memory exits non-zero and prints the saved input's path
# (fuzz/artifacts/<target>/…).
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-fuzz passes -Z flags (sanitizers, coverage instrumentation) to rustc; RUSTC_BOOTSTRAP lets
# the stable toolchain accept them, as no nightly toolchain is available.
export RUSTC_BOOTSTRAP=1
# Per-input limits: a slow or memory-hungry input is a finding too (denial of service).
TIMEOUT_SECS=${FUZZ_TIMEOUT_SECS:-25}
RSS_LIMIT_MB=${FUZZ_RSS_LIMIT_MB:-2048}

mode=run
seconds=20
if [[ ${1:-} == --regress ]]; then
  mode=regress
  shift
elif [[ ${1:-} =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
elif [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version '^0.13'
fi

cd fuzz
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list)
fi
known=$(cargo fuzz list)
for t in "${targets[@]}"; do
  grep -qx -- "$t" <<<"$known" || { echo "unknown fuzz target: $t (have: $(echo $known))" >&2; exit 2; }
done

echo "== cargo fuzz build (release, debug assertions, AddressSanitizer)"
build_start=$SECONDS
cargo fuzz build
echo "== built in $((SECONDS - build_start)) s"

failed=()
for t in "${targets[@]}"; do
  seeds=corpus/$t
  mkdir -p "$seeds" "artifacts/$t"
  log=target/fuzz-$t.log
  args=(-timeout="$TIMEOUT_SECS" -rss_limit_mb="$RSS_LIMIT_MB" -print_final_stats=1)
  start=$SECONDS
  set +e
  if [[ $mode == regress ]]; then
    # -runs=0: execute every input of the committed corpus once and stop.
    cargo fuzz run "$t" "$seeds" -- "${args[@]}" -runs=0 >"$log" 2>&1
  else
    scratch=target/corpus-scratch/$t
    mkdir -p "$scratch"
    cargo fuzz run "$t" "$scratch" "$seeds" -- "${args[@]}" -max_total_time="$seconds" >"$log" 2>&1
  fi
  rc=$?
  set -e
  elapsed=$((SECONDS - start))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  if [[ $mode == regress ]]; then
    inputs=$(find "$seeds" -type f | wc -l)
    detail="$inputs committed inputs"
  else
    detail="${runs:-?} runs, ${rate:-?}/s"
  fi
  if ((rc == 0)); then
    echo "fuzz $t: ok, $detail, ${elapsed} s"
  else
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    echo "fuzz $t: FAILED (exit $rc), $detail, ${elapsed} s"
    grep -E '^(thread .* panicked|==[0-9]+==ERROR|SUMMARY:)' "$log" | head -5 | sed 's/^/  /' || true
    if [[ -n $crash ]]; then
      # cargo-fuzz passes an absolute -artifact_prefix; show it relative to the repository.
      crash=${crash#"$PWD/"}
      crash=${crash#./}
      echo "  crash input: fuzz/$crash"
      echo "  reproduce:   (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t $crash)"
      echo "  minimize:    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz tmin $t $crash)"
    fi
    echo "  full log:    fuzz/$log"
    failed+=("$t")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]} (see fuzz/README.md, \"Every crash becomes a test\")"
  exit 1
fi

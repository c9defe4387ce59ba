#!/usr/bin/env bash
# Run every cargo-fuzz target for a bounded time, one after the other.
#
#   bash fuzz/run.sh                     # each target 60 s
#   FUZZ_SECONDS=600 bash fuzz/run.sh    # longer
#   bash fuzz/run.sh socks5 config       # some targets only
#
# Environment:
#   FUZZ_SECONDS    time per target, seconds (default 60)
#   FUZZ_SANITIZER  none (default) or address
#   FUZZ_JOBS       parallel libFuzzer jobs per target (default 1)
#
# Not part of .ci/run (it takes minutes and builds a second copy of every
# dependency). CI replays what fuzzing found instead: every file under
# fuzz/regressions/<target>/ and fuzz/seeds/<target>/ goes through the same
# checks (fuzz/checks.rs) in tests/fuzz_regressions.rs.
#
# cargo-fuzz passes nightly-only flags to rustc; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them. libFuzzer itself is built from source by
# libfuzzer-sys (needs a C++ compiler).
#
# A crash stops that target (exit status 1 at the end) and leaves the input
# in fuzz/artifacts/<target>/. To keep it: `cargo fuzz tmin --fuzz-dir fuzz
# --sanitizer none <target> <artifact>`, copy the minimised file into
# fuzz/regressions/<target>/ with a name that says what it is, fix the bug,
# and run `cargo test --test fuzz_regressions`.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
jobs="${FUZZ_JOBS:-1}"
all=(connect_target socks5 known_hosts config client_dispatch)
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  targets=("${all[@]}")
fi

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== cargo install cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

echo "== cargo fuzz build --sanitizer $sanitizer"
cargo fuzz build --fuzz-dir . --sanitizer "$sanitizer"

mkdir -p logs
failed=()
summary=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "seeds/$target" "regressions/$target" "artifacts/$target"
  log="logs/$target.log"
  echo "== $target: ${seconds}s"
  status=0
  # corpus/<target> is the working corpus libFuzzer grows; seeds and
  # regressions are read-only inputs.
  # cargo-fuzz writes crashes to artifacts/<target>/ itself.
  parallel=()
  stats=("$log")
  if [ "$jobs" -gt 1 ]; then
    parallel=(-jobs="$jobs" -workers="$jobs")
    stats=(fuzz-*.log) # one log per job
  fi
  cargo fuzz run --fuzz-dir . --sanitizer "$sanitizer" "$target" \
    "corpus/$target" "seeds/$target" "regressions/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 "${parallel[@]}" >"$log" 2>&1 || status=$?
  execs=$(cat "${stats[@]}" 2>/dev/null | grep '^stat::number_of_executed_units' |
    awk '{s += $2} END {print s + 0}' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}' || true)
  files=$(find "corpus/$target" -type f | wc -l)
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    grep -E 'panicked at|ERROR: libFuzzer|Test unit written' "$log" | head -5 || true
    summary+=("$target: FAILED after $execs executions (log fuzz/$log, input in fuzz/artifacts/$target/)")
  else
    summary+=("$target: $execs executions in ${seconds}s, coverage ${cov:-?}, corpus $files files, no crash")
  fi
  rm -f fuzz-*.log
done

echo "== summary"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashed: ${failed[*]}"
  exit 1
fi

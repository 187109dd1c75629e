#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 20),
# starting from the seed corpus in fuzz/corpus/<target>/. Installs
# cargo-fuzz if it is missing; needs the nightly toolchain (rustup).
#
# All targets are built in one `cargo fuzz build` (one compilation of the
# dependencies), then each runs alone with -max_total_time. New inputs the
# fuzzer finds go to target/fuzz-corpus/<target>/ (the checked-in seeds are
# only read); a crash leaves its input in fuzz/artifacts/<target>/ and makes
# the script fail.
#
# Usage: resources/fuzz.sh [SECONDS]
# Environment: ARBOR_FUZZ_JOBS (cargo build jobs, default 2),
# CARGO_TARGET_DIR (default fuzz/target).
[[ ${1:-} != --help ]] || { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"; exit 0; }
set -euo pipefail

SECONDS_PER_TARGET=${1:-20}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '\n=== %s\n' "$*" >&2; }

# shellcheck disable=SC1091
[[ -f $HOME/.cargo/env ]] && . "$HOME/.cargo/env"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
	log "installing the nightly toolchain"
	rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
	log "installing cargo-fuzz"
	cargo install --locked cargo-fuzz
fi

cd "$REPO/fuzz"
TARGETS=$(cargo +nightly fuzz list)
log "fuzz build ($(echo "$TARGETS" | wc -w) targets)"
CARGO_BUILD_JOBS=${ARBOR_FUZZ_JOBS:-2} cargo +nightly fuzz build

for t in $TARGETS; do
	log "fuzz $t for ${SECONDS_PER_TARGET}s"
	out=${CARGO_TARGET_DIR:-$REPO/fuzz/target}/fuzz-corpus/$t
	mkdir -p "$out"
	# The first corpus directory receives new inputs; the seeds are read only.
	CARGO_BUILD_JOBS=${ARBOR_FUZZ_JOBS:-2} cargo +nightly fuzz run "$t" "$out" "corpus/$t" -- \
		-max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
log "fuzzing: no crash in $(echo "$TARGETS" | wc -w) targets"

#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what is
# missing, builds the guest kit (kernel cached outside the checkout), builds
# the workspace, checks formatting and lints, and runs every test, booting
# real guests at most two at a time, then runs each fuzz target briefly,
# and last builds the static release binaries and runs the README's main job
# (resources/demo.sh) with them.
#
# Environment: ARBOR_TEST_TIMEOUT (seconds per wait on a guest log line,
# default 180), ARBOR_CACHE_DIR (kernel cache, default ~/.cache/arbor),
# ARBOR_TEST_JOBS (guest tests at a time, default 2),
# ARBOR_FUZZ (0: no fuzzing), ARBOR_FUZZ_SECONDS (per target, default 15),
# ARBOR_SCHEMATHESIS (0: no API schema check), ARBOR_SCHEMATHESIS_SECONDS
# (its time budget, default 30), ARBOR_RELEASE_CHECK (0: skip the last step,
# the release build and the README's main job with it).
[[ ${1:-} != --help ]] || { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"; exit 0; }
set -euo pipefail

# shellcheck source=resources/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
arbor_setup

log "build"
cargo build --workspace --all-targets --locked

log "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# Each fuzz target briefly (nightly toolchain; one build of all targets,
# then ARBOR_FUZZ_SECONDS per target). ARBOR_FUZZ=0 skips it.
if [[ ${ARBOR_FUZZ:-1} != 0 ]]; then
	log "fuzz"
	"$REPO/resources/fuzz.sh" "${ARBOR_FUZZ_SECONDS:-15}"
fi

# schemathesis (PyPI, pinned, in a virtual environment kept beside the
# kernel cache) against api/openapi.json and a running guest: no 5xx, no
# answer that contradicts the document. ARBOR_SCHEMATHESIS=0 skips it.
if [[ ${ARBOR_SCHEMATHESIS:-1} != 0 ]]; then
	log "API schema check (schemathesis)"
	venv=${ARBOR_CACHE_DIR:-$HOME/.cache/arbor}/schemathesis-4.32.5
	if [[ ! -x $venv/bin/schemathesis ]]; then
		rm -rf "$venv"
		python3 -m venv "$venv"
		"$venv/bin/pip" install -q schemathesis==4.32.5
	fi
	"$REPO/resources/bench/api-schema-check.py" --arbor "$REPO/target/debug/arbor" \
		--schemathesis "$venv/bin/schemathesis" \
		--max-time "${ARBOR_SCHEMATHESIS_SECONDS:-30}" --timeout "${ARBOR_TEST_TIMEOUT:-180}"
fi

# The tests last, so their summary closes the output.
log "tests (no guest)"
cargo test --workspace --exclude arbor-tests --locked
# Guest-booting tests keep a core busy each: ARBOR_TEST_JOBS (default 2) at
# a time, one test per process, longest first (resources/run-tests.py).
log "tests (booting guests, ${ARBOR_TEST_JOBS:-2} at a time)"
"$REPO/resources/run-tests.py" --package arbor-tests --jobs "${ARBOR_TEST_JOBS:-2}"

# What ships: the static release build (resources/build-release.sh, fat LTO)
# booted by the README's main job, resources/demo.sh (boot, hotplug a disk,
# resolve the PCI path in the guest's log, remove it). ARBOR_RELEASE_CHECK=0
# skips it.
if [[ ${ARBOR_RELEASE_CHECK:-1} != 0 ]]; then
	log "release build and the README's main job (resources/demo.sh)"
	"$REPO/resources/demo.sh"
fi

#!/usr/bin/env bash
# Build the release binaries: `arbor` as a static PIE (glibc linked into the
# binary, no dynamic loader at start) and `arbor-remote`; print their paths,
# one per line. Honours CARGO_TARGET_DIR like cargo does.
#
# Why static: the loader no longer maps and relocates libc and libgcc_s at
# every start, and only the parts of libc arbor calls are in its resident
# code, which cut the VMM's memory outside guest RAM from 4.2-4.3 MiB to
# 3.4 MiB at boot (3.07 MiB since the release profile aborts on panic;
# resources/bench/README.md, "A statically linked arbor").
#
# The flag goes to the last rustc call only (`cargo rustc ... -- -C
# target-feature=+crt-static`): in RUSTFLAGS or a [target] section of
# .cargo/config.toml it would also reach the proc-macro crates, which cannot
# be linked statically. A later `cargo build --release -p vmm` relinks arbor
# dynamically; run this script again to get the static one back.
[[ ${1:-} != --help ]] || { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"; exit 0; }
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
TARGET=${CARGO_TARGET_DIR:-target}
[[ $TARGET = /* ]] || TARGET=$REPO/$TARGET

cargo build --release --locked -p api --bin arbor-remote >&2
cargo rustc --release --locked -p vmm --bin arbor -- -C target-feature=+crt-static >&2

ARBOR=$TARGET/release/arbor
# A static PIE has no program interpreter (PT_INTERP).
if readelf -lW "$ARBOR" | grep -q 'Requesting program interpreter'; then
	echo "build-release: $ARBOR is dynamically linked; the static link did not happen" >&2
	exit 1
fi
echo "$ARBOR"
echo "$TARGET/release/arbor-remote"

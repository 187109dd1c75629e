#!/usr/bin/env bash
# Builds arbor-guest (resources/arbor-guest, a workspace member) as a static
# x86-64 executable for the test guest and copies it to $1.
#
# Static: glibc linked in (`-C target-feature=+crt-static`), no interpreter.
# Baseline CPU (`-C target-cpu=x86-64`: SSE2, no POPCNT/SSE4/AVX), so the
# compiler emits none of the instructions the emulated KVM of the project's
# machines fails on (README.md, "The emulated KVM"). These flags apply to this build only:
# `--target` keeps its artifacts apart from the host build
# (<target-dir>/x86_64-unknown-linux-gnu/release), and RUSTFLAGS does not
# reach build scripts when --target is given.
set -euo pipefail

KIT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$KIT_DIR/../.." && pwd)
DEST=${1:?usage: build-arbor-guest.sh DEST}
TARGET=x86_64-unknown-linux-gnu
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}

log() { printf 'build-arbor-guest: %s\n' "$*" >&2; }
die() { printf 'build-arbor-guest: ERROR: %s\n' "$*" >&2; exit 1; }

(cd "$REPO_DIR" &&
	RUSTFLAGS="-C target-feature=+crt-static -C target-cpu=x86-64 -C strip=symbols" \
		cargo build --quiet --release --locked -p arbor-guest --target "$TARGET" \
		-j "${ARBOR_GUEST_JOBS:-1}") ||
	die "cargo build of arbor-guest failed"
BIN=$TARGET_DIR/$TARGET/release/arbor-guest
[[ -x $BIN ]] || die "$BIN was not built"
elf=$(readelf -hl "$BIN")
[[ $elf == *Machine:*X86-64* ]] || die "arbor-guest is not x86-64"
[[ $elf != *INTERP* ]] || die "arbor-guest is not static (it asks for a program interpreter)"
install -m 0755 "$BIN" "$DEST"
touch -d @0 "$DEST"
log "arbor-guest: $(stat -c %s "$DEST") bytes, static"

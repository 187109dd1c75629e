#!/usr/bin/env bash
# Build the release binaries: `arbor` statically linked and `arbor-remote`;
# print their paths, one per line. Honours CARGO_TARGET_DIR like cargo does.
#
# `arbor` is built for x86_64-unknown-linux-musl (musl linked into the
# binary, as Firecracker ships) and copied to target/release/arbor, where
# the benchmarks and the demo look for it. The target's standard library
# is added with rustup when missing; where that cannot be done (no rustup,
# no network) the script says so and links glibc statically instead, a
# static PIE built for the host target. ARBOR_RELEASE_LIBC=glibc asks for
# that build directly (for comparisons).
#
# Why static: no dynamic loader maps and relocates libc at every start,
# and only the parts of libc arbor calls are in its resident code (both
# builds are static PIEs). Why musl: what arbor pulls in of it is a small
# fraction of what it pulls in of glibc (whose printf, scanf, NSS and
# iconv machinery comes along with a few calls). VMM memory outside guest
# RAM at boot: 4.2-4.3 MiB dynamically linked, 3.07 MiB with static
# glibc, 2.3 MiB with musl (resources/bench/README.md, "A statically
# linked arbor").
#
# The glibc fallback passes its flag to the last rustc call only (`cargo
# rustc ... -- -C target-feature=+crt-static`): in RUSTFLAGS it would also
# reach the proc-macro crates, which cannot be linked statically.
[[ ${1:-} != --help ]] || { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"; exit 0; }
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
TARGET=${CARGO_TARGET_DIR:-target}
[[ $TARGET = /* ]] || TARGET=$REPO/$TARGET

cargo build --release --locked -p api --bin arbor-remote >&2

MUSL=x86_64-unknown-linux-musl
ARBOR=$TARGET/release/arbor
musl_ready() {
	local lib
	lib=$(rustc --print target-libdir --target "$MUSL" 2>/dev/null) && compgen -G "$lib/libstd-*" >/dev/null
}
LIBC=${ARBOR_RELEASE_LIBC:-musl}
case $LIBC in
musl | glibc) ;;
*)
	echo "build-release: ARBOR_RELEASE_LIBC must be musl or glibc, not '$LIBC'" >&2
	exit 2
	;;
esac
if [[ $LIBC = musl ]] && ! musl_ready && command -v rustup >/dev/null; then
	echo "build-release: adding the $MUSL target (rustup target add $MUSL)" >&2
	timeout 120 rustup target add "$MUSL" >&2 || true
fi
if [[ $LIBC = musl ]] && musl_ready; then
	cargo build --release --locked -p vmm --bin arbor --target "$MUSL" >&2
	mkdir -p "$TARGET/release"
	# A copy, not a link: cargo's own target/release/arbor may be a hard
	# link to its deps/ file, which must stay as cargo left it.
	cp --remove-destination "$TARGET/$MUSL/release/arbor" "$ARBOR"
else
	[[ $LIBC = glibc ]] || echo "build-release: the $MUSL target is not available; linking glibc statically" >&2
	# Gone, so that cargo links it again rather than keep a musl copy.
	rm -f "$ARBOR"
	cargo rustc --release --locked -p vmm --bin arbor -- -C target-feature=+crt-static >&2
fi

# A static executable has no program interpreter (PT_INTERP).
if readelf -lW "$ARBOR" | grep -q 'Requesting program interpreter'; then
	echo "build-release: $ARBOR is dynamically linked; the static link did not happen" >&2
	exit 1
fi
echo "$ARBOR"
echo "$TARGET/release/arbor-remote"

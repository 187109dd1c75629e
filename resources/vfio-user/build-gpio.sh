#!/bin/sh
# Builds the example gpio server of the `vfio_user` crate (a vfio-user device server this
# project did not write: the test peer of tests/tests/vfio_user.rs) from the crate package
# cargo unpacked in its registry, in a copy under the target dir, and prints the binary's
# path. The binary is cached: a second run only prints the path.
#
# Usage: build-gpio.sh [TARGET_DIR]   (default: $CARGO_TARGET_DIR or <repo>/target)
set -eu
VERSION=0.1.7
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${1:-${CARGO_TARGET_DIR:-$repo/target}}
out="$target/vfio-user-gpio"
bin="$out/target/debug/examples/gpio"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
# The package is in the registry once the workspace (which depends on vfio_user) was fetched.
cargo fetch --manifest-path "$repo/Cargo.toml" >&2
pkg=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/vfio_user-$VERSION 2>/dev/null | head -n1)
[ -n "$pkg" ] || { echo "build-gpio.sh: vfio_user-$VERSION not in the cargo registry" >&2; exit 1; }
mkdir -p "$out"
rm -rf "$out/src-copy"
cp -r "$pkg" "$out/src-copy"
chmod -R u+w "$out/src-copy"
# Its own workspace root, even when the copy lies under this repository's
# target dir (cargo would otherwise take it for a member of ours).
printf '\n[workspace]\n' >> "$out/src-copy/Cargo.toml"
# The package ships its own Cargo.lock; build it as its own workspace.
CARGO_TARGET_DIR="$out/target" cargo build -j1 --quiet --manifest-path "$out/src-copy/Cargo.toml" --example gpio >&2
[ -x "$bin" ] || { echo "build-gpio.sh: no binary at $bin" >&2; exit 1; }
echo "$bin"

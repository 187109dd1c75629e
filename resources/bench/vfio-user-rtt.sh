#!/bin/sh
# Host-side cost of one access through a vfio-user socket: starts a server
# and runs the `vfio_user_rtt` example of the devices crate against it
# (release build): median/min/max microseconds per 4-byte configuration
# read and per 1-byte BAR read, interleaved rounds. No guest.
#
# Servers: by default the vfio_user crate's example gpio server
# (resources/vfio-user/build-gpio.sh; BAR2 reads); with --virtio-blk this
# project's test server arbor-test-vfio-user-blk (the virtio-blk function of
# tests/src/bin/vfio_user_blk; BAR0 reads, which its virtio-pci transport
# serves).
#
# Usage: resources/bench/vfio-user-rtt.sh [--virtio-blk]   (CARGO_TARGET_DIR honoured)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
case "${1:-}" in
"") kind=gpio ;;
--virtio-blk) kind=virtio-blk ;;
*)
    echo "usage: $0 [--virtio-blk]" >&2
    exit 2
    ;;
esac
cargo build -j1 --quiet --release --manifest-path "$repo/Cargo.toml" -p devices --example vfio_user_rtt
dir=$(mktemp -d)
srv=
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; rm -rf "$dir"' EXIT
sock=$dir/server.sock
if [ $kind = gpio ]; then
    gpio=$("$repo/resources/vfio-user/build-gpio.sh" "$target")
    "$gpio" --socket-path "$sock" 2>/dev/null &
    srv=$!
    bar=2
else
    cargo build -j1 --quiet --release --manifest-path "$repo/Cargo.toml" -p arbor-tests --bin arbor-test-vfio-user-blk
    truncate -s 1M "$dir/disk.img"
    "$target/release/arbor-test-vfio-user-blk" --socket "$sock" --disk "$dir/disk.img" >/dev/null &
    srv=$!
    bar=0
fi
i=0
while [ ! -S "$sock" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "server: $kind"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
"$target/release/examples/vfio_user_rtt" "$sock" $bar
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

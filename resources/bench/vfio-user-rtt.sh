#!/bin/sh
# Host-side cost of one access through a vfio-user socket: starts the
# vfio_user crate's example gpio server (resources/vfio-user/build-gpio.sh)
# and runs the `vfio_user_rtt` example of the devices crate against it
# (release build): median/min/max microseconds per 4-byte configuration
# read and per 1-byte BAR2 read, interleaved rounds. No guest.
#
# Usage: resources/bench/vfio-user-rtt.sh   (CARGO_TARGET_DIR honoured)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
gpio=$("$repo/resources/vfio-user/build-gpio.sh" "$target")
cargo build -j1 --quiet --release --manifest-path "$repo/Cargo.toml" -p devices --example vfio_user_rtt
dir=$(mktemp -d)
trap 'kill $srv 2>/dev/null; rm -rf "$dir"' EXIT
"$gpio" --socket-path "$dir/gpio.sock" 2>/dev/null &
srv=$!
i=0
while [ ! -S "$dir/gpio.sock" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
"$target/release/examples/vfio_user_rtt" "$dir/gpio.sock" 2

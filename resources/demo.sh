#!/usr/bin/env bash
# The main job, from a fresh Debian machine: install what is missing, build
# the guest kit and arbor, boot the test guest and show its console until it
# powers itself off.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
log() { printf '\n=== %s\n' "$*" >&2; }

log "host packages"
"$REPO/resources/install-deps.sh"
# shellcheck disable=SC1091
[[ -f $HOME/.cargo/env ]] && . "$HOME/.cargo/env"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

log "guest kit"
"$REPO/resources/guest-kit/build.sh"
GUEST=${ARBOR_GUEST_DIR:-$REPO/target/guest}

log "build arbor"
cargo build --release --locked -p vmm

log "boot the test guest (its /init powers the VM off once it runs)"
start=$(date +%s.%N)
set +e
timeout "${ARBOR_DEMO_TIMEOUT:-300}" "$REPO/target/release/arbor" \
	--kernel "$GUEST/vmlinux" \
	--initramfs "$GUEST/initramfs.cpio" \
	--cmdline "$(cat "$GUEST/cmdline") arbor_init=poweroff" \
	--cpus 1 --memory 512M </dev/null
status=$?
set -e
end=$(date +%s.%N)
log "arbor exited with status $status after $(printf '%.1f' "$(echo "$end - $start" | bc)") s (0 = guest powered off)"
exit "$status"

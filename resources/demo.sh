#!/usr/bin/env bash
# The main job, from a fresh Debian machine: install what is missing, build
# the guest kit and arbor, boot the test guest with an API socket, hotplug a
# disk through the API, and print the PCI path the API returned next to the
# guest's own view of that device (from its kernel log).
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

log "build arbor and arbor-remote"
cargo build --release --locked -p vmm -p api
ARBOR=$REPO/target/release/arbor
REMOTE=$REPO/target/release/arbor-remote

WORK=$(mktemp -d)
SOCK=$WORK/api.sock
CONSOLE=$WORK/console.log
cleanup() {
	[[ -n ${PID:-} ]] && kill "$PID" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
truncate -s 40M "$WORK/disk.img" # 81920 sectors: easy to spot in the guest log

log "boot the test guest (serial console in $CONSOLE)"
"$ARBOR" --kernel "$GUEST/vmlinux" --initramfs "$GUEST/initramfs.cpio" \
	--cmdline "$(cat "$GUEST/cmdline")" --cpus 1 --memory 512M \
	--api-socket "$SOCK" >"$CONSOLE" 2>"$WORK/arbor.err" </dev/null &
PID=$!
wait_line() { # pattern timeout
	local deadline=$((SECONDS + $2))
	until grep -qF -- "$1" "$CONSOLE" 2>/dev/null; do
		if ((SECONDS > deadline)) || ! kill -0 "$PID" 2>/dev/null; then
			echo "timed out waiting for: $1" >&2
			tail -20 "$CONSOLE" >&2
			cat "$WORK/arbor.err" >&2
			exit 1
		fi
		sleep 0.2
	done
}
wait_line "Run /init as init process" "${ARBOR_DEMO_TIMEOUT:-300}"
echo "guest booted: $(grep -F 'Run /init' "$CONSOLE")"

log "hotplug a disk: arbor-remote add-disk"
answer=$("$REMOTE" --api-socket "$SOCK" add-disk "path=$WORK/disk.img,id=demo-disk,serial=demo")
echo "$answer"
path=$(printf '%s' "$answer" | sed -n 's/.*"pci_path": *"\([^"]*\)".*/\1/p')
slot=${path##*/}
bdf="0000:00:${slot}.0"
wait_line "81920 512-byte logical blocks" 120

log "result"
echo "PCI path returned by the API : $path"
echo "BDF it names in this guest   : $bdf"
echo "the guest's view (kernel log):"
grep -E "pci $bdf: |virtio-pci $bdf|81920 512-byte" "$CONSOLE" | sed 's/^/    /'

log "remove it again: arbor-remote remove-device"
"$REMOTE" --api-socket "$SOCK" remove-device demo-disk && echo "removed (the guest ejected the slot)"
"$REMOTE" --api-socket "$SOCK" shutdown-vmm >/dev/null || true
wait "$PID" || true
PID=

#!/usr/bin/env bash
# The main job, from a fresh Debian machine: install what is missing, build
# the guest kit and arbor, boot the test guest with an API socket, hotplug a
# disk through the API, and print the PCI path the API returned next to the
# guest's own view of that device (from its kernel log).
[[ ${1:-} != --help ]] || { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"; exit 0; }
set -euo pipefail

# shellcheck source=resources/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
arbor_setup

log "build arbor (static) and arbor-remote: resources/build-release.sh"
BUILT=$("$REPO/resources/build-release.sh")
{ read -r ARBOR && read -r REMOTE; } <<<"$BUILT"

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
	--api-socket "$SOCK" --allow-path "$WORK" >"$CONSOLE" 2>"$WORK/arbor.err" </dev/null &
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

log "the default topology (arbor-remote info)"
"$REMOTE" --api-socket "$SOCK" info |
	sed -n 's/^ *"id": "\(rp[0-9]*\|br[0-9]*\|root\)".*/\1/p' | tr '\n' ' '
echo "  (8 root ports with native hotplug; the root bus's free slots take ACPI hotplug)"

log "hotplug a disk; arbor places it on the first free native port: arbor-remote add-disk"
answer=$("$REMOTE" --api-socket "$SOCK" add-disk "path=$WORK/disk.img,id=demo-disk,serial=demo")
echo "$answer"
path=$(printf '%s' "$answer" | sed -n 's/.*"pci_path": *"\([^"]*\)".*/\1/p')
wait_line "81920 512-byte logical blocks" 180

# Resolve the path as a guest agent would: from bus 00, follow each
# bridge's secondary bus (here from the guest's "PCI bridge to [bus NN]"
# lines), then take the device's slot.
bus=00
IFS=/ read -r -a elems <<<"$path"
for ((i = 0; i < ${#elems[@]} - 1; i++)); do
	bridge="0000:$bus:${elems[i]}.0"
	bus=$(grep -o "pci $bridge: PCI bridge to \[bus [0-9a-f]*" "$CONSOLE" | tail -n 1 | sed 's/.*bus //')
	[[ -n $bus ]] || { echo "the guest printed no bus for bridge $bridge" >&2; exit 1; }
done
bdf="0000:$bus:${elems[-1]}.0"

log "result"
echo "PCI path returned by the API : $path"
echo "BDF it names in this guest   : $bdf"
echo "the guest's view (kernel log):"
grep -E "PCI bridge to \[bus $bus\]|pci $bdf: |virtio-pci $bdf|81920 512-byte" "$CONSOLE" | sed 's/^/    /'

log "remove it again: arbor-remote remove-device"
"$REMOTE" --api-socket "$SOCK" remove-device demo-disk && echo "removed (the guest ejected the slot)"
"$REMOTE" --api-socket "$SOCK" shutdown-vmm >/dev/null || true
wait "$PID" || true
PID=

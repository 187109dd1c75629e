#!/usr/bin/env bash
# Boot the built guest (build.sh) under QEMU with KVM and check it: both
# kernels (vmlinux through PVH, bzImage) reach /init and keep running,
# `arbor_init=poweroff` makes QEMU exit through a guest power-off and
# `arbor_init=reboot` through a guest restart (-no-reboot). Prints the time
# from QEMU's start to the first kernel line and to `Run /init`. The serial
# logs, each line prefixed with seconds since QEMU's start, are kept in
# $ARBOR_GUEST_DIR/smoke/.
#
# Environment: ARBOR_GUEST_DIR (as build.sh), ARBOR_GUEST_TIMEOUT (seconds
# per boot, default 240), QEMU (default qemu-system-x86_64), QEMU_EXTRA
# (extra QEMU arguments, split on spaces, e.g. "-cpu host").
# Needs qemu-system-x86 (install-deps.sh --qemu) and /dev/kvm.
[[ ${1:-} != --help ]] || { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"; exit 0; }
set -euo pipefail

KIT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST_DIR=${ARBOR_GUEST_DIR:-$(cd "$KIT_DIR/../.." && pwd)/target/guest}
TIMEOUT=${ARBOR_GUEST_TIMEOUT:-240}
QEMU=${QEMU:-qemu-system-x86_64}
read -r -a QEMU_EXTRA <<<"${QEMU_EXTRA:-}"
LOG_DIR=$GUEST_DIR/smoke

die() { printf 'qemu-smoke: ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$QEMU" >/dev/null || die "$QEMU not found; run $KIT_DIR/install-deps.sh --qemu"
[[ -w /dev/kvm ]] || die "/dev/kvm is not usable"
for f in vmlinux bzImage initramfs.cpio cmdline; do
	[[ -s $GUEST_DIR/$f ]] || die "$GUEST_DIR/$f missing; run $KIT_DIR/build.sh"
done
mkdir -p "$LOG_DIR"
CMDLINE=$(<"$GUEST_DIR/cmdline")

# Prefix each line read with the seconds (1 decimal) since $1 (microseconds).
stamp() {
	local start_us=$1 line d
	while IFS= read -r line; do
		d=$(((${EPOCHREALTIME/./} - start_us) / 100000))
		printf '%d.%d %s\n' $((d / 10)) $((d % 10)) "$line"
	done
}

RUNNER=
PIDFILE=
stop_qemu() {
	local pid
	if [[ -n $PIDFILE && -s $PIDFILE ]]; then
		pid=$(<"$PIDFILE")
		if kill -0 "$pid" 2>/dev/null; then
			kill "$pid" 2>/dev/null || true
		fi
	fi
	if [[ -n $RUNNER ]]; then
		wait "$RUNNER" 2>/dev/null || true
	fi
	RUNNER=
}
trap stop_qemu EXIT
trap 'exit 130' INT TERM

first_time() { awk -v pat="$1" 'index($0, pat) { print $1 "s"; found = 1; exit } END { if (!found) print "-" }' "$2"; }

# boot NAME KERNEL EXTRA_CMDLINE EXPECT_LINE MODE [QEMU ARGS...]
#   MODE=stay: the guest must log EXPECT_LINE and still run 5 s later.
#   MODE=exit: QEMU must exit by itself (status 0) with EXPECT_LINE logged.
boot() {
	local name=$1 kernel=$2 extra=$3 expect=$4 mode=$5
	shift 5
	local log=$LOG_DIR/$name.log rcfile=$LOG_DIR/$name.rc start_us deadline ok=0 rc="" d exited=""
	PIDFILE=$LOG_DIR/$name.pid
	rm -f "$PIDFILE" "$rcfile" "$log"
	start_us=${EPOCHREALTIME/./}
	(
		set +e +o pipefail
		timeout --signal=TERM "$TIMEOUT" "$QEMU" -accel kvm -machine q35 -m 512 -nographic \
			-kernel "$GUEST_DIR/$kernel" -initrd "$GUEST_DIR/initramfs.cpio" \
			-append "$CMDLINE${extra:+ $extra}" -pidfile "$PIDFILE" \
			"${QEMU_EXTRA[@]}" "$@" </dev/null 2>&1 | stamp "$start_us" >"$log"
		echo "${PIPESTATUS[0]}" >"$rcfile"
	) &
	RUNNER=$!
	if [[ $mode == stay ]]; then
		while kill -0 "$RUNNER" 2>/dev/null && ! grep -qF "$expect" "$log" 2>/dev/null; do
			sleep 0.2
		done
		deadline=$((SECONDS + 5))
		while kill -0 "$RUNNER" 2>/dev/null && ((SECONDS < deadline)); do
			sleep 0.2
		done
		if kill -0 "$RUNNER" 2>/dev/null && grep -qF "$expect" "$log" &&
			! grep -Eq 'Kernel panic|BUG:|Oops' "$log"; then
			ok=1
		fi
		stop_qemu
	else
		wait "$RUNNER" || true
		RUNNER=
		d=$(((${EPOCHREALTIME/./} - start_us) / 100000))
		exited="QEMU exited at $((d / 10)).$((d % 10))s"
		rc=$(cat "$rcfile" 2>/dev/null || echo '?')
		[[ $rc == 0 ]] && grep -qF "$expect" "$log" && ok=1
	fi
	if ((ok)); then
		printf '%-17s ok    first kernel line %6s   Run /init %6s   %s\n' "$name" \
			"$(first_time 'Linux version' "$log")" "$(first_time 'Run /init as init process' "$log")" \
			"$exited"
		return 0
	fi
	printf '%-17s FAIL  (expected "%s", %s); log: %s\n' "$name" "$expect" \
		"$([[ $mode == exit ]] && echo "QEMU status ${rc:-?}" || echo "guest had to stay up")" "$log"
	tail -n 15 "$log" | sed 's/^/    /'
	return 1
}

failed=0
for k in vmlinux bzImage; do
	boot "$k-idle" "$k" "" 'Run /init as init process' stay || failed=$((failed + 1))
	boot "$k-poweroff" "$k" arbor_init=poweroff 'reboot: Power down' exit || failed=$((failed + 1))
	boot "$k-reboot" "$k" arbor_init=reboot 'reboot: Restarting system' exit -no-reboot ||
		failed=$((failed + 1))
done
echo "$((6 - failed)) passed, $failed failed"
((failed == 0))

#!/usr/bin/env bash
# The guest kit's one entry point: builds (or takes from the cache) the test
# guest kernel, builds the initramfs, and puts
#
#   vmlinux  bzImage  initramfs.cpio  cmdline
#   initramfs-user.cpio  arbor-guest     (guest user space; needs busybox-static)
#
# into ${ARBOR_GUEST_DIR:-<repo>/target/guest}. Prints the paths at the end.
# See README.md beside this file. Environment: ARBOR_GUEST_DIR, plus those of
# build-kernel.sh (ARBOR_CACHE_DIR, ...).
[[ ${1:-} != --help ]] || { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"; exit 0; }
set -euo pipefail

KIT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$KIT_DIR/../.." && pwd)
OUT_DIR=${ARBOR_GUEST_DIR:-$REPO_DIR/target/guest}

log() { printf 'guest-kit: %s\n' "$*" >&2; }
die() { printf 'guest-kit: ERROR: %s\n' "$*" >&2; exit 1; }

# --- Command line sanity --------------------------------------------------------
# One line; the kernel keeps only the first 127 characters of clearcpuid= and
# silently ignores the rest.
[[ $(wc -l <"$KIT_DIR/cmdline") == 1 ]] || die "cmdline must be exactly one line"
clearcpuid=$(grep -o 'clearcpuid=[^ ]*' "$KIT_DIR/cmdline" || true)
clearcpuid=${clearcpuid#clearcpuid=}
((${#clearcpuid} <= 127)) ||
	die "clearcpuid= in cmdline is ${#clearcpuid} characters; the kernel reads only 127"

# --- Kernel (cached) ----------------------------------------------------------
# build-kernel.sh compiles quietly for 5-20 minutes when the cache has no
# kernel for this configuration; this reports its progress every 30 s from
# beside it (build-kernel.sh hashes itself into the cache key, so it stays
# as it is): the lines make has written to build.log so far against the
# count of the last finished build in the cache, and the time so far.
CACHE_ROOT=${ARBOR_CACHE_DIR:-${HOME:?HOME is not set}/.cache/arbor}
kernel_progress() {
	local ref total=1800 took="" dir log n now t0 said=0 last=0 rate_left
	ref=$(ls -1t "$CACHE_ROOT"/kernel-*/.complete 2>/dev/null | head -n1 || true)
	if [[ -n $ref && -f ${ref%/.complete}/build.log && -f ${ref%/.complete}/merge_config.log ]]; then
		total=$(wc -l <"${ref%/.complete}/build.log")
		took=$(($(stat -c %Y "${ref%/.complete}/build.log") - $(stat -c %Y "${ref%/.complete}/merge_config.log")))
	fi
	while sleep 5; do
		# A build in progress: a build.log written to in the last 5 minutes
		# in a kernel-* directory that is not complete (ours, or another
		# process's that build-kernel.sh waits for).
		dir=""
		for log in $(ls -1t "$CACHE_ROOT"/kernel-*/build.log 2>/dev/null); do
			[[ -f ${log%/build.log}/.complete ]] && continue
			(($(date +%s) - $(stat -c %Y "$log") < 300)) && dir=${log%/build.log}
			break
		done
		[[ -n $dir ]] || continue
		now=$(date +%s)
		if ((!said)); then
			if [[ -n $took ]]; then
				log "compiling the kernel in $dir: the last kernel build on this machine" \
					"compiled in $((took / 60)) min $((took % 60)) s (~$total steps); progress every 30 s"
			else
				log "compiling the kernel in $dir: 5 minutes on 2 idle cores, 15-20 while" \
					"other builds run; progress every 30 s"
			fi
			said=1
		fi
		((now - last >= 30)) || continue
		last=$now
		n=$(wc -l <"$dir/build.log")
		t0=$(stat -c %Y "$dir/merge_config.log" 2>/dev/null || echo "$now")
		rate_left=""
		((n > 50 && n < total)) && rate_left=", ~$(((now - t0) * (total - n) / n)) s left at this pace"
		log "still building the kernel: $n of ~$total steps, $((now - t0)) s so far$rate_left"
	done
}
kernel_progress >/dev/null &
PROGRESS_PID=$!
KERNEL_DIR=$("$KIT_DIR/build-kernel.sh" | tail -n1) || {
	kill "$PROGRESS_PID" 2>/dev/null
	die "build-kernel.sh failed"
}
kill "$PROGRESS_PID" 2>/dev/null || true
wait "$PROGRESS_PID" 2>/dev/null || true
[[ -f $KERNEL_DIR/.complete ]] || die "build-kernel.sh gave no finished kernel ($KERNEL_DIR)"

mkdir -p "$OUT_DIR"
TMP=$(mktemp -d "$OUT_DIR/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# --- /init --------------------------------------------------------------------
log "assembling /init from init.S"
gcc -nostdlib -static -no-pie -s -Wl,--build-id=none -o "$TMP/init" "$KIT_DIR/init.S"
touch -d @0 "$TMP/init" # gen_init_cpio stores a file's own mtime
# Must be a static x86-64 executable with no interpreter and no libc.
elf=$(readelf -hl "$TMP/init")
[[ $elf == *Machine:*X86-64* ]] || die "/init is not x86-64"
[[ $elf == *Type:*EXEC* ]] || die "/init is not a static (non-PIE) executable"
[[ $elf != *INTERP* ]] || die "/init asks for a program interpreter"

# --- initramfs: uncompressed newc cpio ------------------------------------------
# Written from a list by the kernel's own gen_init_cpio, so /dev/console can be
# a device node without root rights or mknod on the host. Timestamps are 0 so
# the archive is reproducible.
cat >"$TMP/initramfs.list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
file /init $TMP/init 0755 0 0
EOF
log "writing initramfs.cpio"
"$KERNEL_DIR/gen_init_cpio" -t 0 "$TMP/initramfs.list" >"$TMP/initramfs.cpio"
if command -v cpio >/dev/null; then
	listing=$(cpio -it --quiet <"$TMP/initramfs.cpio" | sort | tr '\n' ' ')
	[[ $listing == "dev dev/console init " ]] ||
		die "initramfs.cpio holds unexpected entries: $listing"
fi

# --- initramfs-user.cpio: busybox, arbor-guest and a shell on ttyS0 -------------
# Optional second initramfs for tests that run programs in the guest (needs
# syscall-fault.patch, in every kit kernel). Skipped with a warning when
# busybox-static or cargo is missing, so kernel-log tests keep working.
build_user_initramfs() {
	local busybox=${ARBOR_BUSYBOX:-/bin/busybox}
	if [[ ! -x $busybox ]] || ! readelf -l "$busybox" >/dev/null 2>&1 ||
		readelf -l "$busybox" | grep -q INTERP; then
		log "WARNING: no static busybox at $busybox (install-deps.sh installs busybox-static):" \
			"initramfs-user.cpio not built"
		return 1
	fi
	command -v cargo >/dev/null || {
		log "WARNING: cargo not found: initramfs-user.cpio not built"
		return 1
	}
	log "building arbor-guest (static, baseline x86-64)"
	"$KIT_DIR/build-arbor-guest.sh" "$TMP/arbor-guest" || return 1

	# busybox init runs /etc/inittab: mount the pseudo file systems, then a
	# shell on ttyS0 without echo (the host drives it; see README.md).
	cat >"$TMP/inittab" <<'INITTAB'
::sysinit:/bin/mount -t proc proc /proc
::sysinit:/bin/mount -t sysfs sysfs /sys
::sysinit:/bin/mount -t devtmpfs devtmpfs /dev
::sysinit:/bin/mount -t tmpfs tmpfs /tmp
ttyS0::respawn:/bin/sh -c 'stty -echo; echo arbor-guest: shell on ttyS0; exec /bin/sh'
::shutdown:/bin/sync
INITTAB
	touch -d @0 "$TMP/inittab"
	{
		echo "dir /dev 0755 0 0"
		echo "nod /dev/console 0600 0 0 c 5 1"
		local d
		for d in proc sys tmp etc bin sbin usr usr/bin usr/sbin; do
			echo "dir /$d 0755 0 0"
		done
		echo "file /bin/busybox $busybox 0755 0 0"
		echo "file /bin/arbor-guest $TMP/arbor-guest 0755 0 0"
		echo "file /etc/inittab $TMP/inittab 0644 0 0"
		echo "slink /init /bin/busybox 0777 0 0"
		# One link per applet (busybox --list-full: bin/sh, sbin/init, ...).
		local a
		"$busybox" --list-full | sort | while read -r a; do
			[[ $a == bin/busybox || $a == linuxrc ]] && continue
			echo "slink /$a /bin/busybox 0777 0 0"
		done
	} >"$TMP/initramfs-user.list"
	log "writing initramfs-user.cpio"
	"$KERNEL_DIR/gen_init_cpio" -t 0 "$TMP/initramfs-user.list" >"$TMP/initramfs-user.cpio"
}
USER_CPIO=0
if build_user_initramfs; then
	USER_CPIO=1
fi

# --- Place the results ----------------------------------------------------------
# Copies, not links: cleaning the cache must not break a built tree. Each file
# is replaced by a rename, never rewritten in place, so a guest that is
# booting from the old file meanwhile is not disturbed; unchanged files are
# left alone.
place() {
	local src=$1 dst=$OUT_DIR/$2
	cmp -s "$src" "$dst" && return 0
	install -m 0644 "$src" "$TMP/$2.new"
	mv -f "$TMP/$2.new" "$dst"
}
place "$KERNEL_DIR/vmlinux" vmlinux
place "$KERNEL_DIR/bzImage" bzImage
place "$TMP/initramfs.cpio" initramfs.cpio
place "$KIT_DIR/cmdline" cmdline
place "$KERNEL_DIR/config" kernel.config.full
if ((USER_CPIO)); then
	place "$TMP/initramfs-user.cpio" initramfs-user.cpio
	place "$TMP/arbor-guest" arbor-guest
fi

log "guest ready in $OUT_DIR (kernel cache: $KERNEL_DIR)"
for f in vmlinux bzImage initramfs.cpio cmdline; do
	echo "$OUT_DIR/$f"
done
((USER_CPIO == 0)) || echo "$OUT_DIR/initramfs-user.cpio"

#!/usr/bin/env bash
# Build Arbor's test-guest kernel (vmlinux with a PVH entry note, and an LZ4
# bzImage) from Debian's linux-source-6.1 package, with kernel.config and the
# patches int3-selftest.patch, fpu-drop-fwait.patch, int80-reboot.patch and
# syscall-fault.patch from this directory (README.md says why each is needed).
#
# The build happens in a cache directory outside the checkout:
#   ${ARBOR_CACHE_DIR:-$HOME/.cache/arbor}/kernel-<hash>
# where <hash> covers kernel.config's settings (not its comments), the
# patches, this script and the
# linux-source package version. If that directory already holds a finished
# build, nothing is rebuilt. On success the last line printed is the path of
# that directory, which holds: vmlinux bzImage config System.map gen_init_cpio
#
# Environment:
#   ARBOR_CACHE_DIR          cache root (default $HOME/.cache/arbor)
#   ARBOR_LINUX_SOURCE       source tarball (default /usr/src/linux-source-6.1.tar.xz)
#   ARBOR_KEEP_KERNEL_TREE=1 keep the ~1.5 GB source/object tree after the build
#   ARBOR_KERNEL_JOBS        make -j value (default: number of CPUs + 1)
set -euo pipefail

KIT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${ARBOR_CACHE_DIR:-${HOME:?HOME is not set}/.cache/arbor}
SRC_PKG=linux-source-6.1
SRC_TARBALL=${ARBOR_LINUX_SOURCE:-/usr/src/${SRC_PKG}.tar.xz}
CONFIG_FRAGMENT=$KIT_DIR/kernel.config
PATCHES=("$KIT_DIR/int3-selftest.patch" "$KIT_DIR/fpu-drop-fwait.patch" "$KIT_DIR/int80-reboot.patch"
	"$KIT_DIR/syscall-fault.patch")
JOBS=${ARBOR_KERNEL_JOBS:-$(($(nproc) + 1))}

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { printf 'build-kernel: ERROR: %s\n' "$*" >&2; exit 1; }

# --- Preconditions ----------------------------------------------------------
[[ -r $SRC_TARBALL ]] ||
	die "kernel source $SRC_TARBALL not found; run $KIT_DIR/install-deps.sh"
for tool in make gcc ld bc bison flex patch xz tar sha256sum flock readelf perl; do
	command -v "$tool" >/dev/null ||
		die "'$tool' is missing; run $KIT_DIR/install-deps.sh"
done
[[ -e /usr/include/libelf.h || -e /usr/include/gelf.h ]] ||
	die "libelf headers are missing; run $KIT_DIR/install-deps.sh"
[[ -e /usr/include/openssl/opensslv.h ]] ||
	die "OpenSSL headers are missing; run $KIT_DIR/install-deps.sh"

if [[ $SRC_TARBALL == "/usr/src/${SRC_PKG}.tar.xz" ]]; then
	SRC_VERSION=$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null) ||
		die "package $SRC_PKG is not installed; run $KIT_DIR/install-deps.sh"
else
	# A tarball from elsewhere: key the cache on its content instead.
	SRC_VERSION=$(sha256sum "$SRC_TARBALL" | cut -d' ' -f1)
fi

# --- Cache key --------------------------------------------------------------
HASH=$({
	printf 'source %s %s\n' "$SRC_PKG" "$SRC_VERSION"
	# The config fragment's comments and blank lines do not change the
	# kernel, so they do not change the key either; its "# CONFIG_X is not
	# set" lines are settings, not comments.
	printf '== %s\n' "$(basename "$CONFIG_FRAGMENT")"
	grep -E -e '^# CONFIG_[A-Za-z0-9_]+ is not set$' -e '^[[:space:]]*[^#[:space:]]' "$CONFIG_FRAGMENT"
	for f in "${PATCHES[@]}" "${BASH_SOURCE[0]}"; do
		printf '== %s\n' "$(basename "$f")"
		cat "$f"
	done
} | sha256sum | cut -c1-16)
OUT=$CACHE_ROOT/kernel-$HASH
ARTIFACTS=(vmlinux bzImage config System.map gen_init_cpio)

is_complete() {
	local a
	[[ -f $OUT/.complete ]] || return 1
	for a in "${ARTIFACTS[@]}"; do [[ -s $OUT/$a ]] || return 1; done
}

mkdir -p "$CACHE_ROOT"
if is_complete; then
	log "cached kernel found ($SRC_PKG $SRC_VERSION, key $HASH), not rebuilding"
	echo "$OUT"
	exit 0
fi

# Serialise concurrent builds of the same configuration.
exec 9>"$CACHE_ROOT/kernel-$HASH.lock"
if ! flock -n 9; then
	log "another build of kernel-$HASH is running; waiting for it"
	flock 9
fi
if is_complete; then
	log "kernel-$HASH was built by another process meanwhile"
	echo "$OUT"
	exit 0
fi

# An unfinished directory (interrupted build) is started over.
WORK=$OUT
rm -rf "$WORK"
mkdir -p "$WORK"
log "building kernel-$HASH from $SRC_PKG $SRC_VERSION in $WORK"

# --- Source -----------------------------------------------------------------
log "extracting $SRC_TARBALL"
tar -xJf "$SRC_TARBALL" -C "$WORK"
TREE=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -print -quit)
[[ -f $TREE/Makefile && -f $TREE/arch/x86/kernel/alternative.c ]] ||
	die "unexpected layout of $SRC_TARBALL (no kernel tree in $TREE)"

for p in "${PATCHES[@]}"; do
	log "applying $(basename "$p")"
	patch -d "$TREE" -p1 --forward --batch --no-backup-if-mismatch <"$p" >/dev/null ||
		die "$(basename "$p") does not apply to $SRC_PKG $SRC_VERSION"
done
grep -q '^	if (0)$' "$TREE/arch/x86/kernel/alternative.c" ||
	die "int3 self-test skip is not in place after patching"
! grep -q '1: fwait' "$TREE/arch/x86/kernel/fpu/core.c" ||
	die "fwait is still in fpu__drop() after patching"
grep -q 'emulated_int80_reboot(regs);' "$TREE/arch/x86/kernel/traps.c" ||
	die "int \$0x80 reboot emulation is not in place after patching"
grep -q 'if (arbor_emulated_syscall(regs, error_code, address))' "$TREE/arch/x86/mm/fault.c" ||
	die "syscall page-fault emulation is not in place after patching"

# --- Configuration ----------------------------------------------------------
MAKE=(make -C "$TREE" KBUILD_BUILD_USER=arbor KBUILD_BUILD_HOST=guest-kit)
log "configuring: tinyconfig + kernel.config + olddefconfig"
"${MAKE[@]}" -s tinyconfig >/dev/null
(cd "$TREE" && scripts/kconfig/merge_config.sh -m .config "$CONFIG_FRAGMENT") >"$WORK/merge_config.log" 2>&1 ||
	{ cat "$WORK/merge_config.log" >&2; die "merge_config.sh failed"; }
"${MAKE[@]}" -s olddefconfig

# Every option in the fragment must have landed exactly as requested.
bad=0
checked=0
while IFS= read -r line; do
	if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		sym=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
	elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		sym=${BASH_REMATCH[1]} want=n
	else
		continue
	fi
	got=$(sed -n "s/^${sym}=//p" "$TREE/.config")
	[[ -n $got ]] || got=n
	checked=$((checked + 1))
	if [[ $got != "$want" ]]; then
		log "config mismatch: $sym requested '$want' but olddefconfig gave '$got'" \
			"(missing dependency? see 'depends on' in its Kconfig)"
		bad=$((bad + 1))
	fi
done <"$CONFIG_FRAGMENT"
((bad == 0)) || die "$bad of $checked requested options did not land; fix kernel.config"
log "all $checked requested options landed"

# Nothing that uses the FPU/SIMD may sneak in: it dies under the emulated KVM.
simd=$(grep -E '^CONFIG_(CRYPTO_[A-Z0-9_]*(INTEL|X86|X86_64|SSE[0-9_]*|AVX[0-9_]*|NI|SSSE3)|RAID6_PQ|XOR_BLOCKS|CRYPTO_DEV_[A-Z0-9_]+)=[ym]' \
	"$TREE/.config" || true)
[[ -z $simd ]] || die "SIMD/FPU users enabled by dependencies, disable them in kernel.config: $simd"

# --- Build ------------------------------------------------------------------
log "compiling with make -j$JOBS (about 5-10 minutes on 2 cores)"
start=$SECONDS
"${MAKE[@]}" -j"$JOBS" vmlinux bzImage >"$WORK/build.log" 2>&1 || {
	tail -n 40 "$WORK/build.log" >&2
	die "kernel build failed; full log: $WORK/build.log"
}
log "compiled in $((SECONDS - start)) s"

# The uncompressed vmlinux must carry the PVH entry point (Xen ELF note type
# 18, XEN_ELFNOTE_PHYS32_ENTRY) so that a VMM can start it in 32-bit mode.
notes=$(readelf -n "$TREE/vmlinux")
grep -Eq '^[[:space:]]*Xen[[:space:]].*0x00000012' <<<"$notes" ||
	die "vmlinux has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"
# bzImage: Linux boot protocol header magic "HdrS" at offset 0x202.
[[ $(dd if="$TREE/arch/x86/boot/bzImage" bs=1 skip=514 count=4 status=none) == HdrS ]] ||
	die "bzImage has no Linux boot protocol header"

# Host tool to write the initramfs (the kernel's own cpio list writer).
gcc -O2 -o "$WORK/gen_init_cpio" "$TREE/usr/gen_init_cpio.c"

cp "$TREE/vmlinux" "$WORK/vmlinux"
cp "$TREE/arch/x86/boot/bzImage" "$WORK/bzImage"
cp "$TREE/.config" "$WORK/config"
cp "$TREE/System.map" "$WORK/System.map"
printf '%s %s\n' "$SRC_PKG" "$SRC_VERSION" >"$WORK/source-version"
if [[ ${ARBOR_KEEP_KERNEL_TREE:-0} != 1 ]]; then
	rm -rf "$TREE"
fi
touch "$WORK/.complete"
log "done: $OUT"
others=$(find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d -name 'kernel-*' ! -path "$OUT" | sort)
[[ -z $others ]] || log "older kernel builds in the cache, safe to delete: ${others//$'\n'/ }"
echo "$OUT"

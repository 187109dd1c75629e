#!/usr/bin/env bash
# Install the Debian packages the guest kit needs to build its kernel and
# initramfs. Does nothing (and needs no network) when all are installed.
#
#   install-deps.sh          build dependencies only
#   install-deps.sh --qemu   also qemu-system-x86, to boot the guest by hand
#
# When another apt-get or dpkg holds the package manager's lock, waits for
# it up to ARBOR_APT_LOCK_TIMEOUT seconds (default 600), with a message.
set -euo pipefail

PACKAGES=(
	linux-source-6.1 # the kernel source tarball in /usr/src
	build-essential  # gcc, make, binutils, libc headers
	bc bison flex    # kernel build tools
	libelf-dev       # objtool
	libssl-dev       # scripts/sign-file, scripts/extract-cert
	perl             # kernel build scripts
	xz-utils         # to unpack the source tarball
	patch            # to apply int3-selftest.patch
	cpio             # to list the initramfs it writes
	util-linux       # flock
	busybox-static   # the user-space guest's shell and tools (initramfs-user.cpio)
)

case ${1:-} in
--qemu) PACKAGES+=(qemu-system-x86) ;;
--help)
	sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"
	exit 0
	;;
"") ;;
*)
	echo "usage: $0 [--qemu]" >&2
	exit 2
	;;
esac

log() { printf 'install-deps: %s\n' "$*" >&2; }

missing=()
for pkg in "${PACKAGES[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
	[[ $status == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
	log "all ${#PACKAGES[@]} packages already installed"
	exit 0
fi

SUDO=()
if ((EUID != 0)); then
	command -v sudo >/dev/null || {
		log "ERROR: not root and no sudo; install as root: ${missing[*]}"
		exit 1
	}
	SUDO=(sudo)
fi

log "installing: ${missing[*]}"
# shellcheck source=resources/guest-kit/apt-wait.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt-wait.sh"
APT=(apt-get -q -o DPkg::Lock::Timeout="$APT_WAIT")
export DEBIAN_FRONTEND=noninteractive
wait_apt_lock
"${SUDO[@]}" "${APT[@]}" update
wait_apt_lock
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
	"${APT[@]}" install -y --no-install-recommends "${missing[@]}"
log "done"

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
# Another apt-get or dpkg running (another checkout's install, unattended
# upgrades) holds the package manager's locks: wait for them, bounded,
# with a message, instead of failing at once.
APT_LOCKS=(/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock)
APT_WAIT=${ARBOR_APT_LOCK_TIMEOUT:-600}
wait_apt_lock() {
	local start=$SECONDS said=0
	command -v fuser >/dev/null || return 0
	while fuser "${APT_LOCKS[@]}" >/dev/null 2>&1; do
		if ((SECONDS - start >= APT_WAIT)); then
			printf 'install-deps: ERROR: the package manager is still busy after %s s (see: fuser -v %s)\n' \
				"$APT_WAIT" "${APT_LOCKS[*]}" >&2
			exit 1
		fi
		((said)) || printf 'install-deps: another package installation is running; waiting for it (up to %s s)\n' "$APT_WAIT" >&2
		said=1
		sleep 5
	done
}
APT=(apt-get -q -o DPkg::Lock::Timeout="$APT_WAIT")
export DEBIAN_FRONTEND=noninteractive
wait_apt_lock
"${SUDO[@]}" "${APT[@]}" update
wait_apt_lock
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
	"${APT[@]}" install -y --no-install-recommends "${missing[@]}"
log "done"

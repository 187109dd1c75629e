#!/usr/bin/env bash
# Debian packages Arbor's build, tests and demo need; installs only what is
# missing (no network needed when everything is there). Waits for another
# installation's package manager lock up to ARBOR_APT_LOCK_TIMEOUT seconds
# (default 600).
[[ ${1:-} != --help ]] || { sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"; exit 0; }
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The guest kit's own list (kernel build), plus the tools tests use:
# e2fsprogs (mke2fs -d for ext4 images), fdisk (sfdisk for partition
# tables), curl (API examples), qemu-utils (qemu-io, for the image locking
# test's check that Arbor and QEMU exclude each other), python3-venv (the
# virtual environment test-all.sh installs schemathesis into).
"$REPO/resources/guest-kit/install-deps.sh"
# shellcheck source=resources/guest-kit/apt-wait.sh
. "$REPO/resources/guest-kit/apt-wait.sh"
extra=()
for pkg in e2fsprogs fdisk curl qemu-utils python3-venv; do
	status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
	[[ $status == "install ok installed" ]] || extra+=("$pkg")
done
if ((${#extra[@]})); then
	export DEBIAN_FRONTEND=noninteractive
	wait_apt_lock
	apt-get -q -o DPkg::Lock::Timeout="$APT_WAIT" update
	wait_apt_lock
	apt-get -q -o DPkg::Lock::Timeout="$APT_WAIT" install -y --no-install-recommends "${extra[@]}"
fi

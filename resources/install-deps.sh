#!/usr/bin/env bash
# Debian packages Arbor's build, tests and demo need; installs only what is
# missing (no network needed when everything is there).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The guest kit's own list (kernel build), plus the tools tests use:
# e2fsprogs (mke2fs -d for ext4 images), fdisk (sfdisk for partition
# tables), curl (API examples), qemu-utils (qemu-io, for the image locking
# test's check that Arbor and QEMU exclude each other), python3-venv (the
# virtual environment test-all.sh installs schemathesis into).
"$REPO/resources/guest-kit/install-deps.sh"
extra=()
for pkg in e2fsprogs fdisk curl qemu-utils python3-venv; do
	status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
	[[ $status == "install ok installed" ]] || extra+=("$pkg")
done
if ((${#extra[@]})); then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends "${extra[@]}"
fi

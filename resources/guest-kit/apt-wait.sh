# Sourced by the install-deps.sh scripts: wait_apt_lock.
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

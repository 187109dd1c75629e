# Shared by resources/demo.sh and resources/test-all.sh: logging, and the
# set-up both start with (Debian packages, Rust toolchain on PATH, guest kit).
# Source it; it sets REPO and GUEST.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '\n=== %s\n' "$*" >&2; }

arbor_setup() {
	cd "$REPO"
	log "host packages"
	"$REPO/resources/install-deps.sh"
	# shellcheck disable=SC1091
	[[ -f $HOME/.cargo/env ]] && . "$HOME/.cargo/env"
	command -v cargo >/dev/null || {
		echo "cargo not found: install Rust (rustup) first" >&2
		exit 1
	}
	log "guest kit"
	"$REPO/resources/guest-kit/build.sh"
	GUEST=${ARBOR_GUEST_DIR:-$REPO/target/guest}
}

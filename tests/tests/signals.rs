//! SIGTERM and SIGINT: the first shuts the VM down as `vm.shutdown` does
//! (power button, grace period, hard stop; exit status 0, socket removed),
//! a second one stops it at once (exit status 128 + the signal).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arbor_tests::{guest_kit, kvm_available, wait_for_socket, Guest};

/// One guest at a time.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("arbor-{name}-{}.sock", std::process::id()))
}

fn send(g: &Guest, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(g.pid()).unwrap();
    // SAFETY: kill(2) on the child we spawned and still own (not reaped).
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn boot(name: &str, sock: &Path, grace: &str) -> Guest {
    let _ = std::fs::remove_file(sock);
    let kit = guest_kit();
    let g = Guest::boot(
        name,
        &kit.vmlinux,
        1,
        "",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--shutdown-grace",
            grace,
        ],
    );
    wait_for_socket(sock);
    g
}

#[test]
fn sigterm_presses_the_power_button_then_stops() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket_path("sigterm");
    let mut g = boot("sigterm", &sock, "2");
    // Once booted the guest reads the button; this kit has no user space to
    // act on it, so the grace period ends the VM.
    g.wait_for("ACPI: button: Power Button [PWRB]");
    g.wait_for("Run /init as init process");
    send(&g, libc::SIGTERM);
    let st = g.wait_exit();
    let err = g.stderr();
    assert_eq!(st.code(), Some(0), "{st:?}\n{err}");
    assert!(err.contains("SIGTERM received"), "{err}");
    assert!(err.contains("power button"), "{err}");
    assert!(err.contains("it read the button event"), "{err}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn a_second_signal_stops_at_once() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket_path("sigtwice");
    // A grace period far longer than the test allows.
    let mut g = boot("sigtwice", &sock, "300");
    send(&g, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    send(&g, libc::SIGINT);
    let st = g.wait_exit();
    let took = start.elapsed();
    let err = g.stderr();
    assert_eq!(st.signal(), None, "{err}");
    assert_eq!(st.code(), Some(128 + libc::SIGINT), "{st:?}\n{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}\n{err}");
    assert!(err.contains("SIGTERM received"), "{err}");
    assert!(err.contains("SIGINT received again"), "{err}");
    assert!(!sock.exists(), "socket left behind");
}

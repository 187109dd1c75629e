//! Seccomp, per thread kind: with `ARBOR_SECCOMP_SELFTEST=<kind>` the
//! thread of that kind makes a forbidden system call right after installing
//! its filter. With `--seccomp=on` (the default) that kills `arbor` with
//! SIGSYS; with `--seccomp=log` it is only logged and the VM keeps running.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arbor_tests::{guest_kit, kvm_available, timeout, Guest};

/// One guest at a time.
static ONE_GUEST: Mutex<()> = Mutex::new(());

const KINDS: &[&str] = &["vcpu", "event-loop", "api", "worker", "intx", "signals"];

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("arbor-seccomp-{name}-{}.sock", std::process::id()))
}

fn start(kind: &str, mode: &str) -> Guest {
    let kit = guest_kit();
    let sock = socket_path(kind);
    let _ = std::fs::remove_file(&sock);
    let args: Vec<String> = [
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--initramfs",
        kit.initramfs.to_str().unwrap(),
        "--cmdline",
        &kit.cmdline,
        "--memory",
        "512M",
        // A device the guest activates at boot, so a worker starts.
        "--rng",
        "id=entropy",
        "--api-socket",
        sock.to_str().unwrap(),
        "--seccomp",
        mode,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Guest::start_env(
        &format!("seccomp-{kind}-{mode}"),
        &args,
        &[("ARBOR_SECCOMP_SELFTEST", kind)],
    )
}

/// The forbidden call kills the process with SIGSYS.
fn killed(kind: &str) {
    let mut g = start(kind, "on");
    let st = g.wait_exit();
    assert_eq!(
        st.signal(),
        Some(libc::SIGSYS),
        "{kind}: {st:?}\n--- stderr ---\n{}",
        g.stderr()
    );
    assert!(!g.stderr().contains("survived"), "{}", g.stderr());
}

/// The forbidden call is logged and returns; the guest boots on.
fn logged(kind: &str) {
    let g = start(kind, "log");
    let needle = format!("seccomp selftest ({kind}) survived");
    let deadline = Instant::now() + timeout();
    while !g.stderr().contains(&needle) {
        assert!(
            Instant::now() < deadline,
            "{kind}: no {needle:?}\n--- stderr ---\n{}",
            g.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    g.wait_for("Run /init as init process");
}

#[test]
fn a_forbidden_call_kills_every_thread_kind() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    for kind in KINDS {
        killed(kind);
    }
}

#[test]
fn log_mode_only_logs_a_forbidden_call() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    for kind in KINDS {
        logged(kind);
    }
}

#[test]
fn off_installs_nothing() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let g = start("event-loop", "off");
    g.wait_for("Run /init as init process");
    assert!(!g.stderr().contains("survived"), "{}", g.stderr());
}

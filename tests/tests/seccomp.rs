//! Seccomp, per thread kind: with `ARBOR_SECCOMP_SELFTEST=<kind>` the
//! thread of that kind makes a forbidden system call right after installing
//! its filter. With `--seccomp=on` (the default) that kills `arbor` with
//! SIGSYS; with `--seccomp=log` it is only logged and the VM keeps running.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arbor_tests::{guest_kit, kvm_available, raw_disk, timeout, Guest, Scratch};

/// One guest at a time.
static ONE_GUEST: Mutex<()> = Mutex::new(());

const KINDS: &[&str] = &[
    "vcpu",
    "event-loop",
    "api",
    "blk-worker",
    "worker",
    "intx",
    "signals",
    "monitor",
    "vsock-worker",
];

/// The API socket's path, in the temporary directory (a scratch path can be too long
/// for a UNIX socket), removed when dropped: a VMM killed by SIGSYS leaves it behind.
struct ApiSocket(PathBuf);

impl ApiSocket {
    fn new(name: &str) -> ApiSocket {
        let p =
            std::env::temp_dir().join(format!("arbor-seccomp-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        ApiSocket(p)
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Boots with a disk, an rng and a vsock device, so that every kind of device worker
/// starts.
fn start(kind: &str, mode: &str, scratch: &Scratch) -> (Guest, ApiSocket) {
    let kit = guest_kit();
    let disk = scratch.path("disk.img");
    raw_disk(&disk, 3);
    let disk = format!("path={}", disk.display());
    let events = format!("path={}", scratch.path("events.jsonl").display());
    let vsock = format!("cid=3,socket={}", scratch.path("v.sock").display());
    let sock = ApiSocket::new(kind);
    let args: Vec<String> = [
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--initramfs",
        kit.initramfs.to_str().unwrap(),
        "--cmdline",
        &kit.cmdline,
        "--memory",
        "512M",
        // Devices the guest activates at boot, so their workers start.
        "--rng",
        "id=entropy",
        "--disk",
        &disk,
        "--vsock",
        &vsock,
        // So the event-monitor thread starts.
        "--event-monitor",
        &events,
        "--api-socket",
        sock.0.to_str().unwrap(),
        "--seccomp",
        mode,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let g = Guest::start_env(
        &format!("seccomp-{kind}-{mode}"),
        &args,
        &[("ARBOR_SECCOMP_SELFTEST", kind)],
    );
    (g, sock)
}

/// The forbidden call kills the process with SIGSYS.
fn killed(kind: &str) {
    let s = Scratch::new(&format!("seccomp-{kind}"));
    let (mut g, _sock) = start(kind, "on", &s);
    let st = g.wait_exit();
    assert_eq!(
        st.signal(),
        Some(libc::SIGSYS),
        "{kind}: {st:?}\n--- stderr ---\n{}",
        g.stderr()
    );
    assert!(!g.stderr().contains("survived"), "{}", g.stderr());
    // The filters went in; the forbidden call, not their installation,
    // killed it.
    assert!(
        g.stderr()
            .contains(&format!("seccomp selftest ({kind}) installed")),
        "{kind}: {}",
        g.stderr()
    );
}

/// In one VM, every kind's forbidden call is logged and returns; the guest
/// boots on.
fn logged_all() {
    let s = Scratch::new("seccomp-log");
    let (g, _sock) = start(&KINDS.join(","), "log", &s);
    let deadline = Instant::now() + timeout();
    for kind in KINDS {
        let needle = format!("seccomp selftest ({kind}) survived");
        while !g.stderr().contains(&needle) {
            assert!(
                Instant::now() < deadline,
                "{kind}: no {needle:?}\n--- stderr ---\n{}",
                g.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
    logged_all();
}

#[test]
fn off_installs_nothing() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new("seccomp-off");
    let (g, _sock) = start("event-loop", "off", &s);
    g.wait_for("Run /init as init process");
    assert!(!g.stderr().contains("survived"), "{}", g.stderr());
}

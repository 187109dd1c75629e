//! Disk image locking, compatible with QEMU's: an image `arbor` holds
//! read-write is refused to a second `arbor` (exit status 2), to QEMU's
//! `qemu-io` opening it read-write ("Failed to get "write" lock"), and to
//! `vm.add-disk` in the same VM (409), unless `lock=off`; and an image
//! `qemu-io` holds read-write is refused to `arbor`. Nothing here needs the
//! guest to boot, so the test does not wait for it. The QEMU half is
//! skipped, with a printed reason, when `qemu-io` is not installed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::client::Client;
use api::ApiErrorKind;
use arbor_tests::{
    disk_at, guest_kit, kvm_available, raw_disk, run_arbor, timeout, wait_for_socket, Guest,
    Scratch,
};

/// Whether another open file description holds a lock on `byte` of `path`.
fn byte_locked(path: &Path, byte: i64) -> bool {
    let f = std::fs::File::open(path).expect("open image");
    // SAFETY: an all-zero `flock` is valid; OFD locks need l_pid == 0.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: F_OFD_GETLK on a descriptor `f` owns, with a live `flock`.
    let r = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::F_OFD_GETLK,
            &mut fl,
        )
    };
    assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    i32::from(fl.l_type) != libc::F_UNLCK
}

fn qemu_io_installed() -> bool {
    Command::new("qemu-io")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `qemu-io -f raw [-r] -c 'read 0 512' IMAGE`: its status and output.
fn qemu_io_read(path: &Path, read_only: bool) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    if read_only {
        cmd.arg("-r");
    }
    let out = cmd
        .args(["-c", "read 0 512"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn images_in_use_are_refused() {
    if !kvm_available() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let kit = guest_kit();
    let kernel = kit.vmlinux.display().to_string();
    let s = Scratch::new("locking");
    let img = s.path("shared.img");
    raw_disk(&img, 1);
    let other = s.path("other.img");
    raw_disk(&other, 1);
    let spec = format!("path={}", img.display());
    let qemu = qemu_io_installed();
    if !qemu {
        eprintln!("qemu-io is not installed (package qemu-utils): QEMU checks skipped");
    }

    let sock = s.path("api.sock");
    let sock_s = sock.display().to_string();
    let mut g = Guest::boot(
        "locking",
        &kit.vmlinux,
        1,
        "",
        &["--api-socket", &sock_s, "--disk", &spec],
    );
    wait_for_socket(&sock);
    // QEMU's lock bytes: "consistent read" and "write" held (100, 101),
    // "write" and "resize" not shared (201, 203).
    for (byte, want) in [
        (100, true),
        (101, true),
        (102, false),
        (201, true),
        (203, true),
    ] {
        assert_eq!(byte_locked(&img, byte), want, "lock byte {byte}");
    }

    // (a) A second arbor, read-write or read-only: exit status 2.
    for extra in ["", ",readonly=on"] {
        let d = format!("{spec}{extra}");
        let (code, stderr) = run_arbor(&["--kernel", &kernel, "--disk", &d]);
        assert_eq!(code, Some(2), "{d}: {stderr}");
        assert!(stderr.contains("the image is in use"), "{d}: {stderr}");
        assert!(stderr.contains("lock=off"), "{d}: {stderr}");
    }
    // The same image twice in one command line, even unused by anyone.
    let o = format!("path={}", other.display());
    let (code, stderr) = run_arbor(&["--kernel", &kernel, "--disk", &o, "--disk", &o]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("the image is in use"), "{stderr}");

    // (b) QEMU cannot open it read-write; read-only it may (qemu-io -r
    // lets others write, so it does not conflict with a writer).
    if qemu {
        let (ok, out) = qemu_io_read(&img, false);
        assert!(!ok, "qemu-io opened an image arbor holds: {out}");
        assert!(out.contains("Failed to get \"write\" lock"), "{out}");
        let (ok, out) = qemu_io_read(&img, true);
        assert!(ok, "qemu-io -r: {out}");
    }

    // (c) vm.add-disk of the same image: 409, read-write or read-only; with
    // lock=off it is added.
    let c = Client::new(&sock).with_timeout(Duration::from_secs(30));
    let before = c.vm_info().expect("vm.info").devices;
    for ro in [false, true] {
        let mut d = disk_at(&img, "again", None, None);
        d.readonly = ro;
        let e = c.vm_add_disk(&d).expect_err("an image in use");
        assert_eq!(e.api_error_kind(), Some(ApiErrorKind::Conflict), "{e}");
        assert!(e.to_string().contains("the image is in use"), "{e}");
    }
    assert_eq!(c.vm_info().expect("vm.info").devices, before);
    let mut d = disk_at(&img, "unlocked", None, None);
    d.lock = false;
    c.vm_add_disk(&d).expect("lock=off skips the check");

    c.vmm_shutdown().expect("vmm.shutdown");
    let st = g.wait_exit();
    assert!(st.success(), "arbor exited with {st}");
    drop(g);
    // Its locks went with it.
    assert!(!(100..104).chain(200..204).any(|b| byte_locked(&img, b)));

    // QEMU holding the image read-write: arbor refuses it.
    if qemu {
        let mut q = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(&img)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        let deadline = Instant::now() + timeout();
        while !byte_locked(&img, 101) {
            assert!(Instant::now() < deadline, "qemu-io never locked the image");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (code, stderr) = run_arbor(&["--kernel", &kernel, "--disk", &spec]);
        drop(q.stdin.take());
        let _ = q.wait();
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains("the image is in use"), "{stderr}");
    }
}

//! The interactive console on a terminal (a pseudo-terminal here): `arbor`
//! puts it in raw mode and gives it back as it found it on every way out,
//! `Ctrl-A x` stops the VM at once, `Ctrl-A h` lists the escape keys, and
//! Ctrl-C (SIGINT from the terminal) shuts the guest down.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_tests::{arbor_bin, guest_kit, kvm_available, timeout};

struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

fn open_pty() -> Pty {
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given integers; the
    // name, termios and window-size arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here.
    unsafe {
        Pty {
            master: OwnedFd::from_raw_fd(m),
            slave: OwnedFd::from_raw_fd(s),
        }
    }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data that tcgetattr fills.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, writable termios and `fd` is open.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

/// Runs arbor with the pty's slave as its controlling terminal and stdio;
/// once the kernel has printed its first line, types each step's keys and
/// waits for its text; returns the exit status, what arbor wrote, and the
/// time from the last keys to the exit.
fn session(steps: &[(&[u8], &str)]) -> (Option<i32>, String, Duration) {
    let kit = guest_kit();
    let pty = open_pty();
    let before = lflag(&pty.slave);
    assert_ne!(before & libc::ICANON, 0, "a fresh pty is in canonical mode");
    let slave_fd = pty.slave.as_raw_fd();
    let mut cmd = Command::new(arbor_bin());
    cmd.args(["--kernel", kit.vmlinux.to_str().unwrap()])
        .args(["--initramfs", kit.initramfs.to_str().unwrap()])
        .args(["--cmdline", &kit.cmdline])
        .args(["--shutdown-grace", "2"])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    // SAFETY: between fork and exec only async-signal-safe calls: a new
    // session, then the pty as its controlling terminal (so Ctrl-C sends
    // SIGINT to arbor as it would in a shell).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn arbor");
    let out = Arc::new(Mutex::new(String::new()));
    let mut reader = std::fs::File::from(pty.master.try_clone().unwrap());
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let wait_text = |needle: &str| {
        let deadline = Instant::now() + timeout();
        while !out.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no '{needle}' in: {}",
                out.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_text("Linux version");
    // While arbor runs the terminal is raw: no echo, no line editing.
    assert_eq!(lflag(&pty.slave) & (libc::ICANON | libc::ECHO), 0);
    let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
    let mut typed = Instant::now();
    for (keys, needle) in steps {
        std::io::Write::write_all(&mut master, keys).unwrap();
        typed = Instant::now();
        wait_text(needle);
    }
    let deadline = Instant::now() + timeout();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("arbor did not exit: {}", out.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = typed.elapsed();
    // Given back as found: canonical mode and echo again.
    assert_eq!(
        lflag(&pty.slave) & (libc::ICANON | libc::ECHO | libc::ISIG),
        before & (libc::ICANON | libc::ECHO | libc::ISIG),
        "terminal not restored: {}",
        out.lock().unwrap()
    );
    std::thread::sleep(Duration::from_millis(100));
    let text = out.lock().unwrap().clone();
    (status.code(), text, took)
}

#[test]
fn console_escape_keys_and_ctrl_c_restore_the_terminal() {
    if !kvm_available() {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    }
    // Ctrl-A h prints the keys; Ctrl-A x stops the VM at once, status 0.
    let (code, text, took) = session(&[
        (b"\x01h", "Ctrl-A x  stop the VM and exit"),
        (b"\x01x", "Ctrl-A x: stopping the VM"),
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {text}");

    // Ctrl-C: the terminal's SIGINT presses the power button; the kit's
    // minimal guest ignores it, so the VM stops after the 2 s grace period.
    let (code, text, _) = session(&[(b"\x03", "SIGINT received")]);
    assert_eq!(code, Some(0), "{text}");
}

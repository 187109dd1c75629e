//! Hardening against hostile or mistaken input, on one real VM: disk files
//! that cannot be disks (a FIFO, which used to block the event loop in
//! `open`, a directory, an empty file, a partial sector, a relative path)
//! are refused with 400 and change nothing, and guest RAM is left out of
//! the VMM's core dumps (`dd` in its `/proc/PID/smaps` flags). Nothing here
//! needs the guest to boot, so the test does not wait for it.

use std::ffi::CString;
use std::path::Path;
use std::time::{Duration, Instant};

use api::client::Client;
use api::types::{DiskConfig, VmState};
use api::ApiErrorKind;
use arbor_tests::{guest_kit, kvm_available, run_arbor, wait_for_socket, Guest, Scratch};

fn mkfifo(path: &Path) {
    let c = CString::new(path.to_str().expect("UTF-8 path")).expect("no NUL");
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn disk(path: &str, readonly: bool) -> DiskConfig {
    DiskConfig {
        path: path.to_string(),
        readonly,
        ..Default::default()
    }
}

/// The mappings of `pid` of at least `min` bytes, with their `VmFlags`.
fn big_mappings(pid: u32, min: u64) -> Vec<(String, u64, String)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut out = Vec::new();
    let mut current: Option<(String, u64)> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                current = Some((line.to_string(), hi - lo));
                continue;
            }
        }
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some((head, size)) = current.take() {
                if size >= min {
                    out.push((head, size, flags.trim().to_string()));
                }
            }
        }
    }
    out
}

#[test]
fn bad_disks_are_refused_and_guest_ram_is_not_dumped() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let s = Scratch::new("hardening");
    let fifo = s.path("fifo");
    mkfifo(&fifo);
    let empty = s.path("empty.img");
    std::fs::write(&empty, b"").expect("empty file");
    let odd = s.path("odd.img");
    std::fs::write(&odd, [0u8; 1000]).expect("1000-byte file");

    // On the command line: refused before anything starts, at once.
    let kernel = kit.vmlinux.display().to_string();
    for (path, ro, want) in [
        (&fifo, true, "a FIFO"),
        (&s.0, false, "a directory"),
        (&empty, false, "empty"),
        (&odd, true, "not a multiple of 512"),
    ] {
        let spec = format!(
            "path={}{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        );
        let start = Instant::now();
        let (code, stderr) = run_arbor(&["--kernel", &kernel, "--disk", &spec]);
        assert_eq!(code, Some(2), "{spec}: {stderr}");
        assert!(stderr.contains(want), "{spec}: {stderr}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{spec} took {:?}",
            start.elapsed()
        );
    }

    let sock = s.path("api.sock");
    let sock_s = sock.display().to_string();
    let mut g = Guest::boot("hardening", &kit.vmlinux, 1, "", &["--api-socket", &sock_s]);
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(30));
    let before = c.vm_info().expect("vm.info").devices;

    // A FIFO opened read-only used to wait for a writer inside the event
    // loop: now a quick 400, and the loop still answers.
    let start = Instant::now();
    let e = c
        .vm_add_disk(&disk(&fifo.display().to_string(), true))
        .expect_err("a FIFO is not a disk");
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::BadRequest), "{e}");
    assert!(e.to_string().contains("a FIFO"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    c.vmm_ping().expect("vmm.ping after the FIFO");

    let cases = [
        (disk(&fifo.display().to_string(), false), "a FIFO"),
        (disk(&s.0.display().to_string(), true), "a directory"),
        (disk(&empty.display().to_string(), false), "empty"),
        (
            disk(&odd.display().to_string(), true),
            "(1000 bytes) is not a multiple of 512",
        ),
        (disk("odd.img", true), "must be absolute"),
        (disk("./odd.img", false), "must be absolute"),
    ];
    for (cfg, want) in cases {
        let e = c.vm_add_disk(&cfg).expect_err("refused");
        assert_eq!(
            e.api_error_kind(),
            Some(ApiErrorKind::BadRequest),
            "{}: {e}",
            cfg.path
        );
        assert!(e.to_string().contains(want), "{}: {e}", cfg.path);
    }
    let info = c.vm_info().expect("vm.info");
    assert_eq!(info.devices, before, "a refused disk changed the devices");
    assert_ne!(info.state, VmState::Shutdown);
    c.vmm_ping().expect("vmm.ping at the end");

    // Guest RAM (512 MiB, in pieces around the PCI hole) is marked
    // MADV_DONTDUMP.
    let big = big_mappings(g.pid(), 64 << 20);
    let total: u64 = big
        .iter()
        .filter(|(_, _, flags)| flags.split_whitespace().any(|f| f == "dd"))
        .map(|(_, size, _)| size)
        .sum();
    assert!(
        total >= 512 << 20,
        "guest RAM mappings without `dd`: {big:#?}"
    );

    c.vmm_shutdown().expect("vmm.shutdown");
    let st = g.wait_exit();
    assert!(st.success(), "arbor exited with {st}");
    drop(g);

    // The embedding API refuses relative paths too, even one that names a
    // good disk from this process's working directory.
    let good = s.path("good.img");
    std::fs::write(&good, [0u8; 4096]).expect("good disk");
    let cwd = std::env::current_dir().expect("cwd");
    let up = "../".repeat(cwd.components().count().saturating_sub(1));
    let relative = format!("{up}{}", good.display().to_string().trim_start_matches('/'));
    assert!(Path::new(&relative).exists(), "{relative}");
    let cfg = arbor_tests::kit_vm_config(vmm::SerialOutput::Off);
    let vm = vmm::Vm::new(cfg).expect("build VM");
    let handle = vm.handle();
    let running = vm.start().expect("start");
    let before = handle.info().expect("info").devices;
    let e = handle
        .add_disk(disk(&relative, true))
        .expect_err("relative path");
    assert_eq!(e.kind, ApiErrorKind::BadRequest, "{e:?}");
    assert!(e.message.contains("is relative"), "{e:?}");
    assert_eq!(handle.info().expect("info").devices, before);
    let added = handle
        .add_disk(disk(&good.display().to_string(), true))
        .expect("an absolute path to a good disk");
    assert!(!added.pci_path.is_empty());
    handle.stop().expect("stop");
    assert_eq!(running.wait().expect("wait"), vmm::ExitReason::VmmShutdown);
}

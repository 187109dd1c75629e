//! Mmap-able vfio-user regions mapped straight into the guest: the
//! project's `arbor-test-vfio-user-blk` server with `--bar2-file` has a
//! 64 KiB memory BAR 2 backed by a file, mmap-able as a whole, and logs
//! every BAR 2 access that reaches it (`bar2 read|write off=.. len=..`).
//! The VMM maps that file and gives it to the guest as a KVM memory slot,
//! so the guest's BAR 2 accesses (through an mmap of the function's sysfs
//! `resource2`, from `arbor-guest`) reach the file without the server
//! seeing one; BAR 0 (the virtio registers) stays trapped and forwarded.
//!
//! One guest boot: a cold-plugged function (guest writes, host reads the
//! file; host writes, guest reads), a hot-plugged one on the root bus
//! (its own memory slot), whose removal takes its slot away while the
//! first function keeps working. The time per 4-byte read of a mapped and
//! of a trapped BAR is printed (not asserted).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::Client;
use api::types::UserDeviceConfig;
use arbor_tests::{kvm_available, raw_disk, timeout, Guest, Scratch};

/// One `arbor-test-vfio-user-blk` process; its stdout (one line per
/// event) goes to `DIR/NAME.log`. Killed on drop.
struct BlkServer {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    bar2: PathBuf,
}

impl BlkServer {
    fn start(dir: &Path, name: &str) -> BlkServer {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let disk = dir.join(format!("{name}.img"));
        let bar2 = dir.join(format!("{name}.bar2"));
        raw_disk(&disk, 8);
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_arbor-test-vfio-user-blk"))
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(&disk)
            .arg("--bar2-file")
            .arg(&bar2)
            .stdout(std::fs::File::create(&log).expect("server log"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start arbor-test-vfio-user-blk");
        let s = BlkServer {
            child,
            socket,
            log,
            bar2,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.log().contains("listening on") {
            assert!(Instant::now() < deadline, "{name}: not listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The BAR 2 accesses the server saw after the first `from` bytes of
    /// its log.
    fn trapped_bar2(&self, from: usize) -> Vec<String> {
        self.log()
            .get(from..)
            .unwrap_or("")
            .lines()
            .filter(|l| l.contains("bar2 "))
            .map(String::from)
            .collect()
    }

    fn file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.bar2)
            .expect("BAR 2 file")
    }
}

impl Drop for BlkServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hex of `b`.
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A pattern of `len` bytes from `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs `cmd` in the guest and asserts it succeeded; returns its output.
fn ok(g: &Guest, cmd: &str) -> String {
    let (st, out) = g.run(cmd);
    assert_eq!(st, 0, "{cmd}:\n{out}\nstderr:\n{}", g.stderr());
    out
}

/// Guest writes into BAR 2 and reads the file's bytes back, both ways,
/// with no access reaching the server.
fn check_mapped(g: &Guest, srv: &BlkServer, pci_path: &str, seed: u8) {
    let file = srv.file();
    let mark = srv.log().len();
    // Guest -> host: 64 bytes (4-byte writes) in the first page, 3 bytes
    // (byte writes) in the last.
    let w = pattern(seed, 64);
    ok(
        g,
        &format!("arbor-guest bar-write {pci_path} 2 0x100 {}", hex(&w)),
    );
    ok(
        g,
        &format!("arbor-guest bar-write {pci_path} 2 0xfffd aabbcc"),
    );
    let mut got = vec![0u8; 64];
    file.read_exact_at(&mut got, 0x100).unwrap();
    assert_eq!(got, w, "the guest's BAR 2 write is not in the file");
    let mut tail = [0u8; 3];
    file.read_exact_at(&mut tail, 0xfffd).unwrap();
    assert_eq!(tail, [0xaa, 0xbb, 0xcc]);
    // Host -> guest.
    let r = pattern(seed.wrapping_add(1), 128);
    file.write_all_at(&r, 0x8000).unwrap();
    let out = ok(g, &format!("arbor-guest bar-read {pci_path} 2 0x8000 128"));
    assert!(
        out.contains(&format!("hex={}", hex(&r))),
        "the guest does not read the file's bytes:\n{out}"
    );
    let trapped = srv.trapped_bar2(mark);
    assert!(
        trapped.is_empty(),
        "BAR 2 accesses reached the server (not mapped):\n{}",
        trapped.join("\n")
    );
}

/// The guest's time per 4-byte read of `bar` at `offset`, `count` times.
fn time_reads(g: &Guest, pci_path: &str, bar: u8, offset: u32, count: u32) -> String {
    let out = ok(
        g,
        &format!("arbor-guest bar-time {pci_path} {bar} {offset:#x} {count}"),
    );
    out.lines()
        .find_map(|l| l.strip_prefix("ns_per_read="))
        .unwrap_or("?")
        .trim()
        .to_string()
}

#[test]
fn mmap_able_bar_is_a_memory_slot() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("vfio-mmap");
    let sock = s.path("api.sock");
    let cold = BlkServer::start(&s.0, "cold");
    let g = Guest::boot_user(
        "vfio-mmap",
        1,
        "",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--user-device",
            &format!("socket={},id=cold", cold.socket.display()),
        ],
    );
    g.wait_shell();
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    let info = c.vm_info().unwrap();
    let path = info
        .devices
        .iter()
        .find(|d| d.id == "cold")
        .expect("cold device in vm.info")
        .pci_path
        .clone();
    // The virtio driver binds (memory decode on).
    let out = ok(&g, &format!("arbor-guest wait-device {path} 120"));
    assert!(out.contains("driver=virtio-pci"), "{out}");
    check_mapped(&g, &cold, &path, 1);
    assert!(
        g.stderr()
            .contains("BAR 2: 0x10000 bytes at 0x0 mapped for the guest"),
        "{}",
        g.stderr()
    );

    // Numbers (not asserted): the mapped BAR 2 against BAR 0, trapped and
    // forwarded to the server (offset 0: the virtio feature select).
    let mapped = time_reads(&g, &path, 2, 0, 100_000);
    let trapped = time_reads(&g, &path, 0, 0, 500);
    eprintln!("guest 4-byte BAR reads: mapped {mapped} ns, trapped {trapped} ns");

    // A hot-plugged function gets its own slot; its removal takes it away
    // and leaves the first function mapped.
    let hot = BlkServer::start(&s.0, "hot");
    let added = c
        .vm_add_user_device(&UserDeviceConfig {
            socket: hot.socket.display().to_string(),
            id: Some("hot".into()),
            port: Some("root".into()),
            pci_path: None,
            function: None,
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", g.stderr()));
    ok(
        &g,
        &format!("arbor-guest wait-device {} 120", added.pci_path),
    );
    check_mapped(&g, &hot, &added.pci_path, 7);
    c.vm_remove_device("hot")
        .unwrap_or_else(|e| panic!("{e}\n{}", g.stderr()));
    let deadline = Instant::now() + timeout();
    while c.vm_info().unwrap().devices.iter().any(|d| d.id == "hot") {
        assert!(Instant::now() < deadline, "hot device not removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    check_mapped(&g, &cold, &path, 3);
    assert!(g.stderr().matches("mapped for the guest").count() >= 2);
}

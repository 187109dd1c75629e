//! A real guest driver using MSI-X and DMA on a vfio-user device: the
//! guest's own `virtio_blk` (over `virtio-pci`) drives the project's
//! virtio-blk served by `arbor-test-vfio-user-blk` (this package's test
//! server), which Arbor passes through with its vfio-user back end.
//!
//! One guest boot (user space, so the guest runs `arbor-guest` and reads
//! `/proc/interrupts`): a server cold-plugged into a native root port, then
//! a second hot-plugged into an ACPI bridge and removed. For each: the
//! returned `pci_path` resolves in the guest to the function `virtio-pci`
//! bound, with a `virtio_blk` disk of the image's size; the guest writes a
//! pattern with O_DIRECT and the host finds it in the server's image (the
//! server wrote guest RAM it mapped from the memfds `DMA_MAP` gave it); the
//! guest's interrupts for the device are its MSI-X vectors (sysfs
//! `msi_irqs/N/mode`), the request queue's with a non-zero count in
//! `/proc/interrupts`, and the server was given the MSI-X vectors'
//! eventfds (so the completions came through the emulated MSI-X table,
//! not INTx).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use api::client::Client;
use api::types::{DeviceState, UserDeviceConfig};
use arbor_tests::{kvm_available, raw_disk, timeout, wait_for_socket, Guest, Scratch};

/// Bytes of pattern the guest writes per disk.
const DATA: usize = 1 << 20;

/// One `arbor-test-vfio-user-blk` process; its stdout is collected.
struct BlkServer {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
    out: Arc<(Mutex<String>, Condvar)>,
}

impl BlkServer {
    fn start(dir: &Path, name: &str, mib: u64) -> BlkServer {
        let socket = dir.join(format!("{name}.sock"));
        let image = dir.join(format!("{name}.img"));
        raw_disk(&image, mib);
        let mut child = Command::new(env!("CARGO_BIN_EXE_arbor-test-vfio-user-blk"))
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(&image)
            .arg("--bar2-file")
            .arg(dir.join(format!("{name}.bar2")))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start arbor-test-vfio-user-blk");
        let out = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (m, c) = &*sink;
                let mut s = m.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
                c.notify_all();
            }
        });
        let srv = BlkServer {
            child,
            socket,
            image,
            out,
        };
        srv.wait_log("listening on");
        srv
    }

    fn log(&self) -> String {
        self.out.0.lock().unwrap().clone()
    }

    /// Waits (bounded) until the server printed `needle`.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + timeout();
        let (m, c) = &*self.out;
        let mut s = m.lock().unwrap();
        while !s.contains(needle) {
            let now = Instant::now();
            assert!(now < deadline, "server output lacks {needle:?}:\n{s}");
            s = c.wait_timeout(s, deadline - now).unwrap().0;
        }
        s.clone()
    }

    fn config(&self, id: &str, port: Option<&str>) -> UserDeviceConfig {
        UserDeviceConfig {
            socket: self.socket.display().to_string(),
            id: Some(id.into()),
            port: port.map(String::from),
            pci_path: None,
            function: None,
        }
    }
}

impl Drop for BlkServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the first `key=value` line of `out`.
fn kv<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

/// The guest's `/proc/interrupts` lines of virtio device `virtio` (e.g.
/// `virtio1`): the total count of each.
fn interrupt_lines(g: &Guest, virtio: &str) -> Vec<(String, u64)> {
    let (st, out) = g.run("cat /proc/interrupts");
    assert_eq!(st, 0, "{out}");
    let needle = format!("{virtio}-");
    out.lines()
        .filter(|l| l.contains(&needle))
        .map(|l| {
            let count = l
                .split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum();
            (l.trim().to_string(), count)
        })
        .collect()
}

/// Checks the server's function at `pci_path` in the guest: bound by
/// virtio-pci with a virtio_blk disk of `mib` MiB; the guest writes a
/// pattern the host then finds in the image; its completions came by
/// MSI-X. Returns the guest's BDF and block device name.
fn check_disk(
    g: &Guest,
    srv: &BlkServer,
    what: &str,
    pci_path: &str,
    mib: u64,
    seed: u64,
) -> (String, String) {
    let (st, out) = g.run(&format!("arbor-guest wait-device {pci_path} 120"));
    assert_eq!(
        st,
        0,
        "{what}: wait-device {pci_path}: {out}\n{}",
        srv.log()
    );
    let bdf = kv(&out, "bdf")
        .unwrap_or_else(|| panic!("{what}: no bdf in {out}"))
        .to_string();
    assert_eq!(kv(&out, "driver"), Some("virtio-pci"), "{what}: {out}");
    assert_eq!(
        kv(&out, "virtio-driver"),
        Some("virtio_blk"),
        "{what}: {out}"
    );
    assert_eq!(
        kv(&out, "sectors"),
        Some(((mib << 20) / 512).to_string().as_str()),
        "{what}: {out}"
    );
    let block = kv(&out, "block")
        .unwrap_or_else(|| panic!("{what}: no block device in {out}"))
        .to_string();
    eprintln!("{what}: {pci_path} -> {bdf}, /dev/{block}");

    // The guest writes (O_DIRECT, fsync); the server's image has it.
    let (st, w) = g.run(&format!("arbor-guest blk-write /dev/{block} {seed} {DATA}"));
    assert_eq!(st, 0, "{what}: guest write failed: {w}\n{}", srv.log());
    let img = std::fs::read(&srv.image).expect("read image");
    assert!(
        img[..DATA] == arbor_guest::pattern(seed, DATA)[..],
        "{what}: the server's image does not hold the guest's pattern"
    );
    let (st, v) = g.run(&format!(
        "arbor-guest blk-verify /dev/{block} {seed} {DATA}"
    ));
    assert_eq!(st, 0, "{what}: guest read back failed: {v}");
    eprintln!(
        "{what}: guest wrote {DATA} bytes in {} ms, read back in {} ms",
        kv(&w, "ms").unwrap_or("?"),
        kv(&v, "ms").unwrap_or("?")
    );

    // MSI-X: the function's MSI interrupts are all in MSI-X mode
    // (sysfs `msi_irqs/N/mode`: this kernel's /proc/interrupts names MSI
    // and MSI-X lines alike, "PCI-MSI"), every interrupt line of the
    // virtio device is one of them, and the request queue's has fired;
    // the server got the vectors' eventfds.
    let (st, modes) = g.run(&format!(
        "for f in /sys/bus/pci/devices/{bdf}/msi_irqs/*; do echo \"$(basename $f) $(cat $f/mode 2>/dev/null || cat $f)\"; done"
    ));
    assert_eq!(st, 0, "{modes}");
    let msix: Vec<&str> = modes
        .lines()
        .filter_map(|l| l.trim().strip_suffix(" msix"))
        .collect();
    assert!(
        !msix.is_empty() && modes.lines().filter(|l| !l.trim().is_empty()).count() == msix.len(),
        "{what}: not all of {bdf}'s interrupts are MSI-X:\n{modes}"
    );
    let (st, virtio) = g.run(&format!("ls -d /sys/bus/pci/devices/{bdf}/virtio*"));
    assert_eq!(st, 0, "{virtio}");
    let virtio = virtio
        .trim()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let lines = interrupt_lines(g, &virtio);
    assert!(!lines.is_empty(), "{what}: no interrupt lines for {virtio}");
    for (l, _) in &lines {
        let irq = l.split(':').next().unwrap_or_default().trim();
        assert!(
            msix.contains(&irq),
            "{what}: {virtio} uses IRQ {irq}, not one of {bdf}'s MSI-X vectors {msix:?}: {l}"
        );
    }
    let req: u64 = lines
        .iter()
        .filter(|(l, _)| l.contains("req"))
        .map(|(_, n)| n)
        .sum();
    assert!(req > 0, "{what}: no request interrupts counted: {lines:?}");
    eprintln!("{what}: MSI-X vectors {msix:?}; {lines:?}");
    let log = srv.wait_log("msix enabled");
    assert!(log.contains("set_irqs index=2 count=2"), "{log}");
    assert!(log.contains("device status 0x0f activated"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.starts_with("dma map iova=0x0 ") && !l.contains("refused")),
        "{what}: guest RAM not mapped:\n{log}"
    );
    (bdf, block)
}

#[test]
fn guest_virtio_blk_over_vfio_user_with_msix() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("vfio-user-virtio");
    let sock = s.path("api.sock");
    let cold = BlkServer::start(&s.0, "cold", 33);
    let g = Guest::boot_user(
        "vfio-user-virtio",
        1,
        "",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--pci-port",
            "id=rp0,type=root-port",
            "--pci-port",
            "id=rp1,type=root-port",
            "--pci-port",
            "id=br0,type=pci-bridge",
            "--user-device",
            &format!("socket={},id=cold,port=rp0", cold.socket.display()),
            "--remove-timeout",
            "120",
        ],
    );
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    g.wait_shell();

    // Cold plug, on a native root port.
    let info = c.vm_info().unwrap();
    let rec = info
        .devices
        .iter()
        .find(|d| d.id == "cold")
        .expect("cold device in vm.info");
    assert_eq!(rec.state, Some(DeviceState::Ok), "{rec:?}");
    let cold_path = rec.pci_path.clone();
    let (_, cold_block) = check_disk(&g, &cold, "cold plug (root port)", &cold_path, 33, 11);

    // Hot plug into an ACPI bridge, same checks, then removal.
    let hot = BlkServer::start(&s.0, "hot", 35);
    let added = c
        .vm_add_user_device(&hot.config("hot", Some("br0")))
        .unwrap_or_else(|e| panic!("hot plug: {e}\n{}", g.stderr()));
    let (bdf, _) = check_disk(&g, &hot, "hot plug (ACPI bridge)", &added.pci_path, 35, 12);
    c.vm_remove_device("hot")
        .unwrap_or_else(|e| panic!("removal: {e}\n{}", g.stderr()));
    let (st, out) = g.run(&format!("test -e /sys/bus/pci/devices/{bdf}; echo gone=$?"));
    assert_eq!((st, kv(&out, "gone")), (0, Some("1")), "{out}");
    let log = hot.wait_log("connection closed");
    assert!(log.contains("msix disabled"), "{log}");

    // The cold device still works after its neighbour left.
    let (st, v) = g.run(&format!("arbor-guest blk-verify /dev/{cold_block} 11 4096"));
    assert_eq!(st, 0, "{v}");
    let info = c.vm_info().unwrap();
    assert!(info.devices.iter().all(|d| d.id != "hot"));
}

/// Bad command lines and files: a message and exit status 2, no socket
/// left behind.
#[test]
fn server_refuses_bad_input() {
    let s = Scratch::new("vfio-user-blk-bad");
    let sock = s.path("s.sock");
    let img = s.path("d.img");
    raw_disk(&img, 1);
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_arbor-test-vfio-user-blk"))
            .args(args)
            .output()
            .expect("run the server");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let os = |p: &Path| p.as_os_str().to_owned();
    let (sock_s, img_s) = (os(&sock), os(&img));
    let flag = |f: &str| std::ffi::OsString::from(f);
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (vec![], "--socket is required"),
        (vec![flag("--socket"), sock_s.clone()], "--disk is required"),
        (vec![flag("--bogus")], "unknown argument '--bogus'"),
        (
            vec![
                flag("--socket"),
                sock_s.clone(),
                flag("--disk"),
                os(&s.path("none.img")),
            ],
            "none.img",
        ),
        (
            vec![
                flag("--socket"),
                sock_s.clone(),
                flag("--disk"),
                img_s.clone(),
                flag("--bar2-file"),
                os(&s.path("no/such/dir")),
            ],
            "BAR 2 file",
        ),
        (
            vec![
                flag("--socket"),
                os(&s.path("no/such/dir.sock")),
                flag("--disk"),
                img_s.clone(),
            ],
            "socket",
        ),
        // The socket path exists (an earlier server's, or any file).
        (
            vec![
                flag("--socket"),
                img_s.clone(),
                flag("--disk"),
                os(&s.path("e.img")),
            ],
            "already exists",
        ),
    ];
    raw_disk(&s.path("e.img"), 1);
    for (args, want) in cases {
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (code, err) = run(&refs);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!sock.exists(), "{args:?} left a socket");
    }
}

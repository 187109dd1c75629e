//! Multifunction slots in a real guest (the user-space initramfs, one boot
//! for every check: boots are slow here).
//!
//! For each kind of hotplug slot (a root port with native hotplug, a slot of
//! the ACPI bridge `br0`, a root-bus ACPI slot), three virtio-blk disks of
//! distinct sizes are staged as functions 1, 2 and 3: the guest sees nothing,
//! even when it rescans its buses itself. Adding function 0 commits the slot:
//! the guest probes all four disks, and each function's `pci_path` resolves
//! in the guest's sysfs to the function whose disk has that function's size.
//! Refusals leave `vm.info` unchanged: a function into a committed slot, a
//! function into a slot whose function 0 is single-function, removing
//! function 2 of a committed slot. Removing function 0 releases the four in
//! one request. A staged function is removed without ever being committed.
//! The same plumbing serves passthrough: two vfio-user servers (the
//! `vfio_user` crate's example gpio server, see `tests/vfio_user.rs`) as
//! functions 1 and 0 of one slot, both bound by the guest's `pci-idio-16`
//! driver and released together.
//! Cold plug: a slot without function 0 is a configuration error.

use std::time::{Duration, Instant};

use api::client::{Client, ClientError};
use api::types::{DiskConfig, SlotInfo, UserDeviceConfig, VmInfo};
use arbor_tests::{
    disk_at, gpio_server_bin, guest_kit, kvm_available, raw_disk, run_arbor, wait_count,
    wait_for_socket, GpioServer, Guest, Scratch, WITH_ACPI_BRIDGE,
};

/// An add request for `srv`'s function at `pci_path`.
fn config(srv: &GpioServer, id: &str, pci_path: &str) -> UserDeviceConfig {
    UserDeviceConfig {
        pci_path: Some(pci_path.into()),
        ..srv.config(id)
    }
}

/// The value of the first `key=value` line of `out`.
fn kv<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

/// The slot of `vm.info` whose path is `path` (function 0's).
fn slot_info(info: &VmInfo, path: &str) -> SlotInfo {
    info.topology
        .iter()
        .flat_map(|n| n.slots.iter())
        .find(|s| s.pci_path == path)
        .cloned()
        .unwrap_or_else(|| panic!("no slot {path} in {:#?}", info.topology))
}

/// A disk request for a function: by port (`port`) or by path.
fn function_disk(
    s: &Scratch,
    id: &str,
    mib: u64,
    port: Option<&str>,
    pci_path: Option<&str>,
    function: Option<u8>,
) -> DiskConfig {
    let f = s.path(&format!("{id}.img"));
    raw_disk(&f, mib);
    DiskConfig {
        function,
        ..disk_at(&f, id, port, pci_path)
    }
}

/// Asserts that `r` is a 409 whose message contains `needle`, and that
/// `vm.info` is what it was.
fn refused<T: std::fmt::Debug>(
    c: &Client,
    before: &VmInfo,
    what: &str,
    r: Result<T, ClientError>,
    needle: &str,
) {
    match r {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 409, "{what}: {message}");
            assert!(message.contains(needle), "{what}: {message}");
            eprintln!("{what}: refused: {message}");
        }
        other => panic!("{what}: expected 409, got {other:?}"),
    }
    assert_eq!(&c.vm_info().unwrap(), before, "{what}: vm.info changed");
}

/// The requests of one round: (function, port, pci_path, function field).
type Adds = [(u8, Option<&'static str>, Option<&'static str>, Option<u8>); 4];

/// One round: stage functions 1-3, check the guest sees nothing, commit
/// with function 0, check every function in the guest, check refusals,
/// remove the slot.
fn round(
    g: &Guest,
    c: &Client,
    s: &Scratch,
    what: &str,
    slot_path: &str,
    base_mib: u64,
    adds: &Adds,
) {
    let t = Instant::now();
    let mark = g.console().len();
    let id = |f: u8| format!("{what}-f{f}");
    let mut paths = Vec::new();
    // Stage functions 1, 2, 3 (adds[1..]).
    for (f, port, path, function) in &adds[1..] {
        let cfg = function_disk(
            s,
            &id(*f),
            base_mib + u64::from(*f),
            *port,
            *path,
            *function,
        );
        let added = c
            .vm_add_disk(&cfg)
            .unwrap_or_else(|e| panic!("{what}: staging function {f}: {e}"));
        assert_eq!(added.pci_path, format!("{slot_path}.{f}"), "{what}");
        paths.push((*f, added.pci_path));
    }
    let info = c.vm_info().unwrap();
    let slot = slot_info(&info, slot_path);
    assert!(slot.staged, "{what}: {slot:?}");
    assert_eq!(slot.device, None, "{what}: {slot:?}");
    let listed: Vec<(u8, &str)> = slot
        .functions
        .iter()
        .map(|f| (f.function, f.device.as_str()))
        .collect();
    let want: Vec<(u8, String)> = (1..4).map(|f| (f, id(f))).collect();
    let want: Vec<(u8, &str)> = want.iter().map(|(f, d)| (*f, d.as_str())).collect();
    assert_eq!(listed, want, "{what}");
    // A staged function is taken like any other.
    let before = c.vm_info().unwrap();
    let again = function_disk(
        s,
        &format!("{what}-again"),
        9,
        None,
        Some(&paths[0].1),
        None,
    );
    let r = c.vm_add_disk(&again);
    match r {
        Err(ClientError::Api { status: 409, .. }) => {}
        other => panic!("{what}: adding a staged function twice: {other:?}"),
    }
    assert_eq!(c.vm_info().unwrap(), before, "{what}");

    // The guest sees nothing, even when it scans its buses itself.
    let (st, out) = g.run("echo 1 > /sys/bus/pci/rescan");
    assert_eq!(st, 0, "{out}");
    for (f, p) in &paths {
        let (st, out) = g.run(&format!("arbor-guest resolve {p}"));
        assert_ne!(
            st, 0,
            "{what}: staged function {f} at {p} is visible: {out}"
        );
    }
    let tail = g.console()[mark..].to_string();
    assert!(
        !tail.contains("virtio_blk"),
        "{what}: the guest probed a staged function:\n{tail}"
    );

    // Function 0 commits the slot: all four disks appear.
    let (_, port, path, function) = adds[0];
    let cfg = function_disk(s, &id(0), base_mib, port, path, function);
    let added = c
        .vm_add_disk(&cfg)
        .unwrap_or_else(|e| panic!("{what}: adding function 0: {e}"));
    assert_eq!(added.pci_path, slot_path, "{what}");
    paths.insert(0, (0, added.pci_path));
    let tail = wait_count(g, mark, "512-byte logical blocks", 4);
    let mut bdfs = Vec::new();
    for (f, p) in &paths {
        let (st, out) = g.run(&format!("arbor-guest wait-device {p} 120"));
        assert_eq!(st, 0, "{what}: function {f} at {p}: {out}");
        let bdf = kv(&out, "bdf").unwrap_or_else(|| panic!("{what}: no bdf: {out}"));
        assert!(
            bdf.ends_with(&format!(".{f}")),
            "{what}: {p} resolved to {bdf}"
        );
        assert_eq!(kv(&out, "virtio-driver"), Some("virtio_blk"), "{out}");
        let sectors = ((base_mib + u64::from(*f)) << 20) / 512;
        assert_eq!(
            kv(&out, "sectors"),
            Some(sectors.to_string().as_str()),
            "{what}: function {f} at {p} is not its disk: {out}"
        );
        let line = format!("] {sectors} 512-byte logical blocks");
        assert!(tail.contains(&line), "{what}: no {line:?} in\n{tail}");
        eprintln!("{what}: {p} -> {bdf}, {sectors} sectors");
        bdfs.push(bdf.to_string());
    }
    let info = c.vm_info().unwrap();
    let slot = slot_info(&info, slot_path);
    assert!(!slot.staged, "{what}: {slot:?}");
    assert_eq!(slot.device.as_deref(), Some(id(0).as_str()), "{what}");
    assert_eq!(slot.functions.len(), 4, "{what}: {slot:?}");
    for (i, (f, p)) in paths.iter().enumerate() {
        let d = info.devices.iter().find(|d| d.id == id(*f)).unwrap();
        assert_eq!(&d.pci_path, p, "{what}");
        assert_eq!(d.bdf.as_deref(), Some(bdfs[i].as_str()), "{what}");
    }
    eprintln!("{what}: staged, committed and probed in {:?}", t.elapsed());

    // Refusals on a committed slot; vm.info unchanged.
    let before = c.vm_info().unwrap();
    let late = function_disk(
        s,
        &format!("{what}-late"),
        9,
        None,
        Some(&format!("{slot_path}.5")),
        None,
    );
    refused(c, &before, what, c.vm_add_disk(&late), "is committed");
    refused(
        c,
        &before,
        what,
        c.vm_remove_device(&id(2)),
        "a committed slot is removed whole",
    );

    // Removing function 0: the four go in one request.
    let t = Instant::now();
    c.vm_remove_device(&id(0))
        .unwrap_or_else(|e| panic!("{what}: removing the slot: {e}"));
    eprintln!("{what}: slot removed in {:?}", t.elapsed());
    let info = c.vm_info().unwrap();
    for f in 0..4 {
        assert!(
            !info.devices.iter().any(|d| d.id == id(f)),
            "{what}: {} still there",
            id(f)
        );
        g.wait_stderr(&format!("removed {} from", id(f)));
    }
    let slot = slot_info(&info, slot_path);
    assert!(slot.functions.is_empty() && !slot.staged, "{slot:?}");
    for bdf in &bdfs {
        let (st, out) = g.run(&format!("test -e /sys/bus/pci/devices/{bdf}"));
        assert_ne!(st, 0, "{what}: the guest still has {bdf}: {out}");
    }
}

#[test]
fn multifunction_slots_in_a_guest() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("multifunction");
    let sock = s.path("api.sock");
    let sock_arg = sock.display().to_string();
    // rp0-rp7 (native), br0 at root slot 09 (ACPI), root-bus slots 0a-1f
    // (ACPI).
    let g = Guest::boot_user(
        "multifunction",
        1,
        "",
        &[
            &["--api-socket", &sock_arg, "--remove-timeout", "60"][..],
            &WITH_ACPI_BRIDGE,
        ]
        .concat(),
    );
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    let booted = g.wait_shell();
    eprintln!("TIMING boot to shell: {booted:?}");

    // A native root port: functions by port and `function`.
    round(
        &g,
        &c,
        &s,
        "native",
        "01/00",
        20,
        &[
            (0, Some("rp0"), None, Some(0)),
            (1, Some("rp0"), None, Some(1)),
            (2, Some("rp0"), None, Some(2)),
            (3, Some("rp0"), None, Some(3)),
        ],
    );
    // A slot of the ACPI bridge br0: functions by path.
    round(
        &g,
        &c,
        &s,
        "acpi-bridge",
        "09/03",
        30,
        &[
            (0, None, Some("09/03"), None),
            (1, None, Some("09/03.1"), None),
            (2, Some("br0"), Some("09/03.2"), None),
            (3, None, Some("09/03"), Some(3)),
        ],
    );
    // A root-bus ACPI slot.
    round(
        &g,
        &c,
        &s,
        "root-bus",
        "1e",
        40,
        &[
            (0, None, Some("1e"), None),
            (1, None, Some("1e.1"), None),
            (2, None, Some("1e.2"), None),
            (3, None, Some("1e.3"), None),
        ],
    );

    // vfio-user passthrough: two servers as functions 1 and 0 of a slot
    // of br0 (which has an I/O window for their I/O BARs).
    let bin = gpio_server_bin();
    let f1 = GpioServer::start(&bin, &s.0, "gpio1");
    let f0 = GpioServer::start(&bin, &s.0, "gpio0");
    let mark = g.console().len();
    let added = c
        .vm_add_user_device(&config(&f1, "gpio-f1", "09/05.1"))
        .unwrap_or_else(|e| panic!("stage a vfio-user function: {e}\n{}", g.stderr()));
    assert_eq!(added.pci_path, "09/05.1");
    assert!(slot_info(&c.vm_info().unwrap(), "09/05").staged);
    let added = c
        .vm_add_user_device(&config(&f0, "gpio-f0", "09/05"))
        .unwrap_or_else(|e| panic!("commit with a vfio-user function 0: {e}\n{}", g.stderr()));
    assert_eq!(added.pci_path, "09/05");
    for (f, p) in [(0, "09/05"), (1, "09/05.1")] {
        let (st, out) = g.run(&format!("arbor-guest wait-device {p} 120"));
        assert_eq!(st, 0, "vfio-user function {f} at {p}: {out}");
        let bdf = kv(&out, "bdf").unwrap_or_else(|| panic!("no bdf: {out}"));
        assert!(bdf.ends_with(&format!(".{f}")), "{p} resolved to {bdf}");
        assert_eq!(kv(&out, "driver"), Some("pci-idio-16"), "{p}: {out}");
        let tail = g.console()[mark..].to_string();
        assert!(
            tail.contains(&format!("pci {bdf}: [494f:0dc8] type 00")),
            "[494f:0dc8] not at {bdf}:\n{tail}"
        );
        eprintln!("vfio-user: {p} -> {bdf}, pci-idio-16 bound");
    }
    c.vm_remove_device("gpio-f0")
        .expect("remove the vfio-user slot");
    let info = c.vm_info().unwrap();
    assert!(!info.devices.iter().any(|d| d.id.starts_with("gpio-")));
    for id in ["gpio-f0", "gpio-f1"] {
        g.wait_stderr(&format!("removed {id} from"));
    }
    drop((f0, f1));

    // Function 1 where function 0 is single-function.
    let single = function_disk(&s, "single", 11, Some("rp1"), None, None);
    let added = c.vm_add_disk(&single).expect("add a single-function disk");
    assert_eq!(added.pci_path, "02/00");
    let (st, out) = g.run("arbor-guest wait-device 02/00 120");
    assert_eq!(st, 0, "{out}");
    let before = c.vm_info().unwrap();
    let f1 = function_disk(&s, "single-f1", 12, Some("rp1"), None, Some(1));
    refused(
        &c,
        &before,
        "single-function",
        c.vm_add_disk(&f1),
        "single-function",
    );
    let f1 = function_disk(&s, "single-f1b", 12, None, Some("02/00.1"), None);
    refused(
        &c,
        &before,
        "single-function by path",
        c.vm_add_disk(&f1),
        "single-function",
    );
    c.vm_remove_device("single")
        .expect("remove the single disk");

    // Stage, then remove without committing: dropped at once, the guest
    // never told; the slot is free again and the image can be used again.
    let mark = g.console().len();
    let staged = function_disk(&s, "lone", 13, Some("rp2"), None, Some(2));
    let added = c.vm_add_disk(&staged).expect("stage a function");
    assert_eq!(added.pci_path, "03/00.2");
    assert!(slot_info(&c.vm_info().unwrap(), "03/00").staged);
    let t = Instant::now();
    c.vm_remove_device("lone")
        .expect("remove a staged function");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a staged function waited for the guest: {:?}",
        t.elapsed()
    );
    let info = c.vm_info().unwrap();
    assert!(!info.devices.iter().any(|d| d.id == "lone"));
    let slot = slot_info(&info, "03/00");
    assert!(slot.functions.is_empty() && !slot.staged, "{slot:?}");
    g.wait_stderr("lone at 03/00.2 is a staged function");
    let again = c.vm_add_disk(&staged).expect("the image is free again");
    assert_eq!(again.pci_path, "03/00.2");
    c.vm_remove_device("lone").expect("remove it again");
    assert!(
        !g.console()[mark..].contains("virtio_blk"),
        "the guest saw the staged function"
    );

    // The guest still works.
    let (st, out) = g.run("echo alive");
    assert_eq!((st, out.trim()), (0, "alive"));
}

/// Cold plug: every slot needs its function 0; with it, functions are
/// accepted in any order (no guest boots).
#[test]
fn cold_plugged_slot_without_function_0_is_refused() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("multifunction-cold");
    let img = s.path("a.img");
    raw_disk(&img, 4);
    let kit = guest_kit();
    let kernel = kit.vmlinux.display().to_string();
    let disk = format!("path={},pci_path=0a.2", img.display());
    let (code, out) = run_arbor(&[
        "--kernel",
        &kernel,
        "--disk",
        &disk,
        "--rng",
        "pci_path=0a.1",
    ]);
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("slot 0a has function(s) 1, 2 but no function 0"),
        "{out}"
    );
    // Out of range.
    let (code, out) = run_arbor(&["--kernel", &kernel, "--rng", "function=8"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("8 is out of range"), "{out}");
}

//! Hotplug through the API on the root bus (ACPI hotplug signalled by the
//! GED): the answer's PCI path names the BDF where the guest probes the
//! disk; removal completes when the guest ejects; a re-add reuses the slot
//! and the guest's names; add/remove cycles leak no descriptors or memory;
//! bad requests get the right status and change nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use api::client::Client;
use api::types::DiskConfig;
use api::{ApiErrorKind, Method};
use arbor_tests::{guest_kit, kvm_available, raw_disk, Guest, Scratch};
use pci::path::resolve_with_bridge_map;
use pci::PciPath;

fn disk(path: &std::path::Path, id: Option<&str>) -> DiskConfig {
    DiskConfig {
        path: path.display().to_string(),
        readonly: false,
        lock: true,
        id: id.map(String::from),
        serial: None,
        port: None,
        pci_path: None,
        function: None,
    }
}

/// The BDF a root-bus PCI path names.
fn bdf_of(path: &str) -> String {
    let p: PciPath = path.parse().expect("PCI path");
    resolve_with_bridge_map(&p, &BTreeMap::new())
        .expect("resolve")
        .to_string()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The descriptor count once it stops changing: the server side of the
/// last API connection closes only when the server sees the client's end.
fn settled_fd_count(pid: u32) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = fd_count(pid);
    let mut same = 0;
    while same < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let n = fd_count(pid);
        same = if n == last { same + 1 } else { 0 };
        last = n;
    }
    last
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Add/remove cycles between the two descriptor and memory samples.
const CYCLES: usize = 8;

/// Waits until the console has `n` occurrences of `needle` after `from`.
fn wait_count(g: &Guest, from: usize, needle: &str, n: usize) -> String {
    let deadline = std::time::Instant::now() + arbor_tests::timeout();
    loop {
        let c = g.console();
        let tail = c.get(from..).unwrap_or("").to_string();
        if tail.matches(needle).count() >= n {
            return tail;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {n} x {needle:?}; console after mark:\n{tail}\nstderr:\n{}",
            g.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn root_bus_hotplug() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let s = Scratch::new("hotplug");
    let sock = s.path("api.sock");
    let boot_disk = s.path("boot.img");
    raw_disk(&boot_disk, 16);
    let a = s.path("a.img");
    raw_disk(&a, 33);
    let b = s.path("b.img");
    raw_disk(&b, 34);
    let cycle = s.path("cycle.img");
    raw_disk(&cycle, 35);
    let cold = format!("path={},id=boot", boot_disk.display());
    let g = Guest::boot(
        "hotplug",
        &kit.vmlinux,
        1,
        "",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--disk",
            &cold,
            "--hotplug-order",
            "root,native,acpi",
            // ACPI removal is slow under emulation on a loaded machine.
            "--remove-timeout",
            "60",
        ],
    );
    g.wait_for("Run /init as init process");
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    let devices_before = c.vm_info().unwrap().devices;
    assert_eq!(devices_before.len(), 1);

    // Bad requests: the right status, and nothing changes.
    let raw = |body: &[u8]| {
        c.request(Method::PUT, "/api/v1/vm.add-disk", Some(body.to_vec()))
            .unwrap()
    };
    assert_eq!(raw(b"{not json").status, 400);
    assert_eq!(raw(br#"{"path": "/x", "bogus": 1}"#).status, 400);
    assert_eq!(raw(br#"{"readonly": true}"#).status, 400);
    let e = c
        .vm_add_disk(&disk(&s.path("missing.img"), None))
        .unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::BadRequest), "{e}");
    let e = c.vm_add_disk(&disk(&a, Some("boot"))).unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::Conflict), "{e}");
    let e = c.vm_remove_device("nope").unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::NotFound), "{e}");
    let e = c.vm_remove_device("boot").unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::Conflict), "{e}");
    let mut bad_path = disk(&a, None);
    bad_path.pci_path = Some("zz".into());
    assert_eq!(
        c.vm_add_disk(&bad_path).unwrap_err().api_error_kind(),
        Some(ApiErrorKind::BadRequest)
    );
    bad_path.pci_path = Some(devices_before[0].pci_path.clone()); // the cold-plugged disk's slot
    assert_eq!(
        c.vm_add_disk(&bad_path).unwrap_err().api_error_kind(),
        Some(ApiErrorKind::Conflict)
    );
    // A device id may not be a port's id (or the root bus's): vm.info lists both.
    for port_id in ["rp0", "root"] {
        let e = c.vm_add_disk(&disk(&a, Some(port_id))).unwrap_err();
        assert_eq!(e.api_error_kind(), Some(ApiErrorKind::BadRequest), "{e}");
        assert!(e.to_string().contains("id of a PCI port"), "{e}");
    }
    assert_eq!(c.vm_info().unwrap().devices, devices_before);

    // Add: the answer's path names the BDF where the guest finds the disk.
    let mark = g.console().len();
    let added = c.vm_add_disk(&disk(&a, Some("a"))).unwrap();
    assert_eq!(added.id, "a");
    let bdf = bdf_of(&added.pci_path);
    let tail = wait_count(&g, mark, "67584 512-byte logical blocks", 1);
    assert!(
        tail.contains(&format!("pci {bdf}: [1af4:1042] type 00 class 0x018000")),
        "disk not probed at {bdf} (path {}):\n{tail}",
        added.pci_path
    );
    let name = tail
        .lines()
        .find(|l| l.contains("67584 512-byte"))
        .and_then(|l| l.split('[').nth(1))
        .and_then(|l| l.split(']').next())
        .unwrap()
        .to_string();
    let info = c.vm_info().unwrap();
    let rec = info.devices.iter().find(|d| d.id == "a").unwrap();
    assert_eq!(rec.pci_path, added.pci_path);
    assert!(rec.hotplugged);

    // Remove: 204 once the guest ejected the slot.
    c.vm_remove_device("a").unwrap();
    assert!(c.vm_info().unwrap().devices.iter().all(|d| d.id != "a"));
    g.wait_stderr("removed a from");

    // Re-add into the same slot: the guest gives it the released name.
    let mark = g.console().len();
    let mut again = disk(&b, Some("a"));
    again.pci_path = Some(added.pci_path.clone());
    let re = c.vm_add_disk(&again).unwrap();
    assert_eq!(re.pci_path, added.pci_path);
    let tail = wait_count(&g, mark, "69632 512-byte logical blocks", 1);
    assert!(
        tail.contains(&format!("[{name}] 69632")),
        "name {name} not reused:\n{tail}"
    );
    assert!(tail.contains(&format!("pci {bdf}: [1af4:1042]")), "{tail}");
    c.vm_remove_device("a").unwrap();

    // An entropy device hot-plugs the same way.
    let mark = g.console().len();
    let rng = c
        .vm_add_rng(&api::types::RngConfig {
            id: Some("rng".into()),
            ..Default::default()
        })
        .unwrap();
    let rng_bdf = bdf_of(&rng.pci_path);
    wait_count(
        &g,
        mark,
        &format!("pci {rng_bdf}: [1af4:1044] type 00 class 0x00ff00"),
        1,
    );
    wait_count(
        &g,
        mark,
        &format!("virtio-pci {rng_bdf}: enabling device"),
        1,
    );
    c.vm_remove_device("rng").unwrap();

    // Add/remove cycles leave descriptors and memory flat.
    let pid = g.pid();
    let run_cycle = |g: &Guest, i: usize| {
        let mark = g.console().len();
        let r = c.vm_add_disk(&disk(&cycle, Some("cyc"))).unwrap();
        wait_count(g, mark, "71680 512-byte logical blocks", 1);
        c.vm_remove_device("cyc")
            .unwrap_or_else(|e| panic!("cycle {i}: remove of {} failed: {e}", r.pci_path));
    };
    // Warm up allocations (thread stacks, maps) before measuring.
    run_cycle(&g, 0);
    let (fds0, rss0) = (settled_fd_count(pid), rss_kib(pid));
    let start = std::time::Instant::now();
    // Eight cycles: a descriptor kept per cycle shows as a difference, and
    // memory kept per cycle beyond 256 KiB crosses the 2 MiB bound
    // (`resources/bench/storm-bench.py` runs hundreds of cycles).
    for i in 1..=CYCLES {
        run_cycle(&g, i);
    }
    let (fds1, rss1) = (settled_fd_count(pid), rss_kib(pid));
    eprintln!(
        "{CYCLES} add/remove cycles in {:?}: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB",
        start.elapsed()
    );
    assert_eq!(fds0, fds1, "file descriptors leaked");
    assert!(rss1 <= rss0 + 2048, "RSS grew from {rss0} to {rss1} KiB");
    assert_eq!(c.vm_info().unwrap().devices, devices_before);

    // Parallel requests are serialized: four concurrent adds get four
    // different slots, and concurrent removals all complete.
    let paths: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let f = s.path(&format!("par{i}.img"));
                raw_disk(&f, 50 + i);
                let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
                scope.spawn(move || {
                    c.vm_add_disk(&disk(&f, Some(&format!("par{i}"))))
                        .unwrap()
                        .pci_path
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut unique = paths.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "two hotplugs got the same slot: {paths:?}");
    for i in 0..4u64 {
        wait_count(
            &g,
            0,
            &format!("{} 512-byte logical blocks", (50 + i) * 2048),
            1,
        );
    }
    std::thread::scope(|scope| {
        for i in 0..4 {
            let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
            scope.spawn(move || c.vm_remove_device(&format!("par{i}")).unwrap());
        }
    });
    assert_eq!(c.vm_info().unwrap().devices, devices_before);
}

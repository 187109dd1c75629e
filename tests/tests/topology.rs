//! The PCI tree with a real guest: root ports, a switch, PCI bridges three
//! levels deep; devices cold-plugged behind them and hot-plugged into a
//! root port (native), a switch downstream port (native), a bridge behind a
//! root port (ACPI) and the root bus (ACPI). Every returned PCI path is
//! resolved against the bus numbers the guest printed for its bridges and
//! must name the BDF where the guest probed the disk of that size.

use std::time::{Duration, Instant};

use api::client::Client;
use arbor_tests::{
    boot_with_api, disk_at, guest_bdf, guest_kit, kvm_available, raw_disk, run_arbor, wait_count,
    Guest, Scratch,
};

const PORTS: &[&str] = &[
    "id=rp0,type=root-port",
    "id=rp1,type=root-port",
    "id=sw0,type=switch,parent=rp1,downstream=3",
    "id=rp2,type=root-port",
    "id=br0,type=pci-bridge,parent=rp2",
    "id=br1,type=pci-bridge,parent=br0",
    "id=rp3,type=root-port,hotplug=none",
    "id=tiny,type=root-port,mem-reserve=0,pref64-reserve=0",
];

#[test]
fn tree_cold_and_hot() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let s = Scratch::new("topology");
    let sock = s.path("api.sock");
    // ACPI removal behind bridges is slow under emulation with two guests
    // sharing two cores: give the guest time.
    let mut args: Vec<String> = vec![
        "--api-socket".into(),
        sock.display().to_string(),
        "--remove-timeout".into(),
        "60".into(),
    ];
    for p in PORTS {
        args.push("--pci-port".into());
        args.push(p.to_string());
    }
    // Cold-plugged behind a switch downstream port, three bridges deep and
    // behind a port without hotplug.
    let sizes = [
        (21u64, "cold-sw", "sw0.2"),
        (22, "cold-br1", "br1"),
        (23, "cold-rp3", "rp3"),
    ];
    for (mib, id, port) in sizes {
        let f = s.path(&format!("{id}.img"));
        raw_disk(&f, mib);
        args.push("--disk".into());
        args.push(format!("path={},id={id},port={port}", f.display()));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let g = Guest::boot("topology", &kit.vmlinux, 1, "", &argv);
    g.wait_for("Run /init as init process");
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    let info = c.vm_info().unwrap();

    // The tree as the API reports it, with the bus numbers read back.
    let node = |id: &str| {
        info.topology
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no {id}"))
    };
    assert_eq!(node("sw0.2").parent.as_deref(), Some("sw0"));
    assert!(node("br1").secondary_bus.unwrap() > node("br0").secondary_bus.unwrap());

    // Cold-plugged devices: at the BDF their path names.
    let console = g.console();
    for (mib, id, _) in sizes {
        let dev = info.devices.iter().find(|d| d.id == id).unwrap();
        let bdf = guest_bdf(&dev.pci_path, &console);
        assert!(
            console.contains(&format!("pci {bdf}: [1af4:1042]")),
            "{id} ({}) not found at {bdf}",
            dev.pci_path
        );
        assert!(console.contains(&format!("{} 512-byte logical blocks", mib * 2048)));
        // vm.info's BDF comes from the bridges' registers: the same.
        assert_eq!(dev.bdf.as_deref(), Some(bdf.as_str()), "{id}");
    }

    // Hot-plug into each kind of place, check, remove, re-add.
    let places: &[(&str, Option<&str>, Option<&str>)] = &[
        ("root port, native", Some("rp0"), None),
        ("switch downstream port, native", Some("sw0.0"), None),
        ("bridge behind a root port, ACPI", Some("br0"), None),
        ("bridge three levels deep, ACPI", Some("br1"), None),
        ("root bus, ACPI", None, Some("1f")),
    ];
    let mut mib = 40u64;
    for (what, port, pci_path) in places {
        for round in 0..2 {
            mib += 1;
            let f = s.path(&format!("hot-{mib}.img"));
            raw_disk(&f, mib);
            let mark = g.console().len();
            let t = Instant::now();
            let added = c
                .vm_add_disk(&disk_at(&f, "hot", *port, *pci_path))
                .unwrap_or_else(|e| panic!("{what}: add failed: {e}"));
            let tail = wait_count(
                &g,
                mark,
                &format!("{} 512-byte logical blocks", mib * 2048),
                1,
            );
            let seen = t.elapsed();
            let bdf = guest_bdf(&added.pci_path, &g.console());
            assert!(
                tail.contains(&format!("pci {bdf}: [1af4:1042] type 00 class 0x018000")),
                "{what}: path {} should be {bdf}:\n{tail}",
                added.pci_path
            );
            let t = Instant::now();
            c.vm_remove_device("hot")
                .unwrap_or_else(|e| panic!("{what}: remove failed: {e}"));
            eprintln!(
                "{what} (round {round}): path {} = {bdf}, guest saw the disk after {seen:?}, removal took {:?}",
                added.pci_path,
                t.elapsed()
            );
        }
    }

    // A port without hotplug refuses hot-plugged devices; so does a port
    // holding other ports; an unknown port is 404.
    let f = s.path("x.img");
    raw_disk(&f, 1);
    let kind = |r: Result<api::types::AddDeviceResponse, api::client::ClientError>| {
        r.unwrap_err().api_error_kind()
    };
    assert_eq!(
        kind(c.vm_add_disk(&disk_at(&f, "x", Some("rp3"), None))),
        Some(api::ApiErrorKind::Conflict)
    );
    assert_eq!(
        kind(c.vm_add_disk(&disk_at(&f, "x", Some("rp1"), None))),
        Some(api::ApiErrorKind::Conflict)
    );
    assert_eq!(
        kind(c.vm_add_disk(&disk_at(&f, "x", Some("nope"), None))),
        Some(api::ApiErrorKind::NotFound)
    );
    let rp0 = node("rp0").pci_path.clone();
    assert_eq!(
        kind(c.vm_add_disk(&disk_at(
            &f,
            "x",
            Some("rp0"),
            Some(&format!("{}/00", node("rp2").pci_path))
        ))),
        Some(api::ApiErrorKind::BadRequest),
        "a path outside the named port"
    );
    assert_eq!(
        kind(c.vm_add_disk(&disk_at(&f, "x", None, Some(&rp0)))),
        Some(api::ApiErrorKind::BadRequest),
        "a path naming a port"
    );
    // A port whose windows cannot hold the device's BARs refuses it before
    // anything changes.
    let e = c
        .vm_add_disk(&disk_at(&f, "x", Some("tiny"), None))
        .unwrap_err();
    assert_eq!(e.api_error_kind(), Some(api::ApiErrorKind::Conflict), "{e}");
    assert!(e.to_string().contains("BAR"), "{e}");
    assert_eq!(c.vm_info().unwrap().devices.len(), 3);
}

#[test]
fn bad_topologies_are_refused() {
    let kit = guest_kit();
    let k = kit.vmlinux.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["id=a,type=root-port,parent=ghost"], "ghost"),
        (
            &[
                "id=a,type=pci-bridge,parent=b",
                "id=b,type=pci-bridge,parent=a",
            ],
            "cycle",
        ),
        (
            &[
                "id=a,type=root-port",
                "id=b,type=pci-bridge,parent=a",
                "id=c,type=pci-bridge,parent=a",
            ],
            "a",
        ),
        (&["id=a,type=root-port", "id=a,type=root-port"], "a"),
        (
            &[
                "id=a,type=root-port",
                "id=b,type=pci-bridge,parent=a,bus-reserve=254",
                "id=c,type=pci-bridge,parent=b",
            ],
            "bus",
        ),
        (&["id=a,type=switch,downstream=0"], "downstream"),
        (&["id=a,type=hub"], "hub"),
        (&["id=a,type=pci-bridge,hotplug=native"], "native"),
    ];
    for (ports, needle) in cases {
        let mut args = vec!["--kernel", k];
        for p in *ports {
            args.push("--pci-port");
            args.push(p);
        }
        let (code, err) = run_arbor(&args);
        assert_eq!(code, Some(2), "{ports:?}: {err}");
        assert!(
            err.contains(needle),
            "{ports:?}: expected '{needle}' in: {err}"
        );
        assert_eq!(
            err.lines()
                .filter(|l| l.starts_with("arbor: error"))
                .count(),
            1,
            "{err}"
        );
    }
}

#[test]
fn thirty_two_hotplugs() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("scale");
    let sock = s.path("api.sock");
    // 8 native root ports, a bridge with ACPI slots (WITH_ACPI_BRIDGE).
    let g = boot_with_api("scale", &sock);
    g.wait_for("Run /init as init process");
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    let mut times = Vec::new();
    let mut natives = 0;
    for i in 0..32u64 {
        let mib = 100 + i;
        let f = s.path(&format!("d{i}.img"));
        raw_disk(&f, mib);
        let mark = g.console().len();
        let t = Instant::now();
        let added = c
            .vm_add_disk(&disk_at(&f, &format!("d{i}"), None, None))
            .unwrap();
        let tail = wait_count(
            &g,
            mark,
            &format!("{} 512-byte logical blocks", mib * 2048),
            1,
        );
        let took = t.elapsed();
        let bdf = guest_bdf(&added.pci_path, &g.console());
        assert!(
            tail.contains(&format!("pci {bdf}: [1af4:1042]")),
            "d{i} at {} / {bdf}:\n{tail}",
            added.pci_path
        );
        let info = c.vm_info().unwrap();
        let port = info
            .devices
            .iter()
            .find(|d| d.id == format!("d{i}"))
            .unwrap()
            .port
            .clone();
        if port.as_deref().is_some_and(|p| p.starts_with("rp")) {
            natives += 1;
        }
        eprintln!("hotplug {i:2}: {} via {:?}: {took:?}", added.pci_path, port);
        times.push(took);
    }
    // Native ports fill first, then the bridge's ACPI slots.
    assert_eq!(natives, 8);
    assert_eq!(c.vm_info().unwrap().devices.len(), 32);
    let avg = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    eprintln!(
        "per-hotplug time: first 8 (native) avg {:?}; ACPI 9-16 avg {:?}; ACPI 25-32 avg {:?}",
        avg(&times[..8]),
        avg(&times[8..16]),
        avg(&times[24..])
    );
}

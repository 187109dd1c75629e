//! Unit tests for [`Topology`]: placement, routing through the created ports, windows,
//! errors, and hot-plug through the root.

use std::collections::BTreeMap;

use super::*;
use crate::bar::BarRegion;
use crate::bus::PciBdf;
use crate::host_bridge::HostBridge;
use crate::interrupt::RecordingMsiGroup;
use crate::path::resolve_with_bridge_map;
use crate::pcie_cap::{regs, slot_control, slot_status};

const MMIO32: (u64, u64) = (0xc000_0000, 0x2000_0000);
const MMIO64: (u64, u64) = (0x1_0000_0000, 1 << 36);

fn opts() -> TopologyOptions {
    TopologyOptions::new((2..8).collect(), MMIO32, MMIO64, None)
}

fn spec(id: &str, kind: PortKind, parent: Option<&str>) -> PortSpec {
    let mut s = PortSpec::new(id, kind);
    s.parent = parent.map(str::to_string);
    s
}

fn sw(n: u8) -> PortKind {
    PortKind::Switch { downstream: n }
}

fn p(s: &str) -> PciPath {
    s.parse().unwrap()
}

fn bdf(s: &str) -> PciBdf {
    s.parse().unwrap()
}

/// The tree used by most tests (see `placement` for what it becomes).
fn specs() -> Vec<PortSpec> {
    let mut rp2 = spec("rp2", PortKind::RootPort, None).with_hotplug(HotplugMode::None);
    rp2.slot = Some(7);
    let mut pb2 = spec("pb2", PortKind::PciBridge, Some("pb0"));
    pb2.slot = Some(5);
    vec![
        spec("rp0", PortKind::RootPort, None),
        spec("rp1", PortKind::RootPort, None),
        spec("sw0", sw(3), Some("rp1")),
        spec("pb0", PortKind::PciBridge, Some("sw0.1")),
        spec("pb1", PortKind::PciBridge, Some("pb0")),
        pb2,
        spec("sw1", sw(1), Some("sw0.2")),
        rp2,
        spec("pbr", PortKind::PciBridge, None),
    ]
}

fn build(specs: &[PortSpec]) -> Result<Topology, TopologyError> {
    Topology::build(specs, &opts())
}

fn err(specs: &[PortSpec]) -> TopologyError {
    build(specs).unwrap_err()
}

#[test]
fn parse_names() {
    assert_eq!("root-port".parse::<PortKind>().unwrap(), PortKind::RootPort);
    assert_eq!(
        "switch".parse::<PortKind>().unwrap(),
        PortKind::Switch {
            downstream: DEFAULT_SWITCH_DOWNSTREAM
        }
    );
    assert_eq!(
        "pci-bridge".parse::<PortKind>().unwrap(),
        PortKind::PciBridge
    );
    let e = "root_port".parse::<PortKind>().unwrap_err();
    assert_eq!(e, TopologyError::BadKind("root_port".into()));
    assert_eq!(
        e.to_string(),
        "unknown port type 'root_port' (expected root-port, switch or pci-bridge)"
    );
    for (s, m) in [
        ("native", HotplugMode::Native),
        ("acpi", HotplugMode::Acpi),
        ("none", HotplugMode::None),
    ] {
        assert_eq!(s.parse::<HotplugMode>().unwrap(), m);
        assert_eq!(m.to_string(), s);
    }
    let e = "shpc".parse::<HotplugMode>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown hotplug mode 'shpc' (expected native, acpi or none)"
    );
    for k in ["root-port", "switch", "pci-bridge"] {
        assert_eq!(k.parse::<PortKind>().unwrap().to_string(), k);
    }
}

#[test]
fn placement() {
    let t = build(&specs()).unwrap();
    let got: Vec<(&str, String, u8, u8, u8)> = t
        .ports()
        .iter()
        .map(|n| {
            (
                n.id.as_str(),
                n.path.to_string(),
                n.primary_bus,
                n.secondary_bus,
                n.subordinate_bus,
            )
        })
        .collect();
    let want: Vec<(&str, String, u8, u8, u8)> = [
        ("rp0", "02", 0, 1, 1),
        ("rp1", "03", 0, 2, 11),
        ("sw0", "03/00", 2, 3, 11),
        ("sw0.0", "03/00/00", 3, 4, 4),
        ("sw0.1", "03/00/01", 3, 5, 8),
        ("pb0", "03/00/01/00", 5, 6, 8),
        ("pb1", "03/00/01/00/01", 6, 7, 7),
        ("pb2", "03/00/01/00/05", 6, 8, 8),
        ("sw0.2", "03/00/02", 3, 9, 11),
        ("sw1", "03/00/02/00", 9, 10, 11),
        ("sw1.0", "03/00/02/00/00", 10, 11, 11),
        ("pbr", "04", 0, 12, 12),
        ("rp2", "07", 0, 13, 13),
    ]
    .into_iter()
    .map(|(a, b, c, d, e)| (a, b.to_string(), c, d, e))
    .collect();
    assert_eq!(got, want);
    assert_eq!(t.last_bus(), 13);
    assert_eq!(t.root_slots_used(), vec![2, 3, 4, 7]);

    let k = |id: &str| t.port(id).unwrap().kind;
    assert_eq!(k("rp0"), PciePortKind::RootPort);
    assert_eq!(k("sw0"), PciePortKind::SwitchUpstream);
    assert_eq!(k("sw0.1"), PciePortKind::SwitchDownstream);
    assert_eq!(k("pb0"), PciePortKind::PcieToPciBridge);
    assert_eq!(k("pb1"), PciePortKind::PciBridge);
    assert_eq!(k("pbr"), PciePortKind::PcieToPciBridge);

    let h = |id: &str| t.port(id).unwrap().hotplug;
    assert_eq!(h("rp0"), HotplugMode::Native);
    assert_eq!(h("sw0"), HotplugMode::None);
    assert_eq!(h("sw0.0"), HotplugMode::Native);
    assert_eq!(h("pb0"), HotplugMode::Acpi);
    assert_eq!(h("rp2"), HotplugMode::None);

    let slots = |id: &str| t.port(id).unwrap().device_slots().to_vec();
    assert_eq!(slots("rp0"), vec![0]);
    assert!(slots("rp1").is_empty());
    assert!(slots("sw0").is_empty());
    assert_eq!(slots("sw0.0"), vec![0]);
    assert!(slots("sw0.1").is_empty());
    let pb0: Vec<u8> = (0..32).filter(|s| *s != 1 && *s != 5).collect();
    assert_eq!(slots("pb0"), pb0);
    assert_eq!(slots("pb1"), (0..32).collect::<Vec<u8>>());
    assert_eq!(slots("rp2"), vec![0]);

    let psn = |id: &str| t.port(id).unwrap().physical_slot;
    assert_eq!(psn("rp0"), Some(32));
    assert_eq!(psn("rp1"), Some(33));
    assert_eq!(psn("sw0.0"), Some(34));
    assert_eq!(psn("sw0.1"), Some(35));
    assert_eq!(psn("sw0.2"), Some(36));
    assert_eq!(psn("sw1.0"), Some(37));
    assert_eq!(psn("sw0"), None);
    assert_eq!(psn("pb0"), None);
    assert_eq!(psn("rp2"), None);

    let n = t.port("sw0").unwrap();
    assert_eq!(n.children, vec!["sw0.0", "sw0.1", "sw0.2"]);
    assert_eq!(n.parent.as_deref(), Some("rp1"));
    assert_eq!(t.port("sw0.2").unwrap().port_number, 2);
    assert_eq!(t.port("sw0.2").unwrap().parent.as_deref(), Some("sw0"));
    assert_eq!(t.port("pb0").unwrap().children, vec!["pb1", "pb2"]);
    assert!(t.port("nope").is_none());

    // Queries.
    assert_eq!(t.device_path("rp0", 0).unwrap(), p("02/00"));
    assert_eq!(t.device_path("pb1", 0x1f).unwrap(), p("03/00/01/00/01/1f"));
    assert_eq!(
        t.device_path("rp1", 0).unwrap_err(),
        TopologyError::SlotNotOpen {
            id: "rp1".into(),
            slot: 0
        }
    );
    assert_eq!(
        t.device_path("pb0", 5).unwrap_err().to_string(),
        "slot 5 under port 'pb0' is not open for devices"
    );
    assert_eq!(
        t.device_path("x", 0).unwrap_err(),
        TopologyError::UnknownPort("x".into())
    );
    let (n, s) = t.port_for_path(&p("03/00/01/00/01/04.2")).unwrap();
    assert_eq!((n.id.as_str(), s.slot, s.function), ("pb1", 4, 2));
    assert!(t.port_for_path(&p("05")).is_none());
    assert!(t.port_for_path(&p("05/00")).is_none());
    assert_eq!(t.port_at_path(&p("03/00")).unwrap().id, "sw0");
    assert_eq!(
        t.check_device_path(&p("02/00.3")).unwrap().unwrap().id,
        "rp0"
    );
    assert!(t.check_device_path(&p("05")).unwrap().is_none());
    assert!(matches!(
        t.check_device_path(&p("02")),
        Err(TopologyError::PathIsPort { .. })
    ));
    assert!(matches!(
        t.check_device_path(&p("02.1")),
        Err(TopologyError::PathIsPort { .. })
    ));
    assert!(matches!(
        t.check_device_path(&p("03/00")),
        Err(TopologyError::PathIsPort { .. })
    ));
    assert_eq!(
        t.check_device_path(&p("03/01")).unwrap_err(),
        TopologyError::SlotNotOpen {
            id: "rp1".into(),
            slot: 1
        }
    );
    assert_eq!(
        t.check_device_path(&p("05/00")).unwrap_err().to_string(),
        "PCI path '05/00' is not below a port of the topology"
    );

    // Port parameters.
    let pp = t.port("sw0.1").unwrap().port_params();
    assert!(pp.native_hotplug);
    assert_eq!(pp.physical_slot, 35);
    assert_eq!(pp.port_number, 1);
    assert!(!pp.io_window);
    assert!(!t.port("rp2").unwrap().port_params().native_hotplug);
    assert!(!t.port("pb0").unwrap().port_params().native_hotplug);
}

/// Every window lies in its parent's, siblings and the own reservation do not overlap,
/// everything is aligned, and the ports' block does not overlap what is left to the root.
fn check_windows(t: &Topology, o: &TopologyOptions) {
    type Get = fn(&PortWindows) -> Option<(u64, u64)>;
    type Win = Option<(u64, u64)>;
    let gets: [(Get, u64, Win, Win); 3] = [
        (
            |w| w.mmio32,
            1 << 20,
            Some(o.mmio32),
            Some(t.remaining_windows().mmio32),
        ),
        (
            |w| w.mmio64,
            1 << 20,
            Some(o.mmio64),
            Some(t.remaining_windows().mmio64),
        ),
        (|w| w.io, 1 << 12, o.io, t.remaining_windows().io),
    ];
    let inside = |inner: (u64, u64), outer: (u64, u64)| {
        inner.0 >= outer.0 && inner.0 + inner.1 <= outer.0 + outer.1
    };
    let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
    for (get, granule, host, rem) in gets {
        let mut top: Vec<(u64, u64)> = Vec::new();
        for n in t.ports() {
            let Some(w) = get(&n.windows) else {
                assert!(get(&n.reserve).is_none());
                continue;
            };
            assert!(w.1 > 0);
            assert_eq!(w.0 % granule, 0, "{} window base", n.id);
            assert_eq!(w.1 % granule, 0, "{} window size", n.id);
            let mut parts: Vec<(u64, u64)> = Vec::new();
            if let Some(r) = get(&n.reserve) {
                assert!(inside(r, w), "{} reserve inside window", n.id);
                if granule == 1 << 20 {
                    let natural = 1u64 << (63 - r.1.leading_zeros());
                    assert_eq!(r.0 % natural, 0, "{} reserve naturally aligned", n.id);
                }
                parts.push(r);
            }
            for c in &n.children {
                let cn = t.port(c).unwrap();
                if let Some(cw) = get(&cn.windows) {
                    assert!(inside(cw, w), "{c} inside {}", n.id);
                    parts.push(cw);
                }
            }
            for i in 0..parts.len() {
                for j in i + 1..parts.len() {
                    assert!(!overlap(parts[i], parts[j]), "overlap under {}", n.id);
                }
            }
            match &n.parent {
                None => {
                    let h = host.unwrap();
                    assert!(inside(w, h), "{} in host window", n.id);
                    if let Some(r) = rem {
                        assert!(!overlap(w, r), "{} overlaps the root's remainder", n.id);
                    }
                    top.push(w);
                }
                Some(parent) => {
                    assert!(get(&t.port(parent).unwrap().windows).is_some());
                }
            }
        }
        for i in 0..top.len() {
            for j in i + 1..top.len() {
                assert!(!overlap(top[i], top[j]));
            }
        }
        if let (Some(h), Some(r)) = (host, rem) {
            assert_eq!(r.0, h.0);
            assert!(r.1 <= h.1);
        }
    }
}

#[test]
fn windows_nested_and_disjoint() {
    let o = opts();
    let t = build(&specs()).unwrap();
    check_windows(&t, &o);
    let win = |id: &str| t.port(id).unwrap().windows;
    let res = |id: &str| t.port(id).unwrap().reserve;
    // Defaults: 8 MiB / 64 MiB for ports with open slots, nothing of their own otherwise.
    assert_eq!(res("rp0").mmio32.unwrap().1, 8 << 20);
    assert_eq!(res("rp0").mmio64.unwrap().1, 64 << 20);
    assert_eq!(win("rp0").mmio32.unwrap().1, 8 << 20);
    assert_eq!(res("rp1"), PortWindows::default());
    assert_eq!(res("sw0"), PortWindows::default());
    // sw0 covers sw0.0 (8), pb0 (8 + pb1 8 + pb2 8) and sw1.0 (8): 40 MiB.
    assert_eq!(win("sw0").mmio32.unwrap().1, 40 << 20);
    assert_eq!(win("rp1").mmio32.unwrap().1, 40 << 20);
    assert_eq!(win("pb0").mmio64.unwrap().1, 3 * (64 << 20));
    // No I/O anywhere without I/O reservations.
    assert!(t.ports().iter().all(|n| n.windows.io.is_none()));
    // 32-bit windows sit at the top of the host window, the root keeps the bottom.
    let rem = t.remaining_windows();
    assert_eq!(rem.mmio32.0, MMIO32.0);
    let top = t
        .ports()
        .iter()
        .filter_map(|n| n.windows.mmio32)
        .map(|(b, s)| b + s)
        .max()
        .unwrap();
    assert_eq!(top, MMIO32.0 + MMIO32.1);
    assert!(rem.mmio32.1 >= MMIO32.1 - (80 << 20));

    // Custom reservations, bus reserves and I/O.
    let mut o = opts();
    o.io = Some((0x1000, 0xf000));
    o.default_bus_reserve = 2;
    let mut s = vec![
        spec("a", PortKind::RootPort, None),
        spec("b", PortKind::PciBridge, Some("a")),
        spec("c", PortKind::PciBridge, Some("b")),
        spec("d", sw(2), Some("e")),
        spec("e", PortKind::RootPort, None),
        spec("f", PortKind::RootPort, None),
    ];
    s[1].io_reserve = Some(0x100);
    s[1].mmio32_reserve = Some(3 << 20);
    s[2].mmio64_reserve = Some(0);
    s[2].bus_reserve = Some(5);
    s[3].mmio32_reserve = Some(1);
    s[3].mmio64_reserve = Some(256 << 20);
    s[3].bus_reserve = Some(0);
    s[5].mmio32_reserve = Some(0);
    s[5].mmio64_reserve = Some(0);
    let t = Topology::build(&s, &o).unwrap();
    check_windows(&t, &o);
    let n = |id: &str| t.port(id).unwrap().clone();
    // I/O only along a -> b, 4 KiB granular.
    assert_eq!(n("b").reserve.io.unwrap().1, 0x1000);
    assert_eq!(n("a").windows.io.unwrap().1, 0x1000);
    assert!(n("c").windows.io.is_none());
    assert!(n("e").windows.io.is_none());
    assert!(n("a").port_params().io_window);
    assert!(!n("c").port_params().io_window);
    // Reservations rounded to 1 MiB.
    assert_eq!(n("b").reserve.mmio32.unwrap().1, 3 << 20);
    assert_eq!(n("d.0").reserve.mmio32.unwrap().1, 1 << 20);
    assert_eq!(n("d.1").reserve.mmio64.unwrap().1, 256 << 20);
    assert!(n("c").reserve.mmio64.is_none());
    assert!(n("f").windows.mmio32.is_none() && n("f").windows.mmio64.is_none());
    // Bus reserves: subordinate >= secondary + reserve (c: 5, d's ports: 0, others: the
    // default 2, already covered by their subtree for a and b; none for switch upstream).
    let buses = |id: &str| (n(id).secondary_bus, n(id).subordinate_bus);
    assert_eq!(buses("a"), (1, 8));
    assert_eq!(buses("b"), (2, 8));
    assert_eq!(buses("c"), (3, 8));
    assert_eq!(buses("e"), (9, 12));
    assert_eq!(buses("d"), (10, 12));
    assert_eq!(buses("d.0"), (11, 11));
    assert_eq!(buses("d.1"), (12, 12));
    assert_eq!(buses("f"), (13, 15));

    // BAR allocation inside a port's reservation, behind-bridge rules.
    let mut a = n("d.1").bar_allocator().unwrap();
    let r32 = n("d.1").reserve.mmio32.unwrap();
    let r64 = n("d.1").reserve.mmio64.unwrap();
    let x = a.allocate_bar(BarRegion::Mmio64, false, 0x4000).unwrap();
    assert!(x >= r32.0 && x < r32.0 + r32.1);
    let y = a.allocate_bar(BarRegion::Mmio64, true, 256 << 20).unwrap();
    assert_eq!(y, r64.0);
    let mut fa = n("f").bar_allocator().unwrap();
    assert!(fa.allocate(BarRegion::Mmio32, 0x1000).is_err());
    let mut ba = n("b").bar_allocator().unwrap();
    assert!(ba.allocate(BarRegion::Io, 0x100).is_ok());
    let rem = t.remaining_windows().io.unwrap();
    assert_eq!(rem, (0x1000, 0xf000 - 0x1000));
}

#[test]
fn routing_through_created_ports() {
    let t = build(&specs()).unwrap();
    let mut root = PciRoot::with_host_bridge();
    let groups: std::cell::RefCell<Vec<(String, Arc<RecordingMsiGroup>)>> = Default::default();
    let devs = t
        .attach(&mut root, &mut |n: &PortNode| {
            let g = Arc::new(RecordingMsiGroup::new(1).unwrap());
            groups.borrow_mut().push((n.id.clone(), g.clone()));
            Some(g as Arc<dyn MsiInterruptGroup>)
        })
        .unwrap();
    assert_eq!(devs.len(), t.ports().len());
    assert_eq!(groups.borrow().len(), t.ports().len());
    for (d, n) in devs.iter().zip(t.ports()) {
        assert_eq!(d.id, n.id);
        assert_eq!(d.path, n.path);
        let port = d.port.lock().unwrap();
        assert_eq!(port.kind(), n.kind);
        assert_eq!(port.secondary_bus(), n.secondary_bus);
        assert_eq!(port.subordinate_bus(), n.subordinate_bus);
        assert_eq!(port.primary_bus(), n.primary_bus);
        assert_eq!(port.windows(), n.windows.to_bridge_windows());
        assert_eq!(port.physical_slot(), n.physical_slot);
        assert!(port.config().mem_decode_enabled());
        // Slots holding a child port are occupied from power-on.
        if port.has_native_hotplug() {
            assert_eq!(port.presence(), n.device_slots().is_empty(), "{}", n.id);
        }
    }
    // Reach the typed port through the shared handle too.
    let shared = root.device_at_path(&p("03/00/01")).unwrap();
    assert!(shared
        .lock()
        .unwrap()
        .as_any_mut()
        .downcast_mut::<PciePort>()
        .is_some());

    let ep = || -> SharedPciDevice { Arc::new(Mutex::new(HostBridge::new())) };
    let deep = t.device_path("sw1.0", 0).unwrap(); // 6 levels
    let behind_bridges = t.device_path("pb1", 3).unwrap();
    let on_rp = t.device_path("rp0", 0).unwrap();
    let on_pbr = t.device_path("pbr", 0).unwrap();
    for path in [&deep, &behind_bridges, &on_rp, &on_pbr] {
        root.add_device(path, ep()).unwrap();
    }
    assert_eq!(root.bdf_of_path(&deep), Some(bdf("0b:00.0")));
    assert_eq!(root.bdf_of_path(&behind_bridges), Some(bdf("07:03.0")));
    assert_eq!(root.bdf_of_path(&on_rp), Some(bdf("01:00.0")));
    assert_eq!(root.bdf_of_path(&on_pbr), Some(bdf("0c:00.0")));

    // The bridge map the guest would log gives the same BDFs.
    let mut map = BTreeMap::new();
    for n in t.ports() {
        let parent_bus = n
            .parent
            .as_ref()
            .map(|id| t.port(id).unwrap().secondary_bus)
            .unwrap_or(0);
        let s = n.path.last();
        map.insert(PciBdf::new(parent_bus, s.slot, 0).unwrap(), n.secondary_bus);
        assert_eq!(root.bdf_of_path(&n.path).unwrap().bus, parent_bus);
    }
    for path in [&deep, &behind_bridges, &on_rp, &on_pbr] {
        assert_eq!(
            Some(resolve_with_bridge_map(path, &map).unwrap()),
            root.bdf_of_path(path)
        );
    }

    // Configuration cycles reach the devices and the ports at those BDFs.
    let vendor = |b: &str| {
        let mut d = [0u8; 2];
        root.config_read(bdf(b), 0, &mut d);
        u16::from_le_bytes(d)
    };
    assert_eq!(vendor("0b:00.0"), 0x8086);
    assert_eq!(vendor("07:03.0"), 0x8086);
    assert_eq!(vendor("0c:00.0"), 0x8086);
    assert_eq!(vendor("0a:00.0"), 0x104c); // sw1.0
    assert_eq!(vendor("09:00.0"), 0x104c); // sw1 upstream
    assert_eq!(vendor("05:00.0"), 0x1b36); // pb0
    assert_eq!(vendor("06:05.0"), 0x1b36); // pb2
    assert_eq!(vendor("0b:01.0"), 0xffff);
    assert_eq!(vendor("0e:00.0"), 0xffff);
    let r = root.config_write(bdf("0b:00.0"), 0x3c, &[5]).unwrap();
    assert!(Arc::ptr_eq(&r.device, &root.device_at_path(&deep).unwrap()));

    // The guest renumbers rp1's subtree: routing follows the registers and the outcome
    // says so.
    let r = root
        .config_write(bdf("00:03.0"), 0x18, &[0, 0x20, 0x30, 0])
        .unwrap();
    assert!(r.outcome.bus_numbers_changed);
    for (b, v) in [("02:00.0", 0xffff), ("20:00.0", 0x104c)] {
        assert_eq!(vendor(b), v);
    }
    let r = root
        .config_write(bdf("20:00.0"), 0x18, &[0x20, 0x21, 0x30, 0])
        .unwrap();
    assert!(r.outcome.bus_numbers_changed);
    assert_eq!(vendor("21:02.0"), 0x104c);
    let r = root
        .config_write(bdf("21:02.0"), 0x18, &[0x21, 0x22, 0x30, 0])
        .unwrap();
    assert!(r.outcome.bus_numbers_changed);
    let _ = root.config_write(bdf("22:00.0"), 0x18, &[0x22, 0x23, 0x30, 0]);
    let _ = root.config_write(bdf("23:00.0"), 0x18, &[0x23, 0x24, 0x30, 0]);
    assert_eq!(vendor("24:00.0"), 0x8086);
    assert_eq!(root.bdf_of_path(&deep), Some(bdf("24:00.0")));
    let r = root
        .config_write(bdf("00:03.0"), 0x20, &0xc0f0_c000u32.to_le_bytes())
        .unwrap();
    assert!(r.outcome.bridge_windows_changed);
    let rp1 = &devs.iter().find(|d| d.id == "rp1").unwrap().port;
    assert_eq!(rp1.lock().unwrap().secondary_bus(), 0x20);
    assert_eq!(
        rp1.lock().unwrap().windows().mem,
        Some((0xc000_0000, 0xc0ff_ffff))
    );
}

/// The whole native hot-plug cycle as the guest drives it through configuration cycles.
#[test]
fn native_hotplug_through_the_root() {
    let t = build(&specs()).unwrap();
    let mut root = PciRoot::with_host_bridge();
    let g = Arc::new(RecordingMsiGroup::new(1).unwrap());
    let gg = g.clone();
    let devs = t
        .attach(&mut root, &mut |n: &PortNode| {
            (n.id == "sw0.0").then(|| gg.clone() as Arc<dyn MsiInterruptGroup>)
        })
        .unwrap();
    let port = devs.iter().find(|d| d.id == "sw0.0").unwrap().port.clone();
    assert!(devs.iter().filter(|d| d.id != "sw0.0").all(|d| d
        .port
        .lock()
        .unwrap()
        .msi()
        .is_none()));
    let port_bdf = root.bdf_of_path(&t.port("sw0.0").unwrap().path).unwrap();
    assert_eq!(port_bdf, bdf("03:00.0"));
    let (cap, msi) = {
        let p = port.lock().unwrap();
        (
            p.config().pcie_offset().unwrap() as u16,
            p.config().msi_offset().unwrap() as u16,
        )
    };
    // Boot-time race: the VMM hot-adds before the guest's driver is ready.
    let path = t.device_path("sw0.0", 0).unwrap();
    root.add_device(&path, Arc::new(Mutex::new(HostBridge::new())))
        .unwrap();
    port.lock().unwrap().card_present(true).unwrap();
    let w16 = |off: u16, v: u16| root.config_write(port_bdf, off, &v.to_le_bytes()).unwrap();
    let r16 = |off: u16| {
        let mut d = [0u8; 2];
        root.config_read(port_bdf, off, &mut d);
        u16::from_le_bytes(d)
    };
    assert_eq!(g.trigger_count(0), 0);
    // The guest driver: MSI, then the slot enables.
    root.config_write(port_bdf, msi + 4, &0xfee0_0000u32.to_le_bytes());
    w16(msi + 2, 1);
    assert_eq!(g.trigger_count(0), 0);
    let en = slot_control::HOTPLUG_INTERRUPT_ENABLE
        | slot_control::PRESENCE_DETECT_ENABLE
        | slot_control::DLL_STATE_CHANGED_ENABLE;
    let o = w16(cap + regs::SLTCTL as u16, en | (3 << 8) | (3 << 6));
    assert_eq!(o.outcome.slot_indicator, Some(false));
    assert_eq!(g.trigger_count(0), 1, "held event delivered");
    let sta = r16(cap + regs::SLTSTA as u16);
    assert_ne!(sta & slot_status::PRESENCE_DETECT_STATE, 0);
    // The guest acknowledges and lights the power indicator.
    w16(cap + regs::SLTSTA as u16, sta);
    let o = w16(cap + regs::SLTCTL as u16, en | (1 << 8) | (3 << 6));
    assert_eq!(o.outcome.slot_indicator, Some(true));
    assert!(port.lock().unwrap().slot_in_use());
    assert_eq!(root.bdf_of_path(&path), Some(bdf("04:00.0")));

    // Removal.
    port.lock().unwrap().card_present(false).unwrap();
    assert_eq!(g.trigger_count(0), 2);
    let sta = r16(cap + regs::SLTSTA as u16);
    assert_eq!(sta & slot_status::PRESENCE_DETECT_STATE, 0);
    // The device still answers while the guest unbinds the driver.
    let mut d = [0u8; 2];
    root.config_read(bdf("04:00.0"), 0, &mut d);
    assert_eq!(u16::from_le_bytes(d), 0x8086);
    w16(cap + regs::SLTSTA as u16, sta);
    let o = w16(cap + regs::SLTCTL as u16, en | (3 << 8) | (3 << 6));
    assert_eq!(o.outcome.slot_indicator, Some(false));
    // The VMM completes the removal.
    let (n, slot) = t.port_for_path(&path).unwrap();
    assert_eq!((n.id.as_str(), slot.slot), ("sw0.0", 0));
    root.remove_device(&path).unwrap();
    root.config_read(bdf("04:00.0"), 0, &mut d);
    assert_eq!(u16::from_le_bytes(d), 0xffff);
}

#[test]
fn hostile_guest_writes_through_the_root() {
    let t = build(&specs()).unwrap();
    let mut root = PciRoot::with_host_bridge();
    let devs = t
        .attach(&mut root, &mut |_| {
            Some(Arc::new(RecordingMsiGroup::new(1).unwrap()) as Arc<dyn MsiInterruptGroup>)
        })
        .unwrap();
    let mut seed: u64 = 42;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) as u32
    };
    for i in 0..40_000u32 {
        let b = PciBdf::from_devfn((next() % 16) as u8, (next() % 8) as u8 * 8);
        let off = (next() % 0x1000) as u16;
        let len = [1usize, 2, 4, 3][(next() % 4) as usize];
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = root.config_write(b, off, &data);
        let mut r = vec![0u8; len];
        root.config_read(b, off, &mut r);
        if i % 101 == 0 {
            let d = &devs[(next() as usize) % devs.len()];
            let mut port = d.port.lock().unwrap();
            if port.has_native_hotplug() {
                let present = port.presence();
                port.card_present(!present).unwrap();
            }
        }
    }
    for d in &devs {
        let _ = root.bdf_of_path(&d.path);
    }
}

#[test]
fn errors() {
    let msg = |e: TopologyError| {
        let m = e.to_string();
        assert!(!m.contains('\n') && !m.is_empty());
        m
    };
    // Ids.
    let e = err(&[spec("", PortKind::RootPort, None)]);
    assert_eq!(e, TopologyError::BadId(String::new()));
    msg(e);
    assert!(matches!(
        err(&[spec("a,b", PortKind::RootPort, None)]),
        TopologyError::BadId(_)
    ));
    let e = err(&[
        spec("rp0", PortKind::RootPort, None),
        spec("rp0", PortKind::RootPort, None),
    ]);
    assert_eq!(e, TopologyError::DuplicateId("rp0".into()));
    assert!(msg(e).contains("'rp0' is used more than once"));
    let e = err(&[
        spec("sw.1", PortKind::RootPort, None),
        spec("sw", sw(2), Some("sw.1")),
    ]);
    assert_eq!(e, TopologyError::DuplicateId("sw.1".into()));

    // Parents.
    let e = err(&[spec("pb", PortKind::PciBridge, Some("nope"))]);
    assert_eq!(msg(e), "port 'pb' names parent 'nope', which is not a port");
    let e = err(&[
        spec("a", PortKind::PciBridge, Some("b")),
        spec("b", PortKind::PciBridge, Some("a")),
    ]);
    assert_eq!(e, TopologyError::Cycle(vec!["a".into(), "b".into()]));
    assert_eq!(
        msg(e),
        "ports form a parent cycle (each port's parent follows it): a -> b -> a"
    );
    let e = err(&[spec("a", PortKind::PciBridge, Some("a"))]);
    assert_eq!(e, TopologyError::Cycle(vec!["a".into()]));
    let e = err(&[spec("sw", sw(2), Some("sw.1"))]);
    assert_eq!(e, TopologyError::Cycle(vec!["sw".into(), "sw.1".into()]));
    let e = err(&[
        spec("rp", PortKind::RootPort, None),
        spec("rp2", PortKind::RootPort, Some("rp")),
    ]);
    assert!(matches!(e, TopologyError::InvalidParent { .. }));
    assert_eq!(
        msg(e),
        "port 'rp2' cannot sit under 'rp': a root port sits on the root bus and cannot have a parent"
    );
    let e = err(&[spec("sw", sw(2), None)]);
    assert_eq!(
        msg(e),
        "port 'sw' cannot sit on the root bus: a switch must sit below a root port or a switch downstream port"
    );
    let e = err(&[
        spec("pb", PortKind::PciBridge, None),
        spec("sw", sw(2), Some("pb")),
    ]);
    assert!(matches!(e, TopologyError::InvalidParent { .. }));
    let e = err(&[
        spec("rp", PortKind::RootPort, None),
        spec("sw", sw(2), Some("rp")),
        spec("pb", PortKind::PciBridge, Some("sw")),
    ]);
    assert!(msg(e).contains("only holds its own downstream ports"));

    // Parent capacity.
    let e = err(&[
        spec("rp", PortKind::RootPort, None),
        spec("a", PortKind::PciBridge, Some("rp")),
        spec("b", PortKind::PciBridge, Some("rp")),
    ]);
    assert!(matches!(e, TopologyError::ParentFull { .. }));
    assert_eq!(
        msg(e),
        "port 'b' does not fit under 'rp': a PCI Express port has a single device slot and another port already uses it"
    );
    let mut s = vec![
        spec("rp", PortKind::RootPort, None),
        spec("sw", sw(1), Some("rp")),
    ];
    s.push(spec("x", PortKind::PciBridge, Some("sw.0")));
    let mut y = spec("y", PortKind::PciBridge, Some("sw.0"));
    y.slot = Some(0);
    s.push(y);
    assert!(matches!(err(&s), TopologyError::ParentFull { .. }));
    let mut s = vec![spec("pb", PortKind::PciBridge, None)];
    for i in 0..33 {
        s.push(spec(&format!("c{i}"), PortKind::PciBridge, Some("pb")));
    }
    let e = err(&s);
    assert_eq!(
        msg(e),
        "port 'c32' does not fit under 'pb': all 32 slots of its bus are taken"
    );
    // 32 children fit (slots 1..31 then 0), but buses run out first with 2 each... use no
    // reserve: 1 + 32 buses is fine.
    s.pop();
    let t = build(&s).unwrap();
    assert_eq!(t.port("c30").unwrap().path, p("02/1f"));
    assert_eq!(t.port("c31").unwrap().path, p("02/00"));
    assert!(t.port("pb").unwrap().device_slots().is_empty());

    // Root slots.
    let s: Vec<PortSpec> = (0..7)
        .map(|i| spec(&format!("rp{i}"), PortKind::RootPort, None))
        .collect();
    let e = err(&s);
    assert_eq!(
        msg(e),
        "no root bus slot left for port 'rp6' (only 6 root bus slots are available to ports)"
    );
    let mut r = spec("rp", PortKind::RootPort, None);
    r.slot = Some(1);
    let e = err(&[r.clone()]);
    assert_eq!(
        msg(e),
        "port 'rp' asks for root bus slot 1, which is not available to ports"
    );
    r.slot = Some(3);
    let mut r2 = r.clone();
    r2.id = "rq".into();
    let e = err(&[r, r2]);
    assert_eq!(
        msg(e),
        "port 'rq' asks for slot 3 on the root bus, which port 'rp' already uses"
    );
    let mut o = opts();
    o.root_slots = vec![3, 40];
    let e = Topology::build(&[], &o).unwrap_err();
    assert_eq!(
        msg(e),
        "root bus slot 40 is out of range (slots are 0 to 31)"
    );

    // Slots below ports.
    let mut a = spec("a", PortKind::PciBridge, Some("rp"));
    a.slot = Some(1);
    let e = err(&[spec("rp", PortKind::RootPort, None), a]);
    assert_eq!(
        msg(e),
        "port 'a' cannot use slot 1: below a PCI Express port only device 0 exists"
    );
    let mut a = spec("a", PortKind::PciBridge, Some("pb"));
    a.slot = Some(32);
    let e = err(&[spec("pb", PortKind::PciBridge, None), a.clone()]);
    assert_eq!(msg(e), "port 'a' cannot use slot 32: slots are 0 to 31");
    a.slot = Some(4);
    let mut b = a.clone();
    b.id = "b".into();
    let e = err(&[spec("pb", PortKind::PciBridge, None), a, b]);
    assert_eq!(
        msg(e),
        "port 'b' asks for slot 4 under 'pb', which port 'a' already uses"
    );

    // Switch sizes.
    for n in [0u8, 33] {
        let e = err(&[
            spec("rp", PortKind::RootPort, None),
            spec("sw", sw(n), Some("rp")),
        ]);
        assert_eq!(
            msg(e),
            format!("switch 'sw' must have 1 to 32 downstream ports, not {n}")
        );
    }
    let t = build(&[
        spec("rp", PortKind::RootPort, None),
        spec("sw", sw(32), Some("rp")),
    ])
    .unwrap();
    assert_eq!(t.port("sw.31").unwrap().path, p("02/00/1f"));

    // Hot-plug modes and physical slots.
    let e = err(&[spec("pb", PortKind::PciBridge, None).with_hotplug(HotplugMode::Native)]);
    assert_eq!(
        msg(e),
        "port 'pb' cannot use native hotplug: a PCI bridge has no PCI Express slot (use acpi or none)"
    );
    let mut r = spec("rp", PortKind::RootPort, None);
    r.physical_slot = Some(8192);
    assert_eq!(
        msg(err(&[r])),
        "port 'rp' cannot use physical slot number 8192 (the maximum is 8191)"
    );
    let mut s = spec("sw", sw(3), Some("rp"));
    s.physical_slot = Some(8190);
    let e = err(&[spec("rp", PortKind::RootPort, None), s]);
    assert_eq!(
        e,
        TopologyError::BadPhysicalSlot {
            id: "sw.2".into(),
            slot: 8192
        }
    );
    let mut a = spec("a", PortKind::RootPort, None);
    a.physical_slot = Some(40);
    let mut s = spec("sw", sw(2), Some("a"));
    s.physical_slot = Some(39);
    let e = err(&[a.clone(), s]);
    assert_eq!(
        msg(e),
        "physical slot number 40 is used by both 'a' and 'sw.1'"
    );
    // Explicit numbers are skipped by the automatic ones.
    a.physical_slot = Some(33);
    let t = build(&[
        spec("b", PortKind::RootPort, None),
        spec("c", PortKind::RootPort, None),
        a,
    ])
    .unwrap();
    let psn: Vec<Option<u16>> = t.ports().iter().map(|n| n.physical_slot).collect();
    assert_eq!(psn, vec![Some(32), Some(34), Some(33)]);

    // Buses.
    let mut s = vec![spec("b0", PortKind::PciBridge, None)];
    for i in 1..256 {
        s.push(spec(
            &format!("b{i}"),
            PortKind::PciBridge,
            Some(&format!("b{}", i - 1)),
        ));
    }
    let e = err(&s);
    assert_eq!(
        msg(e),
        "bus numbers are exhausted at port 'b255': the topology needs more than 255 buses"
    );
    s.pop();
    let mut o = opts();
    o.default_mmio32_reserve = 0;
    o.default_mmio64_reserve = 0;
    let t = Topology::build(&s, &o).unwrap();
    assert_eq!(t.last_bus(), 255);
    assert!(t
        .ports()
        .iter()
        .all(|n| n.windows == PortWindows::default()));
    assert_eq!(t.port("b254").unwrap().path.len(), 255);
    let mut r = spec("rp", PortKind::RootPort, None);
    r.bus_reserve = Some(255);
    assert!(matches!(err(&[r]), TopologyError::BusesExhausted { .. }));

    // Windows.
    let mut o = opts();
    o.mmio32 = (0xc000_0000, 16 << 20);
    let s = vec![
        spec("a", PortKind::RootPort, None),
        spec("b", PortKind::RootPort, None),
        spec("c", PortKind::RootPort, None),
    ];
    let e = Topology::build(&s, &o).unwrap_err();
    assert_eq!(
        msg(e),
        "the host 32-bit memory window is too small for the ports: they need 0x1800000 bytes but it has 0x1000000"
    );
    let mut o = opts();
    o.mmio64 = (1 << 40, 100 << 20);
    assert!(matches!(
        Topology::build(&s, &o).unwrap_err(),
        TopologyError::WindowsExhausted {
            window: "64-bit memory",
            ..
        }
    ));
    let mut big = spec("big", PortKind::RootPort, None);
    big.mmio64_reserve = Some(u64::MAX - 10);
    assert!(matches!(
        err(&[big]),
        TopologyError::WindowsExhausted { .. }
    ));
    let mut io = spec("io", PortKind::RootPort, None);
    io.io_reserve = Some(0x100);
    assert_eq!(
        msg(err(&[io.clone()])),
        "port 'io' reserves I/O space but the host bridge has no I/O window"
    );
    let mut o = opts();
    o.io = Some((0x1000, 0x800));
    assert!(matches!(
        Topology::build(&[io], &o).unwrap_err(),
        TopologyError::WindowsExhausted { window: "I/O", .. }
    ));
    let mut o = opts();
    o.mmio32 = (0xf000_0000, 0x2000_0000);
    assert_eq!(
        msg(Topology::build(&[], &o).unwrap_err()),
        "the host 32-bit memory window is invalid (it wraps around, or the 32-bit window ends above 4 GiB)"
    );
    // An empty topology leaves everything to the root.
    let t = Topology::build(&[], &opts()).unwrap();
    assert!(t.is_empty());
    assert_eq!(
        t.remaining_windows(),
        HostWindows {
            mmio32: MMIO32,
            mmio64: MMIO64,
            io: None
        }
    );
    assert_eq!(t.last_bus(), 0);
}

#[test]
fn routed_root_pins_cover_every_place_a_device_can_be() {
    use crate::intx::{root_pin, routed_root_pins};
    let t = build(&specs()).unwrap();
    let pins = routed_root_pins(&t);
    // Sorted, no duplicates, INTA of every root-bus slot.
    assert!(pins.windows(2).all(|w| w[0] < w[1]), "{pins:?}");
    for slot in 0..32u8 {
        assert!(pins.contains(&(slot, 0)), "slot {slot} INTA");
    }
    // Every port and every slot open to devices reaches a routed pin.
    let mut places = 0;
    for port in t.ports() {
        assert!(pins.contains(&root_pin(&port.path)), "{}", port.id);
        for &slot in port.device_slots() {
            let path = port.device_path(slot).unwrap();
            assert!(pins.contains(&root_pin(&path)), "{path}");
            places += 1;
        }
    }
    assert!(places > 32, "{places}");
    // The PCI bridge on the root bus has 32 slots: all four pins of its slot.
    let pbr = t.port("pbr").unwrap().path.slots()[0].slot;
    for pin in 0..4 {
        assert!(pins.contains(&(pbr, pin)), "pbr pin {pin}");
    }
    // A root port without a switch below passes its one slot's INTA through
    // unswizzled: rp0's root slot needs nothing beyond INTA.
    let rp0 = t.port("rp0").unwrap().path.slots()[0].slot;
    assert_eq!(pins.iter().filter(|(s, _)| *s == rp0).count(), 1);
    // rp1 has a switch below: its downstream ports swizzle.
    let rp1 = t.port("rp1").unwrap().path.slots()[0].slot;
    assert!(pins.iter().filter(|(s, _)| *s == rp1).count() > 1);
    assert!(pins.len() < 128);

    // One root port: INTA of each root-bus slot, nothing more.
    let one = build(&[spec("rp0", PortKind::RootPort, None)]).unwrap();
    assert_eq!(
        routed_root_pins(&one),
        (0..32u8).map(|s| (s, 0)).collect::<Vec<_>>()
    );
}

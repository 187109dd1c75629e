//! Unit tests for the hotplug plan and the placement policy, on topologies built with
//! [`Topology::build`].

use std::collections::BTreeSet;

use super::*;
use crate::bar::{BarRegion, PciBarConfig};
use crate::config::{PciConfigParams, PciConfiguration};
use crate::device::{BarInfo, ConfigWriteOutcome, PciDevice};
use crate::topology::{PortKind, PortSpec, TopologyOptions};
use crate::PciError;

const MMIO32: (u64, u64) = (0xc000_0000, 0x2000_0000);
const MMIO64: (u64, u64) = (0x1_0000_0000, 1 << 36);

fn opts() -> TopologyOptions {
    TopologyOptions::new((1..32).collect(), MMIO32, MMIO64, None)
}

fn p(s: &str) -> PciPath {
    s.parse().unwrap()
}

/// The VMM's default topology: root ports rp0..rp7 (native) and the PCIe-to-PCI bridge
/// br0 (ACPI) on the root bus.
fn default_topology() -> Topology {
    let mut specs: Vec<PortSpec> = (0..8)
        .map(|i| PortSpec::new(format!("rp{i}"), PortKind::RootPort))
        .collect();
    specs.push(PortSpec::new("br0", PortKind::PciBridge));
    Topology::build(&specs, &opts()).unwrap()
}

/// Every kind of port: a native root port, a root port holding a switch (native downstream
/// ports), a root port without hotplug, an ACPI bridge with a bridge with a bridge below
/// (three levels), and a bridge without hotplug.
fn mixed_topology() -> Topology {
    let mut br1 = PortSpec::new("br1", PortKind::PciBridge).with_parent("br0");
    br1.slot = Some(3);
    let mut br2 = PortSpec::new("br2", PortKind::PciBridge).with_parent("br1");
    br2.slot = Some(5);
    let specs = vec![
        PortSpec::new("rp0", PortKind::RootPort),
        PortSpec::new("rp1", PortKind::RootPort),
        PortSpec::new("sw0", PortKind::Switch { downstream: 2 }).with_parent("rp1"),
        PortSpec::new("rpn", PortKind::RootPort).with_hotplug(HotplugMode::None),
        PortSpec::new("br0", PortKind::PciBridge),
        br1,
        br2,
        PortSpec::new("brn", PortKind::PciBridge).with_hotplug(HotplugMode::None),
    ];
    Topology::build(&specs, &opts()).unwrap()
}

/// Occupied paths, as the VMM's bus would report them.
#[derive(Default)]
struct Bus(BTreeSet<PciPath>);

impl Bus {
    fn with(paths: &[&str]) -> Self {
        Bus(paths.iter().map(|s| p(s)).collect())
    }

    fn choose(
        &self,
        t: &Topology,
        plan: &HotplugPlan,
        order: &[PlaceKind],
        req: PlaceRequest<'_>,
    ) -> Result<Place, PlacementError> {
        let occupied = |path: &PciPath| self.0.contains(path);
        choose(t, plan, order, &occupied, &req)
    }

    /// Hot-plug with the default order; the chosen place is then occupied.
    fn hotplug(&mut self, t: &Topology, plan: &HotplugPlan) -> Result<Place, PlacementError> {
        self.add(t, plan, &PlaceKind::DEFAULT_ORDER, auto(true))
    }

    fn add(
        &mut self,
        t: &Topology,
        plan: &HotplugPlan,
        order: &[PlaceKind],
        req: PlaceRequest<'_>,
    ) -> Result<Place, PlacementError> {
        let place = self.choose(t, plan, order, req)?;
        self.0.insert(place.path.clone());
        Ok(place)
    }
}

fn auto(hotplug: bool) -> PlaceRequest<'static> {
    PlaceRequest {
        port: None,
        pci_path: None,
        function: None,
        hotplug,
    }
}

fn by_port(port: &str, hotplug: bool) -> PlaceRequest<'_> {
    PlaceRequest {
        port: Some(port),
        pci_path: None,
        function: None,
        hotplug,
    }
}

fn by_path(path: &str, hotplug: bool) -> PlaceRequest<'_> {
    PlaceRequest {
        port: None,
        pci_path: Some(path),
        function: None,
        hotplug,
    }
}

fn place(path: &str, port: Option<&str>, mechanism: SlotMechanism) -> Place {
    Place {
        path: p(path),
        port: port.map(str::to_string),
        mechanism,
    }
}

fn native(port: &str) -> SlotMechanism {
    SlotMechanism::Native {
        port: port.to_string(),
    }
}

fn acpi(bsel: u32, slot: u8) -> SlotMechanism {
    SlotMechanism::Acpi { bsel, slot }
}

fn bad_path(err: PlacementError) -> (String, String) {
    match err {
        PlacementError::BadPath { path, reason } => (path, reason),
        e => panic!("expected BadPath, got {e:?}"),
    }
}

#[test]
fn topologies_are_as_the_tests_assume() {
    let t = default_topology();
    let paths: Vec<(String, String)> = t
        .ports()
        .iter()
        .map(|n| (n.id.clone(), n.path.to_string()))
        .collect();
    let mut want: Vec<(String, String)> = (0..8)
        .map(|i| (format!("rp{i}"), format!("{:02x}", i + 1)))
        .collect();
    want.push(("br0".into(), "09".into()));
    assert_eq!(paths, want);
    assert_eq!(
        t.port("br0").unwrap().device_slots(),
        (0..32).collect::<Vec<u8>>()
    );

    let t = mixed_topology();
    let paths: Vec<(&str, String, HotplugMode)> = t
        .ports()
        .iter()
        .map(|n| (n.id.as_str(), n.path.to_string(), n.hotplug))
        .collect();
    use HotplugMode::{Acpi, Native, None as NoHp};
    assert_eq!(
        paths,
        vec![
            ("rp0", "01".to_string(), Native),
            ("rp1", "02".to_string(), Native),
            ("sw0", "02/00".to_string(), NoHp),
            ("sw0.0", "02/00/00".to_string(), Native),
            ("sw0.1", "02/00/01".to_string(), Native),
            ("rpn", "03".to_string(), NoHp),
            ("br0", "04".to_string(), Acpi),
            ("br1", "04/03".to_string(), Acpi),
            ("br2", "04/03/05".to_string(), Acpi),
            ("brn", "05".to_string(), NoHp),
        ]
    );
}

#[test]
fn plan_of_the_default_topology() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    assert_eq!(plan.root_slots(), (10..32).collect::<Vec<u8>>());
    let natives: Vec<String> = (0..8).map(|i| format!("rp{i}")).collect();
    assert_eq!(plan.native_ports(), natives);
    assert_eq!(
        plan.acpi_buses(),
        [
            AcpiHotplugBus {
                port: None,
                bsel: 0,
                slots: (10..32).collect(),
            },
            AcpiHotplugBus {
                port: Some("br0".into()),
                bsel: 1,
                slots: (0..32).collect(),
            },
        ]
    );
    assert_eq!(plan.bsel(None), Some(0));
    assert_eq!(plan.bsel(Some("br0")), Some(1));
    assert_eq!(plan.bsel(Some("rp0")), None);
    assert_eq!(plan.bsel(Some("nope")), None);
}

#[test]
fn plan_bsel_numbering_follows_topology_order() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let buses: Vec<(Option<&str>, u32)> = plan
        .acpi_buses()
        .iter()
        .map(|b| (b.port.as_deref(), b.bsel))
        .collect();
    assert_eq!(
        buses,
        vec![
            (None, 0),
            (Some("br0"), 1),
            (Some("br1"), 2),
            (Some("br2"), 3)
        ]
    );
    // Ports without hotplug (rpn, brn) and switch upstream ports have no selector.
    for id in ["rpn", "brn", "sw0", "rp0"] {
        assert_eq!(plan.bsel(Some(id)), None, "{id}");
    }
    // Every native port, including one holding a switch.
    assert_eq!(plan.native_ports(), ["rp0", "rp1", "sw0.0", "sw0.1"]);
    // Root slots: not the five ports' slots.
    assert_eq!(plan.root_slots(), (6..32).collect::<Vec<u8>>());
    // A bridge's slots are its open slots: not those of its child bridges.
    let br0: Vec<u8> = (0..32).filter(|s| *s != 3).collect();
    let br1: Vec<u8> = (0..32).filter(|s| *s != 5).collect();
    assert_eq!(plan.acpi_buses()[1].slots, br0);
    assert_eq!(plan.acpi_buses()[2].slots, br1);
    assert_eq!(plan.acpi_buses()[3].slots, (0..32).collect::<Vec<u8>>());
}

/// A limit on the root bus's ACPI slots keeps the highest free ones, after
/// ports and cold-plugged devices took theirs; a root slot outside the
/// limit hot-plugs by no mechanism; 0 leaves the root bus without ACPI
/// hotplug, a limit above the free slots keeps them all.
#[test]
fn root_acpi_slot_limit_keeps_the_highest_free_slots() {
    let specs: Vec<PortSpec> = (0..8)
        .map(|i| PortSpec::new(format!("rp{i}"), PortKind::RootPort))
        .collect();
    let with = |limit: Option<usize>| {
        let mut o = opts();
        o.root_acpi_slots = limit;
        Topology::build(&specs, &o).unwrap()
    };
    let t = with(Some(8));
    let cold = [p("09"), p("1f")];
    let plan = HotplugPlan::new(&t, &cold);
    assert_eq!(plan.root_slots(), (0x17..0x1f).collect::<Vec<u8>>());
    assert_eq!(plan.mechanism(None, &p("16")), SlotMechanism::None);
    assert_eq!(plan.mechanism(None, &p("17")), acpi(0, 0x17));
    assert_eq!(
        HotplugPlan::new(&with(Some(0)), &[]).root_slots(),
        &[] as &[u8]
    );
    assert_eq!(
        HotplugPlan::new(&with(Some(40)), &[]).root_slots(),
        (9..32).collect::<Vec<u8>>()
    );
    assert_eq!(
        HotplugPlan::new(&with(None), &[]).root_slots(),
        (9..32).collect::<Vec<u8>>()
    );
}

#[test]
fn plan_excludes_cold_plugged_devices() {
    let t = mixed_topology();
    // Root slots 6 and 9 (any function), slot 7 of br0, slot 0 of br2, rp0's slot.
    let cold = [p("06"), p("09.2"), p("04/07"), p("04/03/05/00"), p("01/00")];
    let plan = HotplugPlan::new(&t, &cold);
    let root: Vec<u8> = (7..32).filter(|s| *s != 9).collect();
    assert_eq!(plan.root_slots(), root);
    let br0: Vec<u8> = (0..32).filter(|s| *s != 3 && *s != 7).collect();
    assert_eq!(plan.acpi_buses()[1].slots, br0);
    // br1's slot 7 stays: the cold device at 04/07 is on br0's bus.
    let br1: Vec<u8> = (0..32).filter(|s| *s != 5).collect();
    assert_eq!(plan.acpi_buses()[2].slots, br1);
    assert_eq!(plan.acpi_buses()[3].slots, (1..32).collect::<Vec<u8>>());
    // A native port keeps its mechanism with a cold-plugged device.
    assert_eq!(plan.mechanism(Some("rp0"), &p("01/00")), native("rp0"));
}

#[test]
fn plan_mechanisms() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[p("06"), p("04/07")]);
    // Native: whatever the slot.
    assert_eq!(plan.mechanism(Some("rp0"), &p("01/00")), native("rp0"));
    assert_eq!(
        plan.mechanism(Some("sw0.1"), &p("02/00/01/00")),
        native("sw0.1")
    );
    // ACPI bridges: their plan slots only.
    assert_eq!(plan.mechanism(Some("br0"), &p("04/00")), acpi(1, 0));
    assert_eq!(
        plan.mechanism(Some("br0"), &p("04/07")),
        SlotMechanism::None
    );
    assert_eq!(plan.mechanism(Some("br2"), &p("04/03/05/1f")), acpi(3, 31));
    // Root bus: its hotplug slots only.
    assert_eq!(plan.mechanism(None, &p("07")), acpi(0, 7));
    assert_eq!(plan.mechanism(None, &p("06")), SlotMechanism::None);
    assert_eq!(plan.mechanism(None, &p("01")), SlotMechanism::None);
    assert_eq!(plan.mechanism(None, &p("00")), SlotMechanism::None);
    // No hotplug, no device slot, unknown.
    assert_eq!(
        plan.mechanism(Some("rpn"), &p("03/00")),
        SlotMechanism::None
    );
    assert_eq!(
        plan.mechanism(Some("brn"), &p("05/02")),
        SlotMechanism::None
    );
    assert_eq!(
        plan.mechanism(Some("sw0"), &p("02/00/00")),
        SlotMechanism::None
    );
    assert_eq!(plan.mechanism(Some("nope"), &p("0a")), SlotMechanism::None);
}

#[test]
fn acpi_slot_round_trip() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[p("06"), p("04/07")]);
    let mut n = 0;
    for bus in plan.acpi_buses() {
        for &slot in &bus.slots {
            let (port, path) = plan.acpi_slot(&t, bus.bsel, slot).unwrap();
            assert_eq!(port, bus.port);
            assert_eq!(path.last(), PciSlot { slot, function: 0 });
            assert_eq!(
                plan.mechanism(port.as_deref(), &path),
                acpi(bus.bsel, slot),
                "{path}"
            );
            // The path is a place the topology accepts, under that port.
            let under = t.check_device_path(&path).unwrap().map(|n| n.id.clone());
            assert_eq!(under, port);
            n += 1;
        }
    }
    assert_eq!(n, 25 + 30 + 31 + 32);
    assert_eq!(
        plan.acpi_slot(&t, 3, 4),
        Some((Some("br2".into()), p("04/03/05/04")))
    );
    assert_eq!(plan.acpi_slot(&t, 0, 10), Some((None, p("0a"))));
    // Not in the plan: cold-plugged, a port's slot, a child bridge's slot, unknown bsel.
    assert_eq!(plan.acpi_slot(&t, 0, 6), None);
    assert_eq!(plan.acpi_slot(&t, 0, 1), None);
    assert_eq!(plan.acpi_slot(&t, 0, 0), None);
    assert_eq!(plan.acpi_slot(&t, 1, 7), None);
    assert_eq!(plan.acpi_slot(&t, 1, 3), None);
    assert_eq!(plan.acpi_slot(&t, 4, 0), None);
}

#[test]
fn default_order_native_then_acpi_then_root() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let mut bus = Bus::default();
    for i in 0..8u8 {
        let id = format!("rp{i}");
        assert_eq!(
            bus.hotplug(&t, &plan).unwrap(),
            place(&format!("{:02x}/00", i + 1), Some(&id), native(&id))
        );
    }
    for s in 0..32u8 {
        assert_eq!(
            bus.hotplug(&t, &plan).unwrap(),
            place(&format!("09/{s:02x}"), Some("br0"), acpi(1, s))
        );
    }
    for s in 10..32u8 {
        assert_eq!(
            bus.hotplug(&t, &plan).unwrap(),
            place(&format!("{s:02x}"), None, acpi(0, s))
        );
    }
    assert_eq!(bus.hotplug(&t, &plan), Err(PlacementError::NoFreeSlot));
    assert_eq!(bus.0.len(), 8 + 32 + 22);
}

#[test]
fn default_order_skips_ports_without_slots_or_hotplug() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[p("04/00")]);
    // A cold device at 04/00 (still there).
    let mut bus = Bus::with(&["04/00"]);
    let got: Vec<Place> = (0..3).map(|_| bus.hotplug(&t, &plan).unwrap()).collect();
    assert_eq!(
        got,
        vec![
            place("01/00", Some("rp0"), native("rp0")),
            place("02/00/00/00", Some("sw0.0"), native("sw0.0")),
            place("02/00/01/00", Some("sw0.1"), native("sw0.1")),
        ]
    );
    // Then br0 (slot 0 is cold, slot 3 is br1), br1 (slot 5 is br2), br2.
    let next = bus.hotplug(&t, &plan).unwrap();
    assert_eq!(next, place("04/01", Some("br0"), acpi(1, 1)));
    for _ in 0..29 {
        assert_eq!(bus.hotplug(&t, &plan).unwrap().port.as_deref(), Some("br0"));
    }
    assert_eq!(
        bus.hotplug(&t, &plan).unwrap(),
        place("04/03/00", Some("br1"), acpi(2, 0))
    );
    for _ in 0..30 {
        assert_eq!(bus.hotplug(&t, &plan).unwrap().port.as_deref(), Some("br1"));
    }
    assert_eq!(
        bus.hotplug(&t, &plan).unwrap(),
        place("04/03/05/00", Some("br2"), acpi(3, 0))
    );
    for _ in 0..31 {
        assert_eq!(bus.hotplug(&t, &plan).unwrap().port.as_deref(), Some("br2"));
    }
    // Then the root bus; never rpn or brn.
    assert_eq!(
        bus.hotplug(&t, &plan).unwrap(),
        place("06", None, acpi(0, 6))
    );
    for _ in 0..25 {
        let got = bus.hotplug(&t, &plan).unwrap();
        assert_eq!(got.port, None);
    }
    assert_eq!(bus.hotplug(&t, &plan), Err(PlacementError::NoFreeSlot));
    assert!(!bus.0.iter().any(|p| p.to_string().starts_with("03/")));
    assert!(!bus.0.iter().any(|p| p.to_string().starts_with("05/")));
}

#[test]
fn other_orders() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let bus = Bus::default();
    use PlaceKind::{Acpi, Native, Root};
    let first = |order: &[PlaceKind]| bus.choose(&t, &plan, order, auto(true)).unwrap();
    assert_eq!(first(&[Root, Native, Acpi]), place("0a", None, acpi(0, 10)));
    assert_eq!(first(&[Root, Acpi, Native]), place("0a", None, acpi(0, 10)));
    assert_eq!(
        first(&[Acpi, Native, Root]),
        place("09/00", Some("br0"), acpi(1, 0))
    );
    assert_eq!(
        first(&[Acpi, Root, Native]),
        place("09/00", Some("br0"), acpi(1, 0))
    );
    assert_eq!(
        first(&[Native, Root, Acpi]),
        place("01/00", Some("rp0"), native("rp0"))
    );

    // Root first: the root slots fill, then the next kind.
    let mut bus = Bus::default();
    for s in 10..32u8 {
        let got = bus.add(&t, &plan, &[Root, Acpi], auto(true)).unwrap();
        assert_eq!(got, place(&format!("{s:02x}"), None, acpi(0, s)));
    }
    assert_eq!(
        bus.add(&t, &plan, &[Root, Acpi], auto(true)).unwrap(),
        place("09/00", Some("br0"), acpi(1, 0))
    );
    // A kind left out of the order is never used.
    assert_eq!(
        bus.choose(&t, &plan, &[Root], auto(true)),
        Err(PlacementError::NoFreeSlot)
    );
    assert_eq!(
        bus.choose(&t, &plan, &[], auto(true)),
        Err(PlacementError::NoFreeSlot)
    );
    // Native only.
    let mut bus = Bus::default();
    for i in 0..8 {
        assert_eq!(
            bus.add(&t, &plan, &[Native], auto(true)).unwrap().port,
            Some(format!("rp{i}"))
        );
    }
    assert_eq!(
        bus.choose(&t, &plan, &[Native], auto(true)),
        Err(PlacementError::NoFreeSlot)
    );
    // The order does not matter to cold plug.
    assert_eq!(
        bus.choose(&t, &plan, &[Native], auto(false)).unwrap(),
        place("0a", None, SlotMechanism::None)
    );
}

#[test]
fn automatic_root_hotplug_skips_cold_slots() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[p("0a"), p("0c")]);
    let mut bus = Bus::with(&["0a", "0c"]);
    let got: Vec<String> = (0..3)
        .map(|_| {
            bus.add(&t, &plan, &[PlaceKind::Root], auto(true))
                .unwrap()
                .path
                .to_string()
        })
        .collect();
    assert_eq!(got, ["0b", "0d", "0e"]);
    // A cold slot freed later is still no hotplug slot.
    bus.0.remove(&p("0a"));
    assert_eq!(
        bus.add(&t, &plan, &[PlaceKind::Root], auto(true))
            .unwrap()
            .path,
        p("0f")
    );
}

#[test]
fn cold_plug_without_a_place_takes_the_first_free_root_slot() {
    let t = default_topology();
    // The plan does not matter to cold plug: an empty one, or one with no root slot.
    let empty = HotplugPlan::new(&t, &[]);
    let all: Vec<PciPath> = (1..32).map(root_path).collect();
    let full = HotplugPlan::new(&t, &all);
    assert!(full.root_slots().is_empty());
    for plan in [&empty, &full] {
        let mut bus = Bus::default();
        assert_eq!(
            bus.add(&t, plan, &PlaceKind::DEFAULT_ORDER, auto(false))
                .unwrap(),
            place("0a", None, SlotMechanism::None)
        );
        // Any function occupied makes the slot busy.
        bus.0.insert(p("0b.3"));
        assert_eq!(
            bus.add(&t, plan, &PlaceKind::DEFAULT_ORDER, auto(false))
                .unwrap()
                .path,
            p("0c")
        );
        for s in 13..32u8 {
            assert_eq!(
                bus.add(&t, plan, &PlaceKind::DEFAULT_ORDER, auto(false))
                    .unwrap()
                    .path,
                root_path(s)
            );
        }
        assert_eq!(
            bus.choose(&t, plan, &PlaceKind::DEFAULT_ORDER, auto(false)),
            Err(PlacementError::NoFreeSlot)
        );
    }
    // Without ports every slot but 0 is open.
    let bare = Topology::build(&[], &opts()).unwrap();
    let plan = HotplugPlan::new(&bare, &[]);
    assert_eq!(plan.root_slots(), (1..32).collect::<Vec<u8>>());
    assert_eq!(plan.acpi_buses().len(), 1);
    assert_eq!(
        Bus::default()
            .choose(&bare, &plan, &[], auto(false))
            .unwrap()
            .path,
        p("01")
    );
}

#[test]
fn by_port_into_every_kind_of_slot() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let mut bus = Bus::default();
    let mut add = |port: &str| bus.add(&t, &plan, &[], by_port(port, true));
    assert_eq!(
        add("rp0").unwrap(),
        place("01/00", Some("rp0"), native("rp0"))
    );
    assert_eq!(
        add("sw0.1").unwrap(),
        place("02/00/01/00", Some("sw0.1"), native("sw0.1"))
    );
    assert_eq!(add("br0").unwrap(), place("04/00", Some("br0"), acpi(1, 0)));
    assert_eq!(add("br0").unwrap(), place("04/01", Some("br0"), acpi(1, 1)));
    assert_eq!(add("br0").unwrap(), place("04/02", Some("br0"), acpi(1, 2)));
    // Slot 3 holds br1.
    assert_eq!(add("br0").unwrap(), place("04/04", Some("br0"), acpi(1, 4)));
    assert_eq!(
        add("br1").unwrap(),
        place("04/03/00", Some("br1"), acpi(2, 0))
    );
    assert_eq!(
        add("br2").unwrap(),
        place("04/03/05/00", Some("br2"), acpi(3, 0))
    );
    assert_eq!(
        add("br2").unwrap(),
        place("04/03/05/01", Some("br2"), acpi(3, 1))
    );
    // Full ports.
    assert_eq!(add("rp0"), Err(PlacementError::PortFull("rp0".into())));
    assert_eq!(add("sw0.1"), Err(PlacementError::PortFull("sw0.1".into())));
    for _ in 2..32 {
        add("br2").unwrap();
    }
    assert_eq!(add("br2"), Err(PlacementError::PortFull("br2".into())));
    // Cold plug by port works in ports without hotplug too.
    let mut bus = Bus::default();
    assert_eq!(
        bus.add(&t, &plan, &[], by_port("rpn", false)).unwrap(),
        place("03/00", Some("rpn"), SlotMechanism::None)
    );
    assert_eq!(
        bus.add(&t, &plan, &[], by_port("brn", false)).unwrap(),
        place("05/00", Some("brn"), SlotMechanism::None)
    );
    assert_eq!(
        bus.add(&t, &plan, &[], by_port("rp0", false)).unwrap(),
        place("01/00", Some("rp0"), SlotMechanism::None)
    );
    assert_eq!(
        bus.choose(&t, &plan, &[], by_port("rpn", false)),
        Err(PlacementError::PortFull("rpn".into()))
    );
}

#[test]
fn by_port_hotplug_prefers_plan_slots() {
    let t = default_topology();
    // br0 slot 0 was cold-plugged (so it is not in the plan), and is free now.
    let plan = HotplugPlan::new(&t, &[p("09/00")]);
    let bus = Bus::default();
    assert_eq!(
        bus.choose(&t, &plan, &[], by_port("br0", true)).unwrap(),
        place("09/01", Some("br0"), acpi(1, 1))
    );
    assert_eq!(
        bus.choose(&t, &plan, &[], by_port("br0", false)).unwrap(),
        place("09/00", Some("br0"), SlotMechanism::None)
    );
}

#[test]
fn by_exact_path_into_every_kind_of_slot() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let bus = Bus::default();
    let hot = |path: &str, port: Option<&str>| {
        bus.choose(
            &t,
            &plan,
            &[],
            PlaceRequest {
                port,
                pci_path: Some(path),
                function: None,
                hotplug: true,
            },
        )
    };
    assert_eq!(
        hot("01/00", None).unwrap(),
        place("01/00", Some("rp0"), native("rp0"))
    );
    assert_eq!(
        hot("2/0/0/0", Some("sw0.0")).unwrap(),
        place("02/00/00/00", Some("sw0.0"), native("sw0.0"))
    );
    assert_eq!(
        hot("04/1f", Some("br0")).unwrap(),
        place("04/1f", Some("br0"), acpi(1, 31))
    );
    assert_eq!(
        hot("04/03/02", None).unwrap(),
        place("04/03/02", Some("br1"), acpi(2, 2))
    );
    assert_eq!(
        hot("04/03/05/0a", Some("br2")).unwrap(),
        place("04/03/05/0a", Some("br2"), acpi(3, 10))
    );
    assert_eq!(hot("1f", None).unwrap(), place("1f", None, acpi(0, 31)));
    assert_eq!(hot("06", None).unwrap(), place("06", None, acpi(0, 6)));
    // Cold plug by path: any open slot, no mechanism.
    let cold = |path: &str| bus.choose(&t, &plan, &[], by_path(path, false));
    assert_eq!(
        cold("03/00").unwrap(),
        place("03/00", Some("rpn"), SlotMechanism::None)
    );
    assert_eq!(cold("0a").unwrap(), place("0a", None, SlotMechanism::None));
    assert_eq!(
        cold("05/1e").unwrap(),
        place("05/1e", Some("brn"), SlotMechanism::None)
    );
}

#[test]
fn bad_paths() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let bus = Bus::default();
    let req = |port: Option<&'static str>, path: &'static str, hotplug: bool| {
        bus.choose(
            &t,
            &plan,
            &PlaceKind::DEFAULT_ORDER,
            PlaceRequest {
                port,
                pci_path: Some(path),
                function: None,
                hotplug,
            },
        )
        .unwrap_err()
    };
    for hotplug in [false, true] {
        // Malformed.
        for bad in ["", "zz", "01//00", "20", "01/00.8", "123"] {
            let (path, _) = bad_path(req(None, bad, hotplug));
            assert_eq!(path, bad);
        }
        // A function other than 0 is checked like function 0.
        let (_, reason) = bad_path(req(None, "01.1", hotplug));
        assert!(reason.contains("rp0"), "{reason}");
        let (_, reason) = bad_path(req(Some("rp0"), "04/02.7", hotplug));
        assert_eq!(reason, "it is not a slot of port 'rp0'");
        // Slot 00 of the root bus.
        let e = req(None, "00", hotplug);
        assert_eq!(
            e.to_string(),
            "pci_path '00': slot 00 holds the host bridge"
        );
        // A port's own path, or a slot the port does not open.
        let (_, reason) = bad_path(req(None, "01", hotplug));
        assert!(reason.contains("rp0"), "{reason}");
        let (_, reason) = bad_path(req(None, "04/03", hotplug));
        assert!(reason.contains("br1"), "{reason}");
        bad_path(req(None, "01/01", hotplug));
        bad_path(req(None, "02/00/05", hotplug));
        bad_path(req(None, "0a/00", hotplug));
        // The path is not in the named port (even an unknown one).
        let e = req(Some("rp0"), "02/00/00/00", hotplug);
        assert_eq!(
            e.to_string(),
            "pci_path '02/00/00/00': it is not a slot of port 'rp0'"
        );
        let (_, reason) = bad_path(req(Some("rp0"), "0a", hotplug));
        assert_eq!(reason, "it is not a slot of port 'rp0'");
        let (_, reason) = bad_path(req(Some("nope"), "01/00", hotplug));
        assert_eq!(reason, "it is not a slot of port 'nope'");
        // Checked before slot 00.
        let (_, reason) = bad_path(req(Some("br0"), "00", hotplug));
        assert_eq!(reason, "it is not a slot of port 'br0'");
    }
}

#[test]
fn port_errors() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let bus = Bus::default();
    for hotplug in [false, true] {
        let e = |port| {
            bus.choose(&t, &plan, &[], by_port(port, hotplug))
                .unwrap_err()
        };
        assert_eq!(e("nope"), PlacementError::UnknownPort("nope".into()));
        assert_eq!(e("nope").to_string(), "unknown port 'nope'");
        assert_eq!(e("rp1"), PlacementError::NoDeviceSlot("rp1".into()));
        assert_eq!(e("sw0"), PlacementError::NoDeviceSlot("sw0".into()));
        assert_eq!(
            e("sw0").to_string(),
            "port 'sw0' has no device slot (it holds other ports)"
        );
    }
}

#[test]
fn taken_and_non_hotplug_slots() {
    let t = mixed_topology();
    // 0a was cold-plugged.
    let plan = HotplugPlan::new(&t, &[p("0a")]);
    let bus = Bus::with(&["0a", "01/00", "04/02"]);
    let c = |req| bus.choose(&t, &plan, &[], req);
    for hotplug in [false, true] {
        assert_eq!(
            c(by_path("0a", hotplug)),
            Err(PlacementError::SlotTaken(p("0a")))
        );
        assert_eq!(
            c(by_path("01/00", hotplug)),
            Err(PlacementError::SlotTaken(p("01/00")))
        );
        assert_eq!(
            c(PlaceRequest {
                port: Some("br0"),
                pci_path: Some("04/02"),
                function: None,
                hotplug,
            }),
            Err(PlacementError::SlotTaken(p("04/02")))
        );
    }
    assert_eq!(
        PlacementError::SlotTaken(p("04/02")).to_string(),
        "slot 04/02 is taken"
    );
    // A port without hotplug, by port or by path.
    assert_eq!(
        c(by_port("rpn", true)),
        Err(PlacementError::NotHotplugSlot(p("03/00")))
    );
    assert_eq!(
        c(by_path("03/00", true)),
        Err(PlacementError::NotHotplugSlot(p("03/00")))
    );
    assert_eq!(
        c(by_port("brn", true)),
        Err(PlacementError::NotHotplugSlot(p("05/00")))
    );
    assert_eq!(
        PlacementError::NotHotplugSlot(p("03/00")).to_string(),
        "03/00 is not a hotplug slot"
    );
    // A cold-plugged root slot, once free, is still not a hotplug slot.
    let empty = Bus::default();
    assert_eq!(
        empty.choose(&t, &plan, &[], by_path("0a", true)),
        Err(PlacementError::NotHotplugSlot(p("0a")))
    );
    assert_eq!(
        empty.choose(&t, &plan, &[], by_path("0a", false)).unwrap(),
        place("0a", None, SlotMechanism::None)
    );
}

#[test]
fn a_released_slot_is_reused() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let mut bus = Bus::default();
    assert_eq!(bus.hotplug(&t, &plan).unwrap().path, p("01/00"));
    assert_eq!(bus.hotplug(&t, &plan).unwrap().path, p("02/00"));
    assert_eq!(
        bus.choose(&t, &plan, &[], by_port("rp0", true)),
        Err(PlacementError::PortFull("rp0".into()))
    );
    assert_eq!(
        bus.choose(&t, &plan, &[], by_path("01/00", true)),
        Err(PlacementError::SlotTaken(p("01/00")))
    );
    // The removal completed: the slot is free again.
    assert!(bus.0.remove(&p("01/00")));
    assert_eq!(
        bus.choose(&t, &plan, &[], by_port("rp0", true)).unwrap(),
        place("01/00", Some("rp0"), native("rp0"))
    );
    assert_eq!(bus.hotplug(&t, &plan).unwrap().path, p("01/00"));
    // The same for an ACPI slot on the root bus.
    let mut bus = Bus::default();
    let root = [PlaceKind::Root];
    assert_eq!(bus.add(&t, &plan, &root, auto(true)).unwrap().path, p("0a"));
    assert_eq!(bus.add(&t, &plan, &root, auto(true)).unwrap().path, p("0b"));
    assert!(bus.0.remove(&p("0a")));
    assert_eq!(
        bus.add(&t, &plan, &root, auto(true)).unwrap(),
        place("0a", None, acpi(0, 10))
    );
}

#[test]
fn place_kind_names() {
    assert_eq!("native".parse::<PlaceKind>(), Ok(PlaceKind::Native));
    assert_eq!("acpi".parse::<PlaceKind>(), Ok(PlaceKind::Acpi));
    assert_eq!("root".parse::<PlaceKind>(), Ok(PlaceKind::Root));
    let e = "pcie".parse::<PlaceKind>().unwrap_err();
    assert!(
        e.contains("'pcie'") && e.contains("native, acpi or root"),
        "{e}"
    );
    assert!("Native".parse::<PlaceKind>().is_err());
    for k in PlaceKind::DEFAULT_ORDER {
        assert_eq!(k.to_string().parse::<PlaceKind>(), Ok(k));
    }
    assert_eq!(
        PlaceKind::DEFAULT_ORDER,
        [PlaceKind::Native, PlaceKind::Acpi, PlaceKind::Root]
    );
}

#[test]
fn error_messages() {
    let e = PlacementError::NoFreeSlot.to_string();
    assert!(e.starts_with("no free slot"), "{e}");
    assert!(e.contains("hotplug slot"), "{e}");
    assert_eq!(
        PlacementError::PortFull("rp3".into()).to_string(),
        "every slot of port 'rp3' is taken"
    );
    assert_eq!(
        PlacementError::BadPath {
            path: "zz".into(),
            reason: "why".into()
        }
        .to_string(),
        "pci_path 'zz': why"
    );
}

/// A device with the given memory BARs: (index, size, region, prefetchable).
struct TestDevice(PciConfiguration);

impl TestDevice {
    fn new(bars: &[(usize, u64, BarRegion, bool)]) -> Self {
        let mut c = PciConfiguration::new(PciConfigParams::device(0x1af4, 0x1042, 0));
        for &(index, size, region, prefetchable) in bars {
            c.add_bar(PciBarConfig::new(index, size, region, prefetchable).unwrap())
                .unwrap();
        }
        TestDevice(c)
    }
}

impl PciDevice for TestDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.0.read_config_register(reg)
    }
    fn write_config_register(&mut self, reg: usize, off: u64, data: &[u8]) -> ConfigWriteOutcome {
        self.0.write_config_register(reg, off, data)
    }
    fn bars(&self) -> Vec<BarInfo> {
        self.0.bars()
    }
    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        self.0.set_bar_address(index, addr)
    }
    fn read_bar(&mut self, _: usize, _: u64, _: &mut [u8]) {}
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[test]
fn windows_that_do_not_fit() {
    let mut tiny = PortSpec::new("tiny", PortKind::RootPort);
    tiny.mmio32_reserve = Some(1 << 20);
    let specs = vec![PortSpec::new("rp0", PortKind::RootPort), tiny];
    let t = Topology::build(&specs, &opts()).unwrap();
    let plan = HotplugPlan::new(&t, &[]);
    // Placement picks the slot; the windows are the allocator's business.
    let chosen = Bus::default()
        .choose(&t, &plan, &[], by_port("tiny", true))
        .unwrap();
    assert_eq!(chosen, place("02/00", Some("tiny"), native("tiny")));

    // A 2 MiB non-prefetchable BAR does not fit tiny's 1 MiB 32-bit reserve.
    let big = || TestDevice::new(&[(0, 2 << 20, BarRegion::Mmio32, false)]);
    let node = t.port("tiny").unwrap();
    assert_eq!(node.reserve.mmio32.map(|(_, s)| s), Some(1 << 20));
    let mut a = node.bar_allocator().unwrap();
    let e = a.place_device(&mut big()).unwrap_err();
    assert!(matches!(e, PciError::Allocation(_)), "{e:?}");
    // Nothing stayed allocated: a device that fits still gets the whole reserve.
    let mut small = TestDevice::new(&[
        (0, 1 << 20, BarRegion::Mmio32, false),
        (2, 0x4000, BarRegion::Mmio64, true),
    ]);
    let placed = a.place_device(&mut small).unwrap();
    let (base, size) = node.reserve.mmio32.unwrap();
    assert_eq!(placed[0].addr, base);
    assert_eq!(placed[0].size, size);
    // A 64-bit non-prefetchable BAR behind a bridge needs the 32-bit window too.
    let mut a = node.bar_allocator().unwrap();
    assert!(a
        .place_device(&mut TestDevice::new(&[(
            0,
            2 << 20,
            BarRegion::Mmio64,
            false
        )]))
        .is_err());

    // The default reserve of rp0 holds it.
    let rp0 = t.port("rp0").unwrap();
    let mut a = rp0.bar_allocator().unwrap();
    let placed = a.place_device(&mut big()).unwrap();
    let (base, size) = rp0.reserve.mmio32.unwrap();
    assert!(placed[0].addr >= base && placed[0].addr + (2 << 20) <= base + size);
}

#[test]
fn the_root_bus_by_its_id() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let first = plan.root_slots()[0];
    let mut bus = Bus::default();
    // Hot-plug: the first root slot with ACPI hotplug; cold: the first free slot.
    let hot = bus.add(&t, &plan, &[], by_port(ROOT_BUS_ID, true)).unwrap();
    assert_eq!(
        hot.path,
        PciPath::root(PciSlot {
            slot: first,
            function: 0
        })
    );
    assert_eq!(hot.port, None);
    assert!(matches!(hot.mechanism, SlotMechanism::Acpi { bsel: 0, .. }));
    let next = bus.add(&t, &plan, &[], by_port(ROOT_BUS_ID, true)).unwrap();
    assert_eq!(next.path.last().slot, plan.root_slots()[1]);
    let cold = Bus::default()
        .choose(&t, &plan, &[], by_port(ROOT_BUS_ID, false))
        .unwrap();
    assert_eq!(cold.port, None);
    assert_eq!(cold.mechanism, SlotMechanism::None);
    // Every root slot taken: the root bus is full.
    let mut full = Bus::default();
    for s in plan.root_slots() {
        full.0.insert(PciPath::root(PciSlot {
            slot: *s,
            function: 0,
        }));
    }
    assert_eq!(
        full.choose(&t, &plan, &[], by_port(ROOT_BUS_ID, true))
            .unwrap_err(),
        PlacementError::PortFull(ROOT_BUS_ID.into())
    );
    // No port may take the root bus's id.
    let specs = vec![PortSpec::new(ROOT_BUS_ID, PortKind::RootPort)];
    assert_eq!(
        Topology::build(&specs, &opts()).unwrap_err().to_string(),
        "port id 'root' is reserved for the root bus"
    );
}

fn with_function(req: PlaceRequest<'_>, function: u8) -> PlaceRequest<'_> {
    PlaceRequest {
        function: Some(function),
        ..req
    }
}

#[test]
fn staging_and_committing_a_native_slot() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let mut bus = Bus::default();
    let order = PlaceKind::DEFAULT_ORDER;
    // Functions 3, 1, 2 by path or by port: staged in rp0's slot.
    let placed = bus
        .add(&t, &plan, &order, by_path("01/00.3", true))
        .unwrap();
    assert_eq!(placed, place("01/00.3", Some("rp0"), native("rp0")));
    assert_eq!(slot_functions(&p("01/00"), &|q| bus.0.contains(q)), 0b1000);
    let placed = bus
        .add(&t, &plan, &order, with_function(by_port("rp0", true), 1))
        .unwrap();
    assert_eq!(placed.path, p("01/00.1"));
    let placed = bus
        .add(&t, &plan, &order, with_function(by_path("01/00", true), 2))
        .unwrap();
    assert_eq!(placed.path, p("01/00.2"));
    // A staged function is taken like any other.
    assert_eq!(
        bus.choose(&t, &plan, &order, by_path("01/00.1", true)),
        Err(PlacementError::SlotTaken(p("01/00.1")))
    );
    // A port without a function wants an empty slot: rp0 has none.
    assert_eq!(
        bus.choose(&t, &plan, &order, by_port("rp0", true)),
        Err(PlacementError::PortFull("rp0".into()))
    );
    // Automatic placement without a function skips the staged slot.
    assert_eq!(
        bus.choose(&t, &plan, &order, auto(true)).unwrap().path,
        p("02/00")
    );
    // Function 0 commits it.
    let placed = bus
        .add(&t, &plan, &order, with_function(by_port("rp0", true), 0))
        .unwrap();
    assert_eq!(placed, place("01/00", Some("rp0"), native("rp0")));
    assert_eq!(
        slot_functions(&p("01/00.2"), &|q| bus.0.contains(q)),
        0b1111
    );
    // Nothing joins a committed slot.
    let e = bus
        .choose(&t, &plan, &order, by_path("01/00.4", true))
        .unwrap_err();
    assert_eq!(
        e,
        PlacementError::SlotCommitted {
            slot: p("01/00"),
            functions: "0, 1, 2, 3".into(),
        }
    );
    assert!(e.to_string().contains("slot 01/00 is committed"), "{e}");
    // By port: the reason, not "full".
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(by_port("rp0", true), 4)),
        Err(PlacementError::SlotCommitted {
            slot: p("01/00"),
            functions: "0, 1, 2, 3".into(),
        })
    );
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(by_port("rp0", true), 2)),
        Err(PlacementError::PortFull("rp0".into()))
    );
    assert_eq!(
        bus.choose(&t, &plan, &order, by_path("01/00", true)),
        Err(PlacementError::SlotTaken(p("01/00")))
    );
    // A single-function slot refuses a function, naming why.
    bus.add(&t, &plan, &order, by_port("rp1", true)).unwrap();
    let e = bus
        .choose(&t, &plan, &order, by_path("02/00.1", true))
        .unwrap_err();
    assert_eq!(
        e,
        PlacementError::SingleFunction {
            slot: p("02/00"),
            function: 1
        }
    );
    assert!(e.to_string().contains("single-function"), "{e}");
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(by_port("rp1", true), 1)),
        Err(e)
    );
    // Cold plug (before boot) takes it.
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(by_port("rp1", false), 1))
            .unwrap()
            .path,
        p("02/00.1")
    );
}

#[test]
fn staged_functions_share_acpi_and_root_slots() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let mut bus = Bus::default();
    let order = PlaceKind::DEFAULT_ORDER;
    // By port: the second function joins the first one's slot (slot 00 of br0).
    for f in [1, 2] {
        let placed = bus
            .add(&t, &plan, &order, with_function(by_port("br0", true), f))
            .unwrap();
        assert_eq!(placed.path, p(&format!("09/00.{f}")));
        assert_eq!(placed.mechanism, acpi(1, 0));
    }
    // Without a function a new device takes an empty slot.
    assert_eq!(
        bus.choose(&t, &plan, &order, by_port("br0", true))
            .unwrap()
            .path,
        p("09/01")
    );
    // A function another slot of br0 lacks goes there once this one has it.
    bus.add(&t, &plan, &order, by_path("09/01.2", true))
        .unwrap();
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(by_port("br0", true), 2))
            .unwrap()
            .path,
        p("09/02.2")
    );
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(by_port("br0", true), 3))
            .unwrap()
            .path,
        p("09/00.3")
    );
    // Root bus hotplug slots, by the root bus's id.
    let placed = bus
        .add(&t, &plan, &order, with_function(by_port("root", true), 5))
        .unwrap();
    assert_eq!(placed, place("0a.5", None, acpi(0, 10)));
    let placed = bus
        .add(&t, &plan, &order, with_function(by_port("root", true), 0))
        .unwrap();
    assert_eq!(placed, place("0a", None, acpi(0, 10)));
    // A path and a function that disagree.
    let (_, reason) = bad_path(
        bus.choose(&t, &plan, &order, with_function(by_path("0b.1", true), 2))
            .unwrap_err(),
    );
    assert_eq!(reason, "it names function 1 but 'function' is 2");
    // Equal ones agree.
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(by_path("0b.1", true), 1))
            .unwrap()
            .path,
        p("0b.1")
    );
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(auto(true), 8)),
        Err(PlacementError::BadFunction(8))
    );
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(by_path("0b", true), 9)),
        Err(PlacementError::BadFunction(9))
    );
}

#[test]
fn cold_plugged_functions_join_any_slot_until_the_vm_is_built() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let mut bus = Bus::default();
    let order = PlaceKind::DEFAULT_ORDER;
    // Function 0 first, then others: allowed before boot.
    bus.add(&t, &plan, &order, by_path("0c", false)).unwrap();
    bus.add(&t, &plan, &order, by_path("0c.1", false)).unwrap();
    let placed = bus
        .add(&t, &plan, &order, with_function(by_port("rp2", false), 4))
        .unwrap();
    assert_eq!(placed, place("03/00.4", Some("rp2"), SlotMechanism::None));
    // Automatic cold plug with a function: the first partly filled root slot that lacks it,
    // else a fresh one (01-09 hold ports).
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(auto(false), 3))
            .unwrap()
            .path,
        p("0c.3")
    );
    assert_eq!(
        bus.choose(&t, &plan, &order, with_function(auto(false), 1))
            .unwrap()
            .path,
        p("0a.1")
    );
    assert_eq!(
        bus.choose(&t, &plan, &order, by_path("0c.1", false)),
        Err(PlacementError::SlotTaken(p("0c.1")))
    );
    let paths: Vec<PciPath> = bus.0.iter().cloned().collect();
    let e = check_cold_slots(&paths).unwrap_err();
    assert_eq!(
        e,
        PlacementError::NoFunctionZero {
            slot: p("03/00"),
            functions: "4".into()
        }
    );
    assert!(
        e.to_string()
            .starts_with("slot 03/00 has function(s) 4 but no function 0"),
        "{e}"
    );
    bus.add(&t, &plan, &order, by_port("rp2", false))
        .unwrap_err();
    bus.add(&t, &plan, &order, with_function(by_port("rp2", false), 0))
        .unwrap();
    let paths: Vec<PciPath> = bus.0.iter().cloned().collect();
    check_cold_slots(&paths).unwrap();
    check_cold_slots(&[]).unwrap();
    // The plan leaves every cold-plugged slot out, whatever the function.
    let plan = HotplugPlan::new(&t, &[p("0d.3")]);
    assert!(!plan.root_slots().contains(&0x0d));
}

#[test]
fn removal_takes_the_slot_or_a_staged_function() {
    let staged = Bus::with(&["01/00.1", "01/00.3"]);
    let occ = |b: &Bus| {
        let set = b.0.clone();
        move |q: &PciPath| set.contains(q)
    };
    assert_eq!(
        removal(&p("01/00.3"), &occ(&staged)),
        Ok(Removal::Staged(p("01/00.3")))
    );
    let committed = Bus::with(&["01/00", "01/00.1", "01/00.3"]);
    assert_eq!(
        removal(&p("01/00"), &occ(&committed)),
        Ok(Removal::Slot(vec![p("01/00"), p("01/00.1"), p("01/00.3")]))
    );
    let e = removal(&p("01/00.3"), &occ(&committed)).unwrap_err();
    assert!(matches!(
        e,
        PlacementError::FunctionOfCommittedSlot { function: 3, .. }
    ));
    let single = Bus::with(&["0a"]);
    assert_eq!(
        removal(&p("0a"), &occ(&single)),
        Ok(Removal::Slot(vec![p("0a")]))
    );
}

/// A kernel VFIO assignment of `slots` host devices of `groups`.
fn group_req<'a>(place: PlaceRequest<'a>, slots: usize, groups: &'a [u32]) -> SlotsRequest<'a> {
    SlotsRequest {
        place,
        slots,
        multifunction: true,
        groups,
    }
}

fn slots_of(r: &SlotsPlace) -> Vec<(String, Option<String>)> {
    r.places
        .iter()
        .map(|p| (p.path.to_string(), p.port.clone()))
        .collect()
}

#[test]
fn two_host_groups_get_separate_ports_by_default() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let mut bus = Bus::default();
    let mut placed: Vec<(PciPath, u32)> = Vec::new();
    for (group, want) in [(3u32, "01/00"), (5, "02/00")] {
        let occupied = |path: &PciPath| bus.0.contains(path);
        let groups = [group];
        let r = choose_slots(
            &t,
            &plan,
            &occupied,
            &placed,
            &group_req(auto(true), 1, &groups),
        )
        .unwrap();
        assert_eq!(slots_of(&r).len(), 1);
        assert_eq!(r.places[0].path, p(want), "group {group}");
        assert!(matches!(
            r.places[0].mechanism,
            SlotMechanism::Native { .. }
        ));
        assert!(r.warnings.is_empty());
        // A 4-function device: the whole slot is taken.
        for f in 0..4 {
            bus.0.insert(r.places[0].path.with_function(f));
            placed.push((r.places[0].path.with_function(f), group));
        }
    }
    // Never a slot behind the PCI bridge: once the root ports are taken, refused.
    for s in 3..=8 {
        bus.0.insert(p(&format!("{s:02}/00")));
    }
    let occupied = |path: &PciPath| bus.0.contains(path);
    let e = choose_slots(
        &t,
        &plan,
        &occupied,
        &placed,
        &group_req(auto(true), 1, &[7]),
    )
    .unwrap_err();
    assert_eq!(
        e,
        PlacementError::NoGroupPort {
            groups: "7".into(),
            slots: 1
        }
    );
    assert!(
        e.to_string().contains("never a slot behind a PCI bridge"),
        "{e}"
    );
    // Cold plug follows the same rule.
    let e = choose_slots(
        &t,
        &plan,
        &occupied,
        &placed,
        &group_req(auto(false), 1, &[7]),
    )
    .unwrap_err();
    assert!(matches!(e, PlacementError::NoGroupPort { .. }));
}

#[test]
fn several_devices_of_one_group_go_behind_one_switch() {
    let t = mixed_topology();
    let plan = HotplugPlan::new(&t, &[]);
    let bus = Bus::default();
    let occupied = |path: &PciPath| bus.0.contains(path);
    let r = choose_slots(
        &t,
        &plan,
        &occupied,
        &[],
        &group_req(auto(true), 2, &[4, 5]),
    )
    .unwrap();
    assert_eq!(
        slots_of(&r),
        [
            ("02/00/00/00".to_string(), Some("sw0.0".to_string())),
            ("02/00/01/00".to_string(), Some("sw0.1".to_string())),
        ]
    );
    // Three devices: no switch has three downstream ports.
    let e = choose_slots(&t, &plan, &occupied, &[], &group_req(auto(true), 3, &[4])).unwrap_err();
    assert_eq!(
        e,
        PlacementError::NoGroupPort {
            groups: "4".into(),
            slots: 3
        }
    );
    // port= names the switch, for one device as well; pci_path cannot place several slots.
    let r = choose_slots(
        &t,
        &plan,
        &occupied,
        &[],
        &group_req(by_port("sw0", true), 1, &[4]),
    )
    .unwrap();
    assert_eq!(
        slots_of(&r),
        [("02/00/00/00".to_string(), Some("sw0.0".to_string()))]
    );
    let r = choose_slots(
        &t,
        &plan,
        &occupied,
        &[],
        &group_req(by_port("sw0", true), 2, &[4]),
    )
    .unwrap();
    assert_eq!(r.places.len(), 2);
    let at = PlaceRequest {
        pci_path: Some("02/00/00/00"),
        ..auto(true)
    };
    assert_eq!(
        choose_slots(&t, &plan, &occupied, &[], &group_req(at, 2, &[4])).unwrap_err(),
        PlacementError::PathForGroup(2)
    );
    // A bridge with enough free slots takes a group's devices (an override).
    let r = choose_slots(
        &t,
        &plan,
        &occupied,
        &[],
        &group_req(by_port("br0", true), 2, &[4]),
    )
    .unwrap();
    assert_eq!(r.places.len(), 2);
    assert!(r.warnings.is_empty());
    assert_eq!(
        choose_slots(
            &t,
            &plan,
            &occupied,
            &[],
            &group_req(by_port("rp0", true), 2, &[4])
        )
        .unwrap_err(),
        PlacementError::PortFull("rp0".into())
    );
}

#[test]
fn an_override_onto_a_pci_bridge_with_another_group_warns() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    // Group 3 is behind br0 already (09/01, two functions), a virtio disk at 09/02.
    let bus = Bus::with(&["09/01", "09/01.1", "09/02"]);
    let placed = vec![(p("09/01"), 3u32), (p("09/01.1"), 3)];
    let occupied = |path: &PciPath| bus.0.contains(path);
    let r = choose_slots(
        &t,
        &plan,
        &occupied,
        &placed,
        &group_req(by_port("br0", true), 1, &[5]),
    )
    .unwrap();
    assert_eq!(r.places[0].path, p("09/00"));
    assert_eq!(
        r.warnings,
        [
            "09/00 puts host IOMMU group 5 behind PCI bridge 'br0' with host IOMMU group 3 (at \
          09/01): the guest sees everything behind a conventional PCI bridge as one isolation \
          domain (allowed because port or pci_path was given)"
        ]
    );
    let at = PlaceRequest {
        pci_path: Some("09/07"),
        ..auto(true)
    };
    let r = choose_slots(&t, &plan, &occupied, &placed, &group_req(at, 1, &[5])).unwrap();
    assert_eq!(r.warnings.len(), 1);
    // The same group behind the bridge: no warning; a root port: none either.
    let r = choose_slots(
        &t,
        &plan,
        &occupied,
        &placed,
        &group_req(by_port("br0", true), 1, &[3]),
    )
    .unwrap();
    assert!(r.warnings.is_empty());
    let r = choose_slots(
        &t,
        &plan,
        &occupied,
        &placed,
        &group_req(by_port("rp2", true), 1, &[5]),
    )
    .unwrap();
    assert_eq!(r.places[0].path, p("03/00"));
    assert!(r.warnings.is_empty());
}

#[test]
fn whole_devices_take_empty_slots_and_no_function() {
    let t = default_topology();
    let plan = HotplugPlan::new(&t, &[]);
    // A staged function in rp0's slot.
    let bus = Bus::with(&["01/00.2"]);
    let occupied = |path: &PciPath| bus.0.contains(path);
    let at = |s: &'static str| PlaceRequest {
        pci_path: Some(s),
        ..auto(true)
    };
    assert_eq!(
        choose_slots(&t, &plan, &occupied, &[], &group_req(at("01/00"), 1, &[9])).unwrap_err(),
        PlacementError::SlotTaken(p("01/00"))
    );
    assert_eq!(
        choose_slots(
            &t,
            &plan,
            &occupied,
            &[],
            &group_req(at("02/00.1"), 1, &[9])
        )
        .unwrap_err(),
        PlacementError::WholeDevice
    );
    let f = PlaceRequest {
        function: Some(1),
        ..auto(true)
    };
    assert_eq!(
        choose_slots(&t, &plan, &occupied, &[], &group_req(f, 1, &[9])).unwrap_err(),
        PlacementError::WholeDevice
    );
    // The default skips the staged slot.
    let r = choose_slots(&t, &plan, &occupied, &[], &group_req(auto(true), 1, &[9])).unwrap();
    assert_eq!(r.places[0].path, p("02/00"));
    // A single function may name its function: it joins the staged slot, as `choose` does.
    let single = SlotsRequest {
        multifunction: false,
        ..group_req(f, 1, &[9])
    };
    let r = choose_slots(&t, &plan, &occupied, &[], &single).unwrap();
    assert_eq!(r.places[0].path, p("01/00.1"));
}

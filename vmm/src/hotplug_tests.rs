//! Unit tests for the hotplug owner: no KVM, real port and ACPI register
//! models, completions pushed as the vCPU threads would.

use std::sync::atomic::AtomicBool;

use super::*;
use devices::acpi::PciHotplugController;
use pci::pcie_cap::{regs, slot_control};
use pci::topology::{PortKind, PortSpec, Topology, TopologyOptions};
use pci::{PciDevice, PciePortKind, PciePortParams, RecordingMsiGroup};
use vm_device::bus::MmioAddress;
use vm_device::DeviceMmio;

const HPIE: u16 = slot_control::HOTPLUG_INTERRUPT_ENABLE;
const PDCE: u16 = slot_control::PRESENCE_DETECT_ENABLE;
const DLLSCE: u16 = slot_control::DLL_STATE_CHANGED_ENABLE;

struct Rig {
    owner: HotplugOwner,
    port: Arc<Mutex<PciePort>>,
    acpi: Arc<PciHotplugController>,
    ged_irq: EventFd,
    ready: Arc<AtomicBool>,
}

fn plan() -> HotplugPlan {
    let specs = [
        PortSpec::new("rp0", PortKind::RootPort),
        PortSpec::new("br0", PortKind::PciBridge),
    ];
    let opts = TopologyOptions::new(
        (1..32).collect(),
        (0xc000_0000, 0x2000_0000),
        (0x1_0000_0000, 0x10_0000_0000),
        None,
    );
    let topo = Topology::build(&specs, &opts).unwrap();
    HotplugPlan::new(&topo, &[])
}

fn rig(ready: bool) -> Rig {
    let completions = CompletionQueue::new().unwrap();
    let ged_irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let ged = Ged::new(ged_irq.try_clone().unwrap());
    let acpi = Arc::new(PciHotplugController::new(completions.clone()));
    let group = Arc::new(RecordingMsiGroup::new(1).unwrap());
    let port = Arc::new(Mutex::new(
        PciePort::new(
            PciePortParams::new(PciePortKind::RootPort).with_native_hotplug(1),
            Some(group),
        )
        .unwrap(),
    ));
    let mut native = BTreeMap::new();
    native.insert("rp0".to_string(), port.clone());
    let flag = Arc::new(AtomicBool::new(ready));
    let f = flag.clone();
    let owner = HotplugOwner::new(
        plan(),
        ged,
        acpi.clone(),
        native,
        completions,
        Box::new(move || f.load(Ordering::SeqCst)),
    )
    .unwrap();
    Rig {
        owner,
        port,
        acpi,
        ged_irq,
        ready: flag,
    }
}

fn native() -> SlotMechanism {
    SlotMechanism::Native { port: "rp0".into() }
}

fn acpi(slot: u8) -> SlotMechanism {
    SlotMechanism::Acpi { bsel: 1, slot }
}

/// The guest's pciehp writing Slot Control.
fn slot_control(port: &Arc<Mutex<PciePort>>, v: u16) -> Option<bool> {
    let mut p = port.lock().unwrap();
    let off = p.config().pcie_offset().unwrap() + regs::SLTCTL;
    p.write_config_register(off / 4, (off % 4) as u64, &v.to_le_bytes())
        .slot_indicator
}

/// The guest's `_EJ0` for `slot` of bus selector `bsel`.
fn eject(acpi: &PciHotplugController, bsel: u32, slot: u8) {
    acpi.mmio_write(MmioAddress(0), 0xc, &bsel.to_le_bytes());
    acpi.mmio_write(MmioAddress(0), 0x8, &(1u32 << slot).to_le_bytes());
}

/// The guest turns the native slot's power indicator on (as pciehp does after an add);
/// the PCI manager reports nothing for that.
fn power_on(r: &Rig) {
    assert_eq!(
        slot_control(&r.port, HPIE | PDCE | DLLSCE | (1 << 8) | (3 << 6)),
        Some(true)
    );
}

/// The guest powers the native slot off, and the PCI manager reports it.
fn power_off(r: &Rig) {
    assert_eq!(
        slot_control(&r.port, HPIE | PDCE | DLLSCE | (3 << 8) | (3 << 6)),
        Some(false)
    );
    r.owner
        .completions
        .push(Completion::SlotReleased { port: "rp0".into() });
}

const LONG: Duration = Duration::from_secs(60);

#[test]
fn two_removals_on_different_mechanisms_complete_independently() {
    let mut r = rig(true);
    r.owner.announce("n", &native()).unwrap();
    r.owner.announce("a", &acpi(3)).unwrap();
    power_on(&r);
    assert!(r.owner.process().is_empty());

    assert!(!r.owner.request_removal("n", &native(), LONG, true).unwrap());
    assert!(!r.owner.request_removal("a", &acpi(3), LONG, true).unwrap());
    assert!(r.owner.removing("n") && r.owner.removing("a"));
    assert!(r.acpi.removal_pending(1, 3));

    // The ACPI eject completes first and names only its device.
    eject(&r.acpi, 1, 3);
    assert_eq!(
        r.owner.process(),
        vec![Outcome::Released { id: "a".into() }]
    );
    assert!(r.owner.removing("n") && !r.owner.removing("a"));

    // Then the native slot powers off.
    power_off(&r);
    assert_eq!(
        r.owner.process(),
        vec![Outcome::Released { id: "n".into() }]
    );
    assert!(!r.owner.removing("n"));

    // The other order, and both completions in one batch.
    r.owner.announce("n2", &native()).unwrap();
    r.owner.announce("a2", &acpi(4)).unwrap();
    power_on(&r);
    r.owner.process();
    r.owner.request_removal("a2", &acpi(4), LONG, true).unwrap();
    r.owner
        .request_removal("n2", &native(), LONG, true)
        .unwrap();
    power_off(&r);
    eject(&r.acpi, 1, 4);
    let mut out = r.owner.process();
    out.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
    assert_eq!(
        out,
        vec![
            Outcome::Released { id: "a2".into() },
            Outcome::Released { id: "n2".into() }
        ]
    );
}

#[test]
fn a_slot_release_report_without_removal_or_for_another_port_releases_nothing() {
    let mut r = rig(true);
    r.owner.announce("n", &native()).unwrap();
    power_on(&r);
    r.owner
        .completions
        .push(Completion::SlotReleased { port: "rp0".into() });
    r.owner.completions.push(Completion::SlotReleased {
        port: "nowhere".into(),
    });
    assert!(r.owner.process().is_empty());
}

#[test]
fn removal_of_a_native_card_the_guest_never_powered_is_immediate() {
    let mut r = rig(true);
    r.owner.announce("n", &native()).unwrap();
    // The guest has not powered the slot on (it is still booting).
    assert!(r.owner.request_removal("n", &native(), LONG, true).unwrap());
    assert!(!r.owner.removing("n"));
    // The slot is free for the next device.
    r.owner.announce("m", &native()).unwrap();
    power_on(&r);
    r.owner.request_removal("m", &native(), LONG, true).unwrap();
    power_off(&r);
    assert_eq!(
        r.owner.process(),
        vec![Outcome::Released { id: "m".into() }]
    );
}

#[test]
fn removals_the_guest_ignores_are_withdrawn_at_their_deadline() {
    let mut r = rig(true);
    r.owner.announce("n", &native()).unwrap();
    r.owner.announce("a", &acpi(5)).unwrap();
    power_on(&r);
    r.owner.process();
    let short = Duration::from_millis(1);
    r.owner
        .request_removal("n", &native(), short, true)
        .unwrap();
    r.owner.request_removal("a", &acpi(5), short, true).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let out = r.owner.process();
    assert_eq!(out.len(), 2);
    assert!(out
        .iter()
        .all(|o| matches!(o, Outcome::Withdrawn { after, .. } if *after == short)));
    // The card is present again and the ACPI request is gone.
    assert!(r.port.lock().unwrap().presence());
    assert!(!r.acpi.removal_pending(1, 5));
    // A later eject (the guest was slow) still releases the device.
    eject(&r.acpi, 1, 5);
    assert_eq!(
        r.owner.process(),
        vec![Outcome::Released { id: "a".into() }]
    );
}

#[test]
fn ged_events_are_held_until_the_guest_is_ready() {
    let mut r = rig(false);
    r.owner.announce("a", &acpi(3)).unwrap();
    r.owner.power_button().unwrap();
    assert!(
        r.ged_irq.read().is_err(),
        "held while the guest cannot take it"
    );
    assert!(r.owner.process().is_empty());
    assert!(r.ged_irq.read().is_err());
    assert!(
        r.owner.timer.is_armed().unwrap(),
        "the readiness poll is armed"
    );
    r.ready.store(true, Ordering::SeqCst);
    r.owner.process();
    assert_eq!(
        r.ged_irq.read().unwrap(),
        1,
        "raised once the guest is ready"
    );
    assert!(
        !r.owner.timer.is_armed().unwrap(),
        "nothing left to wait for"
    );
    // From now on events go straight through.
    r.owner.announce("b", &acpi(4)).unwrap();
    assert_eq!(r.ged_irq.read().unwrap(), 1);
}

#[test]
fn guest_initiated_ejects() {
    let mut r = rig(true);
    r.owner.announce("a", &acpi(3)).unwrap();
    // The guest ejects an occupied slot by itself: the device is released.
    eject(&r.acpi, 1, 3);
    assert_eq!(
        r.owner.process(),
        vec![Outcome::Released { id: "a".into() }]
    );
    // Empty slots and unknown buses release nothing.
    eject(&r.acpi, 1, 3);
    eject(&r.acpi, 7, 9);
    assert!(r.owner.process().is_empty());
}

#[test]
fn refusals() {
    let mut r = rig(true);
    assert!(matches!(
        r.owner.announce("x", &SlotMechanism::None),
        Err(HotplugError::NoHotplug(_))
    ));
    assert!(matches!(
        r.owner
            .request_removal("x", &SlotMechanism::None, LONG, true)
            .unwrap_err(),
        HotplugError::NoHotplug(_)
    ));
    r.owner.announce("a", &acpi(3)).unwrap();
    r.owner.request_removal("a", &acpi(3), LONG, true).unwrap();
    let e = r
        .owner
        .request_removal("a", &acpi(3), LONG, true)
        .unwrap_err();
    assert!(matches!(e, HotplugError::AlreadyRemoving(_)));
    assert_eq!(e.api_kind(), api::ApiErrorKind::Conflict);
    let e = r
        .owner
        .announce(
            "p",
            &SlotMechanism::Native {
                port: "nope".into(),
            },
        )
        .unwrap_err();
    assert_eq!(e.api_kind(), api::ApiErrorKind::Internal);
    assert_eq!(r.owner.abandon(), vec!["a".to_string()]);
}

#[test]
fn the_completion_queue_is_bounded() {
    let q = CompletionQueue::new().unwrap();
    for i in 0..(MAX_QUEUED as u32 + 100) {
        q.ejected(0, (i % 32) as u8);
    }
    assert_eq!(q.drain().len(), MAX_QUEUED);
    assert!(q.drain().is_empty());
}

#[test]
fn a_device_the_guest_never_enumerated_is_released_at_once_on_every_mechanism() {
    let mut r = rig(false);
    // ACPI: announced while the GED holds events; the guest never looked.
    r.owner.announce("a", &acpi(6)).unwrap();
    assert!(r.owner.request_removal("a", &acpi(6), LONG, false).unwrap());
    assert!(!r.owner.removing("a"));
    // The announcement is taken back: once the guest is ready it reads no
    // new device in that slot, and no removal request either.
    r.ready.store(true, Ordering::SeqCst);
    r.owner.process();
    assert!(!r.acpi.removal_pending(1, 6));
    r.acpi.mmio_write(MmioAddress(0), 0xc, &1u32.to_le_bytes());
    let mut pciu = [0u8; 4];
    r.acpi.mmio_read(MmioAddress(0), 0x0, &mut pciu);
    assert_eq!(u32::from_le_bytes(pciu) & (1 << 6), 0);
    // Native, even with the slot powered (the guest powers on before it
    // reads the device's identity): the card is reported gone at once.
    r.owner.announce("n", &native()).unwrap();
    power_on(&r);
    r.owner.process();
    assert!(r
        .owner
        .request_removal("n", &native(), LONG, false)
        .unwrap());
    assert!(!r.port.lock().unwrap().presence());
    // Both slots take new devices.
    r.owner.announce("a2", &acpi(6)).unwrap();
    r.owner.announce("n2", &native()).unwrap();
    assert!(r.port.lock().unwrap().presence());
}

//! Configuration-space reads and writes, through ECAM and CF8/CFC, against
//! a `PciRoot` with the host bridge, a tree of ports (root ports with
//! native hotplug, a switch, PCI bridges under it, an ACPI-hotplug root
//! port) and a virtio-pci device (rng) on the root bus.
//!
//! Input: records of 8 bytes: op, bus, devfn, register (u16 LE), and a
//! 32-bit value whose low byte also picks a port for presence changes.

#![no_main]

use std::sync::{Arc, Mutex};

use devices::virtio::{Rng, VirtioDevice, VirtioPciDevice, VirtioPciOptions};
use libfuzzer_sys::fuzz_target;
use pci::topology::{HotplugMode, PortKind, PortSpec, Topology, TopologyOptions};
use pci::{
    BarAllocator, MsiInterruptGroup, PciConfigIo, PciRoot, RecordingMsiGroup, SharedPciDevice,
};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const MMIO32: (u64, u64) = (0xc000_0000, 0x2000_0000);
const MMIO64: (u64, u64) = (0x1_0000_0000, 1 << 36);
const SIZES: [usize; 4] = [1, 2, 4, 4];

fn spec(id: &str, kind: PortKind, parent: Option<&str>) -> PortSpec {
    let mut s = PortSpec::new(id, kind);
    s.parent = parent.map(str::to_string);
    s
}

fn specs() -> Vec<PortSpec> {
    vec![
        spec("rp0", PortKind::RootPort, None),
        spec("rp1", PortKind::RootPort, None),
        spec("sw0", PortKind::Switch { downstream: 3 }, Some("rp1")),
        spec("pb0", PortKind::PciBridge, Some("sw0.1")),
        spec("pb1", PortKind::PciBridge, Some("pb0")),
        spec("rp2", PortKind::RootPort, None).with_hotplug(HotplugMode::Acpi),
        spec("pbr", PortKind::PciBridge, None),
    ]
}

fuzz_target!(|data: &[u8]| {
    let topology = Topology::build(
        &specs(),
        &TopologyOptions::new((2..8).collect(), MMIO32, MMIO64, None),
    )
    .expect("the fixed topology builds");
    let mut root = PciRoot::with_host_bridge();
    let ports = topology
        .attach(&mut root, &mut |_| {
            Some(Arc::new(RecordingMsiGroup::new(1).unwrap()) as Arc<dyn MsiInterruptGroup>)
        })
        .expect("the fixed topology attaches");

    // A virtio-pci function on slot 1 of the root bus, BAR placed.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let rng: Box<dyn VirtioDevice> = Box::new(Rng::new());
    let msi = Arc::new(
        RecordingMsiGroup::new(VirtioPciDevice::required_msix_vectors(rng.as_ref())).unwrap(),
    );
    let virtio = Arc::new(Mutex::new(
        VirtioPciDevice::new(
            rng,
            GuestMemoryAtomic::new(mem),
            msi,
            VirtioPciOptions::default(),
        )
        .unwrap(),
    ));
    let mut alloc = BarAllocator::new(None, (0xd000_0000, 0x1000_0000), Some(MMIO64)).unwrap();
    alloc.place_device(&mut *virtio.lock().unwrap()).unwrap();
    let shared: SharedPciDevice = virtio;
    root.add_root_device(1, 0, shared).unwrap();

    let mut cf8 = PciConfigIo::new();
    for rec in data.chunks_exact(8) {
        let op = rec[0];
        let bus = u64::from(rec[1] & 0x0f);
        let devfn = u64::from(rec[2]);
        let reg = u16::from_le_bytes([rec[3], rec[4]]);
        let value = [rec[5], rec[6], rec[7], rec[5]];
        let size = SIZES[usize::from(op >> 4 & 3)];
        match op & 7 {
            0 | 1 => {
                // ECAM: bus << 20 | devfn << 12 | register.
                let off = bus << 20 | devfn << 12 | u64::from(reg & 0xfff);
                if op & 1 == 0 {
                    let mut buf = [0u8; 4];
                    root.ecam_read(off, &mut buf[..size]);
                } else {
                    let _ = root.ecam_write(off, &value[..size]);
                }
            }
            2 => {
                // CF8 address: enable bit, bus, devfn, register.
                let addr =
                    0x8000_0000 | (bus as u32) << 16 | (devfn as u32) << 8 | u32::from(reg & 0xfc);
                let _ = cf8.write(&root, 0, &addr.to_le_bytes());
            }
            3 => {
                let mut buf = [0u8; 4];
                cf8.read(&root, u64::from(rec[3] & 7), &mut buf[..size]);
            }
            4 => {
                let _ = cf8.write(&root, u64::from(rec[3] & 7), &value[..size]);
            }
            5 => {
                // Raw address write, including a clear enable bit.
                let _ = cf8.write(&root, 0, &u32::from_le_bytes(value).to_le_bytes());
            }
            _ => {
                // The VMM reports a card coming or going on a port.
                let port = &ports[usize::from(rec[5]) % ports.len()];
                let _ = port.port.lock().unwrap().card_present(rec[6] & 1 != 0);
            }
        }
    }
    // Routing still answers for the host bridge and every port.
    let mut id = [0u8; 4];
    root.ecam_read(0, &mut id);
    assert_ne!(id, [0xff; 4]);
});

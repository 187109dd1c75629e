//! PCI manager tests against a real KVM VM (skipped without /dev/kvm): a
//! guest moving BARs over other devices' ranges.

use std::sync::{Arc, Mutex, RwLock};

use kvm_ioctls::Kvm;
use pci::topology::{Topology, TopologyOptions};
use pci::{
    BarAllocator, BarInfo, BarRegion, ConfigWriteOutcome, IoEventNotifier, PciBarConfig,
    PciConfigParams, PciConfiguration, PciDevice, PciError,
};
use vm_device::bus::MmioAddress;
use vm_device::device_manager::{IoManager, MmioManager};
use vm_device::DeviceMmio;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::hotplug::CompletionQueue;
use crate::interrupts::GsiRouting;
use crate::layout::{pci_windows, PCI_ECAM_SIZE, PCI_ECAM_START};

/// A function with one 4 KiB MMIO BAR and a doorbell in it.
struct Fake {
    config: PciConfiguration,
    bell: EventFd,
}

impl Fake {
    fn shared() -> SharedPciDevice {
        let mut config = PciConfiguration::new(PciConfigParams::device(0x1234, 0x5678, 0xff0000));
        config
            .add_bar(PciBarConfig::new(0, 0x1000, BarRegion::Mmio32, false).unwrap())
            .unwrap();
        Arc::new(Mutex::new(Fake {
            config,
            bell: EventFd::new(EFD_NONBLOCK).unwrap(),
        }))
    }
}

impl PciDevice for Fake {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_config_register(reg_idx)
    }
    fn write_config_register(&mut self, reg: usize, off: u64, data: &[u8]) -> ConfigWriteOutcome {
        self.config.write_config_register(reg, off, data)
    }
    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }
    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        self.config.set_bar_address(index, addr)
    }
    fn read_bar(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xab)
    }
    fn write_bar(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
    fn ioeventfds(&self) -> Vec<IoEventNotifier<'_>> {
        vec![IoEventNotifier {
            bar: 0,
            offset: 0x10,
            fd: &self.bell,
        }]
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

struct Rig {
    pm: Arc<PciManager>,
    io: Arc<RwLock<IoManager>>,
    ecam: Arc<dyn DeviceMmio + Send + Sync>,
}

fn rig() -> Option<Rig> {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("no /dev/kvm: skipped");
        return None;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let routing = GsiRouting::new(vm.clone()).unwrap();
    let (mmio32, mmio64) = pci_windows(512 << 20);
    let topo = Topology::build(
        &[],
        &TopologyOptions::new((1..32).collect(), mmio32, mmio64, None),
    )
    .unwrap();
    let rest = topo.remaining_windows();
    let allocator = BarAllocator::new(None, rest.mmio32, Some(rest.mmio64)).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let io = Arc::new(RwLock::new(IoManager::new()));
    let pm = PciManager::new(
        io.clone(),
        vm,
        routing,
        allocator,
        GuestMemoryAtomic::new(mem),
        topo,
        CompletionQueue::new().unwrap(),
    )
    .unwrap();
    pm.register_config_access(PCI_ECAM_START, PCI_ECAM_SIZE)
        .unwrap();
    let ecam = io
        .read()
        .unwrap()
        .mmio_device(MmioAddress(PCI_ECAM_START))
        .unwrap()
        .1
        .clone();
    Some(Rig { pm, io, ecam })
}

impl Rig {
    /// A guest configuration write to 00:SS.0 through ECAM.
    fn write(&self, slot: u64, reg: u64, data: &[u8]) {
        self.ecam
            .mmio_write(MmioAddress(PCI_ECAM_START), (slot << 15) | reg, data);
    }

    fn read32(&self, slot: u64, reg: u64) -> u32 {
        let mut d = [0u8; 4];
        self.ecam
            .mmio_read(MmioAddress(PCI_ECAM_START), (slot << 15) | reg, &mut d);
        u32::from_le_bytes(d)
    }

    /// The (base, size) of what is registered at `addr`.
    fn at(&self, addr: u64) -> Option<(u64, u64)> {
        let io = self.io.read().unwrap();
        io.mmio_device(MmioAddress(addr))
            .map(|(r, _)| (r.base().0, r.size()))
    }

    fn bar0(&self, slot: u8) -> u64 {
        let p = PciManager::root_path(slot).unwrap();
        let placed = self.pm.placed.lock().unwrap();
        placed[&p].bars[0].addr
    }
}

#[test]
fn a_bar_moved_over_other_ranges_never_unmaps_them() {
    let Some(r) = rig() else {
        return;
    };
    for slot in [1u8, 2] {
        r.pm.place(PciManager::root_path(slot).unwrap(), None, Fake::shared())
            .unwrap();
        // The guest enables memory decode.
        r.write(u64::from(slot), 0x4, &[0x02, 0x00]);
    }
    let (a, b) = (r.bar0(1), r.bar0(2));
    assert_eq!(r.at(a), Some((a, 0x1000)));
    assert_eq!(r.at(b), Some((b, 0x1000)));
    let ecam = Some((PCI_ECAM_START, PCI_ECAM_SIZE));
    assert_eq!(r.at(PCI_ECAM_START), ecam);

    // Device 1's BAR moves onto the ECAM window, then back.
    r.write(1, 0x10, &(PCI_ECAM_START as u32).to_le_bytes());
    assert_eq!(r.bar0(1), PCI_ECAM_START);
    assert_eq!(r.at(PCI_ECAM_START), ecam, "ECAM still decodes there");
    assert_eq!(r.at(a), None, "the old range is free");
    r.write(1, 0x10, &(a as u32).to_le_bytes());
    assert_eq!(r.at(PCI_ECAM_START), ecam, "moving away kept ECAM");
    assert_eq!(r.at(a), Some((a, 0x1000)));
    assert_eq!(r.read32(1, 0), 0x5678_1234, "config cycles still work");

    // Device 1's BAR moves onto device 2's BAR, then away: device 2 keeps
    // its registration.
    r.write(1, 0x10, &(b as u32).to_le_bytes());
    assert_eq!(r.at(b), Some((b, 0x1000)));
    r.write(1, 0x10, &(a as u32).to_le_bytes());
    assert_eq!(r.at(b), Some((b, 0x1000)), "device 2's BAR survived");
    assert_eq!(r.at(a), Some((a, 0x1000)));

    // Decode off and on again, then removal, leave nothing behind.
    r.write(1, 0x4, &[0x00, 0x00]);
    assert_eq!(r.at(a), None);
    r.write(1, 0x4, &[0x02, 0x00]);
    assert_eq!(r.at(a), Some((a, 0x1000)));
    r.pm.remove(&PciManager::root_path(1).unwrap()).unwrap();
    assert_eq!(r.at(a), None);
    assert_eq!(r.at(b), Some((b, 0x1000)));
    assert_eq!(r.at(PCI_ECAM_START), ecam);
}

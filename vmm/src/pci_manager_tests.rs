//! PCI manager tests against a real KVM VM (skipped without /dev/kvm): a
//! guest moving BARs over other devices' ranges, direct areas as memory
//! slots.

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
use kvm_bindings::kvm_userspace_memory_region;

/// A function with one MMIO BAR 0: 4 KiB with a doorbell in it
/// ([`Fake::shared`]), or 16 KiB whose 0x1000..0x3000 is a direct area
/// ([`Fake::direct`]).
struct Fake {
    config: PciConfiguration,
    bell: Option<EventFd>,
    area: Option<Arc<Anon>>,
}

impl Fake {
    fn new(device_id: u16, bar_size: u64, bell: bool, area: Option<Arc<Anon>>) -> Fake {
        let mut config =
            PciConfiguration::new(PciConfigParams::device(0x1234, device_id, 0xff0000));
        config
            .add_bar(PciBarConfig::new(0, bar_size, BarRegion::Mmio32, false).unwrap())
            .unwrap();
        Fake {
            config,
            bell: bell.then(|| EventFd::new(EFD_NONBLOCK).unwrap()),
            area,
        }
    }

    fn shared() -> SharedPciDevice {
        Arc::new(Mutex::new(Fake::new(0x5678, 0x1000, true, None)))
    }

    fn direct() -> (SharedPciDevice, Arc<Anon>) {
        let area = Anon::new(0x2000);
        let dev = Fake::new(0x5679, 0x4000, false, Some(area.clone()));
        (Arc::new(Mutex::new(dev)), area)
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
        self.bell
            .iter()
            .map(|fd| IoEventNotifier {
                bar: 0,
                offset: 0x10,
                fd,
            })
            .collect()
    }
    fn direct_areas(&self) -> Vec<pci::DirectArea> {
        self.area
            .iter()
            .map(|a| pci::DirectArea {
                bar: 0,
                offset: 0x1000,
                mapping: a.clone(),
            })
            .collect()
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Anonymous memory standing in for a device's mmap-ed BAR.
#[derive(Debug)]
struct Anon {
    addr: u64,
    size: u64,
}

impl Anon {
    fn new(size: u64) -> Arc<Anon> {
        // SAFETY: a new private anonymous mapping; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        Arc::new(Anon {
            addr: addr as u64,
            size,
        })
    }
}

impl pci::HostMapping for Anon {
    fn host_addr(&self) -> u64 {
        self.addr
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn writable(&self) -> bool {
        true
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size as usize) };
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

    /// The memory slots the function in root slot `slot` holds:
    /// (KVM slot, guest address, size).
    fn slots(&self, slot: u8) -> Vec<(u32, u64, u64)> {
        let p = PciManager::root_path(slot).unwrap();
        let placed = self.pm.placed.lock().unwrap();
        placed.get(&p).map_or(Vec::new(), |p| {
            p.registered
                .iter()
                .filter_map(|r| match r {
                    Registered::Slot(s, gpa, m) => Some((*s, *gpa, m.size())),
                    _ => None,
                })
                .collect()
        })
    }

    /// Whether KVM refuses a new slot over `gpa` (some slot covers it).
    fn kvm_has_slot_at(&self, gpa: u64) -> bool {
        let probe = Anon::new(0x1000);
        let r = kvm_userspace_memory_region {
            slot: 100,
            guest_phys_addr: gpa,
            memory_size: 0x1000,
            userspace_addr: probe.addr,
            flags: 0,
        };
        // SAFETY: `probe` lives until the slot is deleted below.
        let added = unsafe { self.pm.vm.set_user_memory_region(r) };
        if added.is_ok() {
            let gone = kvm_userspace_memory_region {
                memory_size: 0,
                ..r
            };
            // SAFETY: deleting the probe slot.
            unsafe { self.pm.vm.set_user_memory_region(gone) }.unwrap();
        }
        added.is_err()
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

#[test]
fn direct_areas_are_memory_slots_while_the_bar_decodes() {
    let Some(r) = rig() else {
        return;
    };
    let first = r.pm.slots.lock().unwrap().next;
    assert_eq!(first, 1, "after guest RAM's one slot");
    let (dev, area) = Fake::direct();
    r.pm.place(PciManager::root_path(1).unwrap(), None, dev)
        .unwrap();
    let a = r.bar0(1);
    // Placed, decode off: no slot.
    assert!(r.slots(1).is_empty());
    assert!(!r.kvm_has_slot_at(a + 0x1000));
    // Decode on: the area at BAR + 0x1000, the rest of the BAR trapped.
    r.write(1, 0x4, &[0x02, 0x00]);
    assert_eq!(r.slots(1), vec![(first, a + 0x1000, 0x2000)]);
    assert!(r.kvm_has_slot_at(a + 0x1000));
    assert!(r.kvm_has_slot_at(a + 0x2000));
    assert!(!r.kvm_has_slot_at(a));
    assert!(!r.kvm_has_slot_at(a + 0x3000));
    assert_eq!(r.at(a), Some((a, 0x4000)));
    assert_eq!(Arc::strong_count(&area), 4, "test, device, placement, slot");
    // Decode off: gone.
    r.write(1, 0x4, &[0x00, 0x00]);
    assert!(r.slots(1).is_empty());
    assert!(!r.kvm_has_slot_at(a + 0x1000));
    assert_eq!(Arc::strong_count(&area), 3);
    // The BAR moves while decode is on: the slot moves with it.
    r.write(1, 0x4, &[0x02, 0x00]);
    let b = a + 0x10_0000;
    r.write(1, 0x10, &(b as u32).to_le_bytes());
    assert_eq!(r.bar0(1), b);
    assert_eq!(r.slots(1), vec![(first, b + 0x1000, 0x2000)]);
    assert!(!r.kvm_has_slot_at(a + 0x1000));
    assert!(r.kvm_has_slot_at(b + 0x1000));
    // Onto the ECAM window (not registered there): no slot either.
    r.write(1, 0x10, &(PCI_ECAM_START as u32).to_le_bytes());
    assert!(r.slots(1).is_empty());
    assert!(!r.kvm_has_slot_at(PCI_ECAM_START + 0x1000));
    r.write(1, 0x10, &(b as u32).to_le_bytes());
    assert_eq!(r.slots(1), vec![(first, b + 0x1000, 0x2000)]);
    // A second function takes the next slot.
    let (dev2, _) = Fake::direct();
    r.pm.place(PciManager::root_path(2).unwrap(), None, dev2)
        .unwrap();
    r.write(2, 0x4, &[0x02, 0x00]);
    let c = r.bar0(2);
    assert_eq!(r.slots(2), vec![(first + 1, c + 0x1000, 0x2000)]);
    // Removal takes the slot out and lets go of the mapping; the slot
    // number is reused.
    r.pm.remove(&PciManager::root_path(1).unwrap()).unwrap();
    assert!(!r.kvm_has_slot_at(b + 0x1000));
    assert_eq!(Arc::strong_count(&area), 1, "only the test holds it");
    let (dev3, _) = Fake::direct();
    r.pm.place(PciManager::root_path(3).unwrap(), None, dev3)
        .unwrap();
    r.write(3, 0x4, &[0x02, 0x00]);
    assert_eq!(r.slots(3)[0].0, first);
    // Teardown takes the remaining slots out before the mappings go.
    let area2 = r.pm.placed.lock().unwrap()[&PciManager::root_path(2).unwrap()].direct[0]
        .mapping
        .clone();
    let Rig { pm, io, ecam } = r;
    drop((io, ecam));
    assert_eq!(Arc::strong_count(&pm), 1);
    drop(pm);
    assert_eq!(Arc::strong_count(&area2), 1);
}

#[test]
fn memory_slot_numbers_are_reused_lowest_first() {
    let mut s = MemSlots::new(2, 5);
    assert_eq!((s.take(), s.take(), s.take()), (Some(2), Some(3), Some(4)));
    assert_eq!(s.take(), None, "the limit");
    s.give(3);
    s.give(2);
    assert_eq!((s.take(), s.take(), s.take()), (Some(2), Some(3), None));
}

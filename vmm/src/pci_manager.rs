//! PCI in the VMM: the root complex's configuration mechanisms (ECAM and
//! CF8/CFC) on the buses, device placement (slot, BARs, MSI-X vectors,
//! ioeventfds) and following the guest when it reprograms a BAR or the
//! command register.
//!
//! A configuration write from a vCPU travels: vCPU exit -> `EcamHandler`
//! (or `Cf8Handler`) -> `PciRoot::config_write` -> the device -> a
//! `ConfigWriteOutcome` -> [`PciManager::apply`], which moves the BAR's
//! MMIO registration and ioeventfds or (un)maps them on decode changes.
//!
//! Devices are placed through the [`pci::PciDevice`] trait alone (doorbells,
//! direct areas, reset and MSI-X state included), so a virtio transport and
//! a VFIO function take the same path.
//!
//! A function's direct areas ([`pci::PciDevice::direct_areas`]: host
//! mappings of parts of its memory BARs, e.g. a passthrough device's
//! mmap-able regions) become KVM memory slots at BAR address + offset while
//! the BAR is registered (placed, memory decode on), numbered after guest
//! RAM's slots ([`MemSlots`]); they go with the BAR's registration (decode
//! off, before a move, removal, teardown) and come back at the new address.
//! The manager holds a handle on each mapping while its slot exists, so the
//! device cannot unmap it under the guest.
//!
//! # Lock order
//!
//! `PciManager` holds several locks. Whoever takes more than one takes them
//! in this order, and never calls out of the manager while holding one:
//!
//! 1. `root` (the bus tree: read for configuration cycles, write to attach
//!    or detach a function);
//! 2. `cf8` (the CF8 address latch; taken before `root` is read by the CF8
//!    handler, and never while `root` is held for writing);
//! 3. `placed` (the placed functions);
//! 4. the `IoManager` behind `io` (MMIO/PIO registrations), taken inside
//!    `map`/`unmap` while `placed` is held;
//! 5. `allocators` (BAR windows), never held with any of the above except
//!    `placed` during removal;
//! 6. a device's own mutex, last: taken while `placed` is held to read its
//!    BARs, never the other way round. Configuration cycles hold `root`
//!    (read) and then the device; `apply` runs after both are released.
//!
//! `slots` (memory slot numbers) is a leaf: taken inside `map`/`unmap`
//! (with `placed` and the `IoManager` held), nothing is taken under it.
//!
//! Exception to rule 2: the CF8 handler takes `cf8` then `root` (read);
//! nothing takes `root` then `cf8`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock, Weak};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, IoEventAddress, NoDatamatch, VmFd};
use pci::topology::{PortDevice, Topology};
use pci::{
    BarAllocator, BarInfo, BarRegion, ConfigWriteResult, DirectArea, HostMapping,
    MsiInterruptGroup, PciConfigIo, PciPath, PciRoot, PciSlot, PciePort, SharedPciDevice,
};

use crate::hotplug::{Completion, CompletionQueue};
use vm_device::bus::{
    MmioAddress, MmioAddressOffset, MmioRange, PioAddress, PioAddressOffset, PioRange,
};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmm_sys_util::eventfd::EventFd;

use devices::virtio::GuestMemoryHandle;

use crate::interrupts::{GsiRouting, IntxManager, KvmMsiGroup};

/// Errors placing or removing PCI devices.
#[derive(Debug, thiserror::Error)]
pub enum PciManagerError {
    #[error("slot {0} is taken")]
    SlotTaken(PciPath),
    #[error("no device at {0}")]
    NoDevice(PciPath),
    #[error("cannot attach at {path}: {source}")]
    Attach {
        path: PciPath,
        #[source]
        source: pci::PciError,
    },
    #[error("cannot place the device's BARs: {0}")]
    Bars(#[source] pci::PciError),
    #[error("cannot duplicate a doorbell descriptor: {0}")]
    Doorbell(#[source] std::io::Error),
    #[error("cannot register the configuration space on the bus: {0:?}")]
    Bus(vm_device::bus::Error),
    #[error("unknown port '{0}'")]
    UnknownPort(String),
    #[error("cannot create the PCI ports: {0}")]
    Ports(#[source] pci::PciError),
    #[error("cannot give a port its MSI vector: {0}")]
    PortMsi(#[source] std::io::Error),
    #[error("cannot set up INTx: {0}")]
    Intx(#[source] std::io::Error),
}

impl PciManagerError {
    /// The API's status class: the guest-visible topology refusing the
    /// device is a conflict; the rest are host failures.
    pub fn api_kind(&self) -> api::ApiErrorKind {
        use api::ApiErrorKind as K;
        match self {
            PciManagerError::SlotTaken(_) | PciManagerError::Bars(_) => K::Conflict,
            PciManagerError::NoDevice(_) => K::NotFound,
            PciManagerError::Attach { .. }
            | PciManagerError::Doorbell(_)
            | PciManagerError::Bus(_)
            | PciManagerError::UnknownPort(_)
            | PciManagerError::Ports(_)
            | PciManagerError::PortMsi(_)
            | PciManagerError::Intx(_) => K::Internal,
        }
    }
}

/// One placed PCI function.
struct Placed {
    path: PciPath,
    /// The port whose windows hold the BARs; `None` is the root bus.
    port: Option<String>,
    device: SharedPciDevice,
    assigned: Vec<pci::BarAssignment>,
    bars: Vec<BarInfo>,
    /// Doorbells: (BAR index, offset within the BAR, eventfd).
    notifiers: Vec<(usize, u64, EventFd)>,
    /// Parts of BARs mapped straight into the guest while the BAR is.
    direct: Vec<DirectArea>,
    /// Whether the BARs should be mapped (memory decode on).
    mapped: bool,
    /// Whether the guest enabled I/O decode (I/O BARs are mapped while it
    /// is on, memory BARs while memory decode is).
    io_on: bool,
    /// Whether the guest enabled memory decode.
    mem_on: bool,
    /// What `map` actually registered: only these are deregistered, so a
    /// BAR the guest moved onto another device's range (ECAM, another
    /// BAR), which could not be registered there, never takes the other
    /// device's registration with it when it moves again.
    registered: Vec<Registered>,
}

/// One registration a placed function holds on the buses or in KVM.
enum Registered {
    Pio(u16),
    Mmio(u64),
    /// An ioeventfd: its address and the index of its notifier.
    Doorbell(IoEventAddress, usize),
    /// A KVM memory slot holding a direct area: the slot, its guest
    /// address, and the mapping (held until the slot is gone).
    Slot(u32, u64, Arc<dyn HostMapping>),
}

/// KVM memory slot numbers for direct areas: from the first after guest
/// RAM's up to KVM's limit; freed numbers are reused, lowest first.
#[derive(Debug)]
pub(crate) struct MemSlots {
    next: u32,
    limit: u32,
    free: BTreeSet<u32>,
}

impl MemSlots {
    /// Slots `first..limit`.
    pub(crate) fn new(first: u32, limit: u32) -> Self {
        MemSlots {
            next: first,
            limit,
            free: BTreeSet::new(),
        }
    }

    /// A free slot number, if any is left.
    pub(crate) fn take(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop_first() {
            return Some(s);
        }
        (self.next < self.limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Gives back slot `s`.
    pub(crate) fn give(&mut self, s: u32) {
        self.free.insert(s);
    }
}

/// The VMM's PCI state.
pub struct PciManager {
    root: RwLock<PciRoot>,
    cf8: Mutex<PciConfigIo>,
    io: Arc<RwLock<IoManager>>,
    vm: Arc<VmFd>,
    routing: Arc<GsiRouting>,
    /// BAR allocators: the root bus's (key `None`) and each port's.
    allocators: Mutex<BTreeMap<Option<String>, BarAllocator>>,
    placed: Mutex<BTreeMap<PciPath, Placed>>,
    memory: GuestMemoryHandle,
    topology: Topology,
    ports: BTreeMap<String, PortDevice>,
    /// Where slot power changes of native hotplug ports are reported.
    completions: Arc<CompletionQueue>,
    /// Legacy INTx lines, for guests that do not enable MSI-X.
    intx: Arc<IntxManager>,
    /// KVM memory slot numbers for direct areas (a leaf lock: taken inside
    /// `map`/`unmap`).
    slots: Mutex<MemSlots>,
}

/// BAR accesses forwarded to the device.
struct BarHandler {
    device: SharedPciDevice,
    index: usize,
}

impl DeviceMmio for BarHandler {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_bar(self.index, offset, data)
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_bar(self.index, offset, data)
    }
}

impl DevicePio for BarHandler {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_bar(self.index, u64::from(offset), data)
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_bar(self.index, u64::from(offset), data)
    }
}

/// ECAM window: configuration accesses by memory.
pub struct EcamHandler(pub Weak<PciManager>);

impl DeviceMmio for EcamHandler {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match self.0.upgrade() {
            Some(m) => m
                .root
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .ecam_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some(m) = self.0.upgrade() {
            let r = m
                .root
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .ecam_write(offset, data);
            if let Some(r) = r {
                m.apply(r);
            }
        }
    }
}

/// CF8/CFC: configuration accesses by I/O ports 0xcf8-0xcff.
pub struct Cf8Handler(pub Weak<PciManager>);

impl DevicePio for Cf8Handler {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match self.0.upgrade() {
            Some(m) => {
                let cf8 = m.cf8.lock().unwrap_or_else(|e| e.into_inner());
                let root = m.root.read().unwrap_or_else(|e| e.into_inner());
                cf8.read(&root, u64::from(offset), data)
            }
            None => data.fill(0xff),
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(m) = self.0.upgrade() {
            let r = {
                let mut cf8 = m.cf8.lock().unwrap_or_else(|e| e.into_inner());
                let root = m.root.read().unwrap_or_else(|e| e.into_inner());
                cf8.write(&root, u64::from(offset), data)
            };
            if let Some(r) = r {
                m.apply(r);
            }
        }
    }
}

impl PciManager {
    /// A root complex with a host bridge at 00:00.0 and the ports of
    /// `topology` (programmed as firmware leaves them); `allocator` serves
    /// the root bus. Native hotplug ports get one MSI vector each.
    pub fn new(
        io: Arc<RwLock<IoManager>>,
        vm: Arc<VmFd>,
        routing: Arc<GsiRouting>,
        allocator: BarAllocator,
        memory: GuestMemoryHandle,
        topology: Topology,
        completions: Arc<CompletionQueue>,
    ) -> Result<Arc<Self>, PciManagerError> {
        let mut root = PciRoot::with_host_bridge();
        let mut msi_err = None;
        let devices = topology
            .attach(&mut root, &mut |node| {
                if !node.native_hotplug() {
                    return None;
                }
                match KvmMsiGroup::new(routing.clone(), 1) {
                    Ok(g) => Some(Arc::new(g) as Arc<dyn MsiInterruptGroup>),
                    Err(e) => {
                        msi_err = Some(e);
                        None
                    }
                }
            })
            .map_err(PciManagerError::Ports)?;
        if let Some(e) = msi_err {
            return Err(PciManagerError::PortMsi(e));
        }
        let mut allocators = BTreeMap::new();
        allocators.insert(None, allocator);
        for node in topology.ports() {
            if !node.device_slots().is_empty() {
                let a = node.bar_allocator().map_err(PciManagerError::Ports)?;
                allocators.insert(Some(node.id.clone()), a);
            }
        }
        let ports = devices.into_iter().map(|d| (d.id.clone(), d)).collect();
        let vm_for_intx = vm.clone();
        // Guest RAM takes slots 0..N (`vm.rs`); KVM reports how many exist.
        let ram_slots = {
            use vm_memory::{GuestAddressSpace, GuestMemoryBackend};
            memory.memory().num_regions() as u32
        };
        let limit = match vm.check_extension_int(Cap::NrMemslots) {
            n if n > 0 => n as u32,
            _ => 32,
        };
        Ok(Arc::new(PciManager {
            root: RwLock::new(root),
            cf8: Mutex::new(PciConfigIo::new()),
            io,
            vm,
            routing,
            allocators: Mutex::new(allocators),
            placed: Mutex::new(BTreeMap::new()),
            memory,
            topology,
            ports,
            completions,
            intx: IntxManager::new(vm_for_intx).map_err(PciManagerError::Intx)?,
            slots: Mutex::new(MemSlots::new(ram_slots, limit)),
        }))
    }

    /// The INTx lines.
    pub fn intx(&self) -> &Arc<IntxManager> {
        &self.intx
    }

    /// The topology the ports were built from.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The port device `id`.
    pub fn port(&self, id: &str) -> Option<&Arc<Mutex<PciePort>>> {
        self.ports.get(id).map(|d| &d.port)
    }

    /// The ports with native hotplug, by id.
    pub fn native_ports(&self) -> BTreeMap<String, Arc<Mutex<PciePort>>> {
        self.ports
            .iter()
            .filter(|(id, _)| self.topology.port(id).is_some_and(|n| n.native_hotplug()))
            .map(|(id, d)| (id.clone(), d.port.clone()))
            .collect()
    }

    /// The port whose function is `device`, if it is one.
    fn port_id_of(&self, device: &SharedPciDevice) -> Option<&str> {
        self.ports
            .iter()
            .find(|(_, d)| std::ptr::addr_eq(Arc::as_ptr(&d.shared()), Arc::as_ptr(device)))
            .map(|(id, _)| id.as_str())
    }

    /// The BDF the guest currently uses for `path`, from the bus numbers
    /// programmed into the bridges on the way (`None` while one is not
    /// configured).
    pub fn bdf_of(&self, path: &PciPath) -> Option<String> {
        self.root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .bdf_of_path(path)
            .map(|b| b.to_string())
    }

    /// Whether a function sits at `path`.
    pub fn occupied(&self, path: &PciPath) -> bool {
        self.root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .device_at_path(path)
            .is_some()
    }

    /// Registers the ECAM window and the CF8/CFC ports.
    pub fn register_config_access(
        self: &Arc<Self>,
        ecam_base: u64,
        ecam_size: u64,
    ) -> Result<(), PciManagerError> {
        let mut io = self.io.write().unwrap_or_else(|e| e.into_inner());
        let ecam =
            MmioRange::new(MmioAddress(ecam_base), ecam_size).map_err(PciManagerError::Bus)?;
        io.register_mmio(ecam, Arc::new(EcamHandler(Arc::downgrade(self))))
            .map_err(PciManagerError::Bus)?;
        let cf8 = PioRange::new(
            PioAddress(pci::config_io::PCI_CONFIG_IO_PORT),
            pci::config_io::PCI_CONFIG_IO_PORT_SIZE,
        )
        .map_err(PciManagerError::Bus)?;
        io.register_pio(cf8, Arc::new(Cf8Handler(Arc::downgrade(self))))
            .map_err(PciManagerError::Bus)?;
        Ok(())
    }

    /// The GSI routing table (for devices' MSI groups).
    /// The VM (to create KVM devices, e.g. the KVM VFIO device).
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    pub fn routing(&self) -> &Arc<GsiRouting> {
        &self.routing
    }

    /// Guest memory as devices see it.
    pub fn memory(&self) -> &GuestMemoryHandle {
        &self.memory
    }

    /// Places `dev` at `path` under `port` (`None`: the root bus): assigns
    /// its BARs from the port's windows, attaches it to the bus and records
    /// its doorbells. BARs are mapped when the guest enables memory decode.
    /// On error nothing changes.
    pub fn place(
        &self,
        path: PciPath,
        port: Option<&str>,
        device: SharedPciDevice,
    ) -> Result<(), PciManagerError> {
        let key = port.map(str::to_string);
        if self.occupied(&path) {
            return Err(PciManagerError::SlotTaken(path));
        }
        // The device is not on the bus yet: nobody else holds its lock.
        let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
        let assigned = {
            let mut allocators = self.allocators.lock().unwrap_or_else(|e| e.into_inner());
            let a = allocators
                .get_mut(&key)
                .ok_or_else(|| PciManagerError::UnknownPort(port.unwrap_or("").to_string()))?;
            a.place_device(&mut *dev).map_err(PciManagerError::Bars)?
        };
        let release = |assigned: &[pci::BarAssignment]| {
            if let Some(a) = self
                .allocators
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&key)
            {
                a.release(assigned);
            }
        };
        let mut notifiers = Vec::new();
        for n in dev.ioeventfds() {
            match n.fd.try_clone() {
                Ok(e) => notifiers.push((n.bar, n.offset, e)),
                Err(e) => {
                    release(&assigned);
                    return Err(PciManagerError::Doorbell(e));
                }
            }
        }
        let bars = dev.bars();
        let direct = dev.direct_areas();
        drop(dev);
        let shared = device;
        let attached = self
            .root
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(&path, shared.clone());
        if let Err(source) = attached {
            release(&assigned);
            return Err(PciManagerError::Attach { path, source });
        }
        self.placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                path.clone(),
                Placed {
                    path,
                    port: key.clone(),
                    device: shared,
                    assigned,
                    bars,
                    notifiers,
                    direct,
                    mapped: false,
                    io_on: false,
                    mem_on: false,
                    registered: Vec::new(),
                },
            );
        Ok(())
    }

    fn map(&self, p: &mut Placed) {
        if p.mapped {
            return;
        }
        let mut io = self.io.write().unwrap_or_else(|e| e.into_inner());
        let mut live = Vec::new();
        for bar in &p.bars {
            let decoded = if bar.region.is_memory() {
                p.mem_on
            } else {
                p.io_on
            };
            if bar.addr == 0 || !decoded {
                continue;
            }
            let handler = Arc::new(BarHandler {
                device: p.device.clone(),
                index: bar.index,
            });
            let r = match bar.region {
                BarRegion::Io => match (u16::try_from(bar.addr), u16::try_from(bar.size)) {
                    (Ok(a), Ok(s)) => PioRange::new(PioAddress(a), s)
                        .and_then(|range| io.register_pio(range, handler))
                        .map(|()| Registered::Pio(a)),
                    _ => Err(vm_device::bus::Error::InvalidRange),
                },
                _ => MmioRange::new(MmioAddress(bar.addr), bar.size)
                    .and_then(|range| io.register_mmio(range, handler))
                    .map(|()| Registered::Mmio(bar.addr)),
            };
            match r {
                Ok(reg) => {
                    p.registered.push(reg);
                    live.push(bar.index);
                }
                Err(e) => devices::guest_warn!(
                    "PCI {}: cannot map BAR {} at {:#x}: {e:?}",
                    p.path,
                    bar.index,
                    bar.addr
                ),
            }
        }
        // Doorbells only inside BARs that are really ours here: an
        // ioeventfd over another device's range would swallow its writes.
        let bells: Vec<_> = doorbells(p)
            .filter(|(_, bar, _)| live.contains(bar))
            .map(|(addr, _, i)| (addr, i))
            .collect();
        for (addr, i) in bells {
            let Some((_, _, evt)) = p.notifiers.get(i) else {
                continue;
            };
            match self.vm.register_ioevent(evt, &addr, NoDatamatch) {
                Ok(()) => p.registered.push(Registered::Doorbell(addr, i)),
                Err(e) => devices::guest_warn!("PCI {}: cannot register ioeventfd: {e}", p.path),
            }
        }
        // Direct areas, likewise only inside BARs registered here: the
        // accesses KVM does not serve from a slot still reach the BAR's
        // handler.
        for area in &p.direct {
            let Some(bar) = p
                .bars
                .iter()
                .find(|b| b.index == area.bar && b.region.is_memory() && live.contains(&b.index))
            else {
                continue;
            };
            match self.add_slot(bar, area) {
                Ok(reg) => p.registered.push(reg),
                Err(e) => devices::guest_warn!(
                    "PCI {}: BAR {} at {:#x}: cannot map {:#x} bytes at {:#x} directly ({e}); \
                     trapped",
                    p.path,
                    bar.index,
                    bar.addr,
                    area.mapping.size(),
                    area.offset
                ),
            }
        }
        p.mapped = true;
    }

    /// Puts `area` of `bar` into the guest as a KVM memory slot.
    fn add_slot(&self, bar: &BarInfo, area: &DirectArea) -> Result<Registered, String> {
        let size = area.mapping.size();
        let host = area.mapping.host_addr();
        let end = area.offset.checked_add(size);
        if size == 0 || end.is_none_or(|end| end > bar.size) {
            return Err("outside the BAR".into());
        }
        let gpa = bar
            .addr
            .checked_add(area.offset)
            .filter(|a| {
                a.is_multiple_of(4096) && host.is_multiple_of(4096) && size.is_multiple_of(4096)
            })
            .ok_or("not page-aligned")?;
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or("no KVM memory slot left")?;
        let r = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
            flags: if area.mapping.writable() {
                0
            } else {
                KVM_MEM_READONLY
            },
        };
        // SAFETY: `host..host + size` is a live mapping that the handle kept
        // in the returned `Registered::Slot` holds until `remove_slot` has
        // taken the slot out of KVM.
        match unsafe { self.vm.set_user_memory_region(r) } {
            Ok(()) => {
                log::debug!("memory slot {slot}: {size:#x} bytes at {gpa:#x}");
                Ok(Registered::Slot(slot, gpa, area.mapping.clone()))
            }
            Err(e) => {
                self.slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .give(slot);
                Err(e.to_string())
            }
        }
    }

    /// Takes memory slot `slot` out of KVM and frees its number. Returns
    /// whether it did: only then may the caller drop the mapping's handle.
    fn remove_slot(&self, slot: u32, gpa: u64) -> bool {
        let r = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: 0,
            flags: 0,
        };
        // SAFETY: a zero size deletes the slot; no memory is handed to KVM.
        match unsafe { self.vm.set_user_memory_region(r) } {
            Ok(()) => {
                self.slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .give(slot);
                true
            }
            // The slot number is not reused, and the caller leaks the
            // mapping rather than unmap it under KVM.
            Err(e) => {
                log::error!("cannot delete memory slot {slot}: {e}");
                false
            }
        }
    }

    fn unmap(&self, p: &mut Placed) {
        if !p.mapped {
            return;
        }
        let mut io = self.io.write().unwrap_or_else(|e| e.into_inner());
        for reg in p.registered.drain(..) {
            match reg {
                Registered::Pio(a) => {
                    io.deregister_pio(PioAddress(a));
                }
                Registered::Mmio(a) => {
                    io.deregister_mmio(MmioAddress(a));
                }
                Registered::Doorbell(addr, i) => {
                    if let Some((_, _, evt)) = p.notifiers.get(i) {
                        let _ = self.vm.unregister_ioevent(evt, &addr, NoDatamatch);
                    }
                }
                Registered::Slot(slot, gpa, mapping) => {
                    if self.remove_slot(slot, gpa) {
                        drop(mapping);
                    } else {
                        std::mem::forget(mapping);
                    }
                }
            }
        }
        p.mapped = false;
    }

    /// Follows what a configuration write changed.
    pub fn apply(&self, r: ConfigWriteResult) {
        let o = &r.outcome;
        // Every Slot Control write that leaves the power indicator off may complete a
        // removal: the hotplug owner checks the slot's state.
        if o.slot_indicator == Some(false) {
            match self.port_id_of(&r.device) {
                Some(port) => self.completions.push(Completion::SlotReleased {
                    port: port.to_string(),
                }),
                None => {
                    devices::guest_warn!(
                        "PCI {}: slot indicator write from a function that is no port",
                        r.bdf
                    )
                }
            }
        }
        if o.msix_changed {
            let dev = r.device.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = dev.msix() {
                devices::guest_info!(
                    "PCI {}: MSI-X {} ({} vectors{})",
                    r.bdf,
                    if m.enabled() { "enabled" } else { "disabled" },
                    m.num_vectors(),
                    if m.function_masked() {
                        ", function masked"
                    } else {
                        ""
                    }
                );
            }
        }
        if o.bar_changes.is_empty() && o.mem_decode.is_none() && o.io_decode.is_none() {
            return;
        }
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = placed
            .values_mut()
            .find(|p| Arc::ptr_eq(&p.device, &r.device))
        else {
            return;
        };
        self.unmap(p);
        p.bars = r.device.lock().unwrap_or_else(|e| e.into_inner()).bars();
        if let Some(on) = o.mem_decode {
            p.mem_on = on;
        }
        if let Some(on) = o.io_decode {
            p.io_on = on;
        }
        let enabled = p.mem_on || p.io_on;
        if enabled {
            self.map(p);
        }
        log::debug!(
            "PCI {} ({}): decode {}, BARs {:?}",
            p.path,
            r.bdf,
            if enabled { "on" } else { "off" },
            p.bars.iter().map(|b| (b.index, b.addr)).collect::<Vec<_>>()
        );
    }

    /// Detaches the function at `path` and frees what it holds. The device
    /// is reset (its worker joined) before the last reference goes.
    pub fn remove(&self, path: &PciPath) -> Result<(), PciManagerError> {
        let mut p = self
            .placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path)
            .ok_or_else(|| PciManagerError::NoDevice(path.clone()))?;
        self.unmap(&mut p);
        // The areas are out of the guest: the device may unmap them.
        p.direct.clear();
        let detached = self
            .root
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove_device(path);
        if let Err(e) = detached {
            log::warn!("PCI {path}: {e}");
        }
        if let Some(a) = self
            .allocators
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&p.port)
        {
            a.release(&p.assigned);
        }
        p.device.lock().unwrap_or_else(|e| e.into_inner()).reset();
        drop(p);
        Ok(())
    }

    /// Whether the guest has enumerated the function at `path` (see
    /// [`pci::PciDevice::enumerated`]); `true` when unsure.
    pub fn enumerated(&self, path: &PciPath) -> bool {
        let placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        placed.get(path).is_none_or(|p| {
            p.device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enumerated()
        })
    }

    /// Pauses every placed function's back end (see [`pci::PciDevice::pause`]),
    /// waiting at most `timeout` for each; returns the paths of those that
    /// did not stop in time.
    pub fn pause_devices(&self, timeout: std::time::Duration) -> Vec<PciPath> {
        let placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        placed
            .values()
            .filter(|p| {
                !p.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pause(timeout)
            })
            .map(|p| p.path.clone())
            .collect()
    }

    /// Resumes every placed function's back end.
    pub fn resume_devices(&self) {
        let placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        for p in placed.values() {
            p.device.lock().unwrap_or_else(|e| e.into_inner()).resume();
        }
    }

    /// Number of functions placed (for leak checks).
    pub fn placed_count(&self) -> usize {
        self.placed.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The root slot path for slot `s` (1..=31).
    pub fn root_path(s: u8) -> Option<PciPath> {
        PciSlot::new(s, 0).ok().map(PciPath::root)
    }
}

impl Drop for PciManager {
    /// Takes every direct area out of KVM before the devices (and their
    /// mappings) can go, whatever order the VM's parts are dropped in.
    fn drop(&mut self) {
        let placed = std::mem::take(self.placed.get_mut().unwrap_or_else(|e| e.into_inner()));
        for mut p in placed.into_values() {
            self.unmap(&mut p);
        }
    }
}

/// The KVM ioeventfd addresses of a placed function's doorbells, for the
/// BARs that have an address: (address, BAR index, notifier index).
fn doorbells(p: &Placed) -> impl Iterator<Item = (IoEventAddress, usize, usize)> + '_ {
    p.notifiers
        .iter()
        .enumerate()
        .filter_map(|(i, (bar, off, _))| {
            let b = p.bars.iter().find(|b| b.index == *bar && b.addr != 0)?;
            let addr = match b.region {
                BarRegion::Io => IoEventAddress::Pio(b.addr.checked_add(*off)?),
                _ => IoEventAddress::Mmio(b.addr.checked_add(*off)?),
            };
            Some((addr, *bar, i))
        })
}

#[cfg(test)]
#[path = "pci_manager_tests.rs"]
mod tests;

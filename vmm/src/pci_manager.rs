//! PCI in the VMM: the root complex's configuration mechanisms (ECAM and
//! CF8/CFC) on the buses, device placement (slot, BARs, MSI-X vectors,
//! ioeventfds) and following the guest when it reprograms a BAR or the
//! command register.
//!
//! A configuration write from a vCPU travels: vCPU exit -> `EcamHandler`
//! (or `Cf8Handler`) -> `PciRoot::config_write` -> the device -> a
//! `ConfigWriteOutcome` -> [`PciManager::apply`], which moves the BAR's
//! MMIO registration and ioeventfds or (un)maps them on decode changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::topology::{PortDevice, Topology};
use pci::{
    BarAllocator, BarInfo, BarRegion, ConfigWriteResult, MsiInterruptGroup, PciConfigIo, PciDevice,
    PciPath, PciRoot, PciSlot, PciePort, SharedPciDevice,
};
use vm_device::bus::{
    MmioAddress, MmioAddressOffset, MmioRange, PioAddress, PioAddressOffset, PioRange,
};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::virtio::{GuestMemoryHandle, VirtioPciDevice};

use crate::interrupts::{GsiRouting, IntxManager, KvmMsiGroup};

/// Errors placing or removing PCI devices.
#[derive(Debug, thiserror::Error)]
pub enum PciManagerError {
    #[error("no free slot on the root bus")]
    NoFreeSlot,
    #[error("slot {0} is taken")]
    SlotTaken(String),
    #[error("PCI: {0}")]
    Pci(#[from] pci::PciError),
    #[error("cannot place the device's BARs: {0}")]
    Bars(pci::PciError),
    #[error("cannot register an ioeventfd: {0}")]
    IoEvent(kvm_ioctls::Error),
    #[error("cannot register the device on the bus: {0:?}")]
    Bus(vm_device::bus::Error),
    #[error("unknown port '{0}'")]
    UnknownPort(String),
    #[error("cannot create the PCI ports: {0}")]
    Ports(String),
}

/// One placed PCI function.
struct Placed {
    path: PciPath,
    /// The port whose windows hold the BARs; `None` is the root bus.
    port: Option<String>,
    device: SharedPciDevice,
    assigned: Vec<pci::BarAssignment>,
    bars: Vec<BarInfo>,
    /// (offset within BAR 0, eventfd) for virtio queue notifications.
    notifiers: Vec<(u64, EventFd)>,
    mapped: bool,
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
    /// Signalled when the guest switches a native hotplug slot's power.
    slot_power: EventFd,
    /// Legacy INTx lines, for guests that do not enable MSI-X.
    intx: Arc<IntxManager>,
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
            .map_err(PciManagerError::Pci)?;
        if let Some(e) = msi_err {
            return Err(PciManagerError::Ports(format!("MSI for a port: {e}")));
        }
        let mut allocators = BTreeMap::new();
        allocators.insert(None, allocator);
        for node in topology.ports() {
            if !node.device_slots().is_empty() {
                let a = node.bar_allocator().map_err(PciManagerError::Pci)?;
                allocators.insert(Some(node.id.clone()), a);
            }
        }
        let ports = devices.into_iter().map(|d| (d.id.clone(), d)).collect();
        let vm_for_intx = vm.clone();
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
            slot_power: EventFd::new(EFD_NONBLOCK)
                .map_err(|e| PciManagerError::Ports(format!("eventfd: {e}")))?,
            intx: IntxManager::new(vm_for_intx)
                .map_err(|e| PciManagerError::Ports(format!("INTx: {e}")))?,
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

    /// Readable when the guest switched a native slot's power.
    pub fn slot_power_event(&self) -> &EventFd {
        &self.slot_power
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
        let cf8 = PioRange::new(PioAddress(0xcf8), 8).map_err(PciManagerError::Bus)?;
        io.register_pio(cf8, Arc::new(Cf8Handler(Arc::downgrade(self))))
            .map_err(PciManagerError::Bus)?;
        Ok(())
    }

    /// The GSI routing table (for devices' MSI groups).
    pub fn routing(&self) -> &Arc<GsiRouting> {
        &self.routing
    }

    /// Guest memory as devices see it.
    pub fn memory(&self) -> &GuestMemoryHandle {
        &self.memory
    }

    /// First free slot of the root bus.
    pub fn free_root_slot(&self) -> Option<u8> {
        self.root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .free_root_slot()
    }

    /// Places `dev` at `path`: assigns its BARs from the windows, attaches
    /// it to the bus and records its queue notifiers. BARs are mapped when
    /// the guest enables memory decode. On error nothing changes.
    pub fn place_virtio(
        &self,
        path: PciPath,
        port: Option<&str>,
        mut dev: VirtioPciDevice,
    ) -> Result<(), PciManagerError> {
        let key = port.map(str::to_string);
        if self.occupied(&path) {
            return Err(PciManagerError::SlotTaken(path.to_string()));
        }
        let assigned = {
            let mut allocators = self.allocators.lock().unwrap_or_else(|e| e.into_inner());
            let a = allocators
                .get_mut(&key)
                .ok_or_else(|| PciManagerError::UnknownPort(port.unwrap_or("").to_string()))?;
            a.place_device(&mut dev).map_err(PciManagerError::Bars)?
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
        for (off, evt) in dev.ioeventfds() {
            match evt.try_clone() {
                Ok(e) => notifiers.push((off, e)),
                Err(_) => {
                    release(&assigned);
                    return Err(PciManagerError::Bus(vm_device::bus::Error::InvalidRange));
                }
            }
        }
        let bars = dev.bars();
        let shared: SharedPciDevice = Arc::new(Mutex::new(dev));
        let attached = self
            .root
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(&path, shared.clone());
        if let Err(e) = attached {
            release(&assigned);
            return Err(e.into());
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
                    mapped: false,
                },
            );
        Ok(())
    }

    fn map(&self, p: &mut Placed) {
        if p.mapped {
            return;
        }
        let mut io = self.io.write().unwrap_or_else(|e| e.into_inner());
        for bar in &p.bars {
            if bar.addr == 0 {
                continue;
            }
            let handler = Arc::new(BarHandler {
                device: p.device.clone(),
                index: bar.index,
            });
            let r = match bar.region {
                BarRegion::Io => match (u16::try_from(bar.addr), u16::try_from(bar.size)) {
                    (Ok(a), Ok(s)) => PioRange::new(PioAddress(a), s)
                        .and_then(|range| io.register_pio(range, handler)),
                    _ => Err(vm_device::bus::Error::InvalidRange),
                },
                _ => MmioRange::new(MmioAddress(bar.addr), bar.size)
                    .and_then(|range| io.register_mmio(range, handler)),
            };
            if let Err(e) = r {
                log::warn!(
                    "PCI {}: cannot map BAR {} at {:#x}: {e:?}",
                    p.path,
                    bar.index,
                    bar.addr
                );
            }
        }
        if let Some(bar0) = p.bars.iter().find(|b| b.index == 0 && b.addr != 0) {
            for (off, evt) in &p.notifiers {
                let addr = IoEventAddress::Mmio(bar0.addr + off);
                if let Err(e) = self.vm.register_ioevent(evt, &addr, NoDatamatch) {
                    log::warn!("PCI {}: cannot register ioeventfd: {e}", p.path);
                }
            }
        }
        p.mapped = true;
    }

    fn unmap(&self, p: &mut Placed) {
        if !p.mapped {
            return;
        }
        let mut io = self.io.write().unwrap_or_else(|e| e.into_inner());
        for bar in &p.bars {
            if bar.addr == 0 {
                continue;
            }
            match bar.region {
                BarRegion::Io => {
                    if let Ok(a) = u16::try_from(bar.addr) {
                        io.deregister_pio(PioAddress(a));
                    }
                }
                _ => {
                    io.deregister_mmio(MmioAddress(bar.addr));
                }
            }
        }
        if let Some(bar0) = p.bars.iter().find(|b| b.index == 0 && b.addr != 0) {
            for (off, evt) in &p.notifiers {
                let addr = IoEventAddress::Mmio(bar0.addr + off);
                let _ = self.vm.unregister_ioevent(evt, &addr, NoDatamatch);
            }
        }
        p.mapped = false;
    }

    /// Follows what a configuration write changed.
    pub fn apply(&self, r: ConfigWriteResult) {
        let o = &r.outcome;
        if let Some(on) = o.slot_power {
            log::info!(
                "PCI {}: slot powered {}",
                r.bdf,
                if on { "on" } else { "off" }
            );
            if let Err(e) = self.slot_power.write(1) {
                log::warn!("cannot signal a slot power change: {e}");
            }
        }
        if o.msix_changed {
            let mut dev = r.device.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = dev.as_any_mut().downcast_mut::<VirtioPciDevice>() {
                let m = v.msix();
                log::info!(
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
        let was_mapped = p.mapped;
        self.unmap(p);
        p.bars = r.device.lock().unwrap_or_else(|e| e.into_inner()).bars();
        let enabled = match o.mem_decode {
            Some(on) => on,
            None => was_mapped,
        };
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
            .ok_or_else(|| pci::PciError::NoDevice(path.to_string()))?;
        self.unmap(&mut p);
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
        {
            let mut dev = p.device.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = dev.as_any_mut().downcast_mut::<VirtioPciDevice>() {
                v.reset();
            }
        }
        drop(p);
        Ok(())
    }

    /// Number of functions placed (for leak checks).
    pub fn placed_count(&self) -> usize {
        self.placed.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The root slot path for slot `s`.
    pub fn root_path(s: u8) -> Result<PciPath, PciManagerError> {
        let slot = PciSlot::new(s, 0).map_err(|_| pci::PciError::InvalidDeviceFunction {
            device: s,
            function: 0,
        })?;
        Ok(PciPath::root(slot))
    }
}

//! The device manager: creates the platform devices, places them on the
//! port and MMIO buses the vCPUs dispatch to, and wires their interrupts.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use kvm_ioctls::VmFd;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::acpi::{
    Ged, PciHotplugController, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GED_MMIO_SIZE,
    PCI_HOTPLUG_MMIO_SIZE,
};
use devices::legacy::{
    AcpiPmRegisters, BootTimer, Cmos, EventFdTrigger, SerialDevice, ACPI_PM_PORT, BOOT_TIMER_PORT,
    I8042,
};

use std::collections::BTreeMap;

use api::types::{
    DeviceInfo, DeviceKind, DiskConfig, HotplugMechanism, RngConfig, SlotInfo, TopologyNode,
    TopologyNodeType,
};
use devices::virtio::{Block, BlockConfig, Rng, VirtioDevice, VirtioPciDevice, VirtioPciOptions};
use pci::topology::HotplugMode;
use pci::PciePortKind;
use pci::{PciPath, PciePortType};

use crate::config::SerialOutput;
use crate::interrupts::KvmMsiGroup;
use crate::layout::PLATFORM_MMIO_START;
use crate::pci_manager::{PciManager, PciManagerError};

/// IRQ of the first UART.
pub const SERIAL_IRQ: u32 = 4;
/// GSI of the Generic Event Device.
pub const GED_IRQ: u32 = 5;
/// Address of the GED's register block.
pub const GED_MMIO_START: u64 = PLATFORM_MMIO_START;
/// Address of the ACPI PCI hotplug register block.
pub const PCI_HOTPLUG_MMIO_START: u64 = PLATFORM_MMIO_START + 0x1000;

/// Errors creating devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot open serial output '{0}': {1}")]
    SerialFile(String, std::io::Error),
    #[error("cannot register an irqfd: {0}")]
    Irqfd(kvm_ioctls::Error),
    #[error("cannot register device at port {0:#x}: {1:?}")]
    Register(u16, vm_device::bus::Error),
    #[error("cannot register device at {0:#x}: {1:?}")]
    RegisterMmio(u64, vm_device::bus::Error),
    #[error("device id '{0}' is already in use")]
    DuplicateId(String),
    #[error("pci_path '{0}': {1}")]
    BadPath(String, String),
    #[error("{0} is not a hotplug slot")]
    NotHotplugSlot(String),
    #[error("unknown port '{0}'")]
    UnknownPort(String),
    #[error("{0}")]
    NoSlot(String),
    #[error("{0}")]
    Placement(#[from] PciManagerError),
    #[error("cannot open disk '{0}': {1}")]
    Disk(String, std::io::Error),
    #[error("cannot set up MSI-X vectors: {0}")]
    Msi(std::io::Error),
    #[error("cannot create the virtio device: {0}")]
    Virtio(String),
}

/// Events the platform devices raise for the event loop.
pub struct PlatformEvents {
    pub power_off: EventFd,
    pub reset: EventFd,
    /// The guest ejected a hotplug slot.
    pub eject: EventFd,
}

/// A device the VM has, for `vm.info` and removal.
#[derive(Clone, Debug)]
pub struct DeviceRecord {
    pub id: String,
    pub kind: DeviceKind,
    pub path: PciPath,
    /// The port the device sits under; `None` is the root bus.
    pub port: Option<String>,
    pub hotplugged: bool,
    pub disk: Option<DiskConfig>,
}

impl DeviceRecord {
    /// The API's view of the device; `bdf` as the bridges are programmed.
    pub fn info(&self, bdf: Option<String>) -> DeviceInfo {
        DeviceInfo {
            id: self.id.clone(),
            kind: self.kind,
            pci_path: self.path.to_string(),
            bdf,
            port: self.port.clone(),
            hotplugged: self.hotplugged,
            path: self.disk.as_ref().map(|d| d.path.clone()),
            readonly: self.disk.as_ref().map(|d| d.readonly),
            serial: self.disk.as_ref().and_then(|d| d.serial.clone()),
        }
    }
}

/// Devices every VM has.
pub struct DeviceManager {
    pub io: Arc<RwLock<IoManager>>,
    pub pci: Option<Arc<PciManager>>,
    pub records: Vec<DeviceRecord>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub ged: Arc<Ged>,
    pub hotplug: Arc<PciHotplugController>,
    /// Root-bus slots described to the guest as hotplug slots.
    pub hotplug_slots: Vec<u8>,
    /// ACPI bus selectors: the root bus (`None`) and ACPI-hotplug ports.
    pub bsel: BTreeMap<Option<String>, u32>,
    /// Automatic placement order for hot-plugged devices.
    pub placement_order: Vec<PlaceKind>,
    pub events: PlatformEvents,
}

fn evt() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

fn clone(e: &EventFd) -> Result<EventFd, DeviceError> {
    e.try_clone().map_err(DeviceError::EventFd)
}

/// Standard output, unbuffered per line (the UART flushes on newline).
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().lock().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}

fn register_mmio(
    io: &mut IoManager,
    base: u64,
    len: u64,
    dev: Arc<dyn DeviceMmio + Send + Sync>,
) -> Result<(), DeviceError> {
    let range =
        MmioRange::new(MmioAddress(base), len).map_err(|e| DeviceError::RegisterMmio(base, e))?;
    io.register_mmio(range, dev)
        .map_err(|e| DeviceError::RegisterMmio(base, e))
}

fn register_pio(
    io: &mut IoManager,
    base: u16,
    len: u16,
    dev: Arc<dyn DevicePio + Send + Sync>,
) -> Result<(), DeviceError> {
    let range = PioRange::new(PioAddress(base), len).map_err(|e| DeviceError::Register(base, e))?;
    io.register_pio(range, dev)
        .map_err(|e| DeviceError::Register(base, e))
}

impl DeviceManager {
    /// Creates the UART, CMOS, i8042, ACPI PM registers and boot timer.
    pub fn new(vm: &VmFd, serial: &SerialOutput, start: Instant) -> Result<Self, DeviceError> {
        let out: Box<dyn Write + Send> = match serial {
            SerialOutput::Stdout => Box::new(Stdout),
            SerialOutput::Off => Box::new(std::io::sink()),
            SerialOutput::File(p) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| DeviceError::SerialFile(p.display().to_string(), e))?,
            ),
        };
        let serial_irq = evt()?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(DeviceError::Irqfd)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new(serial_irq),
            out,
        )));

        let power_off = evt()?;
        let reset = evt()?;
        let mut io = IoManager::new();
        register_pio(&mut io, 0x3f8, 8, serial.clone())?;
        register_pio(&mut io, 0x70, 2, Arc::new(Mutex::new(Cmos::new())))?;
        register_pio(
            &mut io,
            0x60,
            5,
            Arc::new(Mutex::new(I8042::new(EventFdTrigger::new(clone(&reset)?)))),
        )?;
        register_pio(
            &mut io,
            ACPI_PM_PORT,
            3,
            Arc::new(Mutex::new(AcpiPmRegisters::new(
                EventFdTrigger::new(clone(&power_off)?),
                EventFdTrigger::new(clone(&reset)?),
            ))),
        )?;
        register_pio(
            &mut io,
            BOOT_TIMER_PORT,
            1,
            Arc::new(Mutex::new(BootTimer::new(start))),
        )?;
        let ged_irq = evt()?;
        vm.register_irqfd(&ged_irq, GED_IRQ)
            .map_err(DeviceError::Irqfd)?;
        let ged = Ged::new(ged_irq);
        register_mmio(&mut io, GED_MMIO_START, GED_MMIO_SIZE, ged.clone())?;
        let eject = evt()?;
        let hotplug = Arc::new(PciHotplugController::new(clone(&eject)?));
        register_mmio(
            &mut io,
            PCI_HOTPLUG_MMIO_START,
            PCI_HOTPLUG_MMIO_SIZE,
            hotplug.clone(),
        )?;
        Ok(DeviceManager {
            io: Arc::new(RwLock::new(io)),
            pci: None,
            records: Vec::new(),
            serial,
            ged,
            hotplug,
            hotplug_slots: Vec::new(),
            bsel: BTreeMap::new(),
            placement_order: vec![PlaceKind::Native, PlaceKind::Acpi, PlaceKind::Root],
            events: PlatformEvents {
                power_off,
                reset,
                eject,
            },
        })
    }

    /// DSDT objects of the platform devices, after the host bridge: the
    /// ACPI hotplug slots of the root bus (every slot still free now) and
    /// of the ACPI-hotplug ports, the bridge objects leading to them, the
    /// GED, whose `_EVT` turns event bits into notifications, and the power
    /// button. Also fixes the bus selectors the hotplug block uses.
    pub fn dsdt_aml(&mut self) -> Vec<u8> {
        let used: Vec<u8> = self
            .records
            .iter()
            .filter(|r| r.path.len() == 1)
            .map(|r| r.path.last().slot)
            .collect();
        let port_slots: Vec<u8> = self
            .pci
            .as_ref()
            .map(|p| p.topology().root_slots_used())
            .unwrap_or_default();
        self.hotplug_slots = (1..32u8)
            .filter(|s| !used.contains(s) && !port_slots.contains(s))
            .collect();
        self.bsel.clear();
        self.bsel.insert(None, 0);
        let mut root = crate::acpi::AcpiBus {
            bsel: Some(0),
            slots: self.hotplug_slots.clone(),
            bridges: Vec::new(),
        };
        if let Some(pci) = self.pci.clone() {
            let topo = pci.topology();
            let mut next = 1u32;
            for node in topo.ports() {
                if node.hotplug == HotplugMode::Acpi {
                    self.bsel.insert(Some(node.id.clone()), next);
                    next += 1;
                }
            }
            // Bridge objects for every port on the way to an ACPI bus.
            fn build(
                topo: &pci::topology::Topology,
                parent: Option<&str>,
                bsel: &BTreeMap<Option<String>, u32>,
                records: &[DeviceRecord],
            ) -> Vec<(u8, crate::acpi::AcpiBus)> {
                let mut out = Vec::new();
                for node in topo
                    .ports()
                    .iter()
                    .filter(|n| n.parent.as_deref() == parent)
                {
                    let children = build(topo, Some(&node.id), bsel, records);
                    let sel = bsel.get(&Some(node.id.clone())).copied();
                    let slots: Vec<u8> = if sel.is_some() {
                        node.device_slots()
                            .iter()
                            .copied()
                            .filter(|s| {
                                !records.iter().any(|r| {
                                    r.port.as_deref() == Some(node.id.as_str())
                                        && r.path.last().slot == *s
                                })
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    if sel.is_none() && children.is_empty() {
                        continue;
                    }
                    out.push((
                        node.path.last().slot,
                        crate::acpi::AcpiBus {
                            bsel: sel,
                            slots,
                            bridges: children,
                        },
                    ));
                }
                out
            }
            root.bridges = build(topo, None, &self.bsel, &self.records);
        }
        let mut out = crate::acpi::pci_hotplug_aml(PCI_HOTPLUG_MMIO_START, &root);
        out.extend(crate::acpi::ged_aml(
            GED_MMIO_START,
            GED_IRQ,
            GED_EVENT_POWER_BUTTON,
            GED_EVENT_PCI_HOTPLUG,
        ));
        out
    }
}

/// What is known of a device before it is placed.
struct NewDevice<'a> {
    id: Option<&'a str>,
    prefix: &'a str,
    kind: DeviceKind,
    port: Option<&'a str>,
    pci_path: Option<&'a str>,
    hotplugged: bool,
    disk: Option<DiskConfig>,
}

/// How the guest learns about a device in a given place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// Native PCIe hotplug on this port.
    Native(String),
    /// ACPI hotplug: bus selector and slot.
    Acpi(u32, u8),
    /// Cold-plug only.
    None,
}

/// What the guest is told about a hotplug slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotSignal {
    /// A device appeared.
    Added,
    /// The guest should release the device.
    RemovalRequested,
    /// The removal request is withdrawn; the device stays.
    RemovalWithdrawn,
}

/// Kinds of place, for the automatic placement order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaceKind {
    /// Ports with native PCIe hotplug.
    Native,
    /// Ports (bridges) with ACPI hotplug.
    Acpi,
    /// The root bus's ACPI hotplug slots.
    Root,
}

impl DeviceManager {
    /// Every device as the API describes it.
    pub fn device_info(&self) -> Vec<DeviceInfo> {
        self.records
            .iter()
            .map(|r| r.info(self.pci.as_ref().and_then(|p| p.bdf_of(&r.path))))
            .collect()
    }

    fn fresh_id(&self, prefix: &str) -> String {
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|id| !self.records.iter().any(|r| &r.id == id))
            .unwrap_or_else(|| prefix.to_string())
    }

    fn pci(&self) -> Result<Arc<PciManager>, DeviceError> {
        self.pci
            .clone()
            .ok_or_else(|| DeviceError::Virtio("this VM has no PCI".into()))
    }

    /// How the guest is told about a device at `path` under `port`.
    pub fn mechanism(&self, port: Option<&str>, path: &PciPath) -> Mechanism {
        let slot = path.last().slot;
        let Some(pci) = &self.pci else {
            return Mechanism::None;
        };
        match port {
            None => match self.hotplug_slots.contains(&slot) {
                true => Mechanism::Acpi(0, slot),
                false => Mechanism::None,
            },
            Some(id) => match pci.topology().port(id).map(|n| n.hotplug) {
                Some(HotplugMode::Native) => Mechanism::Native(id.to_string()),
                Some(HotplugMode::Acpi) => match self.bsel.get(&Some(id.to_string())) {
                    Some(sel) => Mechanism::Acpi(*sel, slot),
                    None => Mechanism::None,
                },
                _ => Mechanism::None,
            },
        }
    }

    /// Tells the guest about a slot through its hotplug mechanism: the ACPI
    /// register bitmaps plus a GED event, or the native port's presence.
    pub fn signal(&self, m: &Mechanism, signal: SlotSignal) -> Result<(), DeviceError> {
        match m {
            Mechanism::Acpi(sel, slot) => {
                match signal {
                    SlotSignal::Added => self.hotplug.device_added(*sel, *slot),
                    SlotSignal::RemovalRequested => self.hotplug.request_removal(*sel, *slot),
                    SlotSignal::RemovalWithdrawn => {
                        self.hotplug.cancel_removal(*sel, *slot);
                        return Ok(());
                    }
                }
                self.ged
                    .notify(GED_EVENT_PCI_HOTPLUG)
                    .map_err(DeviceError::EventFd)
            }
            Mechanism::Native(port) => {
                let p = self
                    .pci
                    .as_ref()
                    .and_then(|p| p.port(port))
                    .ok_or_else(|| DeviceError::UnknownPort(port.clone()))?;
                let present = signal != SlotSignal::RemovalRequested;
                p.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .card_present(present)
                    .map(|_| ())
                    .map_err(|e| DeviceError::Virtio(format!("port {port}: {e}")))
            }
            Mechanism::None => Ok(()),
        }
    }

    fn free_slot_of(&self, pci: &PciManager, port: &str) -> Result<Option<PciPath>, DeviceError> {
        let node = pci
            .topology()
            .port(port)
            .ok_or_else(|| DeviceError::UnknownPort(port.to_string()))?;
        Ok(node
            .device_slots()
            .iter()
            .filter_map(|s| node.device_path(*s))
            .find(|p| !pci.occupied(p)))
    }

    /// Chooses where a new device goes: an exact `pci_path`, the first free
    /// slot of `port`, or (neither given) the first free slot in placement
    /// order. Returns the path and the port it sits under.
    fn choose(
        &self,
        port: Option<&str>,
        pci_path: Option<&str>,
        hotplug: bool,
    ) -> Result<(PciPath, Option<String>), DeviceError> {
        let pci = self.pci()?;
        let topo = pci.topology();
        let (path, under) = match (pci_path, port) {
            (Some(p), _) => {
                let path: PciPath = p.parse().map_err(|e: pci::PciPathError| {
                    DeviceError::BadPath(p.into(), e.to_string())
                })?;
                if path.last().function != 0 {
                    return Err(DeviceError::BadPath(
                        p.into(),
                        "multifunction placement is not supported; use function 0".into(),
                    ));
                }
                let node = topo
                    .check_device_path(&path)
                    .map_err(|e| DeviceError::BadPath(p.into(), e.to_string()))?;
                let under = node.map(|n| n.id.clone());
                if let Some(want) = port {
                    if under.as_deref() != Some(want) {
                        return Err(DeviceError::BadPath(
                            p.into(),
                            format!("it is not a slot of port '{want}'"),
                        ));
                    }
                }
                if under.is_none() && path.last().slot == 0 {
                    return Err(DeviceError::BadPath(
                        p.into(),
                        "slot 00 holds the host bridge".into(),
                    ));
                }
                (path, under)
            }
            (None, Some(id)) => {
                let node = topo
                    .port(id)
                    .ok_or_else(|| DeviceError::UnknownPort(id.to_string()))?;
                if node.device_slots().is_empty() {
                    return Err(DeviceError::NoSlot(format!(
                        "port '{id}' has no device slot (it holds other ports)"
                    )));
                }
                let path = self.free_slot_of(&pci, id)?.ok_or_else(|| {
                    DeviceError::NoSlot(format!("every slot of port '{id}' is taken"))
                })?;
                (path, Some(id.to_string()))
            }
            (None, None) if !hotplug => {
                let slot = pci.free_root_slot().ok_or(PciManagerError::NoFreeSlot)?;
                (PciManager::root_path(slot)?, None)
            }
            (None, None) => {
                let mut found = None;
                'order: for kind in &self.placement_order {
                    match kind {
                        PlaceKind::Root => {
                            for s in &self.hotplug_slots {
                                let p = PciManager::root_path(*s)?;
                                if !pci.occupied(&p) {
                                    found = Some((p, None));
                                    break 'order;
                                }
                            }
                        }
                        PlaceKind::Native | PlaceKind::Acpi => {
                            let want = if *kind == PlaceKind::Native {
                                HotplugMode::Native
                            } else {
                                HotplugMode::Acpi
                            };
                            for node in topo.ports().iter().filter(|n| n.hotplug == want) {
                                if let Some(p) = self.free_slot_of(&pci, &node.id)? {
                                    found = Some((p, Some(node.id.clone())));
                                    break 'order;
                                }
                            }
                        }
                    }
                }
                found.ok_or(PciManagerError::NoFreeSlot)?
            }
        };
        if pci.occupied(&path) {
            return Err(PciManagerError::SlotTaken(path.to_string()).into());
        }
        if hotplug && self.mechanism(under.as_deref(), &path) == Mechanism::None {
            return Err(DeviceError::NotHotplugSlot(path.to_string()));
        }
        Ok((path, under))
    }

    /// Places a new device: checks its id, chooses its slot, and only then
    /// calls `make` to build it (opening files), so a bad request changes
    /// nothing.
    fn place(
        &mut self,
        new: NewDevice<'_>,
        make: impl FnOnce() -> Result<Box<dyn VirtioDevice>, DeviceError>,
    ) -> Result<DeviceRecord, DeviceError> {
        let NewDevice {
            id,
            prefix,
            kind,
            port,
            pci_path,
            hotplugged,
            disk,
        } = new;
        let id = match id {
            Some(id) if self.records.iter().any(|r| r.id == id) => {
                return Err(DeviceError::DuplicateId(id.to_string()))
            }
            Some(id) => id.to_string(),
            None => self.fresh_id(prefix),
        };
        let (path, under) = self.choose(port, pci_path, hotplugged)?;
        let device = make()?;
        let pci = self.pci()?;
        let pcie = match under.as_deref().and_then(|p| pci.topology().port(p)) {
            None => Some(PciePortType::RootComplexIntegratedEndpoint),
            Some(node) if node.kind.is_pci_bridge() => None,
            Some(_) => Some(PciePortType::Endpoint),
        };
        let vectors = VirtioPciDevice::required_msix_vectors(device.as_ref());
        let msi =
            Arc::new(KvmMsiGroup::new(pci.routing().clone(), vectors).map_err(DeviceError::Msi)?);
        let opts = VirtioPciOptions {
            pcie,
            prefetchable: false,
        };
        let mut dev = VirtioPciDevice::new(device, pci.memory().clone(), msi, opts)
            .map_err(|e| DeviceError::Virtio(e.to_string()))?;
        let intx = pci
            .intx()
            .line(pci::intx::intx_gsi(&path), dev.isr())
            .map_err(DeviceError::Msi)?;
        dev.set_intx(Arc::new(intx));
        pci.place_virtio(path.clone(), under.as_deref(), dev)?;
        if !hotplugged {
            if let Some(port) = under.as_deref().and_then(|p| pci.port(p)) {
                let mut port = port.lock().unwrap_or_else(|e| e.into_inner());
                if port.has_native_hotplug() {
                    port.cold_plug(true);
                }
            }
        }
        let rec = DeviceRecord {
            id,
            kind,
            path,
            port: under,
            hotplugged,
            disk,
        };
        self.records.push(rec.clone());
        Ok(rec)
    }

    /// Adds a virtio-blk disk.
    pub fn add_disk(
        &mut self,
        cfg: &DiskConfig,
        hotplugged: bool,
    ) -> Result<DeviceRecord, DeviceError> {
        let mut bc = BlockConfig::new(&cfg.path);
        bc.read_only = cfg.readonly;
        bc.serial = cfg.serial.clone().unwrap_or_default();
        self.place(
            NewDevice {
                id: cfg.id.as_deref(),
                prefix: "disk",
                kind: DeviceKind::Disk,
                port: cfg.port.as_deref(),
                pci_path: cfg.pci_path.as_deref(),
                hotplugged,
                disk: Some(cfg.clone()),
            },
            || {
                let block = Block::new(&bc).map_err(|e| DeviceError::Disk(cfg.path.clone(), e))?;
                Ok(Box::new(block) as Box<dyn VirtioDevice>)
            },
        )
    }

    /// Adds a virtio-rng device.
    pub fn add_rng(
        &mut self,
        cfg: &RngConfig,
        hotplugged: bool,
    ) -> Result<DeviceRecord, DeviceError> {
        self.place(
            NewDevice {
                id: cfg.id.as_deref(),
                prefix: "rng",
                kind: DeviceKind::Rng,
                port: cfg.port.as_deref(),
                pci_path: cfg.pci_path.as_deref(),
                hotplugged,
                disk: None,
            },
            || Ok(Box::new(Rng::new()) as Box<dyn VirtioDevice>),
        )
    }

    /// Detaches and frees the device `id` (slot, BARs, MSI-X routes and
    /// irqfds, ioeventfds, worker thread, files) and forgets it.
    pub fn remove(&mut self, id: &str) -> Result<DeviceRecord, DeviceError> {
        let idx = self
            .records
            .iter()
            .position(|r| r.id == id)
            .ok_or_else(|| DeviceError::Virtio(format!("no device '{id}'")))?;
        let pci = self.pci()?;
        pci.remove(&self.records[idx].path)?;
        Ok(self.records.remove(idx))
    }

    /// The API's view of the topology: the root bus and every port, with
    /// the bus numbers read back from the bridges and what fills each slot.
    pub fn topology_info(&self) -> Vec<TopologyNode> {
        let Some(pci) = &self.pci else {
            return Vec::new();
        };
        let occupant = |path: &PciPath| {
            self.records
                .iter()
                .find(|r| &r.path == path)
                .map(|r| r.id.clone())
        };
        let mut nodes = Vec::new();
        let mut root_slots: Vec<SlotInfo> = Vec::new();
        for s in 1..32u8 {
            let Ok(p) = PciManager::root_path(s) else {
                continue;
            };
            let port_here = pci.topology().port_at_path(&p).map(|n| n.id.clone());
            let device = occupant(&p).or(port_here);
            if device.is_some() || self.hotplug_slots.contains(&s) {
                root_slots.push(SlotInfo {
                    slot: s,
                    pci_path: p.to_string(),
                    device,
                });
            }
        }
        nodes.push(TopologyNode {
            id: "root".into(),
            node_type: TopologyNodeType::RootBus,
            hotplug: HotplugMechanism::Acpi,
            pci_path: String::new(),
            parent: None,
            secondary_bus: Some(0),
            subordinate_bus: Some(pci.topology().last_bus()),
            slots: root_slots,
        });
        for node in pci.topology().ports() {
            let (sec, sub) = pci
                .port(&node.id)
                .map(|p| {
                    let p = p.lock().unwrap_or_else(|e| e.into_inner());
                    (p.secondary_bus(), p.subordinate_bus())
                })
                .unwrap_or((node.secondary_bus, node.subordinate_bus));
            let slots = node
                .device_slots()
                .iter()
                .filter_map(|s| {
                    let p = node.device_path(*s)?;
                    Some(SlotInfo {
                        slot: *s,
                        device: occupant(&p),
                        pci_path: p.to_string(),
                    })
                })
                .chain(node.children.iter().filter_map(|c| {
                    let child = pci.topology().port(c)?;
                    Some(SlotInfo {
                        slot: child.path.last().slot,
                        pci_path: child.path.to_string(),
                        device: Some(child.id.clone()),
                    })
                }))
                .collect();
            nodes.push(TopologyNode {
                id: node.id.clone(),
                node_type: match node.kind {
                    PciePortKind::RootPort => TopologyNodeType::PcieRootPort,
                    PciePortKind::SwitchUpstream => TopologyNodeType::PcieSwitchUpstreamPort,
                    PciePortKind::SwitchDownstream => TopologyNodeType::PcieSwitchDownstreamPort,
                    PciePortKind::PcieToPciBridge | PciePortKind::PciBridge => {
                        TopologyNodeType::PciBridge
                    }
                },
                hotplug: match node.hotplug {
                    HotplugMode::Native => HotplugMechanism::PcieNative,
                    HotplugMode::Acpi => HotplugMechanism::Acpi,
                    HotplugMode::None => HotplugMechanism::None,
                },
                pci_path: node.path.to_string(),
                parent: Some(node.parent.clone().unwrap_or_else(|| "root".into())),
                secondary_bus: Some(sec),
                subordinate_bus: Some(sub),
                slots,
            });
        }
        nodes
    }
}

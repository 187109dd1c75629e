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

use api::types::{DeviceInfo, DeviceKind, DiskConfig, RngConfig};
use devices::virtio::{Block, BlockConfig, Rng, VirtioDevice, VirtioPciDevice, VirtioPciOptions};
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
    #[error("pci_path '{0}' is not a hotplug slot (it was taken at boot)")]
    NotHotplugSlot(String),
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
    pub hotplugged: bool,
    pub disk: Option<DiskConfig>,
}

impl DeviceRecord {
    /// The API's view of the device.
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: self.id.clone(),
            kind: self.kind,
            pci_path: self.path.to_string(),
            bdf: None,
            port: None,
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
            events: PlatformEvents {
                power_off,
                reset,
                eject,
            },
        })
    }

    /// DSDT objects of the platform devices, after the host bridge: the
    /// root bus's hotplug slots (every slot still free now), the GED, whose
    /// `_EVT` turns event bits into notifications, and the power button.
    pub fn dsdt_aml(&mut self) -> Vec<u8> {
        let used: Vec<u8> = self
            .records
            .iter()
            .filter(|r| r.path.len() == 1)
            .map(|r| r.path.last().slot)
            .collect();
        self.hotplug_slots = (1..32u8).filter(|s| !used.contains(s)).collect();
        let mut out = crate::acpi::pci_hotplug_aml(PCI_HOTPLUG_MMIO_START, &self.hotplug_slots);
        out.extend(crate::acpi::ged_aml(
            GED_MMIO_START,
            GED_IRQ,
            GED_EVENT_POWER_BUTTON,
            GED_EVENT_PCI_HOTPLUG,
            true,
        ));
        out
    }
}

/// What is known of a device before it is placed.
struct NewDevice<'a> {
    id: Option<&'a str>,
    prefix: &'a str,
    kind: DeviceKind,
    pci_path: Option<&'a str>,
    hotplugged: bool,
    disk: Option<DiskConfig>,
}

impl DeviceManager {
    fn fresh_id(&self, prefix: &str) -> String {
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|id| !self.records.iter().any(|r| &r.id == id))
            .unwrap_or_else(|| prefix.to_string())
    }

    fn choose_path(&self, pci_path: Option<&str>, hotplug: bool) -> Result<PciPath, DeviceError> {
        let pci = self
            .pci
            .as_ref()
            .ok_or_else(|| DeviceError::Virtio("this VM has no PCI".into()))?;
        match pci_path {
            Some(p) => {
                let path: PciPath = p.parse().map_err(|e: pci::PciPathError| {
                    DeviceError::BadPath(p.into(), e.to_string())
                })?;
                if path.len() != 1 || path.last().slot == 0 || path.last().function != 0 {
                    return Err(DeviceError::BadPath(
                        p.into(),
                        "only slots 01-1f (function 0) of the root bus exist in this topology"
                            .into(),
                    ));
                }
                if hotplug && !self.hotplug_slots.contains(&path.last().slot) {
                    return Err(DeviceError::NotHotplugSlot(p.into()));
                }
                Ok(path)
            }
            None => {
                let slot = if hotplug {
                    self.hotplug_slots
                        .iter()
                        .copied()
                        .find(|s| {
                            !self
                                .records
                                .iter()
                                .any(|r| r.path.len() == 1 && r.path.last().slot == *s)
                        })
                        .ok_or(PciManagerError::NoFreeSlot)?
                } else {
                    pci.free_root_slot().ok_or(PciManagerError::NoFreeSlot)?
                };
                Ok(PciManager::root_path(slot)?)
            }
        }
    }

    fn place(
        &mut self,
        new: NewDevice<'_>,
        device: Box<dyn VirtioDevice>,
    ) -> Result<DeviceRecord, DeviceError> {
        let NewDevice {
            id,
            prefix,
            kind,
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
        let path = self.choose_path(pci_path, hotplugged)?;
        let pci = self
            .pci
            .clone()
            .ok_or_else(|| DeviceError::Virtio("this VM has no PCI".into()))?;
        let vectors = VirtioPciDevice::required_msix_vectors(device.as_ref());
        let msi =
            Arc::new(KvmMsiGroup::new(pci.routing().clone(), vectors).map_err(DeviceError::Msi)?);
        let opts = VirtioPciOptions {
            pcie: Some(PciePortType::RootComplexIntegratedEndpoint),
            prefetchable: false,
        };
        let dev = VirtioPciDevice::new(device, pci.memory().clone(), msi, opts)
            .map_err(|e| DeviceError::Virtio(e.to_string()))?;
        pci.place_virtio(path.clone(), dev)?;
        let rec = DeviceRecord {
            id,
            kind,
            path,
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
        if let Some(id) = &cfg.id {
            if self.records.iter().any(|r| &r.id == id) {
                return Err(DeviceError::DuplicateId(id.clone()));
            }
        }
        let mut bc = BlockConfig::new(&cfg.path);
        bc.read_only = cfg.readonly;
        bc.serial = cfg.serial.clone().unwrap_or_default();
        let block = Block::new(&bc).map_err(|e| DeviceError::Disk(cfg.path.clone(), e))?;
        self.place(
            NewDevice {
                id: cfg.id.as_deref(),
                prefix: "disk",
                kind: DeviceKind::Disk,
                pci_path: cfg.pci_path.as_deref(),
                hotplugged,
                disk: Some(cfg.clone()),
            },
            Box::new(block),
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
                pci_path: cfg.pci_path.as_deref(),
                hotplugged,
                disk: None,
            },
            Box::new(Rng::new()),
        )
    }
}

impl DeviceManager {
    /// Detaches and frees the device `id` (slot, BARs, MSI-X routes and
    /// irqfds, ioeventfds, worker thread, files) and forgets it.
    pub fn remove(&mut self, id: &str) -> Result<DeviceRecord, DeviceError> {
        let idx = self
            .records
            .iter()
            .position(|r| r.id == id)
            .ok_or_else(|| DeviceError::Virtio(format!("no device '{id}'")))?;
        let pci = self
            .pci
            .clone()
            .ok_or_else(|| DeviceError::Virtio("this VM has no PCI".into()))?;
        pci.remove(&self.records[idx].path)?;
        Ok(self.records.remove(idx))
    }
}

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
use pci::placement::{
    self, HotplugPlan, PlaceKind, PlaceRequest, PlacementError, SlotMechanism, SlotsRequest,
};

use api::fd_passing::PassedFds;
use api::types::{DeviceConfig, DeviceState, UserDeviceConfig};
use api::types::{
    DeviceInfo, DeviceKind, DiskConfig, FunctionInfo, HotplugMechanism, NetConfig, RngConfig,
    SlotInfo, TopologyNode, TopologyNodeType, VsockConfig,
};
use api::{ApiError, ApiErrorKind};
use devices::vfio::kernel::{
    HostPaths, KernelVfioBackend, KernelVfioContainer, KernelVfioError, ProbeRequest,
};
use devices::vfio::{FailureWatch, VfioBackend};
use devices::virtio::net::{Net, NetConfig as NicConfig, Tap, TapError, DEFAULT_MTU};
use devices::virtio::{
    Block, BlockConfig, Rng, VirtioDevice, VirtioPciDevice, VirtioPciOptions, Vsock,
};
use pci::PciePortKind;
use pci::{PciPath, PciePortType, SharedPciDevice};

use crate::config::SerialOutput;
use crate::hotplug::CompletionQueue;
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

/// Errors creating, placing and removing devices. Each maps to the API's
/// status in [`DeviceError::api_kind`], exhaustively: a new variant must
/// say what a client gets.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot open serial output '{path}': {source}")]
    SerialFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register an irqfd: {0}")]
    Irqfd(#[source] kvm_ioctls::Error),
    #[error("cannot register device at port {0:#x}: {1:?}")]
    Register(u16, vm_device::bus::Error),
    #[error("cannot register device at {0:#x}: {1:?}")]
    RegisterMmio(u64, vm_device::bus::Error),
    #[error("device id '{0}' is already in use")]
    DuplicateId(String),
    /// A device id that names a PCI port or the root bus: `vm.info` lists
    /// ports and devices by id, so they share one namespace.
    #[error("device id '{0}' is the id of a PCI port (or of the root bus); choose another")]
    IdIsPort(String),
    #[error("no device with id '{0}'")]
    NoSuchDevice(String),
    #[error("device '{0}' was cold-plugged and is not removable")]
    NotRemovable(String),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Pci(#[from] PciManagerError),
    #[error("this VM has no PCI root complex")]
    NoPci,
    #[error("cannot use disk '{path}': {source}")]
    Disk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use disk '{path}': {source}")]
    DiskInUse {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "disk path '{0}' is relative: give an absolute path (the VMM's working \
         directory is not the client's)"
    )]
    RelativeDiskPath(String),
    #[error("cannot use disk: {0}")]
    PathNotAllowed(#[source] crate::confine::PathRefused),
    #[error("cannot set up interrupts: {0}")]
    Msi(#[source] std::io::Error),
    #[error("cannot use the tap: {0}")]
    Tap(#[source] TapError),
    #[error("{0}")]
    BadNet(String),
    #[error("cannot create the virtio transport: {0}")]
    Virtio(#[source] devices::virtio::VirtioPciError),
    #[error("the VM has a vsock device already ('{0}'); it can have one")]
    SecondVsock(String),
    #[error(
        "vsock socket path '{0}' is relative: give an absolute path (the VMM's working \
         directory is not the client's)"
    )]
    RelativeVsockPath(String),
    #[error("cannot create vsock socket '{path}': {source}")]
    VsockSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create vsock socket: {0}")]
    VsockPathNotAllowed(#[source] crate::confine::PathRefused),
    #[error(transparent)]
    UserDevice(#[from] devices::vfio::user::VfioUserError),
    #[error("cannot pass the device through: {0}")]
    Passthrough(#[source] devices::vfio::VfioPciError),
    #[error(
        "vfio-user socket '{0}' is relative: give an absolute path (the VMM's working \
         directory is not the client's)"
    )]
    RelativeSocketPath(String),
    #[error("cannot use vfio-user socket: {0}")]
    SocketNotAllowed(#[source] crate::confine::PathRefused),
    #[error("the vfio-user server at '{socket}' is already device '{id}'")]
    SocketInUse { socket: String, id: String },
    #[error("cannot pass the host device through: {0}")]
    KernelVfio(#[from] KernelVfioError),
    #[error("host PCI function {bdf} is already device '{id}'")]
    HostDeviceInUse { bdf: String, id: String },
    #[error("cannot create the KVM VFIO device: {0}")]
    KvmVfio(#[source] kvm_ioctls::Error),
}

impl DeviceError {
    /// The API's status class for this error: 400 for a request that can
    /// never succeed as written, 404 for an unknown id or port, 409 for a
    /// request the VM's current state refuses (slot taken, topology full,
    /// BARs do not fit), 500 for host failures.
    pub fn api_kind(&self) -> ApiErrorKind {
        use ApiErrorKind as K;
        match self {
            DeviceError::DuplicateId(_)
            | DeviceError::NotRemovable(_)
            | DeviceError::DiskInUse { .. }
            | DeviceError::SecondVsock(_) => K::Conflict,
            DeviceError::RelativeVsockPath(_)
            | DeviceError::VsockSocket { .. }
            | DeviceError::VsockPathNotAllowed(_) => K::BadRequest,
            DeviceError::NoSuchDevice(_) => K::NotFound,
            DeviceError::Disk { .. }
            | DeviceError::IdIsPort(_)
            | DeviceError::RelativeDiskPath(_)
            | DeviceError::PathNotAllowed(_) => K::BadRequest,
            DeviceError::Tap(t) => match t {
                TapError::Busy(_) => K::Conflict,
                TapError::OpenTun(_) | TapError::Setup { .. } => K::Internal,
                TapError::BadName(_)
                | TapError::NotFound(_)
                | TapError::Attach { .. }
                | TapError::NotATap { .. } => K::BadRequest,
            },
            DeviceError::BadNet(_) => K::BadRequest,
            DeviceError::Placement(p) => match p {
                PlacementError::BadPath { .. }
                | PlacementError::BadFunction(_)
                | PlacementError::NoFunctionZero { .. }
                | PlacementError::PathForGroup(_)
                | PlacementError::WholeDevice => K::BadRequest,
                PlacementError::UnknownPort(_) => K::NotFound,
                PlacementError::NoDeviceSlot(_)
                | PlacementError::PortFull(_)
                | PlacementError::NoFreeSlot
                | PlacementError::SlotTaken(_)
                | PlacementError::NotHotplugSlot(_)
                | PlacementError::SlotCommitted { .. }
                | PlacementError::SingleFunction { .. }
                | PlacementError::FunctionOfCommittedSlot { .. }
                | PlacementError::NoGroupPort { .. } => K::Conflict,
            },
            DeviceError::Pci(e) => e.api_kind(),
            DeviceError::EventFd(_)
            | DeviceError::SerialFile { .. }
            | DeviceError::Irqfd(_)
            | DeviceError::Register(..)
            | DeviceError::RegisterMmio(..)
            | DeviceError::NoPci
            | DeviceError::Msi(_)
            | DeviceError::Virtio(_) => K::Internal,
            DeviceError::UserDevice(_)
            | DeviceError::RelativeSocketPath(_)
            | DeviceError::SocketNotAllowed(_) => K::BadRequest,
            DeviceError::SocketInUse { .. } | DeviceError::HostDeviceInUse { .. } => K::Conflict,
            // The function, its driver, its group, the host's VFIO, opening
            // the group or device: what the request names cannot be used.
            DeviceError::KernelVfio(_) => K::BadRequest,
            DeviceError::KvmVfio(_) => K::Internal,
            DeviceError::Passthrough(e) => {
                use devices::vfio::VfioPciError as V;
                match e {
                    V::RamNotShared(..) | V::Intx(..) => K::Internal,
                    _ => K::BadRequest,
                }
            }
        }
    }
}

impl From<DeviceError> for ApiError {
    fn from(e: DeviceError) -> Self {
        ApiError::new(e.api_kind(), e.to_string())
    }
}

/// Events the platform devices raise for the event loop.
pub struct PlatformEvents {
    pub power_off: EventFd,
    pub reset: EventFd,
}

/// A device the VM has, for `vm.info` and removal.
#[derive(Clone, Debug)]
pub struct DeviceRecord {
    pub id: String,
    pub kind: DeviceKind,
    pub path: PciPath,
    /// The port the device sits under; `None` is the root bus.
    pub port: Option<String>,
    /// How the guest hears of changes in its slot.
    pub mechanism: SlotMechanism,
    pub hotplugged: bool,
    pub disk: Option<DiskConfig>,
    /// Vsock only: its configuration (the socket path as created).
    pub vsock: Option<VsockConfig>,
    /// vfio-user device: the server's socket (as checked, canonical).
    pub socket: Option<String>,
    pub net: Option<NetRecord>,
    /// Kernel VFIO device: the host function.
    pub host: Option<HostFunction>,
    /// Kernel VFIO device, function 0 of a request's first slot: the host
    /// functions the request left out, held by the VMM while it lives.
    pub held: Vec<HostFunction>,
    /// Passthrough devices: whether the back end failed.
    pub failure: Option<FailureWatch>,
}

/// What `vm.info` shows of a host function passed through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFunction {
    /// `DDDD:BB:DD.F`.
    pub bdf: String,
    /// Its IOMMU group.
    pub group: u32,
}

/// What `vm.info` shows of a NIC.
#[derive(Clone, Debug)]
pub struct NetRecord {
    pub mac: String,
    pub tap: String,
    pub mtu: u32,
}

impl DeviceRecord {
    /// A device at `place` with no kind-specific fields yet (the caller
    /// sets those it has).
    pub fn new(id: String, kind: DeviceKind, place: placement::Place, hotplugged: bool) -> Self {
        DeviceRecord {
            id,
            kind,
            path: place.path,
            port: place.port,
            mechanism: place.mechanism,
            hotplugged,
            disk: None,
            vsock: None,
            socket: None,
            net: None,
            host: None,
            held: Vec::new(),
            failure: None,
        }
    }

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
            cid: self.vsock.as_ref().map(|v| v.cid),
            socket: self
                .vsock
                .as_ref()
                .map(|v| v.socket.clone())
                .or_else(|| self.socket.clone()),
            mac: self.net.as_ref().map(|n| n.mac.clone()),
            tap: self.net.as_ref().map(|n| n.tap.clone()),
            mtu: self.net.as_ref().map(|n| n.mtu),
            host_bdf: self.host.as_ref().map(|h| h.bdf.clone()),
            iommu_group: self.host.as_ref().map(|h| h.group),
            unassigned: self.held.iter().map(|h| h.bdf.clone()).collect(),
            state: self.failure.as_ref().map(|w| match w.get() {
                Some(_) => DeviceState::Failed,
                None => DeviceState::Ok,
            }),
            error: self
                .failure
                .as_ref()
                .and_then(|w| w.get().map(str::to_string)),
        }
    }
}

/// A random, locally administered unicast MAC address.
fn random_mac() -> [u8; 6] {
    let mut mac = [0x52, 0x54, 0x00, 0, 0, 0];
    let mut r = [0u8; 3];
    if devices::virtio::rng::fill_random(&mut r).is_ok() {
        mac[3..].copy_from_slice(&r);
    }
    // Locally administered (bit 1), unicast (bit 0 clear).
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// A duplicate of descriptor `n`, which this process inherited.
fn inherited_fd(n: i32) -> Result<std::os::fd::OwnedFd, DeviceError> {
    use std::os::fd::BorrowedFd;
    // SAFETY: F_GETFD only checks that `n` is open; no memory is passed.
    if n < 0 || unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        return Err(DeviceError::BadNet(format!("descriptor {n} is not open")));
    }
    // SAFETY: `n` is open (checked above) and is only borrowed to duplicate it.
    let fd = unsafe { BorrowedFd::borrow_raw(n) };
    fd.try_clone_to_owned()
        .map_err(|e| DeviceError::BadNet(format!("cannot duplicate descriptor {n}: {e}")))
}

/// Devices every VM has.
pub struct DeviceManager {
    pub io: Arc<RwLock<IoManager>>,
    pub pci: Option<Arc<PciManager>>,
    pub records: Vec<DeviceRecord>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub ged: Arc<Ged>,
    pub hotplug: Arc<PciHotplugController>,
    /// Automatic placement order for hot-plugged devices.
    pub placement_order: Vec<PlaceKind>,
    /// Which paths a hot-plug request may name; `None`: any.
    pub path_policy: Option<crate::confine::PathPolicy>,
    pub events: PlatformEvents,
    /// Where kernel VFIO devices are looked up (`/sys`, `/dev/vfio`).
    pub host_paths: HostPaths,
    /// The VM's VFIO container while a kernel VFIO device uses it.
    vfio_container: std::sync::Weak<KernelVfioContainer>,
    /// Host functions left out of the guest, opened and held (never
    /// placed) for the device whose id is the key, until it is removed.
    held: Vec<(String, Vec<KernelVfioBackend>)>,
}

/// What an add request added: its records in the order they were placed
/// (each slot's functions 1-7 before its function 0, which commits it)
/// and the warnings its placement drew.
#[derive(Debug)]
pub struct Added {
    pub records: Vec<DeviceRecord>,
    pub warnings: Vec<String>,
}

impl Added {
    /// One device, no warnings.
    pub fn one(rec: DeviceRecord) -> Self {
        Added {
            records: vec![rec],
            warnings: Vec::new(),
        }
    }
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

/// Passes at most `max` bytes to `inner`, then drops the rest (saying so once in the log):
/// the guest decides how much console output there is, the host's disk does not grow
/// without bound. Dropped bytes are reported as written, so the UART sees no error.
struct LimitedWriter<W> {
    inner: W,
    left: u64,
    max: u64,
    name: String,
}

impl<W: Write> LimitedWriter<W> {
    fn new(inner: W, max: u64, name: String) -> Self {
        LimitedWriter {
            inner,
            left: max,
            max,
            name,
        }
    }
}

impl<W: Write> Write for LimitedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            return Ok(buf.len());
        }
        let n = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let written = self.inner.write(&buf[..n])?;
        self.left -= written as u64;
        if self.left == 0 {
            log::warn!(
                "serial: {} reached its limit of {} bytes; further console output is dropped",
                self.name,
                self.max
            );
            // The rest of this buffer is dropped as well.
            return Ok(buf.len());
        }
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
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

/// A device placed before boot below a native hotplug port: the port's
/// slot shows it present from power-on.
fn mark_cold_plugged(pci: &PciManager, under: Option<&str>) {
    if let Some(port) = under.and_then(|p| pci.port(p)) {
        let mut port = port.lock().unwrap_or_else(|e| e.into_inner());
        if port.has_native_hotplug() {
            port.cold_plug(true);
        }
    }
}

impl DeviceManager {
    /// Creates the UART, CMOS, i8042, ACPI PM registers, boot timer, GED
    /// and ACPI hotplug registers (whose ejects go to `completions`).
    pub fn new(
        vm: &VmFd,
        serial: &SerialOutput,
        start: Instant,
        completions: Arc<CompletionQueue>,
    ) -> Result<Self, DeviceError> {
        let out: Box<dyn Write + Send> = match serial {
            SerialOutput::Stdout => Box::new(Stdout),
            SerialOutput::Off => Box::new(std::io::sink()),
            SerialOutput::File { path, max } => Box::new(LimitedWriter::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| DeviceError::SerialFile {
                        path: path.display().to_string(),
                        source,
                    })?,
                *max,
                path.display().to_string(),
            )),
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
        register_pio(
            &mut io,
            devices::legacy::SERIAL_PORT,
            devices::legacy::SERIAL_PORT_LEN,
            serial.clone(),
        )?;
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
        let hotplug = Arc::new(PciHotplugController::new(completions));
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
            placement_order: PlaceKind::DEFAULT_ORDER.to_vec(),
            path_policy: None,
            events: PlatformEvents { power_off, reset },
            host_paths: HostPaths::default(),
            vfio_container: std::sync::Weak::new(),
            held: Vec::new(),
        })
    }

    /// DSDT objects of the platform devices, after the host bridge: the
    /// ACPI hotplug slots of `plan` with the bridge objects leading to
    /// them, the GED, whose `_EVT` turns event bits into notifications,
    /// and the power button.
    pub fn dsdt_aml(&self, plan: &HotplugPlan) -> Vec<u8> {
        let root = match &self.pci {
            Some(pci) => crate::acpi::AcpiBus::from_plan(pci.topology(), plan),
            None => crate::acpi::AcpiBus::default(),
        };
        let mut out = crate::acpi::pci_hotplug_aml(PCI_HOTPLUG_MMIO_START, &root);
        out.extend(crate::acpi::ged_aml(
            GED_MMIO_START,
            GED_IRQ,
            GED_EVENT_POWER_BUTTON,
            GED_EVENT_PCI_HOTPLUG,
        ));
        out
    }

    /// Paths of the cold-plugged devices (for the hotplug plan).
    pub fn cold_paths(&self) -> Vec<PciPath> {
        self.records
            .iter()
            .filter(|r| !r.hotplugged)
            .map(|r| r.path.clone())
            .collect()
    }
}

/// What is known of a device before it is placed.
struct NewDevice<'a> {
    id: Option<&'a str>,
    prefix: &'a str,
    kind: DeviceKind,
    port: Option<&'a str>,
    pci_path: Option<&'a str>,
    function: Option<u8>,
    hotplugged: bool,
    disk: Option<DiskConfig>,
    vsock: Option<VsockConfig>,
    net: Option<NetRecord>,
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
            .find(|id| !self.records.iter().any(|r| &r.id == id) && !self.is_port_id(id))
            .unwrap_or_else(|| prefix.to_string())
    }

    /// The id of a new device: `id` if no device or port has it, else a
    /// fresh `prefix<N>`.
    fn claim_id(&self, id: Option<&str>, prefix: &str) -> Result<String, DeviceError> {
        match id {
            Some(id) if self.records.iter().any(|r| r.id == id) => {
                Err(DeviceError::DuplicateId(id.to_string()))
            }
            Some(id) if self.is_port_id(id) => Err(DeviceError::IdIsPort(id.to_string())),
            Some(id) => Ok(id.to_string()),
            None => Ok(self.fresh_id(prefix)),
        }
    }

    /// Where a new device goes: the placement rules over the topology, the
    /// hotplug plan and the slots in use.
    fn choose_place(
        &self,
        pci: &PciManager,
        plan: &HotplugPlan,
        req: &PlaceRequest<'_>,
    ) -> Result<placement::Place, DeviceError> {
        Ok(placement::choose(
            pci.topology(),
            plan,
            &self.placement_order,
            &|p| pci.occupied(p),
            req,
        )?)
    }

    /// Whether `id` names a PCI port or the root bus.
    fn is_port_id(&self, id: &str) -> bool {
        id == pci::topology::ROOT_BUS_ID
            || self
                .pci
                .as_ref()
                .is_some_and(|p| p.topology().port(id).is_some())
    }

    fn pci(&self) -> Result<Arc<PciManager>, DeviceError> {
        self.pci.clone().ok_or(DeviceError::NoPci)
    }

    /// Places a new device: checks its id, chooses its slot, and only then
    /// calls `make` to build it (opening files), so a bad request changes
    /// nothing.
    fn place(
        &mut self,
        new: NewDevice<'_>,
        plan: &HotplugPlan,
        make: impl FnOnce() -> Result<Box<dyn VirtioDevice>, DeviceError>,
    ) -> Result<DeviceRecord, DeviceError> {
        let NewDevice {
            id,
            prefix,
            kind,
            port,
            pci_path,
            function,
            hotplugged,
            disk,
            vsock,
            net,
        } = new;
        let id = self.claim_id(id, prefix)?;
        let pci = self.pci()?;
        let req = PlaceRequest {
            port,
            pci_path,
            function,
            hotplug: hotplugged,
        };
        let place = self.choose_place(&pci, plan, &req)?;
        let (path, under) = (&place.path, place.port.as_deref());
        let device = make()?;
        let pcie = match under.and_then(|p| pci.topology().port(p)) {
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
            .map_err(DeviceError::Virtio)?;
        let intx = pci
            .intx()
            .line(pci::intx::intx_gsi(path), dev.isr())
            .map_err(DeviceError::Msi)?;
        dev.set_intx(Arc::new(intx));
        let shared: SharedPciDevice = Arc::new(Mutex::new(dev));
        pci.place(path.clone(), under, shared)?;
        if !hotplugged {
            mark_cold_plugged(&pci, under);
        }
        let rec = DeviceRecord {
            disk,
            vsock,
            net,
            ..DeviceRecord::new(id, kind, place, hotplugged)
        };
        self.records.push(rec.clone());
        Ok(rec)
    }

    /// Adds a virtio-blk disk. A hot-plugged disk (a request from a client,
    /// whose working directory is not ours) needs an absolute path, and one
    /// the [`crate::confine::PathPolicy`] allows when there is one; the
    /// canonical path it checked is the one opened.
    pub fn add_disk(
        &mut self,
        cfg: &DiskConfig,
        hotplugged: bool,
        plan: &HotplugPlan,
    ) -> Result<DeviceRecord, DeviceError> {
        if hotplugged && !std::path::Path::new(&cfg.path).is_absolute() {
            return Err(DeviceError::RelativeDiskPath(cfg.path.clone()));
        }
        let mut bc = BlockConfig::new(&cfg.path);
        if let (true, Some(policy)) = (hotplugged, &self.path_policy) {
            match policy.check(&cfg.path) {
                Ok(Ok(canonical)) => bc.path = canonical,
                Ok(Err(source)) => {
                    return Err(DeviceError::Disk {
                        path: cfg.path.clone(),
                        source,
                    })
                }
                Err(refused) => return Err(DeviceError::PathNotAllowed(refused)),
            }
        }
        bc.read_only = cfg.readonly;
        bc.lock = cfg.lock;
        bc.serial = cfg.serial.clone().unwrap_or_default();
        self.place(
            NewDevice {
                id: cfg.id.as_deref(),
                prefix: "disk",
                kind: DeviceKind::Disk,
                port: cfg.port.as_deref(),
                pci_path: cfg.pci_path.as_deref(),
                function: cfg.function,
                hotplugged,
                disk: Some(cfg.clone()),
                vsock: None,
                net: None,
            },
            plan,
            || {
                let block = Block::new(&bc).map_err(|source| {
                    let path = cfg.path.clone();
                    if source.kind() == std::io::ErrorKind::ResourceBusy {
                        DeviceError::DiskInUse { path, source }
                    } else {
                        DeviceError::Disk { path, source }
                    }
                })?;
                Ok(Box::new(block) as Box<dyn VirtioDevice>)
            },
        )
    }

    /// Adds a virtio-rng device.
    pub fn add_rng(
        &mut self,
        cfg: &RngConfig,
        hotplugged: bool,
        plan: &HotplugPlan,
    ) -> Result<DeviceRecord, DeviceError> {
        self.place(
            NewDevice {
                id: cfg.id.as_deref(),
                prefix: "rng",
                kind: DeviceKind::Rng,
                port: cfg.port.as_deref(),
                pci_path: cfg.pci_path.as_deref(),
                function: cfg.function,
                hotplugged,
                disk: None,
                vsock: None,
                net: None,
            },
            plan,
            || Ok(Box::new(Rng::new()) as Box<dyn VirtioDevice>),
        )
    }

    /// Adds the virtio-vsock device (one per VM). Its listening socket is
    /// created here, so a taken path or a missing directory fails the
    /// request and changes nothing. A hot-plugged one (a client's request)
    /// needs an absolute path whose directory the
    /// [`crate::confine::PathPolicy`] allows when there is one.
    pub fn add_vsock(
        &mut self,
        cfg: &VsockConfig,
        hotplugged: bool,
        plan: &HotplugPlan,
    ) -> Result<DeviceRecord, DeviceError> {
        if let Some(r) = self.records.iter().find(|r| r.kind == DeviceKind::Vsock) {
            return Err(DeviceError::SecondVsock(r.id.clone()));
        }
        let socket_path = std::path::Path::new(&cfg.socket);
        if hotplugged && !socket_path.is_absolute() {
            return Err(DeviceError::RelativeVsockPath(cfg.socket.clone()));
        }
        let mut socket = socket_path.to_path_buf();
        if let (true, Some(policy)) = (hotplugged, &self.path_policy) {
            let name = socket_path
                .file_name()
                .ok_or_else(|| DeviceError::VsockSocket {
                    path: cfg.socket.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "the path names no file",
                    ),
                })?;
            match policy.check(&crate::config::vsock_dir(&cfg.socket)) {
                Ok(Ok(dir)) => socket = dir.join(name),
                Ok(Err(source)) => {
                    return Err(DeviceError::VsockSocket {
                        path: cfg.socket.clone(),
                        source: std::io::Error::new(
                            source.kind(),
                            format!("its directory does not exist or cannot be reached ({source})"),
                        ),
                    })
                }
                Err(refused) => return Err(DeviceError::VsockPathNotAllowed(refused)),
            }
        }
        let mut recorded = cfg.clone();
        if let Some(s) = socket.to_str() {
            recorded.socket = s.to_string();
        }
        self.place(
            NewDevice {
                id: cfg.id.as_deref(),
                prefix: "vsock",
                kind: DeviceKind::Vsock,
                port: cfg.port.as_deref(),
                pci_path: cfg.pci_path.as_deref(),
                function: cfg.function,
                hotplugged,
                disk: None,
                vsock: Some(recorded),
                net: None,
            },
            plan,
            || {
                let dev =
                    Vsock::new(cfg.cid, &socket).map_err(|source| DeviceError::VsockSocket {
                        path: cfg.socket.clone(),
                        source,
                    })?;
                Ok(Box::new(dev) as Box<dyn VirtioDevice>)
            },
        )
    }

    /// Adds the PCI function a vfio-user server serves on `cfg.socket`. A
    /// hot-plugged one (a client's request) needs an absolute socket path,
    /// one the [`crate::confine::PathPolicy`] allows when there is one.
    /// The slot is chosen first, then the server is connected to (its
    /// handshake bounded in time), given guest RAM and the INTx eventfd,
    /// and the function placed; on error nothing stays.
    pub fn add_user_device(
        &mut self,
        cfg: &UserDeviceConfig,
        hotplugged: bool,
        plan: &HotplugPlan,
    ) -> Result<DeviceRecord, DeviceError> {
        if hotplugged && !std::path::Path::new(&cfg.socket).is_absolute() {
            return Err(DeviceError::RelativeSocketPath(cfg.socket.clone()));
        }
        let mut socket = std::path::PathBuf::from(&cfg.socket);
        if let (true, Some(policy)) = (hotplugged, &self.path_policy) {
            match policy.check(&cfg.socket) {
                Ok(Ok(canonical)) => socket = canonical,
                Ok(Err(source)) => {
                    return Err(devices::vfio::user::VfioUserError::Socket(
                        cfg.socket.clone(),
                        source,
                    )
                    .into())
                }
                Err(refused) => return Err(DeviceError::SocketNotAllowed(refused)),
            }
        } else if let Ok(c) = std::fs::canonicalize(&socket) {
            socket = c;
        }
        let shown = socket.display().to_string();
        if let Some(r) = self
            .records
            .iter()
            .find(|r| r.socket.as_deref() == Some(shown.as_str()))
        {
            return Err(DeviceError::SocketInUse {
                socket: shown,
                id: r.id.clone(),
            });
        }
        let id = self.claim_id(cfg.id.as_deref(), "vfio-user")?;
        let at = PlaceRequest {
            port: cfg.port.as_deref(),
            pci_path: cfg.pci_path.as_deref(),
            function: cfg.function,
            hotplug: hotplugged,
        };
        let (place, failure) = self.attach_passthrough(plan, &at, |_| {
            Ok(Box::new(devices::vfio::VfioUserBackend::connect(&socket)?))
        })?;
        let rec = DeviceRecord {
            socket: Some(shown),
            failure: Some(failure),
            ..DeviceRecord::new(id, DeviceKind::VfioUser, place, hotplugged)
        };
        self.records.push(rec.clone());
        Ok(rec)
    }

    /// Attaches a passthrough function where `at` asks: chooses the place,
    /// only then calls `open` for the back end (connecting, opening host
    /// files), builds and places the function
    /// ([`DeviceManager::place_passthrough`]) and, for cold plug, shows a
    /// native port's slot present. On error nothing stays.
    fn attach_passthrough(
        &mut self,
        plan: &HotplugPlan,
        at: &PlaceRequest<'_>,
        open: impl FnOnce(&mut Self) -> Result<Box<dyn VfioBackend>, DeviceError>,
    ) -> Result<(placement::Place, FailureWatch), DeviceError> {
        let pci = self.pci()?;
        let place = self.choose_place(&pci, plan, at)?;
        let backend = open(self)?;
        let under = place.port.as_deref();
        let failure = self.place_passthrough(&pci, backend, &place.path, under)?;
        if !at.hotplug {
            mark_cold_plugged(&pci, under);
        }
        Ok((place, failure))
    }

    /// Builds the passthrough function over `backend` (guest RAM, INTx)
    /// and places it at `path`; on error nothing stays (the back end is
    /// released and closed).
    fn place_passthrough(
        &self,
        pci: &PciManager,
        backend: Box<dyn VfioBackend>,
        path: &PciPath,
        under: Option<&str>,
    ) -> Result<FailureWatch, DeviceError> {
        let intx = pci
            .intx()
            .line(
                pci::intx::intx_gsi(path),
                Arc::new(std::sync::atomic::AtomicU8::new(0)),
            )
            .map_err(DeviceError::Msi)?;
        let memory = vm_memory::GuestAddressSpace::memory(pci.memory());
        let routing = pci.routing().clone();
        let msi = move |vectors: u16| {
            KvmMsiGroup::new_passthrough(routing.clone(), vectors)
                .map(|g| Arc::new(g) as Arc<dyn pci::MsiInterruptGroup>)
        };
        let dev = devices::vfio::VfioPciDevice::new(
            backend,
            &memory,
            Some(Arc::new(intx) as Arc<dyn pci::IntxInterrupt>),
            Some(&msi),
        )
        .map_err(DeviceError::Passthrough)?;
        let failure = dev.failure_watch();
        let shared: SharedPciDevice = Arc::new(Mutex::new(dev));
        if let Err(e) = pci.place(path.clone(), under, shared.clone()) {
            // Give guest RAM back and let the back end go.
            shared.lock().unwrap_or_else(|e| e.into_inner()).reset();
            return Err(e.into());
        }
        Ok(failure)
    }

    /// Adds the host PCI device whose function `cfg.path` names with kernel
    /// VFIO: what [`devices::vfio::kernel::probe`] says the request takes
    /// (the whole device and its IOMMU groups' endpoints, less the functions
    /// left out, which are held), each host device in a guest slot of its
    /// own, placed by [`placement::choose_slots`]. Before anything is opened
    /// or changed: the ids, the host (sysfs, `/dev/vfio`), that no function
    /// is passed through or held already, the places. Then the VM's VFIO
    /// container is opened (once, with the KVM VFIO device), the held
    /// functions, and each slot's functions, 1-7 first and function 0 last;
    /// on error everything placed is removed again and nothing stays.
    pub fn add_device(
        &mut self,
        cfg: &DeviceConfig,
        hotplugged: bool,
        plan: &HotplugPlan,
    ) -> Result<Added, DeviceError> {
        let base = self.claim_id(cfg.id.as_deref(), "vfio")?;
        let assignment = devices::vfio::kernel::probe(
            &self.host_paths,
            &ProbeRequest {
                path: &cfg.path,
                assigned: cfg.assigned.as_deref(),
                unassigned: &cfg.unassigned,
            },
        )?;
        // Ids: `<id>` for function 0 of the first slot, `<id>.fF` for its
        // function F, `<id>.dN` for the N-th other device of the groups.
        let ids: Vec<Vec<String>> = assignment
            .devices
            .iter()
            .enumerate()
            .map(|(n, dev)| {
                let dev_id = match n {
                    0 => base.clone(),
                    n => format!("{base}.d{n}"),
                };
                dev.functions
                    .iter()
                    .map(|f| match f.function {
                        0 => dev_id.clone(),
                        f => format!("{dev_id}.f{f}"),
                    })
                    .collect()
            })
            .collect();
        for id in ids.iter().flatten().filter(|id| **id != base) {
            self.claim_id(Some(id), "vfio")?;
        }
        for bdf in assignment.host_functions().map(|b| b.to_string()) {
            let user = self
                .records
                .iter()
                .find(|r| r.host.iter().chain(r.held.iter()).any(|h| h.bdf == bdf));
            if let Some(r) = user {
                return Err(DeviceError::HostDeviceInUse {
                    bdf,
                    id: r.id.clone(),
                });
            }
        }
        let pci = self.pci()?;
        let placed: Vec<(PciPath, u32)> = self
            .records
            .iter()
            .filter_map(|r| Some((r.path.clone(), r.host.as_ref()?.group)))
            .collect();
        let slots = placement::choose_slots(
            pci.topology(),
            plan,
            &|p| pci.occupied(p),
            &placed,
            &SlotsRequest {
                place: PlaceRequest {
                    port: cfg.port.as_deref(),
                    pci_path: cfg.pci_path.as_deref(),
                    function: cfg.function,
                    hotplug: hotplugged,
                },
                slots: assignment.devices.len(),
                multifunction: assignment.devices.iter().any(|d| d.functions.len() > 1),
                groups: &assignment.groups,
            },
        )?;
        let container = self.vfio_container(&pci)?;
        let mut held = Vec::new();
        for (bdf, group) in &assignment.held {
            held.push(KernelVfioBackend::open(
                &self.host_paths,
                *bdf,
                *group,
                container.clone(),
            )?);
        }
        let mut added: Vec<DeviceRecord> = Vec::new();
        for ((dev, place), ids) in assignment.devices.iter().zip(&slots.places).zip(&ids) {
            // Function 0 (first) last: it commits the slot.
            let mut order: Vec<_> = dev.functions.iter().zip(ids).collect();
            order.rotate_left(1);
            for (f, id) in order {
                // A single function goes where it was placed (`function`
                // may have chosen its number); several keep theirs.
                let path = match dev.functions.len() {
                    1 => place.path.clone(),
                    _ => place.path.with_function(f.function),
                };
                let attached =
                    KernelVfioBackend::open(&self.host_paths, f.host, f.group, container.clone())
                        .map_err(DeviceError::from)
                        .and_then(|backend| {
                            self.place_passthrough(
                                &pci,
                                Box::new(backend),
                                &path,
                                place.port.as_deref(),
                            )
                        });
                let failure = match attached {
                    Ok(failure) => failure,
                    Err(e) => {
                        for rec in added.iter().rev() {
                            if let Err(r) = pci.remove(&rec.path) {
                                log::warn!("vfio {}: cannot undo its placement: {r}", rec.id);
                            }
                        }
                        return Err(e);
                    }
                };
                log::info!(
                    "vfio {id}: host {} (IOMMU group {}) at {path}",
                    f.host,
                    f.group
                );
                let at = placement::Place {
                    path,
                    port: place.port.clone(),
                    mechanism: place.mechanism.clone(),
                };
                added.push(DeviceRecord {
                    host: Some(HostFunction {
                        bdf: f.host.to_string(),
                        group: f.group,
                    }),
                    failure: Some(failure),
                    ..DeviceRecord::new(id.clone(), DeviceKind::Vfio, at, hotplugged)
                });
            }
            if let Some(host) = dev.remapped {
                log::info!(
                    "vfio: host function 0 of {} is left out: {host} is guest function 0 at {}",
                    host.device_name(),
                    place.path
                );
            }
            if !hotplugged {
                mark_cold_plugged(&pci, place.port.as_deref());
            }
        }
        if let Some(first) = added.iter_mut().find(|r| r.id == base) {
            first.held = assignment
                .held
                .iter()
                .map(|(b, g)| HostFunction {
                    bdf: b.to_string(),
                    group: *g,
                })
                .collect();
        }
        if !held.is_empty() {
            let names: Vec<String> = assignment.held.iter().map(|(b, _)| b.to_string()).collect();
            log::info!(
                "vfio {base}: holds {} (left out of the guest)",
                names.join(", ")
            );
            self.held.push((base.clone(), held));
        }
        for w in &slots.warnings {
            log::warn!("vfio {base}: {w}");
        }
        self.records.extend(added.iter().cloned());
        Ok(Added {
            records: added,
            warnings: slots.warnings,
        })
    }

    /// The VM's VFIO container: the one kernel VFIO devices use now, or a
    /// new one with a new KVM VFIO device (`KVM_DEV_TYPE_VFIO`).
    fn vfio_container(
        &mut self,
        pci: &PciManager,
    ) -> Result<Arc<KernelVfioContainer>, DeviceError> {
        if let Some(c) = self.vfio_container.upgrade() {
            return Ok(c);
        }
        let mut create = kvm_bindings::kvm_create_device {
            type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let fd = pci
            .vm()
            .create_device(&mut create)
            .map_err(DeviceError::KvmVfio)?;
        let memory = (*vm_memory::GuestAddressSpace::memory(pci.memory())).clone();
        let c = KernelVfioContainer::open(
            devices::vfio::kernel::KvmVfioDevice::new_from_kvm(fd),
            memory,
        )?;
        self.vfio_container = Arc::downgrade(&c);
        Ok(c)
    }

    /// Adds a virtio-net NIC. Its tap is opened by name, or taken from
    /// `passed` (the descriptors of an API request; `cfg.fd` is an index)
    /// or, with `passed` `None` (the command line), from the descriptor
    /// number `cfg.fd` this process inherited (duplicated: the inherited
    /// one stays). The tap is opened only once the slot is chosen, so a
    /// refused request changes nothing.
    pub fn add_net(
        &mut self,
        cfg: &NetConfig,
        passed: Option<&PassedFds>,
        hotplugged: bool,
        plan: &HotplugPlan,
    ) -> Result<DeviceRecord, DeviceError> {
        cfg.validate()
            .map_err(|e| DeviceError::BadNet(e.message.clone()))?;
        let mac = match &cfg.mac {
            Some(m) => api::types::parse_mac(m).map_err(|e| DeviceError::BadNet(e.message))?,
            None => random_mac(),
        };
        let mtu = cfg.mtu.map_or(DEFAULT_MTU, |m| m as u16);
        let open_tap = || -> Result<Tap, DeviceError> {
            match (&cfg.tap, cfg.fd, passed) {
                (Some(name), _, _) => Tap::open(name).map_err(DeviceError::Tap),
                (None, Some(i), Some(passed)) => {
                    let fd = passed.take(i as usize).ok_or_else(|| {
                        DeviceError::BadNet(format!(
                            "no descriptor {i} was passed with the request ({} passed; \
                             send the tap with SCM_RIGHTS on the API connection)",
                            passed.len()
                        ))
                    })?;
                    Tap::from_fd(fd).map_err(DeviceError::Tap)
                }
                (None, Some(n), None) => Tap::from_fd(inherited_fd(n)?).map_err(|e| match e {
                    // Name the descriptor given, not its duplicate.
                    TapError::NotATap { why, .. } => {
                        DeviceError::Tap(TapError::NotATap { fd: n, why })
                    }
                    e => DeviceError::Tap(e),
                }),
                (None, None, _) => Err(DeviceError::BadNet("a NIC needs 'tap' or 'fd'".into())),
            }
        };
        // The tap's name is known once it is open: the record is completed
        // by `make`.
        let tap_name = std::cell::RefCell::new(String::new());
        let mut rec = self.place(
            NewDevice {
                id: cfg.id.as_deref(),
                prefix: "net",
                kind: DeviceKind::Net,
                port: cfg.port.as_deref(),
                pci_path: cfg.pci_path.as_deref(),
                function: cfg.function,
                hotplugged,
                disk: None,
                vsock: None,
                net: None,
            },
            plan,
            || {
                let tap = open_tap()?;
                tap_name.replace(tap.name().to_string());
                Ok(Box::new(Net::new(tap, NicConfig { mac, mtu })) as Box<dyn VirtioDevice>)
            },
        )?;
        let net = NetRecord {
            mac: api::types::format_mac(&mac),
            tap: tap_name.into_inner(),
            mtu: u32::from(mtu),
        };
        rec.net = Some(net.clone());
        if let Some(r) = self.records.iter_mut().find(|r| r.id == rec.id) {
            r.net = Some(net);
        }
        Ok(rec)
    }

    /// The hot-plugged device `id`, which may be removed.
    pub fn removable(&self, id: &str) -> Result<&DeviceRecord, DeviceError> {
        let rec = self
            .records
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
        if !rec.hotplugged {
            return Err(DeviceError::NotRemovable(id.to_string()));
        }
        Ok(rec)
    }

    /// The devices in the slot of `path` (any function), by function.
    pub fn slot_records(&self, path: &PciPath) -> Vec<&DeviceRecord> {
        let slot = path.slot_path();
        let mut v: Vec<&DeviceRecord> = self
            .records
            .iter()
            .filter(|r| r.path.slot_path() == slot)
            .collect();
        v.sort_by_key(|r| r.path.last().function);
        v
    }

    /// Whether `rec` is a staged function: 1-7 of a slot without function
    /// 0 (the guest does not see it).
    pub fn is_staged(&self, rec: &DeviceRecord) -> bool {
        rec.path.last().function != 0
            && !self.records.iter().any(|r| r.path == rec.path.slot_path())
    }

    /// What removing device `id` takes (see [`placement::removal`]): its
    /// whole slot for function 0, the function alone while its slot is
    /// staged; a refusal for another function of a committed slot.
    pub fn removal(&self, id: &str) -> Result<placement::Removal, DeviceError> {
        let rec = self
            .records
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
        let occupied = |p: &PciPath| self.records.iter().any(|r| &r.path == p);
        placement::removal(&rec.path, &occupied).map_err(|e| match e {
            PlacementError::FunctionOfCommittedSlot {
                path,
                function,
                slot,
                ..
            } => {
                let slot_device = self
                    .records
                    .iter()
                    .find(|r| r.path == slot)
                    .map(|r| r.id.clone())
                    .unwrap_or_default();
                DeviceError::Placement(PlacementError::FunctionOfCommittedSlot {
                    path,
                    function,
                    slot,
                    slot_device,
                })
            }
            e => DeviceError::Placement(e),
        })
    }

    /// Detaches and frees the device `id` (slot, BARs, MSI-X routes and
    /// irqfds, ioeventfds, worker thread, files) and forgets it. Function
    /// 0 takes every function of its slot with it (the guest released the
    /// slot as a whole); the records freed are returned, function 0 first.
    pub fn remove(&mut self, id: &str) -> Result<Vec<DeviceRecord>, DeviceError> {
        let rec = self
            .records
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
        let ids: Vec<String> = if rec.path.last().function == 0 {
            self.slot_records(&rec.path)
                .iter()
                .map(|r| r.id.clone())
                .collect()
        } else {
            vec![id.to_string()]
        };
        let pci = self.pci()?;
        let mut freed = Vec::new();
        // The other functions first: function 0 keeps the slot visible to
        // the end.
        for id in ids.iter().rev() {
            let Some(idx) = self.records.iter().position(|r| &r.id == id) else {
                continue;
            };
            pci.remove(&self.records[idx].path)?;
            // The functions it left out go back to the host with it.
            self.held.retain(|(owner, _)| owner != id);
            freed.push(self.records.remove(idx));
        }
        freed.reverse();
        Ok(freed)
    }

    /// The API's view of the topology: the root bus and every port, with
    /// the bus numbers read back from the bridges and what fills each slot.
    pub fn topology_info(&self, plan: &HotplugPlan) -> Vec<TopologyNode> {
        let Some(pci) = &self.pci else {
            return Vec::new();
        };
        let occupant = |path: &PciPath| {
            self.records
                .iter()
                .find(|r| &r.path == path)
                .map(|r| r.id.clone())
        };
        let functions = |path: &PciPath| -> (Vec<FunctionInfo>, bool) {
            let v: Vec<FunctionInfo> = self
                .slot_records(path)
                .iter()
                .map(|r| FunctionInfo {
                    function: r.path.last().function,
                    pci_path: r.path.to_string(),
                    device: r.id.clone(),
                })
                .collect();
            let staged = !v.is_empty() && v.iter().all(|f| f.function != 0);
            (v, staged)
        };
        let mut nodes = Vec::new();
        let mut root_slots: Vec<SlotInfo> = Vec::new();
        for s in 1..32u8 {
            let Some(p) = PciManager::root_path(s) else {
                continue;
            };
            let port_here = pci.topology().port_at_path(&p).map(|n| n.id.clone());
            let device = occupant(&p).or(port_here);
            let (functions, staged) = functions(&p);
            if device.is_some() || !functions.is_empty() || plan.root_slots().contains(&s) {
                root_slots.push(SlotInfo {
                    slot: s,
                    pci_path: p.to_string(),
                    device,
                    functions,
                    staged,
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
                    let (functions, staged) = functions(&p);
                    Some(SlotInfo {
                        slot: *s,
                        device: occupant(&p),
                        pci_path: p.to_string(),
                        functions,
                        staged,
                    })
                })
                .chain(node.children.iter().filter_map(|c| {
                    let child = pci.topology().port(c)?;
                    Some(SlotInfo {
                        slot: child.path.last().slot,
                        pci_path: child.path.to_string(),
                        device: Some(child.id.clone()),
                        functions: Vec::new(),
                        staged: false,
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
                hotplug: node.hotplug.into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    /// A device manager with the default topology, its kernel VFIO
    /// devices looked up in the fake host under `dir`; `None` without KVM.
    fn manager(dir: &Path) -> Option<DeviceManager> {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return None;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let completions = CompletionQueue::new().unwrap();
        let mut dm =
            DeviceManager::new(&vm, &SerialOutput::Off, Instant::now(), completions.clone())
                .unwrap();
        // The default topology and a bridge with ACPI slots and an I/O
        // window (a port with several free slots).
        let mut ports = crate::config::default_ports();
        let mut br0 = pci::PortSpec::new("br0", pci::PortKind::PciBridge);
        br0.io_reserve = Some(0x1000);
        ports.push(br0);
        let cfg = crate::config::VmConfig {
            memory: 64 << 20,
            ports,
            ..Default::default()
        };
        let topology = cfg.topology().unwrap();
        let rest = topology.remaining_windows();
        let allocator = pci::BarAllocator::new(rest.io, rest.mmio32, Some(rest.mmio64)).unwrap();
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
            .unwrap();
        let pm = PciManager::new(
            dm.io.clone(),
            vm.clone(),
            crate::interrupts::GsiRouting::new(vm).unwrap(),
            allocator,
            vm_memory::GuestMemoryAtomic::new(mem),
            topology,
            completions,
        )
        .unwrap();
        dm.pci = Some(pm);
        dm.host_paths = HostPaths {
            sysfs: dir.join("sys"),
            dev_vfio: dir.join("dev/vfio"),
        };
        std::fs::create_dir_all(&dm.host_paths.dev_vfio).unwrap();
        // Fake functions: (bdf, driver, IOMMU group).
        for (bdf, driver, group) in [
            ("0000:03:00.0", Some("vfio-pci"), 3),
            ("0000:05:00.0", Some("nvme"), 5),
            ("0000:06:00.0", Some("vfio-pci"), 6),
            ("0000:06:00.1", Some("snd_hda_intel"), 6),
            // A 4-function device alone in group 9.
            ("0000:09:00.0", Some("vfio-pci"), 9),
            ("0000:09:00.1", Some("vfio-pci"), 9),
            ("0000:09:00.2", Some("vfio-pci"), 9),
            ("0000:09:00.3", Some("vfio-pci"), 9),
            // Two devices in group 10.
            ("0000:0a:00.0", Some("vfio-pci"), 10),
            ("0000:0b:00.0", Some("vfio-pci"), 10),
        ] {
            let d = dm.host_paths.sysfs.join("bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config"), [0u8; 64]).unwrap();
            std::fs::write(d.join("class"), "0x020000\n").unwrap();
            if let Some(drv) = driver {
                let dd = dm.host_paths.sysfs.join("bus/pci/drivers").join(drv);
                std::fs::create_dir_all(&dd).unwrap();
                symlink(&dd, d.join("driver")).unwrap();
            }
            let gd = dm
                .host_paths
                .sysfs
                .join("kernel/iommu_groups")
                .join(group.to_string());
            std::fs::create_dir_all(gd.join("devices")).unwrap();
            symlink(&gd, d.join("iommu_group")).unwrap();
            symlink(&d, gd.join("devices").join(bdf)).unwrap();
        }
        Some(dm)
    }

    fn device(path: &str, id: Option<&str>) -> DeviceConfig {
        DeviceConfig {
            path: path.into(),
            id: id.map(String::from),
            ..Default::default()
        }
    }

    /// A refused `vm.add-device` answers 4xx and changes nothing: the
    /// devices, the topology's slots, the VFIO container.
    #[test]
    fn refused_kernel_vfio_devices_change_nothing() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let Some(mut dm) = manager(t.as_path()) else {
            return;
        };
        let plan = HotplugPlan::new(dm.pci.as_ref().unwrap().topology(), &[]);
        dm.add_rng(&RngConfig::default(), true, &plan).unwrap();
        let devices = dm.device_info();
        let topology = dm.topology_info(&plan);
        let dev_vfio = dm.host_paths.dev_vfio.clone();
        let mut refuse = |cfg: DeviceConfig, kind: ApiErrorKind, needle: &str| {
            let e = dm.add_device(&cfg, true, &plan).unwrap_err();
            assert_eq!(e.api_kind(), kind, "{}: {e}", cfg.path);
            assert!(e.to_string().contains(needle), "{}: {e}", cfg.path);
            assert_eq!(dm.device_info(), devices);
            assert_eq!(dm.topology_info(&plan), topology);
            assert!(dm.vfio_container.upgrade().is_none());
        };
        refuse(
            device("/nonexistent", None),
            ApiErrorKind::BadRequest,
            "'/nonexistent' does not name a PCI function",
        );
        refuse(
            device("/sys/bus/pci/devices/0000:05:00.0", None),
            ApiErrorKind::BadRequest,
            "PCI function 0000:05:00.0 is bound to driver 'nvme', not vfio-pci",
        );
        refuse(
            device("/sys/bus/pci/devices/0000:06:00.0", None),
            ApiErrorKind::BadRequest,
            "IOMMU group 6 of 0000:06:00.0 is not viable: 0000:06:00.1 is bound to snd_hda_intel",
        );
        refuse(
            device("/sys/bus/pci/devices/0000:03:00.0", None),
            ApiErrorKind::BadRequest,
            "kernel VFIO is not available on this host",
        );
        // The id is checked first.
        refuse(
            device("/sys/bus/pci/devices/0000:03:00.0", Some("rng0")),
            ApiErrorKind::Conflict,
            "device id 'rng0' is already in use",
        );
        // With a fake /dev/vfio the checks pass; the KVM VFIO device is
        // created, and opening the container (the crate opens the real
        // /dev/vfio/vfio) fails on a host without kernel VFIO.
        std::fs::write(dev_vfio.join("vfio"), b"").unwrap();
        std::fs::write(dev_vfio.join("3"), b"").unwrap();
        let mut bad_port = device("/sys/bus/pci/devices/0000:03:00.0", None);
        bad_port.port = Some("nowhere".into());
        refuse(bad_port, ApiErrorKind::NotFound, "nowhere");
        if !Path::new("/dev/vfio/vfio").exists() {
            refuse(
                device("/sys/bus/pci/devices/0000:03:00.0", None),
                ApiErrorKind::BadRequest,
                "cannot open the VFIO container",
            );
        }
    }

    /// Whole host devices, partial assignment and IOMMU groups: every
    /// refusal answers 4xx and changes nothing (no device, slot, container
    /// or held function).
    #[test]
    fn refused_whole_device_and_group_requests_change_nothing() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let Some(mut dm) = manager(t.as_path()) else {
            return;
        };
        let plan = HotplugPlan::new(dm.pci.as_ref().unwrap().topology(), &[]);
        let rng = RngConfig {
            id: Some("gpu.f2".into()),
            ..Default::default()
        };
        dm.add_rng(&rng, true, &plan).unwrap();
        let devices = dm.device_info();
        let topology = dm.topology_info(&plan);
        let dev_vfio = dm.host_paths.dev_vfio.clone();
        let mut refuse = |cfg: DeviceConfig, kind: ApiErrorKind, needle: &str| {
            let e = dm.add_device(&cfg, true, &plan).unwrap_err();
            assert_eq!(e.api_kind(), kind, "{cfg:?}: {e}");
            assert!(e.to_string().contains(needle), "{cfg:?}: {e}");
            assert_eq!(dm.device_info(), devices);
            assert_eq!(dm.topology_info(&plan), topology);
            assert!(dm.vfio_container.upgrade().is_none());
            assert!(dm.held.is_empty());
        };
        let gpu = |id: Option<&str>| device("/sys/bus/pci/devices/0000:09:00.0", id);
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        refuse(
            DeviceConfig {
                assigned: Some(list(&["0000:09:00.0", "0000:09:00.2"])),
                ..gpu(None)
            },
            ApiErrorKind::BadRequest,
            "0000:09:00.1, 0000:09:00.3 left out of the guest without being named",
        );
        refuse(
            DeviceConfig {
                unassigned: list(&["0000:03:00.0"]),
                ..gpu(None)
            },
            ApiErrorKind::BadRequest,
            "0000:03:00.0 ('unassigned') is neither a function of host device 0000:09:00",
        );
        refuse(
            gpu(None),
            ApiErrorKind::BadRequest,
            "kernel VFIO is not available on this host",
        );
        for g in ["vfio", "9", "10"] {
            std::fs::write(dev_vfio.join(g), b"").unwrap();
        }
        // The functions' ids: `gpu.f2` is the rng's.
        refuse(
            gpu(Some("gpu")),
            ApiErrorKind::Conflict,
            "device id 'gpu.f2' is already in use",
        );
        refuse(
            DeviceConfig {
                function: Some(1),
                ..gpu(None)
            },
            ApiErrorKind::BadRequest,
            "this request takes whole host devices",
        );
        let group10 = |port: Option<&str>, pci_path: Option<&str>| DeviceConfig {
            port: port.map(String::from),
            pci_path: pci_path.map(String::from),
            ..device("/sys/bus/pci/devices/0000:0a:00.0", None)
        };
        // Two devices of one group: a switch by default (there is none).
        refuse(
            group10(None, None),
            ApiErrorKind::Conflict,
            "no free port for host IOMMU group 10 (2 slot(s))",
        );
        refuse(
            group10(None, Some("01/00")),
            ApiErrorKind::BadRequest,
            "it needs 2 slots",
        );
        refuse(
            group10(Some("rp0"), None),
            ApiErrorKind::Conflict,
            "every slot of port 'rp0'",
        );
        // The checks pass: opening the container fails on this host.
        if !Path::new("/dev/vfio/vfio").exists() {
            refuse(
                gpu(None),
                ApiErrorKind::BadRequest,
                "cannot open the VFIO container",
            );
            refuse(
                group10(Some("br0"), None),
                ApiErrorKind::BadRequest,
                "cannot open the VFIO container",
            );
        }
    }

    #[test]
    fn vm_info_shows_a_failed_back_end() {
        let watch = FailureWatch::default();
        let place = placement::Place {
            path: PciManager::root_path(5).unwrap(),
            port: None,
            mechanism: SlotMechanism::None,
        };
        let rec = DeviceRecord {
            host: Some(HostFunction {
                bdf: "0000:03:00.0".into(),
                group: 3,
            }),
            failure: Some(watch.clone()),
            ..DeviceRecord::new("nic".into(), DeviceKind::Vfio, place, true)
        };
        let info = rec.info(None);
        assert_eq!(info.state, Some(DeviceState::Ok));
        assert_eq!(info.error, None);
        assert_eq!(info.host_bdf.as_deref(), Some("0000:03:00.0"));
        assert_eq!(info.iommu_group, Some(3));
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["state"], "ok");
        assert!(json.get("error").is_none());
        assert!(json.get("unassigned").is_none());
        // The functions a request left out show on its first device.
        let holder = DeviceRecord {
            held: vec![HostFunction {
                bdf: "0000:03:00.1".into(),
                group: 3,
            }],
            ..rec.clone()
        };
        let json = serde_json::to_value(holder.info(None)).unwrap();
        assert_eq!(json["unassigned"], serde_json::json!(["0000:03:00.1"]));
        watch.record("BAR read: broken pipe".into());
        let json = serde_json::to_value(rec.info(None)).unwrap();
        assert_eq!(json["state"], "failed");
        assert_eq!(json["error"], "BAR read: broken pipe");
        // Devices without a back end have no state.
        let rng = DeviceRecord {
            kind: DeviceKind::Rng,
            host: None,
            failure: None,
            ..rec
        };
        let json = serde_json::to_value(rng.info(None)).unwrap();
        assert!(json.get("state").is_none() && json.get("host_bdf").is_none());
    }

    #[test]
    fn console_file_output_is_bounded() {
        let mut w = LimitedWriter::new(Vec::new(), 10, "test".into());
        w.write_all(b"hello ").unwrap();
        // Crosses the limit: the first 4 bytes pass, the rest is dropped.
        w.write_all(b"world!!").unwrap();
        assert_eq!(w.write(b"more").unwrap(), 4);
        for _ in 0..1000 {
            w.write_all(b"flood\n").unwrap();
        }
        w.flush().unwrap();
        assert_eq!(w.inner, b"hello worl");
        assert_eq!(w.write(b"").unwrap(), 0);
        // A limit of 0 drops everything.
        let mut z = LimitedWriter::new(Vec::new(), 0, "z".into());
        z.write_all(b"abc").unwrap();
        assert!(z.inner.is_empty());
    }
}

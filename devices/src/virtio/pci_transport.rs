//! The virtio-pci modern transport: a [`VirtioDevice`] exposed as a [`PciDevice`].
//!
//! PCI identity: vendor 0x1af4, device 0x1040 + virtio type, revision 1 (virtio 1.x only, no
//! legacy I/O BAR), subsystem 0x1af4:0x1100, class from [`VirtioDevice::pci_class`]. No INTx
//! pin: interrupts are MSI-X only, one vector per queue plus one for configuration changes.
//!
//! Everything lives in BAR 0, a 64-bit memory BAR of [`BAR_SIZE`] bytes:
//!
//! | offset   | region                                   |
//! |----------|------------------------------------------|
//! | 0x0000   | common configuration ([`super::common_config`]) |
//! | 0x1000   | ISR status (read clears)                 |
//! | 0x2000   | device-specific configuration            |
//! | 0x3000   | notifications, queue N at N * 4          |
//! | 0x4000   | MSI-X table                              |
//! | 0x6000   | MSI-X PBA                                |
//!
//! The capability list holds (optionally) a PCI Express capability, MSI-X, power management
//! and the virtio vendor capabilities (common, ISR, device, notify with
//! `notify_off_multiplier` = 4, and the PCI configuration access window).
//!
//! Notifications: each queue has an EventFd owned by the transport for its whole lifetime.
//! The VMM should register it as an ioeventfd at `BAR0 + queue_notify_offset(q)` (any write
//! size, no data match) so notifications never exit to user space; a notify write that does
//! reach [`PciDevice::write_bar`] signals the same EventFd. On DRIVER_OK the transport
//! validates the enabled queues and calls [`VirtioDevice::activate`] with duplicates of those
//! EventFds; writing 0 to device_status (or dropping the transport) calls
//! [`VirtioDevice::reset`], which joins the device's worker thread.

use std::any::Any;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use log::debug;
use pci::config::RawCapability;
use pci::{
    BarInfo, BarRegion, ConfigWriteOutcome, IntxInterrupt, IoEventNotifier, MsiInterruptGroup,
    MsixCapability, MsixConfig, PciBarConfig, PciConfigParams, PciConfiguration, PciDevice,
    PciError, PcieCapability, PciePortType, PmCapability,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::common_config::{CommonConfig, CommonWrite};
use super::interrupt::{VectorTable, VirtioInterrupt, VirtioPciInterrupt};
use super::{ActivateContext, ActiveQueue, GuestMemoryHandle, VirtioDevice};

/// Virtio PCI vendor ID.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID used for every virtio device.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// The BAR holding every virtio region.
pub const BAR_INDEX: usize = 0;
/// Size of that BAR.
pub const BAR_SIZE: u64 = 0x8000;
/// Common configuration offset in the BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// ISR offset in the BAR.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration offset in the BAR.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Notification area offset in the BAR.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between the notification addresses of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// MSI-X table offset in the BAR.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X PBA offset in the BAR.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_SIZE: u64 = 0x1000;
/// Maximum number of MSI-X vectors (table region size / entry size).
pub const MAX_MSIX_VECTORS: u16 = 0x2000 / 16;

/// Offset, within BAR 0, of the notification address of queue `queue`.
fn notify_offset(queue: u64) -> u64 {
    NOTIFY_OFFSET + queue * u64::from(NOTIFY_OFF_MULTIPLIER)
}

const VIRTIO_CAP_ID: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// Transport options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioPciOptions {
    /// Add a PCI Express capability of this type (and a 4 KiB configuration space):
    /// `RootComplexIntegratedEndpoint` on the root bus, `Endpoint` behind a root or switch
    /// port. `None` makes a conventional PCI function.
    pub pcie: Option<PciePortType>,
    /// Mark BAR 0 prefetchable.
    pub prefetchable: bool,
}

/// Errors building the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// PCI configuration error.
    #[error("PCI: {0}")]
    Pci(#[from] PciError),
    /// Queue setup error.
    #[error("virtqueue: {0}")]
    Queue(String),
    /// EventFd creation failed.
    #[error("eventfd: {0}")]
    Io(#[from] std::io::Error),
    /// Device description not usable by the transport.
    #[error("invalid device: {0}")]
    InvalidDevice(String),
}

fn virtio_cap(cfg_type: u8, offset: u32, length: u32, extra: Option<u32>) -> RawCapability {
    let cap_len = if extra.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, BAR_INDEX as u8, 0, 0, 0];
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    if let Some(x) = extra {
        body.extend_from_slice(&x.to_le_bytes());
    }
    RawCapability {
        id: VIRTIO_CAP_ID,
        body,
        writable: Vec::new(),
    }
}

/// A virtio device on the PCI transport.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    common: CommonConfig,
    msix: Arc<MsixConfig>,
    isr: Arc<AtomicU8>,
    config_generation: Arc<AtomicU8>,
    vectors: Arc<VectorTable>,
    queue_evts: Vec<EventFd>,
    mem: GuestMemoryHandle,
    pci_cfg_cap: usize,
    intx: Option<Arc<dyn IntxInterrupt>>,
    /// The guest read the identity register (it enumerated the function).
    enumerated: bool,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device.device_type())
            .field("status", &self.common.status())
            .field("config", &self.config)
            .finish()
    }
}

impl VirtioPciDevice {
    /// MSI-X vectors the transport uses for `device`: one per queue plus one for
    /// configuration changes. The interrupt group passed to [`VirtioPciDevice::new`] must
    /// have at least this many vectors.
    pub fn required_msix_vectors(device: &dyn VirtioDevice) -> u16 {
        device.queue_max_sizes().len() as u16 + 1
    }

    /// Wrap `device`. `msi` delivers its MSI-X vectors (see
    /// [`VirtioPciDevice::required_msix_vectors`]).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryHandle,
        msi: Arc<dyn MsiInterruptGroup>,
        opts: VirtioPciOptions,
    ) -> Result<Self, VirtioPciError> {
        let num_queues = device.queue_max_sizes().len();
        if num_queues == 0 || num_queues >= usize::from(MAX_MSIX_VECTORS) {
            return Err(VirtioPciError::InvalidDevice(format!(
                "{num_queues} queues"
            )));
        }
        let device_id = u16::try_from(device.device_type())
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or_else(|| VirtioPciError::InvalidDevice("device type".into()))?;
        if device.config_len() as u64 > REGION_SIZE {
            return Err(VirtioPciError::InvalidDevice(
                "config space too large".into(),
            ));
        }
        let num_vectors = Self::required_msix_vectors(device.as_ref());

        let mut params =
            PciConfigParams::device(VIRTIO_PCI_VENDOR_ID, device_id, device.pci_class());
        params.revision_id = 1;
        params.subsystem_vendor_id = VIRTIO_PCI_VENDOR_ID;
        params.subsystem_id = VIRTIO_PCI_SUBSYSTEM_ID;
        params.extended = opts.pcie.is_some();
        let mut config = PciConfiguration::new(params);
        config.add_bar(PciBarConfig::new(
            BAR_INDEX,
            BAR_SIZE,
            BarRegion::Mmio64,
            opts.prefetchable,
        )?)?;
        if let Some(pt) = opts.pcie {
            config.add_pcie_capability(&PcieCapability::new(pt))?;
        }
        let msix = Arc::new(MsixConfig::new(num_vectors, msi)?);
        let msix_cap = MsixCapability::new(
            num_vectors,
            BAR_INDEX as u8,
            MSIX_TABLE_OFFSET as u32,
            BAR_INDEX as u8,
            MSIX_PBA_OFFSET as u32,
        )?;
        config.add_msix_capability(&msix_cap, msix.clone())?;
        config.add_pm_capability(PmCapability::default())?;
        config.add_capability(&virtio_cap(
            CAP_COMMON,
            COMMON_CFG_OFFSET as u32,
            super::common_config::COMMON_CFG_LEN as u32,
            None,
        ))?;
        config.add_capability(&virtio_cap(CAP_ISR, ISR_OFFSET as u32, 1, None))?;
        if device.config_len() > 0 {
            config.add_capability(&virtio_cap(
                CAP_DEVICE,
                DEVICE_CFG_OFFSET as u32,
                device.config_len() as u32,
                None,
            ))?;
        }
        config.add_capability(&virtio_cap(
            CAP_NOTIFY,
            NOTIFY_OFFSET as u32,
            num_queues as u32 * NOTIFY_OFF_MULTIPLIER,
            Some(NOTIFY_OFF_MULTIPLIER),
        ))?;
        let pci_cfg_cap = config.add_capability(&virtio_cap(CAP_PCI_CFG, 0, 0, Some(0)))?;
        // bar, offset, length and pci_cfg_data are driver-writable.
        config.set_writable_mask(pci_cfg_cap + 4, &[0xff]);
        config.set_writable_mask(pci_cfg_cap + 8, &[0xff; 12]);

        let vectors = Arc::new(VectorTable::new(num_queues));
        let config_generation = Arc::new(AtomicU8::new(0));
        let common = CommonConfig::new(
            device.features(),
            device.queue_max_sizes(),
            vectors.clone(),
            num_vectors,
            config_generation.clone(),
        )
        .map_err(|e| VirtioPciError::Queue(e.to_string()))?;
        let queue_evts = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VirtioPciDevice {
            config,
            device,
            common,
            msix,
            isr: Arc::new(AtomicU8::new(0)),
            config_generation,
            vectors,
            queue_evts,
            mem,
            pci_cfg_cap,
            intx: None,
            enumerated: false,
        })
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queue_evts.len()
    }

    /// Offset, within BAR 0, of the notification address of `queue`.
    pub fn queue_notify_offset(&self, queue: u16) -> Option<u64> {
        (usize::from(queue) < self.num_queues()).then(|| notify_offset(u64::from(queue)))
    }

    /// The notification EventFd of `queue` (stable for the transport's lifetime).
    pub fn queue_eventfd(&self, queue: u16) -> Option<&EventFd> {
        self.queue_evts.get(usize::from(queue))
    }

    /// Every (offset within BAR 0, EventFd) pair to register as an ioeventfd.
    pub fn ioeventfds(&self) -> Vec<(u64, &EventFd)> {
        self.queue_evts
            .iter()
            .enumerate()
            .map(|(i, e)| (notify_offset(i as u64), e))
            .collect()
    }

    /// The MSI-X state (shared with the device's worker).
    pub fn msix(&self) -> &Arc<MsixConfig> {
        &self.msix
    }

    /// The PCI configuration space.
    pub fn config(&self) -> &PciConfiguration {
        &self.config
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The wrapped device, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Current device status.
    pub fn status(&self) -> u8 {
        self.common.status()
    }

    /// Whether the device has been activated (DRIVER_OK) and not reset since.
    pub fn is_active(&self) -> bool {
        self.device.is_active()
    }

    /// Reset the virtio device as if the driver wrote 0 to device_status: stop (join) the
    /// worker, reset queues and features. PCI state (BARs, MSI-X) is untouched. Use before
    /// unplug, or rely on drop.
    pub fn reset(&mut self) {
        self.device.reset();
        self.common.reset();
        self.isr.store(0, Ordering::Release);
    }

    /// Gives the device an INTx line (interrupt pin A), used while the
    /// driver has not enabled MSI-X. Call before the guest sees the device.
    pub fn set_intx(&mut self, intx: Arc<dyn IntxInterrupt>) {
        self.config.set_interrupt_pin(1);
        self.intx = Some(intx);
    }

    /// The ISR status (non-zero while a legacy interrupt is pending).
    pub fn isr(&self) -> Arc<AtomicU8> {
        self.isr.clone()
    }

    fn interrupt(&self) -> Arc<VirtioPciInterrupt> {
        Arc::new(VirtioPciInterrupt {
            msix: self.msix.clone(),
            intx: self.intx.clone(),
            isr: self.isr.clone(),
            vectors: self.vectors.clone(),
            config_generation: self.config_generation.clone(),
        })
    }

    fn fail(&mut self, why: &str) {
        crate::guest_error!("virtio-pci: device needs reset: {why}");
        self.common.set_needs_reset();
        if let Err(e) = self.interrupt().signal_config_change() {
            crate::guest_warn!("virtio-pci: cannot signal config change: {e}");
        }
    }

    fn activate(&mut self) {
        if self.device.is_active() {
            return;
        }
        let guard = self.mem.memory();
        let mut queues = Vec::new();
        for (i, q) in self.common.queues().iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&*guard) {
                drop(guard);
                self.fail(&format!("queue {i} is outside guest memory"));
                return;
            }
            let queue = match Queue::try_from(q.state()) {
                Ok(q) => q,
                Err(e) => {
                    drop(guard);
                    self.fail(&format!("queue {i}: {e}"));
                    return;
                }
            };
            let event = match self.queue_evts[i].try_clone() {
                Ok(e) => e,
                Err(e) => {
                    drop(guard);
                    self.fail(&format!("queue {i}: {e}"));
                    return;
                }
            };
            queues.push(ActiveQueue {
                index: i as u16,
                queue,
                event,
            });
        }
        drop(guard);
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt(),
            queues,
            acked_features: self.common.driver_features(),
        };
        if let Err(e) = self.device.activate(ctx) {
            self.fail(&e.to_string());
        }
        // Activation allocates the queues and the worker and frees what
        // building them took.
        crate::release_free_heap();
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        match self.common.write(offset, data) {
            CommonWrite::None => {}
            CommonWrite::Activate => self.activate(),
            CommonWrite::Reset => {
                self.device.reset();
                self.isr.store(0, Ordering::Release);
            }
            CommonWrite::Failed => self.device.reset(),
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let region = offset & !(REGION_SIZE - 1);
        let off = offset - region;
        if off + data.len() as u64 > REGION_SIZE && region < MSIX_TABLE_OFFSET {
            return;
        }
        match region {
            COMMON_CFG_OFFSET => self.common.read(off, data),
            ISR_OFFSET if off == 0 && !data.is_empty() => {
                data[0] = self.isr.swap(0, Ordering::AcqRel);
            }
            DEVICE_CFG_OFFSET => self.device.read_config(off, data),
            NOTIFY_OFFSET => {}
            _ if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&offset) => {
                self.msix.read_table(offset - MSIX_TABLE_OFFSET, data)
            }
            _ if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&offset) => {
                self.msix.read_pba(offset - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let region = offset & !(REGION_SIZE - 1);
        let off = offset - region;
        if off + data.len() as u64 > REGION_SIZE && region < MSIX_TABLE_OFFSET {
            return;
        }
        match region {
            COMMON_CFG_OFFSET => self.common_write(off, data),
            ISR_OFFSET => {}
            DEVICE_CFG_OFFSET => {
                if (off as usize) < self.device.config_len() {
                    self.device.write_config(off, data)
                }
            }
            NOTIFY_OFFSET => {
                let q = off / u64::from(NOTIFY_OFF_MULTIPLIER);
                if off.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) {
                    if let Some(evt) = self.queue_evts.get(q as usize) {
                        if let Err(e) = evt.write(1) {
                            crate::guest_error!("virtio-pci: notify queue {q}: {e}");
                        }
                    }
                }
            }
            _ if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&offset) => {
                self.msix.write_table(offset - MSIX_TABLE_OFFSET, data)
            }
            _ if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&offset) => {
                self.msix.write_pba(offset - MSIX_PBA_OFFSET, data)
            }
            _ => debug!("virtio-pci: ignored BAR write at {offset:#x}"),
        }
    }

    /// The BAR access selected by the PCI configuration access capability, if valid.
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.read_u8(cap + 4);
        let offset = u64::from(self.config.read_u32(cap + 8));
        let len = self.config.read_u32(cap + 12) as usize;
        (usize::from(bar) == BAR_INDEX
            && matches!(len, 1 | 2 | 4)
            && offset + len as u64 <= BAR_SIZE)
            .then_some((offset, len))
    }

    fn pci_cfg_data_reg(&self) -> usize {
        (self.pci_cfg_cap + 16) / 4
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.device.reset();
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if reg_idx == 0 {
            self.enumerated = true;
        }
        if reg_idx == self.pci_cfg_data_reg() {
            if let Some((offset, len)) = self.pci_cfg_target() {
                let mut b = [0u8; 4];
                self.bar_read(offset, &mut b[..len]);
                return u32::from_le_bytes(b);
            }
        }
        self.config.read_config_register(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> ConfigWriteOutcome {
        let out = self.config.write_config_register(reg_idx, offset, data);
        if reg_idx == self.pci_cfg_data_reg() {
            if let Some((bar_off, len)) = self.pci_cfg_target() {
                let v = self.config.read_u32(reg_idx * 4).to_le_bytes();
                self.bar_write(bar_off, &v[..len]);
            }
        }
        out
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        self.config.set_bar_address(index, addr)
    }

    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        if index != BAR_INDEX || data.len() > 8 || offset >= BAR_SIZE {
            data.fill(0xff);
            return;
        }
        self.bar_read(offset, data);
    }

    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        if index != BAR_INDEX || data.len() > 8 || offset >= BAR_SIZE {
            return;
        }
        self.bar_write(offset, data);
    }

    fn ioeventfds(&self) -> Vec<IoEventNotifier<'_>> {
        VirtioPciDevice::ioeventfds(self)
            .into_iter()
            .map(|(offset, fd)| IoEventNotifier {
                bar: BAR_INDEX,
                offset,
                fd,
            })
            .collect()
    }

    fn reset(&mut self) {
        VirtioPciDevice::reset(self)
    }

    fn pause(&mut self, timeout: std::time::Duration) -> bool {
        self.device.pause(timeout)
    }

    fn enumerated(&self) -> bool {
        self.enumerated
    }

    fn resume(&mut self) {
        self.device.resume()
    }

    fn msix(&self) -> Option<&MsixConfig> {
        Some(self.msix.as_ref())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
#[path = "pci_transport_tests.rs"]
mod tests;

//! [`VfioPciDevice`]: the passthrough PCI function the VMM places on its buses.

use std::any::Any;
use std::sync::Arc;

use pci::{
    BarInfo, BarRegion, ConfigWriteOutcome, HeaderType, IntxInterrupt, PciBarConfig,
    PciConfigParams, PciConfiguration, PciDevice, PciError,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{VfioBackend, CONFIG_REGION, INTX_IRQ};

/// Dwords of the type 0 header (0x00-0x3f), which are virtual.
const HEADER_DWORDS: usize = 16;
/// Dwords of the conventional configuration space.
const CONFIG_DWORDS: usize = 64;
/// Dword of the command and status registers.
const COMMAND_REG: usize = 1;
/// First BAR register.
const BAR0: usize = 0x10;
/// Number of BARs of a type 0 header.
const NUM_BARS: usize = 6;

/// Errors creating a passthrough function.
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    #[error("{0}: the device has no PCI configuration space region")]
    NoConfigRegion(String),
    #[error("{0}: cannot read the configuration space: {1}")]
    ReadConfig(String, #[source] std::io::Error),
    #[error("{0}: header type {1:#x} is not a PCI endpoint (type 0)")]
    NotEndpoint(String, u8),
    #[error("{dev}: BAR {index}: {what}")]
    Bar {
        dev: String,
        index: usize,
        what: String,
    },
    #[error("{dev}: BAR {index}: {source}")]
    BarConfig {
        dev: String,
        index: usize,
        #[source]
        source: PciError,
    },
    #[error("{0}: guest RAM at {1:#x} is not backed by a file (no memfd), it cannot be shared")]
    RamNotShared(String, u64),
    #[error("{0}: cannot map guest RAM for DMA: {1}")]
    DmaMap(String, #[source] std::io::Error),
    #[error("{0}: cannot set up INTx: {1}")]
    Intx(String, #[source] std::io::Error),
}

/// One BAR as the model placed it: the back end's region and its real size
/// (the BAR's size is that rounded up to a power of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bar {
    index: usize,
    region: BarRegion,
    /// Bytes of the region the back end implements.
    len: u64,
}

/// A host PCI function (or a vfio-user server's function) given to the guest.
pub struct VfioPciDevice {
    backend: Box<dyn VfioBackend>,
    name: String,
    config: PciConfiguration,
    bars: Vec<Bar>,
    intx: Option<Arc<dyn IntxInterrupt>>,
    /// Guest RAM given to the back end: (iova, size).
    dma: Vec<(u64, u64)>,
    enumerated: bool,
    /// Why the back end stopped answering; accesses then do nothing.
    failed: Option<String>,
    /// The back end's failure, for readers without the device's lock.
    watch: FailureWatch,
}

/// Whether a function's back end failed, readable from any thread without
/// the function's lock (which a vCPU may hold while it waits on the back
/// end): `vm.info` reads it. Set once, by the first failure; removing the
/// function is not a failure.
#[derive(Clone, Debug, Default)]
pub struct FailureWatch(Arc<std::sync::OnceLock<String>>);

impl FailureWatch {
    /// Why the back end failed, if it did.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// Records that the back end failed, and why; only the first failure
    /// is kept.
    pub fn record(&self, why: String) {
        let _ = self.0.set(why);
    }
}

/// How the device's BAR register `raw` says the BAR decodes.
pub(crate) fn bar_kind(raw: u32) -> (BarRegion, bool) {
    if raw & 1 == 1 {
        (BarRegion::Io, false)
    } else {
        let region = if (raw >> 1) & 3 == 2 {
            BarRegion::Mmio64
        } else {
            BarRegion::Mmio32
        };
        (region, raw & 8 != 0)
    }
}

/// The power-of-two BAR size covering a region of `len` bytes, or why the
/// region cannot be a BAR of that kind.
pub(crate) fn bar_size(region: BarRegion, len: u64) -> Result<u64, String> {
    let min = match region {
        BarRegion::Io => pci::bar::MIN_IO_BAR_SIZE,
        _ => pci::bar::MIN_MEM_BAR_SIZE,
    };
    let size = len
        .checked_next_power_of_two()
        .ok_or_else(|| format!("region of {len:#x} bytes is too large"))?
        .max(min);
    match region {
        BarRegion::Io if size > pci::bar::MAX_IO_BAR_SIZE => Err(format!(
            "I/O region of {len:#x} bytes is larger than the {:#x} an I/O BAR can decode",
            pci::bar::MAX_IO_BAR_SIZE
        )),
        BarRegion::Mmio32 if size > 1 << 31 => Err(format!(
            "32-bit memory region of {len:#x} bytes is too large"
        )),
        _ => Ok(size),
    }
}

impl VfioPciDevice {
    /// Builds the function from what `backend` reports: reads the device's
    /// identity and BAR types, sizes the BARs from the regions, gives all of
    /// `memory` to the back end for DMA and, when the device has an INTx pin
    /// and `intx` is given, has the back end signal that line's eventfd.
    /// Nothing is left mapped on error.
    pub fn new(
        mut backend: Box<dyn VfioBackend>,
        memory: &GuestMemoryMmap,
        intx: Option<Arc<dyn IntxInterrupt>>,
    ) -> Result<Self, VfioPciError> {
        let name = backend.describe();
        let cfg_len = match backend.region_info(CONFIG_REGION) {
            Some(r) if r.size >= 0x40 => r.size,
            _ => return Err(VfioPciError::NoConfigRegion(name)),
        };
        let mut header = [0u8; 0x40];
        backend
            .region_read(CONFIG_REGION, 0, &mut header)
            .map_err(|e| VfioPciError::ReadConfig(name.clone(), e))?;
        let u16_at = |o: usize| u16::from_le_bytes([header[o], header[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
        let header_type = header[0x0e] & 0x7f;
        if header_type != 0 {
            return Err(VfioPciError::NotEndpoint(name, header_type));
        }
        let pin = header[0x3d];
        let params = PciConfigParams {
            vendor_id: u16_at(0),
            device_id: u16_at(2),
            revision_id: header[8],
            class_code: u32_at(8) >> 8,
            subsystem_vendor_id: u16_at(0x2c),
            subsystem_id: u16_at(0x2e),
            header_type: HeaderType::Device,
            // The VMM routes every function's INTx as INTA (see `pci::intx`).
            interrupt_pin: u8::from(pin != 0 && intx.is_some()),
            extended: false,
        };
        let mut config = PciConfiguration::new(params);
        let mut bars = Vec::new();
        let mut index = 0;
        while index < NUM_BARS {
            let region = backend.region_info(index as u32).unwrap_or_default();
            if region.size == 0 {
                index += 1;
                continue;
            }
            let (kind, prefetchable) = bar_kind(u32_at(BAR0 + 4 * index));
            if kind == BarRegion::Mmio64 && index + 1 >= NUM_BARS {
                return Err(VfioPciError::Bar {
                    dev: name,
                    index,
                    what: "64-bit BAR in the last BAR register".into(),
                });
            }
            let size = bar_size(kind, region.size).map_err(|what| VfioPciError::Bar {
                dev: name.clone(),
                index,
                what,
            })?;
            let bar = PciBarConfig::new(index, size, kind, prefetchable).map_err(|source| {
                VfioPciError::BarConfig {
                    dev: name.clone(),
                    index,
                    source,
                }
            })?;
            config
                .add_bar(bar)
                .map_err(|source| VfioPciError::BarConfig {
                    dev: name.clone(),
                    index,
                    source,
                })?;
            bars.push(Bar {
                index,
                region: kind,
                len: region.size,
            });
            index += if kind == BarRegion::Mmio64 { 2 } else { 1 };
        }
        log::info!(
            "{name}: [{:04x}:{:04x}] class {:06x}, {} BAR(s), config space {cfg_len} bytes",
            u16_at(0),
            u16_at(2),
            u32_at(8) >> 8,
            bars.len()
        );
        let mut dev = VfioPciDevice {
            backend,
            name,
            config,
            bars,
            intx: None,
            dma: Vec::new(),
            enumerated: false,
            failed: None,
            watch: FailureWatch::default(),
        };
        if let Err(e) = dev.map_memory(memory) {
            dev.release();
            return Err(e);
        }
        if pin != 0 {
            if let Some(line) = intx {
                if let Some(fd) = line.eventfd() {
                    let mut r = dev.backend.set_irq_eventfds(INTX_IRQ, &[fd]);
                    if let (Ok(()), Some(resample)) = (&r, line.resample_eventfd()) {
                        r = dev.backend.set_intx_unmask(resample);
                    }
                    if let Err(e) = r {
                        // Disable what may have been enabled.
                        dev.intx = Some(line);
                        dev.release();
                        return Err(VfioPciError::Intx(dev.name.clone(), e));
                    }
                }
                dev.intx = Some(line);
            }
        }
        Ok(dev)
    }

    fn map_memory(&mut self, memory: &GuestMemoryMmap) -> Result<(), VfioPciError> {
        for region in memory.iter() {
            let iova = region.start_addr().0;
            let Some(fo) = region.file_offset() else {
                return Err(VfioPciError::RamNotShared(self.name.clone(), iova));
            };
            self.backend
                .dma_map(iova, region.len(), fo.file(), fo.start())
                .map_err(|e| VfioPciError::DmaMap(self.name.clone(), e))?;
            self.dma.push((iova, region.len()));
        }
        Ok(())
    }

    /// Takes back guest RAM and the interrupt from the back end, resets the
    /// function and closes the back end. Errors are logged: the function is
    /// going away.
    fn release(&mut self) {
        if self.failed.is_none() {
            if self.intx.is_some() {
                if let Err(e) = self.backend.set_irq_eventfds(INTX_IRQ, &[]) {
                    log::warn!("{}: cannot disable INTx: {e}", self.name);
                }
            }
            for (iova, size) in std::mem::take(&mut self.dma) {
                if let Err(e) = self.backend.dma_unmap(iova, size) {
                    log::warn!("{}: cannot unmap guest RAM at {iova:#x}: {e}", self.name);
                }
            }
            if let Err(e) = self.backend.reset() {
                log::warn!("{}: reset failed: {e}", self.name);
            }
        }
        self.backend.close();
        self.failed.get_or_insert_with(|| "removed".into());
    }

    /// The back end's description (socket path, host BDF).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why the back end stopped answering, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// A handle on the back end's failure, for `vm.info`.
    pub fn failure_watch(&self) -> FailureWatch {
        self.watch.clone()
    }

    fn fail(&mut self, what: &str, e: std::io::Error) {
        if self.failed.is_none() {
            log::error!(
                "{}: {what}: {e}; the device no longer answers the guest",
                self.name
            );
            let why = format!("{what}: {e}");
            self.watch.record(why.clone());
            self.failed = Some(why);
            self.backend.close();
        }
    }

    #[cfg(test)]
    pub(crate) fn inject_failure(&mut self) {
        self.fail("injected", std::io::Error::other("test"));
    }

    fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.iter().copied().find(|b| b.index == index)
    }

    fn device_config_read(&mut self, reg_idx: usize) -> u32 {
        if self.failed.is_some() {
            return u32::MAX;
        }
        let mut b = [0u8; 4];
        match self
            .backend
            .region_read(CONFIG_REGION, (reg_idx * 4) as u64, &mut b)
        {
            Ok(()) => u32::from_le_bytes(b),
            Err(e) => {
                self.fail("configuration read", e);
                u32::MAX
            }
        }
    }

    fn device_config_write(&mut self, offset: u64, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.backend.region_write(CONFIG_REGION, offset, data) {
            self.fail("configuration write", e);
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if reg_idx == 0 {
            self.enumerated = true;
        }
        match reg_idx {
            // The header is virtual (identity read once, BARs, command,
            // interrupt line, no capability list, no expansion ROM).
            0..HEADER_DWORDS => self.config.read_config_register(reg_idx),
            // Device-specific registers (capabilities hidden from the list
            // but their bytes still there) pass through.
            HEADER_DWORDS..CONFIG_DWORDS => self.device_config_read(reg_idx),
            // No extended space; beyond 4 KiB is all-ones.
            _ => self.config.read_config_register(reg_idx),
        }
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> ConfigWriteOutcome {
        if !matches!(data.len(), 1 | 2 | 4) || offset >= 4 || offset as usize + data.len() > 4 {
            return ConfigWriteOutcome::default();
        }
        match reg_idx {
            0..HEADER_DWORDS => {
                let out = self.config.write_config_register(reg_idx, offset, data);
                // The device sees the command register (decodes, bus
                // master, INTx disable), never the status half.
                if reg_idx == COMMAND_REG && offset < 2 {
                    let cmd = self.config.command().to_le_bytes();
                    self.device_config_write(4, &cmd);
                }
                out
            }
            HEADER_DWORDS..CONFIG_DWORDS => {
                self.device_config_write(reg_idx as u64 * 4 + offset, data);
                ConfigWriteOutcome::default()
            }
            _ => ConfigWriteOutcome::default(),
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        self.config.set_bar_address(index, addr)
    }

    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        let inside = self
            .bar(index)
            .is_some_and(|b| offset.saturating_add(data.len() as u64) <= b.len);
        if !inside || data.len() > 8 || self.failed.is_some() {
            data.fill(0xff);
            return;
        }
        if let Err(e) = self.backend.region_read(index as u32, offset, data) {
            data.fill(0xff);
            self.fail("BAR read", e);
        }
    }

    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        let inside = self
            .bar(index)
            .is_some_and(|b| offset.saturating_add(data.len() as u64) <= b.len);
        if !inside || data.len() > 8 || self.failed.is_some() {
            return;
        }
        if let Err(e) = self.backend.region_write(index as u32, offset, data) {
            self.fail("BAR write", e);
        }
    }

    fn reset(&mut self) {
        self.release();
    }

    fn enumerated(&self) -> bool {
        self.enumerated
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.backend.close();
    }
}

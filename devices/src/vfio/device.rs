//! [`VfioPciDevice`]: the passthrough PCI function the VMM places on its buses.

use std::any::Any;
use std::sync::Arc;

use pci::msi::{MSI_CAP_ID, MSI_CTL_ENABLE};
use pci::msix::{MSIX_CAP_ID, MSIX_CTL_ENABLE, MSIX_CTL_FUNCTION_MASK};
use pci::{
    BarInfo, BarRegion, ConfigWriteOutcome, DirectArea, HeaderType, HostMapping, IntxInterrupt,
    MsiCapability, MsiConfig, MsiInterruptGroup, MsixCapability, MsixConfig, PciBarConfig,
    PciConfigParams, PciConfiguration, PciDevice, PciError,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{
    VfioBackend, CONFIG_REGION, INTX_IRQ, MSIX_IRQ, MSI_IRQ, REGION_MMAP, REGION_READ, REGION_WRITE,
};

/// Makes the MSI interrupt group of a function with the given number of
/// vectors (the VMM: one KVM GSI and irqfd per vector). The back end
/// signals the vectors' notifier eventfds directly, so the group must not
/// deliver a masked vector's signals: it unregisters a vector's irqfd while
/// the vector is masked (`update` with `masked`) and registers it again on
/// unmask, and its eventfds are non-blocking (the model reads a masked
/// vector's count to fill the PBA).
pub type MsiGroupFactory<'a> = &'a dyn Fn(u16) -> std::io::Result<Arc<dyn MsiInterruptGroup>>;

/// Status register bit (in the command/status dword): capability list.
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Dword holding the capabilities pointer (0x34).
const CAP_PTR_REG: usize = 0x34 / 4;
/// Most capabilities the walk of the device's list visits (a list in
/// 192 bytes holds at most 48); a longer or cyclic list is cut there.
const MAX_CAPS: usize = 48;
/// Bytes of the MSI-X capability.
const MSIX_CAP_LEN: usize = 12;
/// Capability ID of a vendor-specific capability (virtio-pci describes
/// its register blocks with them).
pub const VENDOR_CAP_ID: u8 = 0x09;

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
    #[error("{0}: cannot create the {1} interrupt group: {2}")]
    Msi(String, &'static str, #[source] std::io::Error),
}

/// The device's MSI-X capability as the guest sees it: control word and
/// table virtual, table and PBA emulated (never forwarded to the device).
struct Msix {
    /// Offset of the capability in configuration space.
    offset: usize,
    cap: MsixCapability,
    config: MsixConfig,
}

/// The device's MSI capability as the guest sees it: all registers
/// virtual (the back end is told the enabled vectors through its MSI
/// interrupt index, never through these registers).
struct Msi {
    /// Offset of the capability in configuration space.
    offset: usize,
    cap: MsiCapability,
    config: MsiConfig,
    /// The capability's bytes as the guest wrote them (`cap.len()` bytes,
    /// ID and next included; the next byte is relinked on read).
    regs: Vec<u8>,
    /// Writable bits of `regs`.
    writable: Vec<u8>,
}

impl Msi {
    fn reg(&self, at: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        if let Some(src) = self.regs.get(at..at + len) {
            b[..len].copy_from_slice(src);
        }
        u32::from_le_bytes(b)
    }

    fn control(&self) -> u16 {
        self.reg(MsiCapability::CONTROL, 2) as u16
    }

    /// Vectors the guest enabled, 0 when MSI is off.
    fn wanted(&self) -> u16 {
        if self.control() & MSI_CTL_ENABLE == 0 {
            0
        } else {
            self.config.vectors_enabled()
        }
    }

    /// Pushes the registers to the delivery state (routes, masks).
    fn apply(&self) {
        let addr = u64::from(self.reg(MsiCapability::ADDR_LO, 4))
            | self
                .cap
                .addr_hi_offset()
                .map_or(0, |o| u64::from(self.reg(o, 4)) << 32);
        let data = self.reg(self.cap.data_offset(), 2) as u16;
        let mask = self.cap.mask_offset().map_or(0, |o| self.reg(o, 4));
        self.config
            .registers_written(self.control(), addr, data, mask);
    }

    /// Like [`Msix::collect_pending`]: signals of masked vectors counted in
    /// their (unregistered) eventfds become pending bits.
    fn pending(&self) -> u32 {
        let wanted = self.wanted();
        let mask = self.cap.mask_offset().map_or(0, |o| self.reg(o, 4));
        for v in 0..wanted.min(32) {
            if mask & (1 << v) == 0 {
                continue;
            }
            if let Some(fd) = self.config.group().notifier(v) {
                if fd.read().is_ok_and(|n| n > 0) {
                    // Masked: this only sets the pending bit.
                    let _ = self.config.trigger(v);
                }
            }
        }
        self.config.pending_bits()
    }
}

/// Which interrupt the back end signals: the modes are exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IrqMode {
    /// INTx (or nothing, for a function without a line).
    Intx,
    /// MSI with this many vectors.
    Msi(u16),
    /// MSI-X, every vector of the table.
    Msix,
}

impl Msix {
    fn table_range(&self) -> (usize, u64, u64) {
        let start = u64::from(self.cap.table_offset);
        (
            usize::from(self.cap.table_bar),
            start,
            start + self.cap.table_len(),
        )
    }

    fn pba_range(&self) -> (usize, u64, u64) {
        let start = u64::from(self.cap.pba_offset);
        (
            usize::from(self.cap.pba_bar),
            start,
            start + self.cap.pba_len(),
        )
    }

    /// Before a PBA read of `len` bytes at `offset`: a masked vector's
    /// eventfd is not registered with the hypervisor (see
    /// [`MsiGroupFactory`]), so what the device signalled while it was
    /// masked is still counted there. Those counts become the vectors'
    /// pending bits; unmasking such a vector then delivers it once.
    fn collect_pending(&self, offset: u64, len: usize) {
        if !self.config.enabled() {
            return;
        }
        let first = offset.saturating_mul(8);
        let end = offset
            .saturating_add(len as u64)
            .saturating_mul(8)
            .min(u64::from(self.cap.table_size));
        let function_masked = self.config.function_masked();
        for v in first..end {
            let v = v as u16;
            let masked = function_masked || self.config.entry(v).is_some_and(|e| e.masked());
            if !masked {
                continue;
            }
            if let Some(fd) = self.config.group().notifier(v) {
                if fd.read().is_ok_and(|n| n > 0) {
                    // Masked: this only sets the pending bit.
                    let _ = self.config.trigger(v);
                }
            }
        }
    }

    fn control(&self) -> u16 {
        let mut c = self.cap.table_size - 1;
        if self.config.enabled() {
            c |= MSIX_CTL_ENABLE;
        }
        if self.config.function_masked() {
            c |= MSIX_CTL_FUNCTION_MASK;
        }
        c
    }

    /// The capability's three dwords as the guest reads them (`next` is
    /// the relinked list's next pointer).
    fn dword(&self, index: usize, next: u8) -> u32 {
        match index {
            0 => u32::from(MSIX_CAP_ID) | u32::from(next) << 8 | u32::from(self.control()) << 16,
            1 => self.cap.table_offset | u32::from(self.cap.table_bar),
            _ => self.cap.pba_offset | u32::from(self.cap.pba_bar),
        }
    }
}

/// Which of a BAR's bytes an access touches: the emulated MSI-X table,
/// the PBA, or neither.
enum BarTarget {
    Table(u64),
    Pba(u64),
    /// Overlaps the table or PBA without starting in it: dropped.
    Straddle,
    Device,
}

/// Walks the capability list of `config` (the device's conventional
/// configuration space, 256 bytes) from the pointer at 0x34 and returns
/// each capability as (offset, id). Pointers into the header or past the
/// end end the walk, as does a capability seen twice (a cycle) or more
/// than [`MAX_CAPS`] of them.
pub(crate) fn walk_capabilities(config: &[u8; 256]) -> Vec<(usize, u8)> {
    let mut caps: Vec<(usize, u8)> = Vec::new();
    if u32::from(config[6]) << 16 & STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut ptr = usize::from(config[0x34] & 0xfc);
    while ptr != 0 && caps.len() < MAX_CAPS {
        if !(0x40..=0xfc).contains(&ptr) || caps.iter().any(|&(o, _)| o == ptr) {
            break;
        }
        caps.push((ptr, config[ptr]));
        ptr = usize::from(config[ptr + 1] & 0xfc);
    }
    caps
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

/// Part of a BAR mmap-ed from the back end's descriptor (`MAP_SHARED`);
/// unmapped when the last handle goes (the VMM holds one while the area is
/// a KVM memory slot, so it is unmapped only once the slot is gone).
#[derive(Debug)]
struct MmapArea {
    addr: u64,
    size: u64,
    writable: bool,
}

impl HostMapping for MmapArea {
    fn host_addr(&self) -> u64 {
        self.addr
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn writable(&self) -> bool {
        self.writable
    }
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: `addr..addr + size` is the mapping `mmap` returned for this
        // value, unmapped only here; every user (the VMM's memory slot) held
        // a handle, so none is left.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size as usize) };
    }
}

/// The host's page size.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// Which byte ranges (offset, size) of a BAR whose region has `len` bytes
/// are mapped into the guest: the union of the back end's mmap-able
/// `areas` (clipped to the region), less every page that holds a byte of
/// `excluded` (the MSI-X table and PBA, which stay trapped), each piece
/// rounded inward to whole pages of `page` bytes. Sorted, disjoint.
pub(crate) fn direct_ranges(
    len: u64,
    areas: &[(u64, u64)],
    excluded: &[(u64, u64)],
    page: u64,
) -> Vec<(u64, u64)> {
    let down = |x: u64| x & !(page - 1);
    let up = |x: u64| x.checked_add(page - 1).map(down);
    // Page-aligned (start, end) of each area, clipped, then merged.
    let mut spans: Vec<(u64, u64)> = areas
        .iter()
        .filter_map(|&(o, s)| {
            let end = down(o.checked_add(s)?.min(len));
            let start = up(o)?;
            (start < end).then_some((start, end))
        })
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    for &(o, s) in excluded {
        if s == 0 {
            continue;
        }
        let ex_start = down(o);
        let ex_end = o.checked_add(s).and_then(up).unwrap_or(u64::MAX);
        merged = merged
            .into_iter()
            .flat_map(|(s, e)| {
                if ex_end <= s || ex_start >= e {
                    return vec![(s, e)];
                }
                [(s, ex_start.max(s)), (ex_end.min(e), e)]
                    .into_iter()
                    .filter(|(a, b)| a < b)
                    .collect()
            })
            .collect();
    }
    merged.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// The length of `fd` when it is a regular file (a vfio-user server's
/// memfd or file); `None` for anything else, such as kernel VFIO's device
/// descriptor, whose regions the kernel itself sizes.
fn regular_file_len(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
    let meta = file.metadata().ok()?;
    meta.file_type().is_file().then_some(meta.len())
}

/// Maps the parts of memory BARs the back end lets be mmap-ed (see
/// [`direct_ranges`]), once. Anything that cannot be mapped stays trapped
/// (logged): this never fails the function.
fn map_direct(
    backend: &dyn VfioBackend,
    name: &str,
    bars: &[Bar],
    msix: Option<&Msix>,
) -> Vec<DirectArea> {
    let page = page_size();
    let mut out = Vec::new();
    for bar in bars.iter().filter(|b| b.region != BarRegion::Io) {
        let Some(info) = backend.region_info(bar.index as u32) else {
            continue;
        };
        if info.flags & REGION_MMAP == 0 || info.flags & REGION_READ == 0 {
            continue;
        }
        let Some(m) = backend.region_mmap(bar.index as u32) else {
            continue;
        };
        let excluded: Vec<(u64, u64)> = msix
            .into_iter()
            .flat_map(|x| [x.table_range(), x.pba_range()])
            .filter(|&(b, _, _)| b == bar.index)
            .map(|(_, start, end)| (start, end - start))
            .collect();
        let writable = info.flags & REGION_WRITE != 0;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let file_len = regular_file_len(m.fd);
        for (offset, size) in direct_ranges(bar.len, &m.areas, &excluded, page) {
            let file_offset = m
                .offset
                .checked_add(offset)
                .filter(|o| o % page == 0)
                .and_then(|o| libc::off_t::try_from(o).ok());
            let (Some(file_offset), Ok(len)) = (file_offset, usize::try_from(size)) else {
                log::warn!(
                    "{name}: BAR {}: area at {offset:#x} is not page-aligned in the file; trapped",
                    bar.index
                );
                continue;
            };
            // Pages past the end of a file cannot be faulted in: the
            // guest's access would fail in KVM_RUN and stop the VM.
            if let Some(flen) = file_len {
                if (file_offset as u64).saturating_add(size) > flen {
                    log::warn!(
                        "{name}: BAR {}: area at {offset:#x} ({size:#x} bytes) ends past the \
                         end of the server's file ({flen:#x} bytes); trapped",
                        bar.index
                    );
                    continue;
                }
            }
            // SAFETY: a new shared mapping chosen by the kernel (no address
            // given), of a descriptor that is open for the whole call; the
            // result is checked, and owned by the `MmapArea` from here on.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_SHARED,
                    std::os::fd::AsRawFd::as_raw_fd(&m.fd),
                    file_offset,
                )
            };
            if addr == libc::MAP_FAILED {
                log::warn!(
                    "{name}: BAR {}: cannot mmap {size:#x} bytes at {offset:#x}: {}; trapped",
                    bar.index,
                    std::io::Error::last_os_error()
                );
                continue;
            }
            log::info!(
                "{name}: BAR {}: {size:#x} bytes at {offset:#x} mapped for the guest{}",
                bar.index,
                if writable { "" } else { " (read-only)" }
            );
            out.push(DirectArea {
                bar: bar.index,
                offset,
                mapping: Arc::new(MmapArea {
                    addr: addr as u64,
                    size,
                    writable,
                }),
            });
        }
    }
    out
}

/// A host PCI function (or a vfio-user server's function) given to the guest.
pub struct VfioPciDevice {
    backend: Box<dyn VfioBackend>,
    name: String,
    config: PciConfiguration,
    bars: Vec<Bar>,
    intx: Option<Arc<dyn IntxInterrupt>>,
    /// The MSI-X capability offered to the guest, if any.
    msix: Option<Msix>,
    /// The MSI capability offered to the guest, if any.
    msi: Option<Msi>,
    /// Offsets of the capabilities offered, in the device's list order:
    /// the guest's capability list links them in that order. Those that are
    /// not the MSI or MSI-X capability are vendor-specific: read from the
    /// device (but for their next pointer) and written to it.
    caps: Vec<usize>,
    /// The interrupt the back end signals.
    mode: IrqMode,
    /// Guest RAM given to the back end: (iova, size).
    dma: Vec<(u64, u64)>,
    /// Parts of BARs mapped for the guest (see [`map_direct`]).
    direct: Vec<DirectArea>,
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

/// Builds the emulation of the MSI-X capability at `offset` of `space` (the
/// device's configuration space) if it is usable: the back end has MSI-X
/// interrupts, the table and PBA lie inside memory BARs the model placed.
/// The interrupt group comes from `factory`. An unusable capability is
/// hidden (logged), not an error.
fn find_msix(
    space: &[u8; 256],
    offset: usize,
    backend: &mut dyn VfioBackend,
    name: &str,
    bars: &[Bar],
    factory: MsiGroupFactory<'_>,
) -> Result<Option<Msix>, VfioPciError> {
    if offset + MSIX_CAP_LEN > space.len() {
        log::warn!(
            "{name}: MSI-X capability at {offset:#x} runs past the configuration space; hidden"
        );
        return Ok(None);
    }
    let dw = |o: usize| u32::from_le_bytes([space[o], space[o + 1], space[o + 2], space[o + 3]]);
    let control = u16::from_le_bytes([space[offset + 2], space[offset + 3]]);
    let table = dw(offset + 4);
    let pba = dw(offset + 8);
    let count = backend.irq_info(MSIX_IRQ).map(|i| i.count).unwrap_or(0);
    let size = (u32::from(control & 0x7ff) + 1).min(count);
    if size == 0 {
        log::warn!("{name}: the back end offers no MSI-X interrupts; MSI-X hidden");
        return Ok(None);
    }
    let cap = match MsixCapability::new(
        size as u16,
        (table & 7) as u8,
        table & !7,
        (pba & 7) as u8,
        pba & !7,
    ) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("{name}: MSI-X capability: {e}; hidden");
            return Ok(None);
        }
    };
    let fits = |bar: u8, start: u32, len: u64| {
        bars.iter().any(|b| {
            b.index == usize::from(bar)
                && b.region != BarRegion::Io
                && u64::from(start) + len <= b.len
        })
    };
    if !fits(cap.table_bar, cap.table_offset, cap.table_len())
        || !fits(cap.pba_bar, cap.pba_offset, cap.pba_len())
    {
        log::warn!("{name}: MSI-X table or PBA outside its BAR; MSI-X hidden");
        return Ok(None);
    }
    let group =
        factory(cap.table_size).map_err(|e| VfioPciError::Msi(name.to_string(), "MSI-X", e))?;
    let config = MsixConfig::new(cap.table_size, group).map_err(|e| {
        VfioPciError::Msi(
            name.to_string(),
            "MSI-X",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(Some(Msix {
        offset,
        cap,
        config,
    }))
}

/// Builds the emulation of the MSI capability at `offset` of `space` if it
/// is usable: the back end has MSI interrupts (the guest sees as many
/// vectors as both the capability and the back end allow, a power of two).
/// The interrupt group comes from `factory`. An unusable capability is
/// hidden (logged), not an error.
fn find_msi(
    space: &[u8; 256],
    offset: usize,
    backend: &mut dyn VfioBackend,
    name: &str,
    factory: MsiGroupFactory<'_>,
) -> Result<Option<Msi>, VfioPciError> {
    let Some(&[lo, hi]) = space.get(offset + 2..offset + 4) else {
        return Ok(None);
    };
    let control = u16::from_le_bytes([lo, hi]);
    let claimed = 1u32 << ((control >> 1) & 7).min(5);
    let count = backend.irq_info(MSI_IRQ).map(|i| i.count).unwrap_or(0);
    let vectors = claimed.min(count);
    if vectors == 0 {
        log::warn!("{name}: the back end offers no MSI interrupts; MSI hidden");
        return Ok(None);
    }
    // The largest power of two both allow (at most 32).
    let vectors = 1u8 << (31 - vectors.leading_zeros());
    let cap = match MsiCapability::new(vectors, control & (1 << 7) != 0, control & (1 << 8) != 0) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("{name}: MSI capability: {e}; hidden");
            return Ok(None);
        }
    };
    if offset + cap.len() > space.len() {
        log::warn!(
            "{name}: MSI capability at {offset:#x} runs past the configuration space; hidden"
        );
        return Ok(None);
    }
    let group =
        factory(u16::from(vectors)).map_err(|e| VfioPciError::Msi(name.to_string(), "MSI", e))?;
    let mut regs = vec![MSI_CAP_ID, 0];
    regs.extend(cap.body());
    let mut writable = vec![0, 0];
    writable.extend(cap.writable_mask());
    Ok(Some(Msi {
        offset,
        cap,
        config: MsiConfig::new(cap, group),
        regs,
        writable,
    }))
}

impl VfioPciDevice {
    /// Builds the function from what `backend` reports: reads the device's
    /// identity and BAR types, sizes the BARs from the regions, gives all of
    /// `memory` to the back end for DMA and, when the device has an INTx pin
    /// and `intx` is given, has the back end signal that line's eventfd.
    /// With `msi`, a device's usable MSI and MSI-X capabilities (the back
    /// end has such interrupts; for MSI-X, the table and PBA lie in memory
    /// BARs) are offered to the guest, each with an interrupt group `msi`
    /// makes for its vectors; vendor-specific capabilities are offered as
    /// the device has them; all other capabilities are hidden. Nothing is
    /// left mapped on error.
    pub fn new(
        mut backend: Box<dyn VfioBackend>,
        memory: &GuestMemoryMmap,
        intx: Option<Arc<dyn IntxInterrupt>>,
        msi: Option<MsiGroupFactory<'_>>,
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
        let (mut msix, mut msi_cap, mut caps) = (None, None, Vec::new());
        if cfg_len >= 256 {
            let mut space = [0u8; 256];
            backend
                .region_read(CONFIG_REGION, 0, &mut space)
                .map_err(|e| VfioPciError::ReadConfig(name.clone(), e))?;
            for (offset, id) in walk_capabilities(&space) {
                match (id, msi) {
                    (MSIX_CAP_ID, Some(factory)) if msix.is_none() => {
                        msix = find_msix(&space, offset, &mut *backend, &name, &bars, factory)?;
                        if msix.is_some() {
                            caps.push(offset);
                        }
                    }
                    (MSI_CAP_ID, Some(factory)) if msi_cap.is_none() => {
                        msi_cap = find_msi(&space, offset, &mut *backend, &name, factory)?;
                        if msi_cap.is_some() {
                            caps.push(offset);
                        }
                    }
                    (VENDOR_CAP_ID, _) => caps.push(offset),
                    _ => {}
                }
            }
            // A vendor capability inside an emulated one (a malformed
            // list) would read as the emulated bytes: not offered.
            let emulated = |o: usize| {
                msix.as_ref()
                    .is_some_and(|m: &Msix| (m.offset..m.offset + MSIX_CAP_LEN).contains(&o))
                    || msi_cap
                        .as_ref()
                        .is_some_and(|m: &Msi| (m.offset..m.offset + m.regs.len()).contains(&o))
            };
            let own = |o: usize| {
                msix.as_ref().is_some_and(|m: &Msix| m.offset == o)
                    || msi_cap.as_ref().is_some_and(|m: &Msi| m.offset == o)
            };
            caps.retain(|&o| own(o) || !emulated(o));
        }
        log::info!(
            "{name}: [{:04x}:{:04x}] class {:06x}, {} BAR(s), config space {cfg_len} bytes{}",
            u16_at(0),
            u16_at(2),
            u32_at(8) >> 8,
            bars.len(),
            match (&msix, &msi_cap) {
                (None, None) => ", INTx only".to_string(),
                (x, m) => format!(
                    ", MSI {} vector(s), MSI-X {} vector(s)",
                    m.as_ref().map_or(0, |m| m.cap.max_vectors),
                    x.as_ref().map_or(0, |x| x.cap.table_size)
                ),
            }
        );
        let direct = map_direct(&*backend, &name, &bars, msix.as_ref());
        let mut dev = VfioPciDevice {
            direct,
            backend,
            name,
            config,
            bars,
            msix,
            msi: msi_cap,
            caps,
            mode: IrqMode::Intx,
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
        // The VMM has taken the areas out of the guest before a removal; it
        // holds its own handle while they are in, so nothing is unmapped
        // under the guest.
        self.direct.clear();
        if self.failed.is_none() {
            let off = match self.mode {
                IrqMode::Intx => None,
                IrqMode::Msi(_) => Some((MSI_IRQ, "MSI")),
                IrqMode::Msix => Some((MSIX_IRQ, "MSI-X")),
            };
            if let Some((index, what)) = off {
                if let Err(e) = self.backend.set_irq_eventfds(index, &[]) {
                    log::warn!("{}: cannot disable {what}: {e}", self.name);
                }
            }
            self.mode = IrqMode::Intx;
            if let Some(m) = &self.msix {
                m.config.reset();
            }
            if let Some(m) = &mut self.msi {
                m.regs[2..].copy_from_slice(&m.cap.body());
                m.apply();
            }
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

    /// Where an access of `len` bytes at `offset` of BAR `index` goes.
    fn bar_target(&self, index: usize, offset: u64, len: usize) -> BarTarget {
        let Some(m) = &self.msix else {
            return BarTarget::Device;
        };
        let end = offset.saturating_add(len as u64);
        for (range, table) in [(m.table_range(), true), (m.pba_range(), false)] {
            let (bar, start, stop) = range;
            if bar != index || end <= start || offset >= stop {
                continue;
            }
            if offset < start {
                return BarTarget::Straddle;
            }
            return if table {
                BarTarget::Table(offset - start)
            } else {
                BarTarget::Pba(offset - start)
            };
        }
        BarTarget::Device
    }

    /// Whether the guest has MSI-X enabled (the back end signals MSI-X).
    pub fn msix_enabled(&self) -> bool {
        self.mode == IrqMode::Msix
    }

    /// The MSI vectors the back end signals (0: MSI is off).
    pub fn msi_vectors(&self) -> u16 {
        match self.mode {
            IrqMode::Msi(n) => n,
            _ => 0,
        }
    }

    /// The next capability offered after the one at `offset` (0: last).
    fn next_cap(&self, offset: usize) -> u8 {
        let mut it = self.caps.iter().skip_while(|&&o| o != offset);
        it.next();
        it.next().map_or(0, |&o| o as u8)
    }

    /// The guest wrote the MSI-X message control word: follow the enable
    /// and function mask bits.
    fn msix_control_written(&mut self, control: u16) {
        if self.failed.is_some() {
            return;
        }
        if let Some(m) = &self.msix {
            m.config.set_control(
                control & MSIX_CTL_ENABLE != 0,
                control & MSIX_CTL_FUNCTION_MASK != 0,
            );
        }
        self.follow_guest_mode();
    }

    /// The guest wrote `data` at byte `rel` of the MSI capability.
    fn msi_written(&mut self, rel: usize, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if let Some(m) = &mut self.msi {
            for (i, &b) in data.iter().enumerate() {
                if let (Some(r), Some(&w)) = (m.regs.get_mut(rel + i), m.writable.get(rel + i)) {
                    *r = (*r & !w) | (b & w);
                }
            }
            m.apply();
        }
        self.follow_guest_mode();
    }

    /// Switches the back end to the interrupt the guest enabled: MSI-X,
    /// else MSI, else INTx. If the guest enables both MSI and MSI-X (which
    /// the specification forbids), the one already in use stays.
    fn follow_guest_mode(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let msix = self.msix.as_ref().is_some_and(|m| m.config.enabled());
        let msi = self.msi.as_ref().map_or(0, |m| m.wanted());
        let wanted = match (msix, msi) {
            (true, n) if n > 0 && matches!(self.mode, IrqMode::Msi(_)) => self.mode,
            (true, _) => IrqMode::Msix,
            (false, 0) => IrqMode::Intx,
            (false, n) => IrqMode::Msi(n),
        };
        if wanted == self.mode {
            return;
        }
        if let Err(e) = self.switch_mode(wanted) {
            self.fail("switching interrupts", e);
        }
    }

    fn switch_mode(&mut self, to: IrqMode) -> std::io::Result<()> {
        match self.mode {
            IrqMode::Intx if self.intx.is_some() => {
                self.backend.set_irq_eventfds(INTX_IRQ, &[])?;
            }
            IrqMode::Intx => {}
            IrqMode::Msi(_) => self.backend.set_irq_eventfds(MSI_IRQ, &[])?,
            IrqMode::Msix => self.backend.set_irq_eventfds(MSIX_IRQ, &[])?,
        }
        // Off until the new mode is on.
        self.mode = IrqMode::Intx;
        let (index, group, count) = match to {
            IrqMode::Intx => {
                if let Some(line) = self.intx.clone() {
                    if let Some(fd) = line.eventfd() {
                        self.backend.set_irq_eventfds(INTX_IRQ, &[fd])?;
                        if let Some(resample) = line.resample_eventfd() {
                            self.backend.set_intx_unmask(resample)?;
                        }
                    }
                }
                return Ok(());
            }
            IrqMode::Msi(n) => match &self.msi {
                Some(m) => (MSI_IRQ, m.config.group(), n),
                None => return Ok(()),
            },
            IrqMode::Msix => match &self.msix {
                Some(m) => (MSIX_IRQ, m.config.group(), m.cap.table_size),
                None => return Ok(()),
            },
        };
        let mut fds = Vec::with_capacity(usize::from(count));
        for v in 0..count {
            match group.notifier(v) {
                Some(fd) => fds.push(fd),
                None => {
                    return Err(std::io::Error::other(format!(
                        "interrupt vector {v} has no eventfd"
                    )))
                }
            }
        }
        self.backend.set_irq_eventfds(index, &fds)?;
        self.mode = to;
        Ok(())
    }

    /// A configuration dword past the header: the offered capabilities are
    /// virtual; other bytes come from the device.
    fn capability_read(&mut self, reg_idx: usize) -> u32 {
        let at = reg_idx * 4;
        if let Some(m) = &self.msix {
            let rel = at.wrapping_sub(m.offset);
            if rel < MSIX_CAP_LEN {
                return m.dword(rel / 4, self.next_cap(m.offset));
            }
        }
        if let Some(m) = &self.msi {
            let rel = at.wrapping_sub(m.offset);
            if rel < m.regs.len() {
                return match rel {
                    0 => m.reg(0, 4) & !0xff00 | u32::from(self.next_cap(m.offset)) << 8,
                    _ if Some(rel) == m.cap.pending_offset() => m.pending(),
                    _ => m.reg(rel, 4),
                };
            }
        }
        // Past MSI and MSI-X, an offered capability is a vendor-specific one.
        if self.caps.contains(&at) {
            let v = self.device_config_read(reg_idx);
            if self.failed.is_some() {
                return v;
            }
            return v & !0xff00 | u32::from(self.next_cap(at)) << 8;
        }
        self.device_config_read(reg_idx)
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
            // interrupt line, no expansion ROM); the capability list holds
            // only the MSI, MSI-X and vendor-specific capabilities offered.
            COMMAND_REG | CAP_PTR_REG => {
                let v = self.config.read_config_register(reg_idx);
                match (self.caps.first(), reg_idx) {
                    (Some(_), COMMAND_REG) => v | STATUS_CAP_LIST,
                    (Some(&first), _) => (v & !0xff) | first as u32,
                    (None, _) => v,
                }
            }
            0..HEADER_DWORDS => self.config.read_config_register(reg_idx),
            // Device-specific registers (hidden capabilities' bytes still
            // there) pass through.
            HEADER_DWORDS..CONFIG_DWORDS => self.capability_read(reg_idx),
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
                let at = reg_idx * 4;
                let msix_rel = self.msix.as_ref().map(|m| at.wrapping_sub(m.offset));
                let msi_rel = self
                    .msi
                    .as_ref()
                    .map(|m| (at.wrapping_sub(m.offset), m.regs.len()));
                match (msix_rel, msi_rel) {
                    // The MSI-X message control word (bytes 2-3 of the
                    // first dword); the rest of the capability is
                    // read-only.
                    (Some(0), _) if offset + data.len() as u64 > 2 => {
                        let mut dword = self.capability_read(reg_idx).to_le_bytes();
                        let o = offset as usize;
                        dword[o..o + data.len()].copy_from_slice(data);
                        self.msix_control_written(u16::from_le_bytes([dword[2], dword[3]]));
                    }
                    (Some(rel), _) if rel < MSIX_CAP_LEN => {}
                    (_, Some((rel, len))) if rel < len => {
                        self.msi_written(rel + offset as usize, data);
                    }
                    _ => self.device_config_write(at as u64 + offset, data),
                }
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
        match (self.bar_target(index, offset, data.len()), &self.msix) {
            (BarTarget::Table(o), Some(m)) => return m.config.read_table(o, data),
            (BarTarget::Pba(o), Some(m)) => {
                m.collect_pending(o, data.len());
                return m.config.read_pba(o, data);
            }
            (BarTarget::Straddle, _) => return data.fill(0xff),
            _ => {}
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
        match (self.bar_target(index, offset, data.len()), &self.msix) {
            (BarTarget::Table(o), Some(m)) => return m.config.write_table(o, data),
            (BarTarget::Pba(o), Some(m)) => return m.config.write_pba(o, data),
            (BarTarget::Straddle, _) => return,
            _ => {}
        }
        if let Err(e) = self.backend.region_write(index as u32, offset, data) {
            self.fail("BAR write", e);
        }
    }

    fn direct_areas(&self) -> Vec<DirectArea> {
        self.direct.clone()
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

//! `arbor-test-vfio-user-blk`: a vfio-user server presenting a modern
//! virtio-blk PCI function, a test peer for Arbor's passthrough model.
//!
//! ```text
//! arbor-test-vfio-user-blk --socket PATH --disk IMAGE [--bar2-file PATH]
//! ```
//!
//! The function is the project's own virtio-pci transport
//! (`devices::virtio::VirtioPciDevice`) around its virtio-blk device
//! (`devices::virtio::Block`, on `IMAGE`), served through the `vfio_user`
//! crate's `Server`:
//!
//! - region 7 (configuration space, 256 bytes) reads and writes go to the
//!   transport's configuration registers; region 0 (BAR 0, 32 KiB) to its
//!   BAR 0, so queue notifications arrive as BAR writes (no ioeventfd);
//! - `DMA_MAP` gives the memfds of guest RAM: each is mmap-ed and the guest
//!   memory the device uses is rebuilt from them (`DMA_UNMAP` takes one
//!   away); the device reaches guest RAM directly, never through messages;
//! - interrupts: INTx (1), MSI (0) and MSI-X (one vector per queue plus one
//!   for configuration changes). The client emulates the MSI-X capability
//!   and table itself and never forwards them, so `SET_IRQS` on MSI-X with
//!   N eventfds is what enables MSI-X on the inner transport (its control
//!   word and vector masks are written through its own registers) and makes
//!   vector i signal the i-th eventfd; `SET_IRQS` with none disables it;
//! - with `--bar2-file`, region 2 is a 64 KiB memory BAR backed by that
//!   file (created and sized), mmap-able as a whole (its descriptor is the
//!   region's mmap fd); accesses that reach the server are served from the
//!   file and logged (`bar2 read|write off=.. len=..`).
//!
//! The server prints `listening on PATH` once the socket is bound, then one
//! line per notable event (DMA maps, `SET_IRQS`, the device status). It
//! serves one client at a time, as many in turn as connect; between two the
//! device is reset and guest RAM dropped. Bad command-line input: a message
//! and exit status 2. Nothing a client or its guest sends panics the
//! server: accesses outside a region read all-ones and are dropped, and
//! region accesses never fail (an error reply would desynchronise clients
//! that do not check for one).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use devices::virtio::pci_transport::{BAR_INDEX, BAR_SIZE, MSIX_TABLE_OFFSET};
use devices::virtio::{Block, BlockConfig, GuestMemoryHandle, VirtioPciDevice, VirtioPciOptions};
use pci::msix::{MSIX_CAP_ID, MSIX_CTL_ENABLE, MSIX_VECTOR_MASKED};
use pci::{IntxInterrupt, MsiInterruptGroup, MsiMessage, PciDevice};
use vfio_bindings::bindings::vfio::{
    vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{
    DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion, SparseArea,
};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

/// Size of BAR 2 with `--bar2-file`.
const BAR2_SIZE: u64 = 64 << 10;
/// Size of the configuration space region.
const CONFIG_SIZE: u64 = 256;
/// VFIO region indexes.
const BAR2_REGION: u32 = 2;
const CONFIG_REGION: u32 = 7;
/// Regions the server describes (BARs 0-5, ROM, config, VGA).
const NUM_REGIONS: u32 = 9;
/// VFIO interrupt indexes.
const INTX_IRQ: u32 = 0;
const MSI_IRQ: u32 = 1;
const MSIX_IRQ: u32 = 2;
/// The most guest RAM regions a client may map at once.
const MAX_DMA_MAPS: usize = 64;

const USAGE: &str = "usage: arbor-test-vfio-user-blk --socket PATH --disk IMAGE [--bar2-file PATH]";

/// The command line.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    socket: PathBuf,
    disk: PathBuf,
    bar2: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let (mut socket, mut disk, mut bar2) = (None, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--socket" => &mut socket,
            "--disk" => &mut disk,
            "--bar2-file" => &mut bar2,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        };
        let v = it
            .next()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        if slot.replace(PathBuf::from(v)).is_some() {
            return Err(format!("{a} given twice"));
        }
    }
    Ok(Args {
        socket: socket.ok_or_else(|| format!("--socket is required\n{USAGE}"))?,
        disk: disk.ok_or_else(|| format!("--disk is required\n{USAGE}"))?,
        bar2,
    })
}

/// Prints one event line (stdout, flushed: tests read it as it comes).
fn event(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Writes the eventfd `f` (its counter += 1).
fn signal(f: &File) -> io::Result<()> {
    let mut w = f;
    w.write_all(&1u64.to_ne_bytes())
}

/// The inner transport's MSI-X vectors: vector i signals the i-th eventfd
/// the client gave (none: nothing happens; the client masks in its own
/// emulated table).
#[derive(Default)]
struct VectorFds {
    fds: RwLock<Vec<Option<File>>>,
}

impl VectorFds {
    fn set(&self, start: usize, fds: Vec<File>) {
        let mut v = self.fds.write().unwrap_or_else(|e| e.into_inner());
        v.clear();
        v.resize_with(start, || None);
        v.extend(fds.into_iter().map(Some));
    }
}

impl MsiInterruptGroup for VectorFds {
    fn trigger(&self, vector: u16) -> io::Result<()> {
        let fds = self.fds.read().unwrap_or_else(|e| e.into_inner());
        match fds.get(usize::from(vector)) {
            Some(Some(f)) => signal(f),
            _ => Ok(()),
        }
    }

    fn update(&self, _vector: u16, _msg: MsiMessage, _masked: bool) -> io::Result<()> {
        Ok(())
    }

    fn notifier(&self, _vector: u16) -> Option<&vmm_sys_util::eventfd::EventFd> {
        None
    }
}

/// The inner transport's INTx line: the eventfd the client gave on index 0.
#[derive(Default)]
struct IntxFd {
    fd: Mutex<Option<File>>,
}

impl IntxInterrupt for IntxFd {
    fn assert(&self) -> io::Result<()> {
        match &*self.fd.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(f) => signal(f),
            None => Ok(()),
        }
    }
}

/// One guest RAM region the client mapped.
struct DmaMap {
    iova: u64,
    size: u64,
    region: Arc<GuestRegionMmap>,
}

/// The server's device: the virtio-blk function and what the client gave it.
struct BlkBackend {
    dev: VirtioPciDevice,
    mem: GuestMemoryHandle,
    maps: Vec<DmaMap>,
    vectors: Arc<VectorFds>,
    intx: Arc<IntxFd>,
    num_vectors: u16,
    /// Offset of the transport's MSI-X capability.
    msix_cap: usize,
    bar2: Option<File>,
    /// Last device status logged.
    status: u8,
    active: bool,
}

impl BlkBackend {
    fn new(disk: &BlockConfig, bar2: Option<File>) -> io::Result<Self> {
        let block = Block::new(disk)?;
        let num_vectors = VirtioPciDevice::required_msix_vectors(&block);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vectors = Arc::new(VectorFds::default());
        let intx = Arc::new(IntxFd::default());
        let mut dev = VirtioPciDevice::new(
            Box::new(block),
            mem.clone(),
            vectors.clone(),
            VirtioPciOptions::default(),
        )
        .map_err(io::Error::other)?;
        dev.set_intx(intx.clone());
        let mut b = BlkBackend {
            dev,
            mem,
            maps: Vec::new(),
            vectors,
            intx,
            num_vectors,
            msix_cap: 0,
            bar2,
            status: 0,
            active: false,
        };
        b.msix_cap = b
            .find_capability(MSIX_CAP_ID)
            .ok_or_else(|| io::Error::other("the transport has no MSI-X capability"))?;
        Ok(b)
    }

    /// The regions the server describes, for `Server::new`.
    fn regions(&self) -> Vec<ServerRegion> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        (0..NUM_REGIONS)
            .map(|index| {
                let (size, flags) = match index {
                    0 => (BAR_SIZE, rw),
                    BAR2_REGION if self.bar2.is_some() => {
                        (BAR2_SIZE, rw | VFIO_REGION_INFO_FLAG_MMAP)
                    }
                    CONFIG_REGION => (CONFIG_SIZE, rw),
                    _ => (0, 0),
                };
                let bar2 = (index == BAR2_REGION).then_some(self.bar2.as_ref());
                let (sparse_areas, mmap_fd) = match bar2.flatten() {
                    // The whole region may be mapped; the descriptor goes
                    // with the region's information.
                    Some(f) => (
                        vec![SparseArea {
                            area: vfio_region_sparse_mmap_area {
                                offset: 0,
                                size: BAR2_SIZE,
                            },
                        }],
                        Some(f.as_raw_fd()),
                    ),
                    None => (Vec::new(), None),
                };
                ServerRegion {
                    region_info: vfio_region_info {
                        argsz: std::mem::size_of::<vfio_region_info>() as u32,
                        flags,
                        index,
                        cap_offset: 0,
                        size,
                        offset: 0,
                    },
                    sparse_areas,
                    mmap_fd,
                }
            })
            .collect()
    }

    /// The interrupts the server describes, for `Server::new`.
    fn irqs(&self) -> Vec<IrqInfo> {
        [
            (INTX_IRQ, 1),
            (MSI_IRQ, 0),
            (MSIX_IRQ, u32::from(self.num_vectors)),
        ]
        .into_iter()
        .map(|(index, count)| IrqInfo {
            index,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count,
        })
        .collect()
    }

    /// Offset of the transport's first capability with `id`.
    fn find_capability(&mut self, id: u8) -> Option<usize> {
        let mut space = [0u8; CONFIG_SIZE as usize];
        self.config_read(0, &mut space);
        let mut ptr = usize::from(space[0x34] & 0xfc);
        for _ in 0..48 {
            if !(0x40..=0xfc).contains(&ptr) {
                return None;
            }
            if space[ptr] == id {
                return Some(ptr);
            }
            ptr = usize::from(space[ptr + 1] & 0xfc);
        }
        None
    }

    /// Reads configuration space, a dword of the transport at a time
    /// (each register read once: some have side effects). Bytes past the
    /// region read all-ones.
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        let mut cached: Option<(u64, [u8; 4])> = None;
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            if at >= CONFIG_SIZE {
                *b = 0xff;
                continue;
            }
            let reg = at / 4;
            let dword = match cached {
                Some((r, d)) if r == reg => d,
                _ => {
                    let d = self.dev.read_config_register(reg as usize).to_le_bytes();
                    cached = Some((reg, d));
                    d
                }
            };
            *b = dword[(at % 4) as usize];
        }
    }

    /// Writes configuration space: an aligned access of 1, 2 or 4 bytes
    /// as it is, anything else a byte at a time. Bytes past the region are
    /// dropped.
    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let aligned = matches!(data.len(), 1 | 2 | 4) && offset.is_multiple_of(data.len() as u64);
        if aligned && offset < CONFIG_SIZE {
            self.dev
                .write_config_register((offset / 4) as usize, offset % 4, data);
            return;
        }
        for (i, b) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if at < CONFIG_SIZE {
                self.dev
                    .write_config_register((at / 4) as usize, at % 4, &[*b]);
            }
        }
    }

    /// Reads BAR 0, at most 8 bytes per transport access.
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, chunk) in data.chunks_mut(8).enumerate() {
            let at = offset.saturating_add(8 * i as u64);
            self.dev.read_bar(BAR_INDEX, at, chunk);
        }
    }

    /// Writes BAR 0, at most 8 bytes per transport access, then logs a
    /// change of the device status.
    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(8).enumerate() {
            let at = offset.saturating_add(8 * i as u64);
            self.dev.write_bar(BAR_INDEX, at, chunk);
        }
        self.log_status();
    }

    fn log_status(&mut self) {
        let (status, active) = (self.dev.status(), self.dev.is_active());
        if status != self.status || active != self.active {
            self.status = status;
            self.active = active;
            event(&format!(
                "device status {status:#04x}{}",
                if active { " activated" } else { "" }
            ));
        }
    }

    /// BAR 2 access at `offset`, `len` bytes: the file offset, if inside.
    fn bar2_range(&self, offset: u64, len: usize) -> Option<&File> {
        let end = offset.checked_add(len as u64)?;
        self.bar2.as_ref().filter(|_| end <= BAR2_SIZE)
    }

    fn bar2_read(&mut self, offset: u64, data: &mut [u8]) {
        event(&format!("bar2 read off={offset:#x} len={}", data.len()));
        let ok = self
            .bar2_range(offset, data.len())
            .is_some_and(|f| f.read_exact_at(data, offset).is_ok());
        if !ok {
            data.fill(0xff);
        }
    }

    fn bar2_write(&mut self, offset: u64, data: &[u8]) {
        event(&format!("bar2 write off={offset:#x} len={}", data.len()));
        if let Some(f) = self.bar2_range(offset, data.len()) {
            if let Err(e) = f.write_all_at(data, offset) {
                event(&format!("bar2 write failed: {e}"));
            }
        }
    }

    /// Turns MSI-X on or off in the inner transport: its control word's
    /// enable bit and every vector's mask bit, through its own registers.
    fn set_inner_msix(&mut self, on: bool) {
        let control: u16 = if on { MSIX_CTL_ENABLE } else { 0 };
        self.config_write(self.msix_cap as u64 + 2, &control.to_le_bytes());
        let mask: u32 = if on { 0 } else { MSIX_VECTOR_MASKED };
        for v in 0..u64::from(self.num_vectors) {
            self.dev.write_bar(
                BAR_INDEX,
                MSIX_TABLE_OFFSET + 16 * v + 12,
                &mask.to_le_bytes(),
            );
        }
    }

    /// Builds the guest memory the device sees from the maps.
    fn publish_memory(&mut self) -> io::Result<()> {
        self.maps.sort_by_key(|m| m.iova);
        let mem = if self.maps.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_arc_regions(self.maps.iter().map(|m| m.region.clone()).collect())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
        };
        self.mem
            .lock()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?
            .replace(mem);
        Ok(())
    }

    /// Back to the state of a new connection.
    fn disconnect(&mut self) {
        self.dev.reset();
        self.set_inner_msix(false);
        self.vectors.set(0, Vec::new());
        *self.intx.fd.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.maps.clear();
        if let Err(e) = self.publish_memory() {
            event(&format!("dropping guest memory: {e}"));
        }
        self.log_status();
    }
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why.into())
}

impl ServerBackend for BlkBackend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        match region {
            0 => self.bar0_read(offset, data),
            BAR2_REGION if self.bar2.is_some() => self.bar2_read(offset, data),
            CONFIG_REGION => self.config_read(offset, data),
            _ => data.fill(0xff),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        match region {
            0 => self.bar0_write(offset, data),
            BAR2_REGION if self.bar2.is_some() => self.bar2_write(offset, data),
            CONFIG_REGION => self.config_write(offset, data),
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        let shown = format!("iova={address:#x} size={size:#x} offset={offset:#x}");
        let result = (|| {
            let file =
                fd.ok_or_else(|| invalid("no file descriptor (DMA messages unsupported)"))?;
            if self.maps.len() >= MAX_DMA_MAPS {
                return Err(invalid("too many DMA maps"));
            }
            let len = usize::try_from(size).map_err(|_| invalid("size too large"))?;
            if len == 0 || address.checked_add(size).is_none() {
                return Err(invalid("empty or wrapping range"));
            }
            let mapping = MmapRegion::from_file(FileOffset::new(file, offset), len)
                .map_err(|e| invalid(format!("mmap: {e}")))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(address))
                .ok_or_else(|| invalid("range overflows"))?;
            self.maps.push(DmaMap {
                iova: address,
                size,
                region: Arc::new(region),
            });
            if let Err(e) = self.publish_memory() {
                // Only the map just pushed: an identical earlier one stays.
                self.maps.pop();
                self.publish_memory()?;
                return Err(e);
            }
            Ok(())
        })();
        match &result {
            Ok(()) => event(&format!("dma map {shown} flags={:#x}", flags.bits())),
            Err(e) => event(&format!("dma map {shown} refused: {e}")),
        }
        result
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        let before = self.maps.len();
        if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            self.maps.clear();
        } else {
            self.maps.retain(|m| m.iova != address || m.size != size);
        }
        let removed = before - self.maps.len();
        event(&format!(
            "dma unmap iova={address:#x} size={size:#x}: {removed} region(s)"
        ));
        self.publish_memory()
    }

    fn reset(&mut self) -> io::Result<()> {
        event("reset");
        self.dev.reset();
        self.set_inner_msix(false);
        self.vectors.set(0, Vec::new());
        self.log_status();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        let trigger = flags & VFIO_IRQ_SET_ACTION_TRIGGER != 0;
        let none = flags & VFIO_IRQ_SET_DATA_NONE != 0;
        let with_fds = flags & VFIO_IRQ_SET_DATA_EVENTFD != 0;
        let disable = trigger && (count == 0 || (none && fds.is_empty()));
        if !trigger || (!disable && (!with_fds || fds.len() != count as usize)) {
            event(&format!(
                "set_irqs index={index} flags={flags:#x} count={count}: refused"
            ));
            return Err(invalid(format!(
                "SET_IRQS flags {flags:#x} with {count} vector(s) and {} fd(s) not supported",
                fds.len()
            )));
        }
        let n = if disable { 0 } else { count };
        let limit = match index {
            INTX_IRQ => 1,
            MSIX_IRQ => u32::from(self.num_vectors),
            _ => 0,
        };
        if n > 0 && start.checked_add(n).is_none_or(|end| end > limit) {
            event(&format!(
                "set_irqs index={index} start={start} count={n}: refused"
            ));
            return Err(invalid(format!(
                "interrupt index {index} has {limit} vector(s)"
            )));
        }
        event(&format!("set_irqs index={index} count={n}"));
        match index {
            INTX_IRQ => {
                *self.intx.fd.lock().unwrap_or_else(|e| e.into_inner()) = fds.into_iter().next();
            }
            MSIX_IRQ => {
                if n > 0 {
                    // `start` was checked against the vector count above.
                    self.vectors.set(start as usize, fds);
                } else {
                    // A disable may name any start: drop every vector.
                    self.vectors.set(0, Vec::new());
                }
                self.set_inner_msix(n > 0);
                event(&format!(
                    "msix {}",
                    if n > 0 { "enabled" } else { "disabled" }
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Opens (creating it) and sizes the BAR 2 file.
fn open_bar2(path: &std::path::Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.set_len(BAR2_SIZE)?;
    Ok(f)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("arbor-test-vfio-user-blk: {e}");
            std::process::exit(2);
        }
    };
    let fail = |what: String| -> ! {
        eprintln!("arbor-test-vfio-user-blk: {what}");
        std::process::exit(2);
    };
    let bar2 = args.bar2.as_ref().map(|p| {
        open_bar2(p).unwrap_or_else(|e| fail(format!("BAR 2 file '{}': {e}", p.display())))
    });
    let mut backend = BlkBackend::new(&BlockConfig::new(&args.disk), bar2)
        .unwrap_or_else(|e| fail(format!("disk '{}': {e}", args.disk.display())));
    let server = Server::new(&args.socket, true, backend.irqs(), backend.regions())
        .unwrap_or_else(|e| fail(format!("socket '{}': {e}", args.socket.display())));
    event(&format!("listening on {}", args.socket.display()));
    loop {
        match server.run(&mut backend) {
            Ok(()) => event("connection closed"),
            Err(vfio_user::Error::SocketAccept(e)) => {
                eprintln!("arbor-test-vfio-user-blk: accept: {e}");
                std::process::exit(1);
            }
            Err(e) => event(&format!("connection ended: {e}")),
        }
        backend.disconnect();
    }
}

#[cfg(test)]
mod tests;

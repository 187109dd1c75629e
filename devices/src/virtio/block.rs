//! virtio-blk backed by a raw image file (or host block device).
//!
//! One request queue. Each chain is: a 16-byte device-readable header (type, reserved,
//! sector), data buffers (device-readable for writes/discard, device-writable for reads and
//! GET_ID) and a final device-writable status byte; the header and status may straddle
//! descriptors. Supported requests: IN, OUT, FLUSH, GET_ID (the 20-byte serial) and DISCARD
//! (hole punching, when the disk is writable). The image is a regular file or block
//! device, not empty and a whole number of 512-byte sectors, opened without blocking
//! ([`open_disk`]); capacity is its size in sectors. Requests must be whole sectors inside
//! the disk, otherwise they complete with IOERR. A read-only disk advertises
//! VIRTIO_BLK_F_RO and fails writes with IOERR. Data moves with positional I/O
//! (`pread`/`pwrite`) straight between the image and the guest's buffers, with no host
//! buffer in between: guest buffer sizes never translate into host allocations, and a
//! disk costs no memory for its data path.
//!
//! The limits advertised in the configuration space are enforced: a request with more than
//! `seg_max` data buffers (plus the header and status descriptors) or a buffer larger than
//! `size_max` ([`SIZE_MAX`]) completes with IOERR, so a request moves at most
//! `seg_max * size_max` bytes. That work is done in slices of [`IO_CHUNK`] bytes with the
//! worker's stop signal checked between slices (and between discard ranges), so a reset,
//! removal or shutdown waits for at most one slice; the request cut short is abandoned
//! without a completion (see [`worker`](super::worker)).

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::chain::{parse_chain, ChainBuffers};
use super::worker::{QueueHandler, StopSignal, WorkerSlot};
use super::{device_type, features, ActivateContext, ActivateError, VirtioDevice};
use crate::guest_warn;

/// Sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Default queue size.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Largest copy done at once between the disk and guest memory.
pub const IO_CHUNK: usize = 1 << 20;
/// Advertised maximum segment size.
pub const SIZE_MAX: u32 = 1 << 20;
/// Maximum sectors per discard request.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Maximum segments per discard request.
pub const MAX_DISCARD_SEG: u32 = 32;
const HEADER_LEN: u64 = 16;
const DISCARD_SEG_LEN: u64 = 16;
const DISCARD_FLAG_UNMAP: u32 = 1;
/// Size of the device configuration space exposed.
pub const BLOCK_CONFIG_LEN: usize = 0x3c;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// How to build a [`Block`] device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Image path.
    pub path: PathBuf,
    /// Expose the disk read-only.
    pub read_only: bool,
    /// Serial returned by GET_ID (truncated to 20 bytes).
    pub serial: String,
    /// Queue size (power of two).
    pub queue_size: u16,
    /// Offer DISCARD (ignored for read-only disks).
    pub discard: bool,
    /// Take QEMU-compatible image locks ([`lock_disk`]); `false` is
    /// `lock=off`.
    pub lock: bool,
}

impl BlockConfig {
    /// Read-write disk at `path` with defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlockConfig {
            path: path.into(),
            read_only: false,
            serial: String::new(),
            queue_size: BLOCK_QUEUE_SIZE,
            discard: true,
            lock: true,
        }
    }
}

/// The virtio block device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<File>,
    read_only: bool,
    discard: bool,
    serial: [u8; ID_LEN],
    disk_bytes: u64,
    features: u64,
    config: [u8; BLOCK_CONFIG_LEN],
    queue_sizes: [u16; 1],
    worker: WorkerSlot,
}

/// What a file is, for messages about files that cannot be disks.
fn file_kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "a file of another type"
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Refuses anything but a regular file or a block device.
fn check_kind(m: &Metadata) -> io::Result<()> {
    let t = m.file_type();
    if t.is_file() || t.is_block_device() {
        Ok(())
    } else {
        Err(invalid(format!(
            "it is {}, not a regular file or block device",
            file_kind(m)
        )))
    }
}

/// Refuses a disk of `size` bytes that is empty or not whole sectors.
fn check_size(size: u64) -> io::Result<()> {
    if size == 0 {
        Err(invalid("it is empty".to_string()))
    } else if !size.is_multiple_of(SECTOR_SIZE) {
        Err(invalid(format!(
            "its size ({size} bytes) is not a multiple of {SECTOR_SIZE}"
        )))
    } else {
        Ok(())
    }
}

/// Opens a disk image (read-only or read-write) without ever blocking, and
/// checks it: only a regular file or a block device, not empty, a whole
/// number of 512-byte sectors. The path is looked at with `stat` first, so
/// FIFOs, sockets and character devices are refused without being opened;
/// the file is then opened with `O_NONBLOCK` (an `open` of a FIFO would
/// otherwise wait for a writer), checked again with `fstat` (the path may
/// have changed in between), and `O_NONBLOCK` is cleared for the device's
/// I/O. The size is where `lseek(SEEK_END)` lands, which for a block device
/// is its size in bytes (the value `BLKGETSIZE64` answers).
pub fn open_disk(path: &Path, read_only: bool) -> io::Result<File> {
    check_kind(&std::fs::metadata(path)?)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    check_kind(&file.metadata()?)?;
    check_size(file.seek(SeekFrom::End(0))?)?;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor `file` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a descriptor `file` owns, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

// Image locking, compatible with QEMU's `file` driver (block/file-posix.c).
//
// QEMU describes what a user of an image does with permission bits and
// publishes them as one-byte OFD read (shared) locks on the image itself:
// a user holding permission bit `i` locks byte `LOCK_PERM_BASE + i`, and a
// user that does not let others have it locks byte `LOCK_SHARED_BASE + i`.
// Before using a permission, a user tests (`F_OFD_GETLK` with a write lock,
// which conflicts with anyone's read lock) that nobody forbids it; before
// forbidding one, that nobody holds it. Locks are taken first and tested
// second, so two users racing both see each other. OFD locks belong to the
// open file description: the lock lives exactly as long as the `File`, and
// two opens in one process exclude each other like two processes do.
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
/// QEMU's `BLK_PERM_*` bits, by bit index (resize is bit 3), with the names
/// its messages use.
const PERM_CONSISTENT_READ: u32 = 0;
const PERM_WRITE: u32 = 1;
const PERM_WRITE_UNCHANGED: u32 = 2;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// The permissions an Arbor disk holds and those it lets others hold, as
/// QEMU's bit masks. Like a QEMU guest device without `share-rw=on`, both
/// a read-write and a read-only disk need a consistent view, so neither
/// lets others write or resize; only a read-write disk holds `write`. So
/// read-only users share, and a writer excludes every other user (and any
/// user excludes a writer), reader or writer, in either order.
fn disk_perms(read_only: bool) -> (u32, u32) {
    let mut held = 1 << PERM_CONSISTENT_READ;
    if !read_only {
        held |= 1 << PERM_WRITE;
    }
    let shared = (1 << PERM_CONSISTENT_READ) | (1 << PERM_WRITE_UNCHANGED);
    (held, shared)
}

fn ofd_lock(file: &File, cmd: libc::c_int, kind: libc::c_int, byte: i64) -> io::Result<i32> {
    // SAFETY: an all-zero `flock` is valid (OFD locks require l_pid == 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: F_OFD_SETLK/F_OFD_GETLK on a descriptor `file` owns, with a
    // pointer to a live, initialized `flock` the call may update.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type))
}

fn in_use(msg: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!(
            "{msg}: the image is in use (by another disk of this VM, another Arbor or a \
             QEMU); lock=off skips this check"
        ),
    )
}

/// Locks an open image the way QEMU does (see above) for a read-write or
/// read-only disk, and refuses with `ErrorKind::ResourceBusy` an image
/// another user holds in a conflicting way. The locks go with `file`.
pub fn lock_disk(file: &File, read_only: bool) -> io::Result<()> {
    let (held, shared) = disk_perms(read_only);
    let lock_err = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot lock the image ({e}); lock=off skips locking"),
        )
    };
    // Every lock this disk takes: (byte, the byte a conflicting user
    // locks, what to call it). Its permissions at 100+bit; what it refuses
    // others at 200+bit. All are taken first, then tested, so two users
    // racing to open the image both see each other.
    let locks: Vec<(i64, i64, String)> = (0..PERM_NAMES.len() as u32)
        .flat_map(|bit| {
            let name = PERM_NAMES[bit as usize];
            let (perm, refuse) = (
                LOCK_PERM_BASE + i64::from(bit),
                LOCK_SHARED_BASE + i64::from(bit),
            );
            let mut v = Vec::new();
            if held & (1 << bit) != 0 {
                v.push((perm, refuse, format!("\"{name}\" lock")));
            }
            if shared & (1 << bit) == 0 {
                v.push((refuse, perm, format!("shared \"{name}\" lock")));
            }
            v
        })
        .collect();
    for (byte, _, what) in &locks {
        ofd_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK, *byte).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) => {
                    in_use(format!("cannot take the {what}"))
                }
                _ => lock_err(e),
            }
        })?;
    }
    for (_, conflict, what) in &locks {
        let t = ofd_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK, *conflict).map_err(lock_err)?;
        if t != libc::F_UNLCK {
            return Err(in_use(format!("cannot get the {what}")));
        }
    }
    Ok(())
}

impl Block {
    /// Open `cfg.path` with [`open_disk`], lock it with [`lock_disk`]
    /// unless `cfg.lock` is off, and build the device. The locks live as
    /// long as the device's file.
    pub fn new(cfg: &BlockConfig) -> io::Result<Self> {
        let file = open_disk(&cfg.path, cfg.read_only)?;
        if cfg.lock {
            lock_disk(&file, cfg.read_only)?;
        }
        Self::from_file(file, cfg)
    }

    /// Build the device on an already open file (`cfg.path` is ignored).
    /// An empty file, or one that is not a whole number of sectors, is
    /// refused.
    pub fn from_file(mut file: File, cfg: &BlockConfig) -> io::Result<Self> {
        let size = file.seek(SeekFrom::End(0))?;
        check_size(size)?;
        let sectors = size / SECTOR_SIZE;
        if !cfg.queue_size.is_power_of_two() || cfg.queue_size < 4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block queue size must be a power of two >= 4",
            ));
        }
        let discard = cfg.discard && !cfg.read_only;
        let mut feats = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if cfg.read_only {
            feats |= 1 << VIRTIO_BLK_F_RO;
        }
        if discard {
            feats |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        let mut config = [0u8; BLOCK_CONFIG_LEN];
        let mut put =
            |off: usize, bytes: &[u8]| config[off..off + bytes.len()].copy_from_slice(bytes);
        put(0x00, &sectors.to_le_bytes());
        put(0x08, &SIZE_MAX.to_le_bytes());
        put(0x0c, &seg_max(cfg.queue_size).to_le_bytes());
        put(0x14, &(SECTOR_SIZE as u32).to_le_bytes());
        put(0x22, &1u16.to_le_bytes());
        if discard {
            put(0x24, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(0x28, &MAX_DISCARD_SEG.to_le_bytes());
            put(0x2c, &8u32.to_le_bytes());
        }
        let mut serial = [0u8; ID_LEN];
        let s = cfg.serial.as_bytes();
        let n = s.len().min(ID_LEN);
        serial[..n].copy_from_slice(&s[..n]);
        Ok(Block {
            disk: Arc::new(file),
            read_only: cfg.read_only,
            discard,
            serial,
            disk_bytes: sectors * SECTOR_SIZE,
            features: feats,
            config,
            queue_sizes: [cfg.queue_size],
            worker: WorkerSlot::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk_bytes / SECTOR_SIZE
    }

    /// The request handler a worker would run for this disk; exposed so
    /// that tests and fuzz targets can drive a `QueueProcessor` directly,
    /// without a worker thread.
    pub fn handler(&self) -> BlockHandler {
        BlockHandler {
            disk: self.disk.clone(),
            disk_bytes: self.disk_bytes,
            read_only: self.read_only,
            discard: self.discard,
            serial: self.serial,
            max_descs: usize::from(self.queue_sizes[0]) * 4,
            max_segments: seg_max(self.queue_sizes[0]) as usize + 2,
        }
    }
}

/// Advertised `seg_max`: data buffers per request. Two more descriptors are taken by the
/// header and the status.
fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size).saturating_sub(2).max(1)
}

/// Why a request did not finish.
enum Cut {
    /// Host I/O or guest memory error: IOERR.
    Io(io::Error),
    /// The worker is stopping: abandon the request.
    Stopped,
}

impl From<io::Error> for Cut {
    fn from(e: io::Error) -> Self {
        Cut::Io(e)
    }
}

/// Request execution on the worker thread.
pub struct BlockHandler {
    disk: Arc<File>,
    disk_bytes: u64,
    read_only: bool,
    discard: bool,
    serial: [u8; ID_LEN],
    /// Descriptors walked before a chain is rejected as malformed (no status written).
    max_descs: usize,
    /// Non-empty buffers accepted per request (`seg_max` + header + status).
    max_segments: usize,
}

type Status = u8;
const S_OK: Status = VIRTIO_BLK_S_OK as u8;
const S_IOERR: Status = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: Status = VIRTIO_BLK_S_UNSUPP as u8;

impl BlockHandler {
    /// Byte offset of `len` bytes at `sector`, if whole sectors inside the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let off = sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len)?;
        (end <= self.disk_bytes).then_some(off)
    }

    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &ChainBuffers,
        off: u64,
        len: u64,
        stop: &StopSignal,
    ) -> Result<(), Cut> {
        let mut pos = 0u64;
        while pos < len {
            if stop.is_raised() {
                return Err(Cut::Stopped);
            }
            let n = ((len - pos) as usize).min(IO_CHUNK);
            bufs.read_from_file(mem, pos, &self.disk, off + pos, n)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &ChainBuffers,
        off: u64,
        len: u64,
        stop: &StopSignal,
    ) -> Result<(), Cut> {
        let mut pos = 0u64;
        while pos < len {
            if stop.is_raised() {
                return Err(Cut::Stopped);
            }
            let n = ((len - pos) as usize).min(IO_CHUNK);
            bufs.write_to_file(mem, HEADER_LEN + pos, &self.disk, off + pos, n)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn discard(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &ChainBuffers,
        len: u64,
        stop: &StopSignal,
    ) -> Option<Status> {
        Some(match self.discard_ranges(mem, bufs, len, stop)? {
            Ok(()) => S_OK,
            Err(st) => st,
        })
    }

    /// `None` when stopped; otherwise the failing status, if any.
    fn discard_ranges(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &ChainBuffers,
        len: u64,
        stop: &StopSignal,
    ) -> Option<Result<(), Status>> {
        if len == 0
            || !len.is_multiple_of(DISCARD_SEG_LEN)
            || len / DISCARD_SEG_LEN > u64::from(MAX_DISCARD_SEG)
        {
            return Some(Err(S_IOERR));
        }
        for i in 0..len / DISCARD_SEG_LEN {
            if stop.is_raised() {
                return None;
            }
            let mut seg = [0u8; DISCARD_SEG_LEN as usize];
            if bufs
                .read_at(mem, HEADER_LEN + i * DISCARD_SEG_LEN, &mut seg)
                .is_err()
            {
                return Some(Err(S_IOERR));
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            if flags & !DISCARD_FLAG_UNMAP != 0 {
                return Some(Err(S_UNSUPP));
            }
            if num > MAX_DISCARD_SECTORS {
                return Some(Err(S_IOERR));
            }
            let bytes = u64::from(num) * SECTOR_SIZE;
            let Some(off) = self.byte_range(sector, bytes) else {
                return Some(Err(S_IOERR));
            };
            if bytes == 0 {
                continue;
            }
            if let Err(e) = fallocate(&*self.disk, FallocateMode::PunchHole, true, off, bytes) {
                guest_warn!("virtio-blk: discard failed: {e}");
                return Some(Err(S_IOERR));
            }
        }
        Some(Ok(()))
    }

    /// Execute a request; returns the status and the number of data bytes written into the
    /// chain (excluding the status byte), or `None` if the worker is stopping.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &ChainBuffers,
        stop: &StopSignal,
    ) -> Option<(Status, u64)> {
        let mut hdr = [0u8; HEADER_LEN as usize];
        if bufs.read_at(mem, 0, &mut hdr).is_err() {
            return Some((S_IOERR, 0));
        }
        let req = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        // Status is the last writable byte; data-in is everything before it.
        let data_in = bufs.writable_len().saturating_sub(1);
        let data_out = bufs.readable_len().saturating_sub(HEADER_LEN);
        Some(match req {
            VIRTIO_BLK_T_IN => {
                let Some(off) = self.byte_range(sector, data_in) else {
                    return Some((S_IOERR, 0));
                };
                match self.read(mem, bufs, off, data_in, stop) {
                    Ok(()) => (S_OK, data_in),
                    Err(Cut::Stopped) => return None,
                    Err(Cut::Io(e)) => {
                        guest_warn!("virtio-blk: read at sector {sector} failed: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Some((S_IOERR, 0));
                }
                let Some(off) = self.byte_range(sector, data_out) else {
                    return Some((S_IOERR, 0));
                };
                match self.write(mem, bufs, off, data_out, stop) {
                    Ok(()) => (S_OK, 0),
                    Err(Cut::Stopped) => return None,
                    Err(Cut::Io(e)) => {
                        guest_warn!("virtio-blk: write at sector {sector} failed: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    guest_warn!("virtio-blk: flush failed: {e}");
                    (S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = (data_in as usize).min(ID_LEN);
                if n == 0 {
                    return Some((S_IOERR, 0));
                }
                match bufs.write_at(mem, 0, &self.serial[..n]) {
                    Ok(()) => (S_OK, n as u64),
                    Err(_) => (S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD if self.discard => (self.discard(mem, bufs, data_out, stop)?, 0),
            _ => (S_UNSUPP, 0),
        })
    }

    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        stop: &StopSignal,
    ) -> Option<u32> {
        let bufs = match parse_chain(mem, chain, self.max_descs) {
            Ok(b) => b,
            Err(e) => {
                guest_warn!("virtio-blk: bad descriptor chain: {e}");
                return Some(0);
            }
        };
        let Some(status_off) = bufs.writable_len().checked_sub(1) else {
            guest_warn!("virtio-blk: request without a status byte");
            return Some(0);
        };
        let (status, written) = match bufs.check_limits(self.max_segments, SIZE_MAX) {
            Ok(()) => self.execute(mem, &bufs, stop)?,
            Err(e) => {
                guest_warn!("virtio-blk: request refused: {e}");
                (S_IOERR, 0)
            }
        };
        if bufs.write_at(mem, status_off, &[status]).is_err() {
            return Some(0);
        }
        // Bounded by the chain length, which is below 4 GiB.
        Some((written + 1) as u32)
    }
}

impl QueueHandler for BlockHandler {
    fn process_chain(
        &mut self,
        _queue: usize,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        stop: &StopSignal,
    ) -> Option<u32> {
        self.handle(mem, chain, stop)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_len(&self) -> usize {
        BLOCK_CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if off >= BLOCK_CONFIG_LEN {
            return;
        }
        let n = data.len().min(BLOCK_CONFIG_LEN - off);
        data[..n].copy_from_slice(&self.config[off..off + n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field we expose is read-only (no VIRTIO_BLK_F_CONFIG_WCE).
        log::debug!(
            "virtio-blk: ignored config write at {offset:#x} len {}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = self.handler();
        self.worker.start("virtio-blk", 1, ctx, handler)
    }

    fn worker(&self) -> &WorkerSlot {
        &self.worker
    }

    fn worker_mut(&mut self) -> &mut WorkerSlot {
        &mut self.worker
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;

//! Validation and scatter/gather access for guest descriptor chains.
//!
//! `virtio-queue` already bounds chain walks (a chain visits at most queue-size descriptors,
//! indirect tables are checked) but reports a broken chain by silently ending the iteration.
//! [`parse_chain`] turns a chain into two segment lists (device-readable, then
//! device-writable) and rejects, with a [`ChainError`], anything a well-behaved driver never
//! produces: an empty chain (bad head index or unreadable table), a truncated one (loop cut by
//! the walk limit, next index out of range, descriptor table outside memory), more
//! descriptors than the device accepts, buffers outside guest memory, a readable descriptor
//! after a writable one, or more than 4 GiB in total. Zero-length descriptors are dropped.
//!
//! [`ChainBuffers`] then addresses the readable and writable areas as flat byte ranges, so
//! devices can read headers and write status bytes that straddle descriptors.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions, ReadVolatile,
    VolatileMemoryError, VolatileSlice, WriteVolatile,
};

/// Why a descriptor chain was rejected.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// No descriptor could be read (bad head index or descriptor table outside memory).
    #[error("empty descriptor chain or invalid head")]
    Empty,
    /// The walk stopped on a descriptor that still had NEXT set.
    #[error(
        "descriptor chain is truncated (loop, next index out of range or unreadable descriptor)"
    )]
    Truncated,
    /// More descriptors than the device accepts.
    #[error("descriptor chain has more than {0} descriptors")]
    TooLong(usize),
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    BadOrder,
    /// The buffers add up to more than 4 GiB.
    #[error("descriptor chain larger than 4 GiB")]
    TooBig,
    /// More buffers than the device advertises (virtio-blk `seg_max`).
    #[error("request has {count} buffers, more than the {max} the device accepts")]
    TooManySegments {
        /// Non-empty buffers in the chain.
        count: usize,
        /// Most the device accepts.
        max: usize,
    },
    /// A buffer larger than the device advertises (virtio-blk `size_max`).
    #[error("buffer of {len} bytes is larger than the {max} the device accepts")]
    SegmentTooBig {
        /// Buffer length.
        len: u32,
        /// Largest the device accepts.
        max: u32,
    },
    /// Access outside the readable/writable area, or a guest memory error.
    #[error("access of {len} bytes at offset {offset} outside the chain buffers")]
    OutOfBounds {
        /// Offset in the area.
        offset: u64,
        /// Access length.
        len: usize,
    },
}

/// A guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A validated descriptor chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainBuffers {
    head_index: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
}

/// Validate `chain` (at most `max_descs` descriptors) against guest memory `mem`.
pub fn parse_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max_descs: usize,
) -> Result<ChainBuffers, ChainError> {
    let mut bufs = ChainBuffers {
        head_index: chain.head_index(),
        ..Default::default()
    };
    let mut count = 0usize;
    let mut last: Option<Descriptor> = None;
    for desc in chain {
        count += 1;
        if count > max_descs {
            return Err(ChainError::TooLong(max_descs));
        }
        last = Some(desc);
        if desc.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        let perm = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !GuestMemory::check_range(mem, seg.addr, seg.len as usize, perm) {
            return Err(ChainError::OutOfMemory {
                addr: seg.addr.0,
                len: seg.len,
            });
        }
        if desc.is_write_only() {
            bufs.writable_len += u64::from(seg.len);
            bufs.writable.push(seg);
        } else {
            if !bufs.writable.is_empty() {
                return Err(ChainError::BadOrder);
            }
            bufs.readable_len += u64::from(seg.len);
            bufs.readable.push(seg);
        }
        if bufs.readable_len + bufs.writable_len > u64::from(u32::MAX) {
            return Err(ChainError::TooBig);
        }
    }
    match last {
        None => Err(ChainError::Empty),
        Some(d) if d.has_next() => Err(ChainError::Truncated),
        Some(_) => Ok(bufs),
    }
}

/// A file read or written at a position that advances: `pread`/`pwrite`
/// straight between the file and guest memory (vm-memory's volatile I/O),
/// with no buffer in between. Each call fills or drains its whole slice
/// unless the file ends (a read returns less) or the call fails.
struct FileAt<'a> {
    file: &'a File,
    pos: u64,
}

impl FileAt<'_> {
    /// Moves `len` bytes, calling `op(done, offset)` (one `pread`/`pwrite` of
    /// the bytes from `done` on, at file offset `offset`) until all moved, the
    /// file ends (0) or a call fails; retries on EINTR. Returns the bytes moved.
    fn transfer(
        &mut self,
        len: usize,
        mut op: impl FnMut(usize, libc::off64_t) -> isize,
    ) -> io::Result<usize> {
        let mut done = 0usize;
        while done < len {
            let off = libc::off64_t::try_from(self.pos)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let n = op(done, off);
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            self.pos += n as u64;
        }
        Ok(done)
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let base = guard.as_ptr();
        let len = buf.len();
        let fd = self.file.as_raw_fd();
        let r = self.transfer(len, |done, off| {
            // SAFETY: `base` is valid for writes of `len` bytes (the
            // VolatileSlice's invariant, kept alive by `guard`), so
            // `base + done` is valid for `len - done`; the descriptor is the
            // borrowed file's.
            unsafe { libc::pread64(fd, base.add(done).cast::<libc::c_void>(), len - done, off) }
        });
        match r {
            Ok(done) => {
                buf.bitmap().mark_dirty(0, done);
                Ok(done)
            }
            Err(e) => {
                buf.bitmap().mark_dirty(0, len);
                Err(VolatileMemoryError::IOError(e))
            }
        }
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let base = guard.as_ptr();
        let len = buf.len();
        let fd = self.file.as_raw_fd();
        self.transfer(len, |done, off| {
            // SAFETY: `base` is valid for reads of `len` bytes (the
            // VolatileSlice's invariant, kept alive by `guard`); the
            // descriptor is the borrowed file's.
            unsafe { libc::pwrite64(fd, base.add(done).cast::<libc::c_void>(), len - done, off) }
        })
        .map_err(VolatileMemoryError::IOError)
    }
}

/// Sub-ranges of `segs` covering the flat byte range `[offset, offset + len)`.
fn ranges(
    segs: &[Segment],
    total: u64,
    offset: u64,
    len: usize,
) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    let oob = ChainError::OutOfBounds { offset, len };
    let end = offset.checked_add(len as u64).ok_or_else(|| oob.clone())?;
    if end > total {
        return Err(oob);
    }
    let mut out = Vec::new();
    let mut pos = 0u64; // flat offset of the current segment
    for s in segs {
        let seg_end = pos + u64::from(s.len);
        if seg_end > offset && pos < end {
            let start = offset.max(pos);
            let stop = end.min(seg_end);
            // Segments were checked to lie in guest memory, so this cannot overflow.
            out.push((
                GuestAddress(s.addr.0 + (start - pos)),
                (stop - start) as usize,
            ));
        }
        if seg_end >= end {
            break;
        }
        pos = seg_end;
    }
    Ok(out)
}

impl ChainBuffers {
    /// Index of the chain's head descriptor (for the used ring).
    pub fn head_index(&self) -> u16 {
        self.head_index
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Check the limits a device advertises: at most `max_segments` non-empty buffers, none
    /// larger than `max_segment_len` bytes.
    pub fn check_limits(
        &self,
        max_segments: usize,
        max_segment_len: u32,
    ) -> Result<(), ChainError> {
        let count = self.readable.len() + self.writable.len();
        if count > max_segments {
            return Err(ChainError::TooManySegments {
                count,
                max: max_segments,
            });
        }
        match self
            .readable
            .iter()
            .chain(&self.writable)
            .find(|s| s.len > max_segment_len)
        {
            Some(s) => Err(ChainError::SegmentTooBig {
                len: s.len,
                max: max_segment_len,
            }),
            None => Ok(()),
        }
    }

    /// Device-readable segments.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// Device-writable segments.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    /// Copy `buf.len()` bytes from the readable area at flat `offset`.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        for (addr, len) in ranges(&self.readable, self.readable_len, offset, buf.len())? {
            mem.read_slice(&mut buf[done..done + len], addr)
                .map_err(|_| ChainError::OutOfBounds {
                    offset,
                    len: buf.len(),
                })?;
            done += len;
        }
        Ok(())
    }

    /// Read `len` bytes of `file` at `file_offset` straight into the
    /// writable area at flat `offset` (no host buffer). The file ending
    /// first is an error (`UnexpectedEof`).
    pub fn read_from_file(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        file: &File,
        file_offset: u64,
        len: usize,
    ) -> io::Result<()> {
        let mut src = FileAt {
            file,
            pos: file_offset,
        };
        for (addr, n) in
            ranges(&self.writable, self.writable_len, offset, len).map_err(io::Error::other)?
        {
            let got = mem
                .read_volatile_from(addr, &mut src, n)
                .map_err(io::Error::other)?;
            if got != n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended {} bytes short", n - got),
                ));
            }
        }
        Ok(())
    }

    /// Write `len` bytes of the readable area at flat `offset` straight to
    /// `file` at `file_offset` (no host buffer).
    pub fn write_to_file(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        file: &File,
        file_offset: u64,
        len: usize,
    ) -> io::Result<()> {
        let mut dst = FileAt {
            file,
            pos: file_offset,
        };
        for (addr, n) in
            ranges(&self.readable, self.readable_len, offset, len).map_err(io::Error::other)?
        {
            mem.write_all_volatile_to(addr, &mut dst, n)
                .map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Copy `buf` into the writable area at flat `offset`.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        for (addr, len) in ranges(&self.writable, self.writable_len, offset, buf.len())? {
            mem.write_slice(&buf[done..done + len], addr)
                .map_err(|_| ChainError::OutOfBounds {
                    offset,
                    len: buf.len(),
                })?;
            done += len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{desc, mem, TestQueue, F_INDIRECT, F_NEXT, F_WRITE};
    use virtio_queue::{Queue, QueueT};

    fn parse_head(
        m: &GuestMemoryMmap,
        q: &TestQueue,
        head: u16,
        max: usize,
    ) -> Result<ChainBuffers, ChainError> {
        q.push_avail(m, head);
        let mut queue: Queue = q.queue();
        queue.set_next_avail(q.avail_idx(m).wrapping_sub(1));
        let chain = queue.pop_descriptor_chain(m).expect("chain");
        parse_chain(m, chain, max)
    }

    #[test]
    fn valid_chain_and_scatter_gather() {
        let m = mem();
        let q = TestQueue::new(0x1000, 16);
        q.write_desc(&m, 0, desc(0x10000, 3, F_NEXT, 1));
        q.write_desc(&m, 1, desc(0x20000, 5, F_NEXT, 2));
        q.write_desc(&m, 2, desc(0x30000, 0, F_NEXT | F_WRITE, 3)); // zero length: dropped
        q.write_desc(&m, 3, desc(0x40000, 4, F_NEXT | F_WRITE, 4));
        q.write_desc(&m, 4, desc(0x50000, 4, F_WRITE, 0));
        m.write_slice(&[1, 2, 3], GuestAddress(0x10000)).unwrap();
        m.write_slice(&[4, 5, 6, 7, 8], GuestAddress(0x20000))
            .unwrap();
        let b = parse_head(&m, &q, 0, 16).unwrap();
        assert_eq!(b.readable_len(), 8);
        assert_eq!(b.writable_len(), 8);
        assert_eq!(b.readable().len(), 2);
        assert_eq!(b.writable().len(), 2);
        let mut hdr = [0u8; 6];
        b.read_at(&m, 1, &mut hdr).unwrap();
        assert_eq!(hdr, [2, 3, 4, 5, 6, 7]);
        assert!(b.read_at(&m, 4, &mut hdr).is_err());
        assert!(b.read_at(&m, u64::MAX, &mut hdr).is_err());
        b.write_at(&m, 2, &[9, 9, 9, 9]).unwrap();
        let mut out = [0u8; 4];
        m.read_slice(&mut out, GuestAddress(0x40000)).unwrap();
        assert_eq!(out, [0, 0, 9, 9]);
        m.read_slice(&mut out, GuestAddress(0x50000)).unwrap();
        assert_eq!(out, [9, 9, 0, 0]);
        assert!(b.write_at(&m, 7, &[1, 2]).is_err());
    }

    #[test]
    fn file_io_goes_straight_between_the_file_and_the_segments() {
        let m = mem();
        let q = TestQueue::new(0x1000, 16);
        q.write_desc(&m, 0, desc(0x10000, 3, F_NEXT, 1));
        q.write_desc(&m, 1, desc(0x20000, 5, F_NEXT, 2));
        q.write_desc(&m, 2, desc(0x40000, 4, F_NEXT | F_WRITE, 3));
        q.write_desc(&m, 3, desc(0x50000, 4, F_WRITE, 0));
        m.write_slice(&[1, 2, 3], GuestAddress(0x10000)).unwrap();
        m.write_slice(&[4, 5, 6, 7, 8], GuestAddress(0x20000))
            .unwrap();
        let b = parse_head(&m, &q, 0, 16).unwrap();
        let path = std::env::temp_dir().join(format!("arbor-chain-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        // Readable bytes 1..7 (across both segments) to the file at 2.
        b.write_to_file(&m, 1, &file, 2, 6).unwrap();
        let mut got = vec![0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, 0).unwrap();
        assert_eq!(got, [0, 0, 2, 3, 4, 5, 6, 7]);
        // File bytes 3..9 into the writable area at 1 (across both segments).
        std::os::unix::fs::FileExt::write_all_at(
            &file,
            &[10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
            0,
        )
        .unwrap();
        b.read_from_file(&m, 1, &file, 3, 6).unwrap();
        let mut out = [0u8; 4];
        m.read_slice(&mut out, GuestAddress(0x40000)).unwrap();
        assert_eq!(out, [0, 13, 14, 15]);
        m.read_slice(&mut out, GuestAddress(0x50000)).unwrap();
        assert_eq!(out, [16, 17, 18, 0]);
        // Past the chain's areas: refused before any I/O.
        assert!(b.read_from_file(&m, 4, &file, 0, 8).is_err());
        assert!(b.write_to_file(&m, 4, &file, 0, 5).is_err());
        // The file ends first: an error, not a short success.
        let e = b.read_from_file(&m, 0, &file, 6, 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // Offsets beyond what the system call takes.
        assert!(b.read_from_file(&m, 0, &file, u64::MAX - 2, 1).is_err());
    }

    #[test]
    fn hostile_chains_are_rejected() {
        let m = mem();
        let q = TestQueue::new(0x1000, 16);
        // Loop: 0 -> 1 -> 0.
        q.write_desc(&m, 0, desc(0x10000, 16, F_NEXT, 1));
        q.write_desc(&m, 1, desc(0x10000, 16, F_NEXT, 0));
        assert_eq!(parse_head(&m, &q, 0, 1024), Err(ChainError::Truncated));
        // Self loop.
        q.write_desc(&m, 2, desc(0x10000, 16, F_NEXT, 2));
        assert_eq!(parse_head(&m, &q, 2, 1024), Err(ChainError::Truncated));
        // Next index out of range.
        q.write_desc(&m, 3, desc(0x10000, 16, F_NEXT, 500));
        assert_eq!(parse_head(&m, &q, 3, 1024), Err(ChainError::Truncated));
        // Head index out of range.
        assert_eq!(parse_head(&m, &q, 40, 1024), Err(ChainError::Empty));
        // Buffer outside guest memory, and one straddling its end.
        q.write_desc(&m, 4, desc(0xffff_ffff_0000, 16, 0, 0));
        assert!(matches!(
            parse_head(&m, &q, 4, 1024),
            Err(ChainError::OutOfMemory { .. })
        ));
        q.write_desc(&m, 5, desc(0xff_fff0, 0x100, F_WRITE, 0));
        assert!(matches!(
            parse_head(&m, &q, 5, 1024),
            Err(ChainError::OutOfMemory { .. })
        ));
        // Readable after writable.
        q.write_desc(&m, 6, desc(0x10000, 16, F_NEXT | F_WRITE, 7));
        q.write_desc(&m, 7, desc(0x20000, 16, 0, 0));
        assert_eq!(parse_head(&m, &q, 6, 1024), Err(ChainError::BadOrder));
        // Too many descriptors for the device.
        for i in 8..15 {
            q.write_desc(&m, i, desc(0x10000, 1, F_NEXT, i + 1));
        }
        q.write_desc(&m, 15, desc(0x10000, 1, 0, 0));
        assert_eq!(parse_head(&m, &q, 8, 4), Err(ChainError::TooLong(4)));
        assert!(parse_head(&m, &q, 8, 8).is_ok());
        // Larger than 4 GiB in total.
        q.write_desc(&m, 9, desc(0x10000, u32::MAX, F_NEXT, 10));
        q.write_desc(&m, 10, desc(0x10000, u32::MAX, 0, 0));
        assert!(parse_head(&m, &q, 9, 1024).is_err());
    }

    #[test]
    fn advertised_limits() {
        let m = mem();
        let q = TestQueue::new(0x1000, 16);
        q.write_desc(&m, 0, desc(0x10000, 16, F_NEXT, 1));
        q.write_desc(&m, 1, desc(0x20000, 0, F_NEXT, 2)); // empty: not a segment
        q.write_desc(&m, 2, desc(0x20000, 4096, F_NEXT | F_WRITE, 3));
        q.write_desc(&m, 3, desc(0x30000, 1, F_WRITE, 0));
        let b = parse_head(&m, &q, 0, 16).unwrap();
        assert_eq!(b.check_limits(3, 4096), Ok(()));
        assert_eq!(
            b.check_limits(2, 4096),
            Err(ChainError::TooManySegments { count: 3, max: 2 })
        );
        assert_eq!(
            b.check_limits(3, 4095),
            Err(ChainError::SegmentTooBig {
                len: 4096,
                max: 4095
            })
        );
    }

    #[test]
    fn indirect_tables() {
        let m = mem();
        let q = TestQueue::new(0x1000, 16);
        // Valid indirect table with two descriptors at 0x8000.
        let t = TestQueue::new(0x8000, 16);
        t.write_desc(&m, 0, desc(0x10000, 8, F_NEXT, 1));
        t.write_desc(&m, 1, desc(0x20000, 8, F_WRITE, 0));
        q.write_desc(&m, 0, desc(0x8000, 32, F_INDIRECT, 0));
        let b = parse_head(&m, &q, 0, 16).unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (8, 8));
        // Indirect table with a loop.
        t.write_desc(&m, 1, desc(0x20000, 8, F_NEXT, 0));
        assert_eq!(parse_head(&m, &q, 0, 1024), Err(ChainError::Truncated));
        // Misaligned table length, and a table outside memory.
        q.write_desc(&m, 1, desc(0x8000, 17, F_INDIRECT, 0));
        assert_eq!(parse_head(&m, &q, 1, 16), Err(ChainError::Empty));
        q.write_desc(&m, 2, desc(0xffff_0000_0000, 32, F_INDIRECT, 0));
        assert_eq!(parse_head(&m, &q, 2, 16), Err(ChainError::Empty));
        // Nested indirect.
        t.write_desc(&m, 0, desc(0x8000, 32, F_INDIRECT, 0));
        assert!(parse_head(&m, &q, 0, 16).is_err());
    }
}

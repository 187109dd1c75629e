//! virtio-blk request handling tests, driving the queue processor directly.

use std::io::Write;

use super::*;
use crate::virtio::test_utils::{desc, mem, TestQueue, F_INDIRECT, F_NEXT, F_WRITE};
use crate::virtio::worker::QueueProcessor;
use crate::virtio::{ActiveQueue, VirtioInterrupt};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

struct NoInterrupt;
impl VirtioInterrupt for NoInterrupt {
    fn signal_used_queue(&self, _q: u16) -> io::Result<()> {
        Ok(())
    }
    fn signal_config_change(&self) -> io::Result<()> {
        Ok(())
    }
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn disk(sectors: usize, cfg: impl FnOnce(&mut BlockConfig)) -> (TempFile, Block) {
    let t = TempFile::new().unwrap();
    let data: Vec<u8> = (0..sectors * 512).map(pattern).collect();
    t.as_file().write_all(&data).unwrap();
    let mut c = BlockConfig::new(t.as_path());
    c.serial = "arbor-serial-0123456789".into();
    cfg(&mut c);
    let b = Block::new(&c).unwrap();
    (t, b)
}

fn processor(b: &Block, m: &GuestMemoryMmap, q: &TestQueue) -> QueueProcessor<BlockHandler> {
    let ctx = ActivateContext {
        mem: GuestMemoryAtomic::new(m.clone()),
        interrupt: Arc::new(NoInterrupt),
        queues: vec![ActiveQueue {
            index: 0,
            queue: q.queue(),
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
        }],
        acked_features: b.features(),
    };
    QueueProcessor::new(ctx, b.handler())
}

fn hdr(m: &GuestMemoryMmap, at: u64, req: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(at)).unwrap();
}

fn status(m: &GuestMemoryMmap, at: u64) -> u8 {
    m.read_obj(GuestAddress(at)).unwrap()
}

fn file_bytes(t: &TempFile) -> Vec<u8> {
    std::fs::read(t.as_path()).unwrap()
}

#[test]
fn config_space_and_features() {
    let (_t, b) = disk(100, |_| {});
    assert_eq!(b.capacity(), 100);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 100);
    let mut seg = [0u8; 4];
    b.read_config(0x0c, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), u32::from(BLOCK_QUEUE_SIZE) - 2);
    b.read_config(0x08, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SIZE_MAX);
    let mut big = [0xffu8; 16];
    b.read_config(0x38, &mut big);
    assert_eq!(&big[4..], &[0; 12]);
    b.read_config(u64::MAX, &mut big);
    assert_eq!(big, [0; 16]);
    assert_ne!(b.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(b.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(b.features() & features::VERSION_1, 0);
    let (_t, ro) = disk(1, |c| c.read_only = true);
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    let t = TempFile::new().unwrap();
    t.as_file().write_all(&[0u8; 1024]).unwrap();
    let mut bad = BlockConfig::new(t.as_path());
    bad.queue_size = 100;
    assert!(Block::new(&bad).is_err());
    assert!(Block::new(&BlockConfig::new("/nonexistent/arbor")).is_err());
}

/// The message of `Block::new`'s error for a read-only disk at `path`.
fn refused(path: &std::path::Path, read_only: bool) -> String {
    let mut c = BlockConfig::new(path);
    c.read_only = read_only;
    let e = Block::new(&c).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    e.to_string()
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("arbor-blk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn fifo_is_refused_at_once() {
    let d = TempDir::new("fifo");
    let fifo = d.0.join("fifo");
    mkfifo(&fifo);
    // Without a writer, open(O_RDONLY) on a FIFO would wait forever: run
    // the opens on a thread and bound the wait.
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send((refused(&path, true), refused(&path, false)));
    });
    let (ro, rw) = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("opening a FIFO as a disk blocked");
    assert_eq!(ro, "it is a FIFO, not a regular file or block device");
    assert_eq!(rw, ro);
    // Even if the path becomes a FIFO after the first check, the open does
    // not block and the fstat check refuses it.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    assert!(check_kind(&file.metadata().unwrap()).is_err());
}

#[test]
fn directories_devices_and_sockets_are_refused() {
    let d = TempDir::new("kinds");
    assert_eq!(
        refused(&d.0, true),
        "it is a directory, not a regular file or block device"
    );
    assert_eq!(
        refused(std::path::Path::new("/dev/null"), true),
        "it is a character device, not a regular file or block device"
    );
    let sock = d.0.join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert_eq!(
        refused(&sock, true),
        "it is a socket, not a regular file or block device"
    );
}

#[test]
fn empty_and_partial_sector_files_are_refused() {
    let t = TempFile::new().unwrap();
    assert_eq!(refused(t.as_path(), false), "it is empty");
    assert_eq!(refused(t.as_path(), true), "it is empty");
    t.as_file().write_all(&[0u8; 1000]).unwrap();
    assert_eq!(
        refused(t.as_path(), true),
        "its size (1000 bytes) is not a multiple of 512"
    );
    // from_file checks the size too.
    let f = File::open(t.as_path()).unwrap();
    assert!(Block::from_file(f, &BlockConfig::new(t.as_path())).is_err());
    t.as_file().write_all(&[0u8; 24]).unwrap();
    assert_eq!(
        Block::new(&BlockConfig::new(t.as_path()))
            .unwrap()
            .capacity(),
        2
    );
}

#[test]
fn opened_disk_is_blocking_and_close_on_exec() {
    let t = TempFile::new().unwrap();
    t.as_file().write_all(&[0u8; 512]).unwrap();
    for ro in [true, false] {
        let f = open_disk(t.as_path(), ro).unwrap();
        // SAFETY: F_GETFL/F_GETFD on a descriptor `f` owns.
        let (fl, fd) = unsafe {
            (
                libc::fcntl(f.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(f.as_raw_fd(), libc::F_GETFD),
            )
        };
        assert_eq!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fd & libc::FD_CLOEXEC, 0);
        assert_eq!(
            fl & libc::O_ACCMODE,
            if ro { libc::O_RDONLY } else { libc::O_RDWR }
        );
    }
}

#[test]
fn read_write_flush_get_id() {
    let m = mem();
    let (t, b) = disk(64, |_| {});
    let q = TestQueue::new(0x1000, 16);
    let mut p = processor(&b, &m, &q);

    // Read sectors 2..4 into two data buffers.
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 2);
    q.add_chain(
        &m,
        &[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 0x1000, 512, true),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(p.process_queue(0), 1);
    assert_eq!(q.used_elem(&m, 0), (0, 1025));
    assert_eq!(status(&m, STATUS), S_OK);
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA + 0x1000)).unwrap();
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, &x)| x == pattern(3 * 512 + i)));

    // Write sector 5 from guest memory.
    let payload: Vec<u8> = (0..1024).map(|i| (i * 7) as u8).collect();
    m.write_slice(&payload, GuestAddress(DATA)).unwrap();
    hdr(&m, HDR + 0x100, VIRTIO_BLK_T_OUT, 5);
    q.add_chain(
        &m,
        &[
            (HDR + 0x100, 16, false),
            (DATA, 1024, false),
            (STATUS + 1, 1, true),
        ],
    );
    // Flush.
    hdr(&m, HDR + 0x200, VIRTIO_BLK_T_FLUSH, 0);
    q.add_chain(&m, &[(HDR + 0x200, 16, false), (STATUS + 2, 1, true)]);
    // GET_ID into a 32-byte buffer: 20 bytes of serial.
    hdr(&m, HDR + 0x300, VIRTIO_BLK_T_GET_ID, 0);
    m.write_slice(&[0xee; 32], GuestAddress(DATA + 0x2000))
        .unwrap();
    q.add_chain(
        &m,
        &[
            (HDR + 0x300, 16, false),
            (DATA + 0x2000, 32, true),
            (STATUS + 3, 1, true),
        ],
    );
    assert_eq!(p.process_queue(0), 3);
    assert_eq!(status(&m, STATUS + 1), S_OK);
    assert_eq!(status(&m, STATUS + 2), S_OK);
    assert_eq!(status(&m, STATUS + 3), S_OK);
    assert_eq!(q.used_elem(&m, 1).1, 1);
    assert_eq!(q.used_elem(&m, 2).1, 1);
    assert_eq!(q.used_elem(&m, 3).1, 21);
    let f = file_bytes(&t);
    assert_eq!(&f[5 * 512..7 * 512], &payload[..]);
    assert_eq!(f[4 * 512], pattern(4 * 512));
    let mut id = [0u8; 32];
    m.read_slice(&mut id, GuestAddress(DATA + 0x2000)).unwrap();
    assert_eq!(&id[..20], b"arbor-serial-0123456");
    assert_eq!(&id[20..], &[0xee; 12]);
}

#[test]
fn header_and_status_may_straddle_descriptors() {
    let m = mem();
    let (_t, b) = disk(8, |_| {});
    let q = TestQueue::new(0x1000, 16);
    let mut p = processor(&b, &m, &q);
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 1);
    let mut split = [0u8; 16];
    m.read_slice(&mut split, GuestAddress(HDR)).unwrap();
    m.write_slice(&split[8..], GuestAddress(HDR + 0x800))
        .unwrap();
    // Header in two pieces; data and status share the last writable descriptor.
    q.add_chain(
        &m,
        &[(HDR, 8, false), (HDR + 0x800, 8, false), (DATA, 513, true)],
    );
    p.process_queue(0);
    assert_eq!(q.used_elem(&m, 0).1, 513);
    assert_eq!(status(&m, DATA + 512), S_OK);
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA)).unwrap(), pattern(512));
}

#[test]
fn error_statuses() {
    let m = mem();
    let (t, b) = disk(8, |c| c.read_only = true);
    let q = TestQueue::new(0x1000, 32);
    let mut p = processor(&b, &m, &q);
    let before = file_bytes(&t);
    let cases: [(u32, u64, u32, Status); 7] = [
        (VIRTIO_BLK_T_OUT, 0, 512, S_IOERR),             // read-only
        (VIRTIO_BLK_T_IN, 8, 512, S_IOERR),              // past the end
        (VIRTIO_BLK_T_IN, 7, 1024, S_IOERR),             // straddles the end
        (VIRTIO_BLK_T_IN, u64::MAX / 256, 512, S_IOERR), // offset overflow
        (VIRTIO_BLK_T_IN, 0, 100, S_IOERR),              // not whole sectors
        (VIRTIO_BLK_T_DISCARD, 0, 16, S_UNSUPP),         // not offered when read-only
        (0x1234, 0, 512, S_UNSUPP),
    ];
    for (i, (req, sector, len, _)) in cases.iter().enumerate() {
        let h = HDR + 0x100 * i as u64;
        hdr(&m, h, *req, *sector);
        let write = *req != VIRTIO_BLK_T_OUT && *req != VIRTIO_BLK_T_DISCARD;
        q.add_chain(
            &m,
            &[
                (h, 16, false),
                (DATA, *len, write),
                (STATUS + i as u64, 1, true),
            ],
        );
    }
    assert_eq!(p.process_queue(0), cases.len());
    for (i, (_, _, _, want)) in cases.iter().enumerate() {
        assert_eq!(status(&m, STATUS + i as u64), *want, "case {i}");
        assert_eq!(q.used_elem(&m, i as u16).1, 1);
    }
    assert_eq!(file_bytes(&t), before);
    // Reads and flushes still work on a read-only disk.
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    q.add_chain(
        &m,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    hdr(&m, HDR + 0x40, VIRTIO_BLK_T_FLUSH, 0);
    q.add_chain(&m, &[(HDR + 0x40, 16, false), (STATUS + 1, 1, true)]);
    p.process_queue(0);
    assert_eq!(status(&m, STATUS), S_OK);
    assert_eq!(status(&m, STATUS + 1), S_OK);
}

#[test]
fn discard_punches_holes() {
    let m = mem();
    let (t, b) = disk(64, |_| {});
    let q = TestQueue::new(0x1000, 16);
    let mut p = processor(&b, &m, &q);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&8u64.to_le_bytes());
    seg[8..12].copy_from_slice(&16u32.to_le_bytes());
    m.write_slice(&seg, GuestAddress(DATA)).unwrap();
    hdr(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    q.add_chain(
        &m,
        &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
    );
    // Unknown flags are unsupported; ranges past the end fail.
    seg[12] = 2;
    m.write_slice(&seg, GuestAddress(DATA + 0x100)).unwrap();
    hdr(&m, HDR + 0x100, VIRTIO_BLK_T_DISCARD, 0);
    q.add_chain(
        &m,
        &[
            (HDR + 0x100, 16, false),
            (DATA + 0x100, 16, false),
            (STATUS + 1, 1, true),
        ],
    );
    seg[12] = 0;
    seg[0..8].copy_from_slice(&60u64.to_le_bytes());
    m.write_slice(&seg, GuestAddress(DATA + 0x200)).unwrap();
    hdr(&m, HDR + 0x200, VIRTIO_BLK_T_DISCARD, 0);
    q.add_chain(
        &m,
        &[
            (HDR + 0x200, 16, false),
            (DATA + 0x200, 16, false),
            (STATUS + 2, 1, true),
        ],
    );
    // Segment list that is not a multiple of 16 bytes.
    hdr(&m, HDR + 0x300, VIRTIO_BLK_T_DISCARD, 0);
    q.add_chain(
        &m,
        &[
            (HDR + 0x300, 16, false),
            (DATA, 10, false),
            (STATUS + 3, 1, true),
        ],
    );
    p.process_queue(0);
    assert_eq!(status(&m, STATUS + 1), S_UNSUPP);
    assert_eq!(status(&m, STATUS + 2), S_IOERR);
    assert_eq!(status(&m, STATUS + 3), S_IOERR);
    let st = status(&m, STATUS);
    let f = file_bytes(&t);
    assert_eq!(f.len(), 64 * 512);
    if st == S_OK {
        assert!(f[8 * 512..24 * 512].iter().all(|&x| x == 0));
    } else {
        // Filesystems without hole punching report an I/O error.
        assert_eq!(st, S_IOERR);
    }
    assert_eq!(f[24 * 512 + 1], pattern(24 * 512 + 1));
}

#[test]
fn malformed_chains_never_panic() {
    let m = mem();
    let (t, b) = disk(8, |_| {});
    let before = file_bytes(&t);
    let q = TestQueue::new(0x1000, 16);
    let mut p = processor(&b, &m, &q);
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    // No writable descriptor: no status can be written.
    q.add_chain(&m, &[(HDR, 16, false), (DATA, 512, false)]);
    // Header too short: IOERR in the status byte.
    q.add_chain(&m, &[(HDR, 8, false), (STATUS, 1, true)]);
    // Loop.
    q.write_desc(&m, 10, desc(HDR, 16, F_NEXT, 11));
    q.write_desc(&m, 11, desc(STATUS, 1, F_NEXT | F_WRITE, 10));
    q.push_avail(&m, 10);
    // Data buffer outside guest memory.
    q.write_desc(&m, 12, desc(HDR, 16, F_NEXT, 13));
    q.write_desc(&m, 13, desc(0x7fff_ffff_0000, 512, F_NEXT, 14));
    q.write_desc(&m, 14, desc(STATUS, 1, F_WRITE, 0));
    q.push_avail(&m, 12);
    // Zero-length everything.
    q.write_desc(&m, 15, desc(HDR, 0, F_WRITE, 0));
    q.push_avail(&m, 15);
    // Head out of range.
    q.push_avail(&m, 0xffff);
    assert_eq!(p.process_queue(0), 6);
    assert_eq!(q.used_elem(&m, 0).1, 0);
    assert_eq!(q.used_elem(&m, 1).1, 1);
    assert_eq!(status(&m, STATUS), S_IOERR);
    assert_eq!(q.used_elem(&m, 2).1, 0);
    assert_eq!(q.used_elem(&m, 3).1, 0);
    assert_eq!(q.used_elem(&m, 4).1, 0);
    assert_eq!(q.used_idx(&m), 5);
    assert_eq!(file_bytes(&t), before);
}

#[test]
fn oversized_and_huge_chains() {
    let m = mem();
    let (_t, b) = disk(8, |c| c.queue_size = 4);
    // max_descs = 16 for a queue of 4: an indirect table of 32 descriptors is too long.
    let q = TestQueue::new(0x1000, 4);
    let table = TestQueue::new(0x8000, 32);
    for i in 0..31 {
        table.write_desc(&m, i, desc(DATA, 512, F_NEXT | F_WRITE, i + 1));
    }
    table.write_desc(&m, 31, desc(STATUS, 1, F_WRITE, 0));
    q.write_desc(&m, 0, desc(0x8000, 32 * 16, 4, 0));
    q.push_avail(&m, 0);
    // A 8 MiB read request that exceeds the 4 KiB disk: IOERR, no huge allocation.
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    q.write_desc(&m, 1, desc(HDR, 16, F_NEXT, 2));
    q.write_desc(&m, 2, desc(0x40_0000, 8 << 20, F_NEXT | F_WRITE, 3));
    q.write_desc(&m, 3, desc(STATUS, 1, F_WRITE, 0));
    q.push_avail(&m, 1);
    let mut p = processor(&b, &m, &q);
    assert_eq!(p.process_queue(0), 2);
    assert_eq!(q.used_elem(&m, 0).1, 0);
    assert_eq!(q.used_elem(&m, 1).1, 1);
    assert_eq!(status(&m, STATUS), S_IOERR);
}

/// Simple LCG so the fuzz test needs no extra crates.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn random_descriptor_tables() {
    let m = mem();
    let (_t, b) = disk(16, |_| {});
    let q = TestQueue::new(0x1000, 16);
    let mut p = processor(&b, &m, &q);
    let mut rng = Lcg(42);
    let addrs = [HDR, DATA, STATUS, 0xff_fff0, 0x1_0000_0000, 0x1000, 0];
    for round in 0..400 {
        for i in 0..16 {
            let addr = addrs[(rng.next() % addrs.len() as u64) as usize] + rng.next() % 64;
            let len = [0u32, 1, 16, 512, 4096, u32::MAX][(rng.next() % 6) as usize];
            let flags = (rng.next() % 8) as u16;
            let next = (rng.next() % 20) as u16;
            q.write_desc(&m, i, desc(addr, len, flags, next));
        }
        // Random headers too.
        hdr(&m, HDR, (rng.next() % 12) as u32, rng.next() % 20);
        for _ in 0..(rng.next() % 5) {
            q.push_avail(&m, (rng.next() % 18) as u16);
        }
        if round % 50 == 0 {
            q.set_avail_idx(&m, rng.next() as u16);
        }
        p.process_queue(0);
    }
}

#[test]
fn more_buffers_than_seg_max_is_refused_with_ioerr() {
    let m = mem();
    // A queue of 4 advertises seg_max 2.
    let (_t, b) = disk(16, |c| c.queue_size = 4);
    let mut seg = [0u8; 4];
    b.read_config(0x0c, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), 2);
    let q = TestQueue::new(0x1000, 16);
    let mut p = processor(&b, &m, &q);
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // seg_max data buffers: served.
    q.add_chain(
        &m,
        &[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 0x1000, 512, true),
            (STATUS, 1, true),
        ],
    );
    // seg_max + 1 data buffers: refused with IOERR (the status byte is still written).
    q.add_chain(
        &m,
        &[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 0x1000, 512, true),
            (DATA + 0x2000, 512, true),
            (STATUS + 1, 1, true),
        ],
    );
    m.write_slice(&[0xaa; 512], GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(p.process_queue(0), 2);
    assert_eq!(status(&m, STATUS), S_OK);
    assert_eq!(q.used_elem(&m, 0).1, 1025);
    assert_eq!(status(&m, STATUS + 1), S_IOERR);
    assert_eq!(q.used_elem(&m, 1).1, 1);
    // Nothing was read into the refused request's extra buffer.
    assert_eq!(status(&m, DATA + 0x2000), 0xaa);
}

#[test]
fn buffer_larger_than_size_max_is_refused_with_ioerr() {
    let m = mem();
    let len = SIZE_MAX + 512;
    let (t, b) = disk(len as usize / 512, |_| {});
    let before = file_bytes(&t);
    let q = TestQueue::new(0x1000, 16);
    let mut p = processor(&b, &m, &q);
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    q.add_chain(
        &m,
        &[(HDR, 16, false), (0x40_0000, len, true), (STATUS, 1, true)],
    );
    hdr(&m, HDR + 0x100, VIRTIO_BLK_T_OUT, 0);
    q.add_chain(
        &m,
        &[
            (HDR + 0x100, 16, false),
            (0x40_0000, len, false),
            (STATUS + 1, 1, true),
        ],
    );
    // Exactly size_max: served.
    q.add_chain(
        &m,
        &[
            (HDR, 16, false),
            (0x40_0000, SIZE_MAX, true),
            (STATUS + 2, 1, true),
        ],
    );
    assert_eq!(p.process_queue(0), 3);
    assert_eq!(status(&m, STATUS), S_IOERR);
    assert_eq!(q.used_elem(&m, 0).1, 1);
    assert_eq!(status(&m, STATUS + 1), S_IOERR);
    assert_eq!(status(&m, STATUS + 2), S_OK);
    assert_eq!(q.used_elem(&m, 2).1, SIZE_MAX + 1);
    assert_eq!(file_bytes(&t), before);
}

/// Reset while the worker is busy with the largest requests the device accepts (seg_max
/// buffers of size_max bytes each, all over the same guest buffer, reading a sparse disk):
/// the reset waits for one bounded slice, not for the queued gigabytes.
#[test]
fn reset_during_huge_requests_is_bounded() {
    const CHAINS: u16 = 64;
    let t = TempFile::new().unwrap();
    t.as_file().set_len(1 << 30).unwrap();
    let mut b = Block::new(&BlockConfig::new(t.as_path())).unwrap();
    let m = mem();
    let q = TestQueue::new(0x1000, BLOCK_QUEUE_SIZE);
    // One indirect table shared by every chain: header, seg_max data buffers, status.
    let segs = seg_max(BLOCK_QUEUE_SIZE) as u16;
    let table = TestQueue::new(0x8_0000, BLOCK_QUEUE_SIZE);
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    table.write_desc(&m, 0, desc(HDR, 16, F_NEXT, 1));
    for i in 1..=segs {
        table.write_desc(&m, i, desc(DATA, SIZE_MAX, F_NEXT | F_WRITE, i + 1));
    }
    table.write_desc(&m, segs + 1, desc(STATUS, 1, F_WRITE, 0));
    let table_len = 16 * (u32::from(segs) + 2);
    for i in 0..CHAINS {
        q.write_desc(&m, i, desc(0x8_0000, table_len, F_INDIRECT, 0));
        q.push_avail(&m, i);
    }
    m.write_slice(&[0xff; 64], GuestAddress(DATA)).unwrap();
    let queued = u64::from(CHAINS) * u64::from(segs) * u64::from(SIZE_MAX);
    b.activate(ActivateContext {
        mem: GuestMemoryAtomic::new(m.clone()),
        interrupt: Arc::new(NoInterrupt),
        queues: vec![ActiveQueue {
            index: 0,
            queue: q.queue(),
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
        }],
        acked_features: b.features(),
    })
    .unwrap();
    // Wait until the worker is copying (the sparse disk reads as zeros).
    let waiting = std::time::Instant::now();
    while m.read_obj::<u8>(GuestAddress(DATA)).unwrap() != 0 {
        assert!(waiting.elapsed().as_secs() < 10, "worker never started");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let start = std::time::Instant::now();
    b.reset();
    let took = start.elapsed();
    let done = q.used_idx(&m);
    eprintln!(
        "reset with {} MiB of reads queued took {took:?}; {done} of {CHAINS} chains completed",
        queued >> 20
    );
    assert!(!b.is_active());
    assert!(
        took < std::time::Duration::from_secs(2),
        "reset took {took:?}"
    );
    // The request in progress was abandoned, not completed.
    assert!(done < CHAINS);
}

#[test]
fn raised_stop_signal_leaves_the_queue_alone() {
    let m = mem();
    let (t, b) = disk(8, |_| {});
    let before = file_bytes(&t);
    let q = TestQueue::new(0x1000, 16);
    let mut p = processor(&b, &m, &q);
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    q.add_chain(
        &m,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    p.stop_signal().raise();
    assert_eq!(p.process_queue(0), 0);
    // No completion, no status byte, no disk write after the stop.
    assert_eq!(q.used_idx(&m), 0);
    assert_eq!(status(&m, STATUS), 0xee);
    assert_eq!(file_bytes(&t), before);
}

#[test]
fn no_request_completes_while_paused() {
    let (_t, mut b) = disk(8, |_| {});
    let m = mem();
    let q = TestQueue::new(0x1000, 16);
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    let notify = event.try_clone().unwrap();
    b.activate(ActivateContext {
        mem: GuestMemoryAtomic::new(m.clone()),
        interrupt: Arc::new(NoInterrupt),
        queues: vec![ActiveQueue {
            index: 0,
            queue: q.queue(),
            event,
        }],
        acked_features: b.features(),
    })
    .unwrap();
    let paused = std::time::Instant::now();
    assert!(
        b.pause(std::time::Duration::from_secs(2)),
        "the idle worker parks"
    );
    assert!(paused.elapsed() < std::time::Duration::from_secs(2));
    // The guest queues a read and notifies: nothing completes while paused.
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    q.add_chain(
        &m,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    notify.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(q.used_idx(&m), 0, "a request completed while paused");
    // Resumed, the request completes.
    b.resume();
    let resumed = std::time::Instant::now();
    while q.used_idx(&m) == 0 {
        assert!(
            resumed.elapsed().as_secs() < 10,
            "no completion after resume"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(status(&m, STATUS), VIRTIO_BLK_S_OK as u8);
    // Pausing twice, resuming, and a reset while paused all return.
    assert!(b.pause(std::time::Duration::from_secs(2)));
    assert!(b.pause(std::time::Duration::from_secs(2)));
    let start = std::time::Instant::now();
    b.reset();
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
    assert!(!b.is_active());
    // A device without a worker pauses at once.
    assert!(b.pause(std::time::Duration::from_millis(1)));
    b.resume();
}

fn image() -> TempFile {
    let t = TempFile::new().unwrap();
    t.as_file().write_all(&[0u8; 4096]).unwrap();
    t
}

fn cfg(t: &TempFile, read_only: bool, lock: bool) -> BlockConfig {
    let mut c = BlockConfig::new(t.as_path());
    c.read_only = read_only;
    c.lock = lock;
    c
}

#[test]
fn second_writer_is_refused_and_freed_on_drop() {
    let t = image();
    let first = Block::new(&cfg(&t, false, true)).unwrap();
    let e = Block::new(&cfg(&t, false, true)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
    assert!(e.to_string().contains("in use"), "{e}");
    assert!(e.to_string().contains("lock=off"), "{e}");
    drop(first);
    // The locks went with the first file: the image is free again.
    Block::new(&cfg(&t, false, true)).unwrap();
}

#[test]
fn readers_share() {
    let t = image();
    let a = Block::new(&cfg(&t, true, true)).unwrap();
    let b = Block::new(&cfg(&t, true, true)).unwrap();
    drop((a, b));
}

#[test]
fn reader_and_writer_exclude_each_other_in_either_order() {
    // As with QEMU's defaults, a reader needs a consistent view and so
    // forbids writers: a writer then a reader, or a reader then a writer,
    // is refused.
    let t = image();
    let w = Block::new(&cfg(&t, false, true)).unwrap();
    let e = Block::new(&cfg(&t, true, true)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
    drop(w);
    let r = Block::new(&cfg(&t, true, true)).unwrap();
    let e = Block::new(&cfg(&t, false, true)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
    drop(r);
}

#[test]
fn lock_off_bypasses_and_takes_no_locks() {
    let t = image();
    let _w = Block::new(&cfg(&t, false, true)).unwrap();
    // lock=off neither checks nor locks...
    let unlocked = Block::new(&cfg(&t, false, false)).unwrap();
    drop(_w);
    // ...so once the locked writer is gone, a locked writer gets in while
    // the unlocked one is still open.
    Block::new(&cfg(&t, false, true)).unwrap();
    drop(unlocked);
}

#[test]
fn lock_bytes_are_qemus() {
    // A writer holds "consistent read" and "write" (bytes 100, 101) and
    // forbids "write" and "resize" (bytes 201, 203); a reader the same
    // without byte 101. Another description tests them.
    let t = image();
    let probe = std::fs::File::open(t.as_path()).unwrap();
    let locked = |byte: i64| {
        ofd_lock(&probe, libc::F_OFD_GETLK, libc::F_WRLCK, byte).unwrap() != libc::F_UNLCK
    };
    let all = [100, 101, 102, 103, 200, 201, 202, 203];
    for (ro, want) in [
        (false, vec![100, 101, 201, 203]),
        (true, vec![100, 201, 203]),
    ] {
        let f = open_disk(t.as_path(), ro).unwrap();
        lock_disk(&f, ro).unwrap();
        let got: Vec<i64> = all.iter().copied().filter(|&b| locked(b)).collect();
        assert_eq!(got, want, "read_only={ro}");
        drop(f);
        assert!(all.iter().all(|&b| !locked(b)));
    }
}

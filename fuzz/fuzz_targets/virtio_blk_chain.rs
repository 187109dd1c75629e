//! Descriptor chains from the input through virtio-blk's request handling
//! (`QueueProcessor::process_queue` with the block handler, as the worker
//! thread runs it), on a small temp-file disk.
//!
//! Input: byte 0: how many avail entries (0..=16); byte 1: feature choice
//! (event index, read-only disk); then 16 descriptors of 16 bytes (address,
//! length, flags, next: as a driver writes them, with the address folded
//! into guest memory or just past it), then 16 avail heads (u16 LE); the
//! rest is copied into guest memory at `DATA` (request headers, indirect
//! tables, payload). Invariants: no more chains are handled than offered,
//! the used index advances by no more than that, a drained ring yields
//! nothing more, and the disk's size never changes.

#![no_main]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::worker::QueueProcessor;
use devices::virtio::{ActivateContext, ActiveQueue, VirtioDevice, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: u64 = 256 << 10;
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const DATA: u64 = 0x1000;
const DISK_SECTORS: usize = 64;
const RING_EVENT_IDX: u64 = 1 << 29;

struct NoInterrupt;
impl VirtioInterrupt for NoInterrupt {
    fn signal_used_queue(&self, _q: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The disk image, created once and rewritten before each input.
fn image() -> &'static TempFile {
    static IMAGE: OnceLock<TempFile> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let t = TempFile::new().unwrap();
        t.as_file()
            .write_all(&vec![0x5a; DISK_SECTORS * 512])
            .unwrap();
        t
    })
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fuzz_target!(|data: &[u8]| {
    let header = 2 + 16 * usize::from(QUEUE_SIZE) + 2 * usize::from(QUEUE_SIZE);
    if data.len() < header {
        return;
    }
    let offered = u16::from(data[0]) % (QUEUE_SIZE + 1);
    let event_idx = data[1] & 1 != 0;
    let read_only = data[1] & 2 != 0;

    let img = image();
    img.as_file()
        .write_all_at(&vec![0x5a; DISK_SECTORS * 512], 0)
        .unwrap();
    img.as_file().set_len((DISK_SECTORS * 512) as u64).unwrap();
    let mut cfg = BlockConfig::new(img.as_path());
    cfg.read_only = read_only;
    let block = Block::new(&cfg).unwrap();

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    for i in 0..usize::from(QUEUE_SIZE) {
        let d = &data[2 + 16 * i..2 + 16 * (i + 1)];
        let mut raw = [0u8; 16];
        raw.copy_from_slice(d);
        // Fold the address so most land in memory; some run past its end.
        let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
        let folded = if addr >> 63 == 0 {
            addr % (MEM_SIZE + 0x1000)
        } else {
            addr
        };
        raw[0..8].copy_from_slice(&folded.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DESC + 16 * i as u64))
            .unwrap();
    }
    let heads = 2 + 16 * usize::from(QUEUE_SIZE);
    for i in 0..usize::from(QUEUE_SIZE) {
        let head = u16_at(data, heads + 2 * i);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    mem.write_obj(offered, GuestAddress(AVAIL + 2)).unwrap();
    let payload = &data[header..];
    let room = (MEM_SIZE - DATA) as usize;
    mem.write_slice(&payload[..payload.len().min(room)], GuestAddress(DATA))
        .unwrap();

    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let mut features = block.features();
    if !event_idx {
        features &= !RING_EVENT_IDX;
    }
    let ctx = ActivateContext {
        mem: GuestMemoryAtomic::new(mem.clone()),
        interrupt: Arc::new(NoInterrupt),
        queues: vec![ActiveQueue {
            index: 0,
            queue: q,
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
        }],
        acked_features: features,
    };
    let mut processor = QueueProcessor::new(ctx, block.handler());
    let handled = processor.process_queue(0);
    assert!(handled <= usize::from(offered), "{handled} > {offered}");
    // A chain whose head is out of range is handled but cannot be returned.
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert!(
        usize::from(used) <= handled,
        "used {used} > handled {handled}"
    );
    // Nothing more to do once the ring is drained.
    assert_eq!(processor.process_queue(0), 0);
    drop(processor);
    let len = img.as_file().metadata().unwrap().len();
    assert_eq!(len, (DISK_SECTORS * 512) as u64);
});

//! Test helpers: guest memory and a hand-built split virtqueue, playing the driver's role.

use std::cell::Cell;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// 16 MiB of guest memory at address 0.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// A raw split descriptor.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDesc {
    RawDesc {
        addr,
        len,
        flags,
        next,
    }
}

/// A split virtqueue laid out in guest memory at `base`.
pub struct TestQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_free: Cell<u16>,
}

impl TestQueue {
    pub fn new(base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestQueue {
            desc: base,
            avail,
            used,
            size,
            next_free: Cell::new(0),
        }
    }

    pub fn write_desc(&self, m: &GuestMemoryMmap, idx: u16, d: RawDesc) {
        let a = GuestAddress(self.desc + 16 * u64::from(idx));
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        m.write_slice(&b, a).unwrap();
    }

    pub fn avail_idx(&self, m: &GuestMemoryMmap) -> u16 {
        m.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    /// Overwrite the avail index (hostile drivers).
    pub fn set_avail_idx(&self, m: &GuestMemoryMmap, idx: u16) {
        m.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    pub fn push_avail(&self, m: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx(m);
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(idx % self.size));
        m.write_obj(head, slot).unwrap();
        m.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Write `used_event` (event-index suppression: interrupt me once used idx passes it).
    pub fn set_used_event(&self, m: &GuestMemoryMmap, v: u16) {
        let a = self.avail + 4 + 2 * u64::from(self.size);
        m.write_obj(v, GuestAddress(a)).unwrap();
    }

    pub fn used_idx(&self, m: &GuestMemoryMmap) -> u16 {
        m.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (id, len) of used ring entry `i`.
    pub fn used_elem(&self, m: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let a = self.used + 4 + 8 * u64::from(i % self.size);
        (
            m.read_obj(GuestAddress(a)).unwrap(),
            m.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    /// Write a chain of `(addr, len, device_writable)` buffers into free descriptors and make
    /// it available. Returns the head index.
    pub fn add_chain(&self, m: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_free.get();
        let n = bufs.len() as u16;
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let mut flags = if *w { F_WRITE } else { 0 };
            if (i as u16) + 1 < n {
                flags |= F_NEXT;
            }
            self.write_desc(m, idx, desc(*addr, *len, flags, (idx + 1) % self.size));
        }
        self.next_free.set((head + n) % self.size);
        self.push_avail(m, head);
        head
    }

    /// A ready `Queue` pointing at this layout.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }
}

/// An interrupt sink counting what devices signal.
#[derive(Debug, Default)]
pub struct TestInterrupt {
    pub used: std::sync::atomic::AtomicUsize,
    pub config: std::sync::atomic::AtomicUsize,
}

impl super::VirtioInterrupt for TestInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        self.used.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        self.config
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// An activation context over `m` (from [`mem`]) with `n` queues of size 16 laid out like
/// `TestQueue::new(0x10_0000 + i * 0x1_0000, 16)` (build the same `TestQueue`s to play the
/// driver), and the driver's side of their notification EventFds.
pub fn activate_context(
    m: &GuestMemoryMmap,
    n: u16,
    interrupt: std::sync::Arc<dyn super::VirtioInterrupt>,
) -> (super::ActivateContext, Vec<vmm_sys_util::eventfd::EventFd>) {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let mut queues = Vec::new();
    let mut notify = Vec::new();
    for i in 0..n {
        let tq = TestQueue::new(0x10_0000 + u64::from(i) * 0x1_0000, 16);
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        notify.push(event.try_clone().unwrap());
        queues.push(super::ActiveQueue {
            index: i,
            queue: tq.queue(),
            event,
        });
    }
    let ctx = super::ActivateContext {
        mem: vm_memory::GuestMemoryAtomic::new(m.clone()),
        interrupt,
        queues,
        acked_features: super::features::VERSION_1,
    };
    (ctx, notify)
}

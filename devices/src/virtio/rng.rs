//! virtio-rng: one queue of device-writable buffers filled from the host's `getrandom(2)`.
//!
//! At most [`MAX_BYTES_PER_REQUEST`] bytes are produced per chain (the driver asks again for
//! more); the used length tells the driver how much was written. Device-readable
//! descriptors are ignored; a malformed chain is returned with length 0.

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::chain::parse_chain;
use super::worker::{QueueHandler, StopSignal, WorkerSlot};
use super::{device_type, features, ActivateContext, ActivateError, VirtioDevice};
use crate::guest_warn;

/// Queue size.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Upper bound of random bytes returned per request.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
const MAX_DESCRIPTORS: usize = 1024;

/// Fill `buf` from the kernel CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the duration of
        // the call, and getrandom writes at most that many bytes into it.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

struct RngHandler {
    buf: Vec<u8>,
}

impl RngHandler {
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let bufs = match parse_chain(mem, chain, MAX_DESCRIPTORS) {
            Ok(b) => b,
            Err(e) => {
                guest_warn!("virtio-rng: bad descriptor chain: {e}");
                return 0;
            }
        };
        let len = (bufs.writable_len() as usize).min(MAX_BYTES_PER_REQUEST);
        if len == 0 {
            return 0;
        }
        self.buf.resize(len, 0);
        if let Err(e) = fill_random(&mut self.buf) {
            guest_warn!("virtio-rng: getrandom failed: {e}");
            return 0;
        }
        match bufs.write_at(mem, 0, &self.buf) {
            Ok(()) => len as u32,
            Err(e) => {
                guest_warn!("virtio-rng: cannot write guest buffer: {e}");
                0
            }
        }
    }
}

impl QueueHandler for RngHandler {
    fn process_chain(
        &mut self,
        _queue: usize,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        _stop: &StopSignal,
    ) -> Option<u32> {
        // At most MAX_BYTES_PER_REQUEST bytes per chain: no slicing needed.
        Some(self.handle(mem, chain))
    }
}

/// The virtio entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    worker: WorkerSlot,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX
    }

    fn config_len(&self) -> usize {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = RngHandler { buf: Vec::new() };
        self.worker.start("virtio-rng", 1, ctx, handler)
    }

    fn worker(&self) -> &WorkerSlot {
        &self.worker
    }

    fn worker_mut(&mut self) -> &mut WorkerSlot {
        &mut self.worker
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{desc, mem, TestQueue, F_NEXT, F_WRITE};
    use crate::virtio::worker::QueueProcessor;
    use crate::virtio::{ActiveQueue, VirtioInterrupt};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Default)]
    struct CountingInterrupt(AtomicU32);
    impl VirtioInterrupt for CountingInterrupt {
        fn signal_used_queue(&self, _q: u16) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn signal_config_change(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn processor(
        m: &GuestMemoryMmap,
        q: &TestQueue,
    ) -> (QueueProcessor<RngHandler>, Arc<CountingInterrupt>) {
        let irq = Arc::new(CountingInterrupt::default());
        let ctx = ActivateContext {
            mem: GuestMemoryAtomic::new(m.clone()),
            interrupt: irq.clone(),
            queues: vec![ActiveQueue {
                index: 0,
                queue: q.queue(),
                event: EventFd::new(EFD_NONBLOCK).unwrap(),
            }],
            acked_features: features::VERSION_1,
        };
        (
            QueueProcessor::new(ctx, RngHandler { buf: Vec::new() }),
            irq,
        )
    }

    #[test]
    fn fills_writable_buffers() {
        let m = mem();
        let q = TestQueue::new(0x1000, 16);
        q.add_chain(&m, &[(0x10000, 64, true), (0x20000, 64, true)]);
        q.add_chain(&m, &[(0x30000, 0x20000, true)]);
        let (mut p, irq) = processor(&m, &q);
        assert_eq!(p.process_queue(0), 2);
        assert_eq!(q.used_idx(&m), 2);
        assert_eq!(q.used_elem(&m, 0), (0, 128));
        assert_eq!(q.used_elem(&m, 1).1, MAX_BYTES_PER_REQUEST as u32);
        let mut b = [0u8; 64];
        m.read_slice(&mut b, GuestAddress(0x20000)).unwrap();
        assert!(b.iter().any(|&x| x != 0));
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn hostile_chains_get_zero_length() {
        let m = mem();
        let q = TestQueue::new(0x1000, 16);
        q.write_desc(&m, 0, desc(0x10000, 16, F_NEXT | F_WRITE, 0)); // loop
        q.push_avail(&m, 0);
        q.write_desc(&m, 1, desc(0xffff_0000_0000, 16, F_WRITE, 0)); // outside memory
        q.push_avail(&m, 1);
        q.write_desc(&m, 2, desc(0x10000, 0, F_WRITE, 0)); // zero length
        q.push_avail(&m, 2);
        q.write_desc(&m, 3, desc(0x10000, 16, 0, 0)); // read-only buffer
        q.push_avail(&m, 3);
        q.push_avail(&m, 200); // head out of range
        let (mut p, _) = processor(&m, &q);
        assert_eq!(p.process_queue(0), 5);
        for i in 0..4 {
            assert_eq!(q.used_elem(&m, i).1, 0);
        }
        // The out-of-range head cannot be returned.
        assert_eq!(q.used_idx(&m), 4);
        // Avail index far ahead of the ring: nothing popped, no hang.
        q.set_avail_idx(&m, q.avail_idx(&m).wrapping_add(1000));
        assert_eq!(p.process_queue(0), 0);
    }

    #[test]
    fn getrandom_fills() {
        let mut b = [0u8; 4096];
        fill_random(&mut b).unwrap();
        assert!(b.iter().any(|&x| x != 0));
        fill_random(&mut []).unwrap();
    }
}

//! Frame movement against a fake tap, with well-formed and hostile chains.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::test_utils::{desc, mem, TestQueue, F_NEXT, F_WRITE};

#[derive(Default)]
struct FakeTap {
    inbox: Mutex<VecDeque<Vec<u8>>>,
    sent: Mutex<Vec<Vec<u8>>>,
    fail_reads: Mutex<bool>,
}

impl TapIo for FakeTap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        if *self.fail_reads.lock().unwrap() {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        match self.inbox.lock().unwrap().pop_front() {
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        self.sent.lock().unwrap().push(buf.to_vec());
        Ok(buf.len())
    }
    fn set_offload(&self, _flags: libc::c_uint) -> io::Result<()> {
        Ok(())
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    f[..VNET_HDR_LEN].fill(0);
    f
}

fn engine(tap: &Arc<FakeTap>, mrg: bool) -> NetEngine {
    let acked = if mrg { nf::MRG_RXBUF } else { 0 };
    NetEngine::new(tap.clone(), acked | features::VERSION_1)
}

fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    m.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}

#[test]
fn receive_into_one_buffer_sets_num_buffers() {
    let m = mem();
    let tq = TestQueue::new(0x1000, 16);
    let tap = Arc::new(FakeTap::default());
    let f = frame(100, 1);
    tap.inbox.lock().unwrap().push_back(f.clone());
    tq.add_chain(&m, &[(0x10000, 2048, true)]);
    let mut q = tq.queue();
    let mut e = engine(&tap, true);
    let mut r = Round::default();
    // Frame delivered, then the ring is empty.
    assert!(matches!(e.receive(&m, &mut q, &mut r), RxStop::NoBuffers));
    assert!(r.used && !r.force_signal);
    assert_eq!(tq.used_idx(&m), 1);
    assert_eq!(tq.used_elem(&m, 0), (0, 100));
    let got = read(&m, 0x10000, 100);
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
}

#[test]
fn large_frame_is_merged_and_published_at_once() {
    let m = mem();
    let tq = TestQueue::new(0x1000, 16);
    let tap = Arc::new(FakeTap::default());
    let f = frame(4000, 2);
    tap.inbox.lock().unwrap().push_back(f.clone());
    // Only two 1500-byte buffers: the frame waits for a third.
    tq.add_chain(&m, &[(0x10000, 1500, true)]);
    tq.add_chain(&m, &[(0x20000, 1500, true)]);
    let mut q = tq.queue();
    let mut e = engine(&tap, true);
    let mut r = Round::default();
    assert!(matches!(e.receive(&m, &mut q, &mut r), RxStop::NoBuffers));
    assert!(e.holding());
    assert_eq!(tq.used_idx(&m), 0, "no partial frame is visible");
    tq.add_chain(&m, &[(0x30000, 1500, true)]);
    tq.add_chain(&m, &[(0x40000, 1500, true)]);
    let mut r = Round::default();
    assert!(matches!(e.receive(&m, &mut q, &mut r), RxStop::TapEmpty));
    assert!(r.force_signal);
    assert_eq!(tq.used_idx(&m), 3);
    assert_eq!(tq.used_elem(&m, 0), (0, 1500));
    assert_eq!(tq.used_elem(&m, 1), (1, 1500));
    assert_eq!(tq.used_elem(&m, 2), (2, 1000));
    let mut got = read(&m, 0x10000, 1500);
    got.extend(read(&m, 0x20000, 1500));
    got.extend(read(&m, 0x30000, 1000));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[12..], &f[12..]);
}

#[test]
fn no_read_from_the_tap_without_buffers() {
    let m = mem();
    let tq = TestQueue::new(0x1000, 16);
    let tap = Arc::new(FakeTap::default());
    for i in 0..10 {
        tap.inbox.lock().unwrap().push_back(frame(60, i));
    }
    let mut q = tq.queue();
    let mut e = engine(&tap, true);
    let mut r = Round::default();
    assert!(matches!(e.receive(&m, &mut q, &mut r), RxStop::NoBuffers));
    assert_eq!(
        tap.inbox.lock().unwrap().len(),
        10,
        "nothing buffered in the VMM"
    );
    assert!(!e.holding());
    tq.add_chain(&m, &[(0x10000, 2048, true)]);
    tq.add_chain(&m, &[(0x11000, 2048, true)]);
    assert!(matches!(e.receive(&m, &mut q, &mut r), RxStop::NoBuffers));
    assert_eq!(tap.inbox.lock().unwrap().len(), 8);
    assert_eq!(tq.used_idx(&m), 2);
}

#[test]
fn without_mergeable_buffers_a_short_buffer_drops_the_frame() {
    let m = mem();
    let tq = TestQueue::new(0x1000, 16);
    let tap = Arc::new(FakeTap::default());
    tap.inbox.lock().unwrap().push_back(frame(3000, 3));
    tap.inbox.lock().unwrap().push_back(frame(80, 4));
    tq.add_chain(&m, &[(0x10000, 1500, true)]);
    let mut q = tq.queue();
    let mut e = engine(&tap, false);
    let mut r = Round::default();
    assert!(matches!(e.receive(&m, &mut q, &mut r), RxStop::NoBuffers));
    // The big frame was dropped, the small one went into the same buffer.
    assert_eq!(tq.used_idx(&m), 1);
    assert_eq!(tq.used_elem(&m, 0), (0, 80));
}

#[test]
fn hostile_receive_chains() {
    let m = mem();
    let tq = TestQueue::new(0x1000, 16);
    let tap = Arc::new(FakeTap::default());
    tap.inbox.lock().unwrap().push_back(frame(200, 5));
    tq.write_desc(&m, 0, desc(0x10000, 16, F_NEXT | F_WRITE, 0)); // loop
    tq.push_avail(&m, 0);
    tq.write_desc(&m, 1, desc(0xffff_0000_0000, 4096, F_WRITE, 0)); // outside memory
    tq.push_avail(&m, 1);
    tq.write_desc(&m, 2, desc(0x10000, 4096, 0, 0)); // wrong direction
    tq.push_avail(&m, 2);
    tq.write_desc(&m, 3, desc(0x10000, 4, F_WRITE, 0)); // shorter than the header
    tq.push_avail(&m, 3);
    tq.write_desc(&m, 4, desc(0x10000, u32::MAX, F_WRITE, 0)); // huge
    tq.push_avail(&m, 4);
    tq.push_avail(&m, 300); // head out of range
    tq.write_desc(&m, 5, desc(0x20000, 4096, F_WRITE, 0)); // finally a good one
    tq.push_avail(&m, 5);
    let mut q = tq.queue();
    let mut e = engine(&tap, true);
    let mut r = Round::default();
    let stop = e.receive(&m, &mut q, &mut r);
    assert!(matches!(stop, RxStop::NoBuffers), "{stop:?}");
    assert_eq!(tq.used_idx(&m), 6);
    for i in 0..5 {
        assert_eq!(tq.used_elem(&m, i).1, 0);
    }
    assert_eq!(tq.used_elem(&m, 5), (5, 200));
    // Avail index far ahead of the ring: bounded, no panic.
    tap.inbox.lock().unwrap().push_back(frame(200, 6));
    tq.set_avail_idx(&m, tq.avail_idx(&m).wrapping_add(1000));
    let _ = e.receive(&m, &mut q, &mut r);
}

#[test]
fn tiny_buffers_that_cannot_hold_a_frame_drop_it() {
    let m = mem();
    let tq = TestQueue::new(0x1000, 4);
    let tap = Arc::new(FakeTap::default());
    tap.inbox.lock().unwrap().push_back(frame(1000, 7));
    for i in 0..4 {
        tq.add_chain(&m, &[(0x10000 + 0x100 * i, 16, true)]);
    }
    let mut q = tq.queue();
    let mut e = engine(&tap, true);
    let mut r = Round::default();
    let _ = e.receive(&m, &mut q, &mut r);
    assert!(!e.holding());
    assert_eq!(tq.used_idx(&m), 4);
    for i in 0..4 {
        assert_eq!(tq.used_elem(&m, i).1, 0);
    }
}

#[test]
fn tap_read_error_is_reported() {
    let m = mem();
    let tq = TestQueue::new(0x1000, 16);
    let tap = Arc::new(FakeTap::default());
    *tap.fail_reads.lock().unwrap() = true;
    tq.add_chain(&m, &[(0x10000, 2048, true)]);
    let mut q = tq.queue();
    let mut e = engine(&tap, true);
    let mut r = Round::default();
    assert!(matches!(
        e.receive(&m, &mut q, &mut r),
        RxStop::TapFailed(_)
    ));
    assert_eq!(tq.used_idx(&m), 0);
}

#[test]
fn transmit_and_hostile_transmit_chains() {
    let m = mem();
    let tq = TestQueue::new(0x1000, 16);
    let tap = Arc::new(FakeTap::default());
    let f = frame(300, 9);
    m.write_slice(&f[..12], GuestAddress(0x10000)).unwrap();
    m.write_slice(&f[12..], GuestAddress(0x20000)).unwrap();
    tq.add_chain(&m, &[(0x10000, 12, false), (0x20000, 288, false)]); // good, split header
    tq.add_chain(&m, &[(0x10000, 8, false)]); // shorter than the header
    tq.add_chain(&m, &[(0x10000, 2000, true)]); // wrong direction
    tq.add_chain(&m, &[(0x10000, 0x20000, false)]); // larger than any frame
    tq.write_desc(&m, 10, desc(0x10000, 16, F_NEXT, 10)); // loop
    tq.push_avail(&m, 10);
    tq.push_avail(&m, 999); // out of range
    let mut q = tq.queue();
    let mut e = engine(&tap, true);
    let mut r = Round::default();
    // Six popped; the out-of-range head cannot be returned.
    assert_eq!(e.transmit(&m, &mut q, true, 100, &mut r), 6);
    assert_eq!(
        tap.sent.lock().unwrap().as_slice(),
        std::slice::from_ref(&f)
    );
    assert_eq!(tq.used_idx(&m), 5);
    // Bounded by the budget.
    for _ in 0..3 {
        tq.add_chain(&m, &[(0x10000, 12, false), (0x20000, 288, false)]);
    }
    assert_eq!(e.transmit(&m, &mut q, true, 2, &mut r), 2);
    // A failed tap drops frames but returns the chains.
    assert_eq!(e.transmit(&m, &mut q, false, 10, &mut r), 1);
    assert_eq!(tap.sent.lock().unwrap().len(), 3);
}

#[test]
fn config_space_and_features() {
    let tap = Tap::open("x y").unwrap_err();
    assert!(matches!(tap, TapError::BadName(_)));
    assert_eq!(
        tap_offload(nf::GUEST_CSUM | nf::GUEST_TSO4 | nf::GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    assert_eq!(tap_offload(nf::GUEST_TSO4), 0, "TSO needs checksum offload");
    assert_eq!(tap_offload(0), 0);
}

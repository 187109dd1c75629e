//! The vsock device with its real event worker; the test plays the driver with hand-built
//! queues in test memory.

use super::packet::{op, HOST_CID, TYPE_STREAM};
use super::*;
use crate::virtio::test_utils::{activate_context, desc, mem, TestInterrupt, TestQueue, F_NEXT};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "arbor-vsock-dev-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn guest_pkt(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 1 << 16,
        ..Default::default()
    }
}

#[test]
fn config_cid_and_bad_cids() {
    let dir = tmpdir();
    for bad in [0u64, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(Vsock::new(bad, &dir.join("x")).is_err(), "cid {bad}");
    }
    let v = Vsock::new(0x1_2345, &dir.join("v")).unwrap();
    let mut b = [0xffu8; 8];
    v.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1_2345);
    let mut b = [0xffu8; 4];
    v.read_config(6, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    v.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    assert_eq!(v.device_type(), 19);
    // The path is taken while the device lives (a socket, or any file), and freed after.
    assert!(Vsock::new(3, &dir.join("v")).is_err());
    std::fs::write(dir.join("f"), b"x").unwrap();
    assert!(Vsock::new(3, &dir.join("f")).is_err());
    assert!(Vsock::new(3, &dir.join("missing/v")).is_err());
    drop(v);
    assert!(!dir.join("v").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn worker_moves_packets_and_survives_hostile_chains() {
    let dir = tmpdir();
    let path = dir.join("v.sock");
    let mut dev = Vsock::new(3, &path).unwrap();
    let m = mem();
    let irq = Arc::new(TestInterrupt::default());
    let (ctx, notify) = activate_context(&m, 3, irq.clone());
    let rxq = TestQueue::new(0x10_0000, 16);
    let txq = TestQueue::new(0x11_0000, 16);
    dev.activate(ctx).unwrap();

    // Hostile TX chains: too short for a header, len beyond the chain, a broken chain.
    let short = 0x20_0000;
    m.write_slice(&[0u8; 10], GuestAddress(short)).unwrap();
    txq.add_chain(&m, &[(short, 10, false)]);
    let long = 0x20_1000;
    m.write_slice(
        &guest_pkt(op::RW, 1, 2, 5000).to_bytes(),
        GuestAddress(long),
    )
    .unwrap();
    txq.add_chain(&m, &[(long, 44 + 100, false)]);
    txq.write_desc(&m, 5, desc(0x20_2000, 44, F_NEXT, 5)); // loop
    txq.push_avail(&m, 5);
    // A REQUEST to a host port nobody listens on.
    let req = 0x20_3000;
    m.write_slice(
        &guest_pkt(op::REQUEST, 1000, 4444, 0).to_bytes(),
        GuestAddress(req),
    )
    .unwrap();
    txq.add_chain(&m, &[(req, 44, false)]);
    notify[1].write(1).unwrap();
    wait_until(|| txq.used_idx(&m) == 4);

    // The RST waits for an RX buffer; give one.
    let rxbuf = 0x30_0000;
    rxq.add_chain(&m, &[(rxbuf, 44 + 4096, true)]);
    notify[0].write(1).unwrap();
    wait_until(|| rxq.used_idx(&m) == 1);
    let mut raw = [0u8; 44];
    m.read_slice(&mut raw, GuestAddress(rxbuf)).unwrap();
    let h = Header::from_bytes(&raw);
    assert_eq!(
        (h.op, h.src_port, h.dst_port, h.dst_cid),
        (op::RST, 4444, 1000, 3)
    );
    assert_eq!(rxq.used_elem(&m, 0).1, 44);

    // A host client: CONNECT reaches the guest as REQUEST once a buffer is there.
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(b"CONNECT 5000\n").unwrap();
    rxq.add_chain(&m, &[(rxbuf + 0x2000, 44 + 4096, true)]);
    notify[0].write(1).unwrap();
    wait_until(|| rxq.used_idx(&m) == 2);
    m.read_slice(&mut raw, GuestAddress(rxbuf + 0x2000))
        .unwrap();
    let h = Header::from_bytes(&raw);
    assert_eq!((h.op, h.dst_port), (op::REQUEST, 5000));
    // The guest accepts; the host gets OK and then data flows to the guest.
    let resp = 0x20_4000;
    m.write_slice(
        &guest_pkt(op::RESPONSE, 5000, h.src_port, 0).to_bytes(),
        GuestAddress(resp),
    )
    .unwrap();
    txq.add_chain(&m, &[(resp, 44, false)]);
    notify[1].write(1).unwrap();
    let mut ok = [0u8; 14];
    c.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK 1073741824\n");
    c.write_all(b"data!").unwrap();
    rxq.add_chain(
        &m,
        &[(rxbuf + 0x4000, 20, true), (rxbuf + 0x5000, 4096, true)],
    );
    notify[0].write(1).unwrap();
    wait_until(|| rxq.used_idx(&m) == 3);
    assert_eq!(rxq.used_elem(&m, 2).1, 49);
    let mut d = [0u8; 5];
    m.read_slice(&mut d, GuestAddress(rxbuf + 0x5000 + 24))
        .unwrap();
    assert_eq!(&d, b"data!");
    assert!(irq.used.load(Ordering::SeqCst) > 0);

    // Reset closes the host connection; the socket file stays until the device goes.
    dev.reset();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(path.exists());
    drop(dev);
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(dir);
}

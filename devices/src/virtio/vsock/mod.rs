//! virtio-vsock (device type 19): guest stream sockets forwarded to host UNIX sockets.
//!
//! Three queues: RX (device-writable buffers the device fills with packets for the guest),
//! TX (packets from the guest), event (transport events; this device never sends one, so
//! its buffers simply stay in the ring). The configuration space is the guest's CID
//! (`u64`, little endian). Only stream sockets exist.
//!
//! [`Vsock::new`] binds the host listening socket at creation, so a taken or unreachable
//! path fails the request that added the device; the socket file is removed when the
//! device is dropped. On activation an event worker (thread "virtio-vsock") runs a
//! [`VsockHandler`]: the [`muxer::Muxer`] registers the listener and every connection's
//! UNIX socket with the worker's epoll; TX chains are parsed ([`packet::Header::parse`]),
//! handed to the muxer and returned at once; RX chains are only popped when the muxer has
//! a packet to send, otherwise they wait in the ring. Each callback handles at most
//! [`BUDGET`] chains per queue and re-arms the queue to come back for the rest.

pub mod muxer;
pub mod packet;

use std::io;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use self::muxer::{FdRegistry, Muxer};
use self::packet::{Header, HDR_LEN, MAX_PAYLOAD};
use super::chain::parse_chain;
use super::event_worker::{DeviceQueues, EventControl, EventHandler};
use super::worker::WorkerSlot;
use super::{device_type, features, ActivateContext, ActivateError, VirtioDevice};
use crate::guest_warn;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Chains handled per queue per callback.
pub const BUDGET: usize = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const MAX_DESCRIPTORS: usize = 64;

/// Lowest CID a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Highest CID accepted (`u32::MAX` is VMADDR_CID_ANY; wider CIDs are not used by Linux).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

impl FdRegistry for EventControl {
    fn add(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        EventControl::add(self, fd, events, token)
    }
    fn modify(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        EventControl::modify(self, fd, events, token)
    }
    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        EventControl::remove(self, fd)
    }
}

/// The worker-side state: the muxer and a bounce buffer for payloads.
pub struct VsockHandler {
    mux: Muxer,
    buf: Vec<u8>,
}

impl VsockHandler {
    /// Read one TX chain and hand the packet to the muxer.
    fn tx_one(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        reg: &mut dyn FdRegistry,
    ) {
        let bufs = match parse_chain(mem, chain, MAX_DESCRIPTORS) {
            Ok(b) => b,
            Err(e) => {
                guest_warn!("virtio-vsock: bad TX chain: {e}");
                return;
            }
        };
        let mut raw = [0u8; HDR_LEN];
        let have = bufs.readable_len() >= HDR_LEN as u64 && bufs.read_at(mem, 0, &mut raw).is_ok();
        let h = match Header::parse(have.then_some(&raw), bufs.readable_len()) {
            Ok(h) => h,
            Err(e) => {
                guest_warn!("virtio-vsock: dropped TX packet: {e}");
                return;
            }
        };
        let len = h.len as usize; // <= MAX_PAYLOAD, checked by parse
        if bufs
            .read_at(mem, HDR_LEN as u64, &mut self.buf[..len])
            .is_err()
        {
            guest_warn!("virtio-vsock: unreadable TX payload");
            return;
        }
        self.mux.handle_tx(&h, &self.buf[..len], reg);
    }

    fn process_tx(&mut self, ctl: &mut EventControl, q: &mut DeviceQueues) {
        let mem = q.memory();
        let mut n = 0;
        loop {
            while let Some(chain) = q.pop(&mem, TXQ) {
                let head = chain.head_index();
                self.tx_one(&mem, chain, ctl);
                q.add_used(&mem, TXQ, head, 0);
                n += 1;
                if n >= BUDGET {
                    q.signal_used(&mem, TXQ);
                    q.rearm(TXQ);
                    return;
                }
            }
            if !q.enable_notification(&mem, TXQ) {
                break;
            }
        }
        if n > 0 {
            q.signal_used(&mem, TXQ);
        }
    }

    /// Fill RX chains while the muxer has packets (and the guest has buffers).
    fn process_rx(&mut self, ctl: &mut EventControl, q: &mut DeviceQueues) {
        let mem = q.memory();
        let mut n = 0;
        while self.mux.has_rx() {
            if n >= BUDGET {
                q.rearm(RXQ);
                break;
            }
            let Some(chain) = q.pop(&mem, RXQ) else {
                if q.enable_notification(&mem, RXQ) {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let bufs = match parse_chain(&mem, chain, MAX_DESCRIPTORS) {
                Ok(b) if b.writable_len() >= HDR_LEN as u64 => b,
                Ok(_) | Err(_) => {
                    guest_warn!("virtio-vsock: unusable RX chain");
                    q.add_used(&mem, RXQ, head, 0);
                    n += 1;
                    continue;
                }
            };
            let cap = ((bufs.writable_len() - HDR_LEN as u64) as usize).min(MAX_PAYLOAD);
            let Some((h, len)) = self.mux.fill_rx(&mut self.buf[..cap], ctl) else {
                q.undo_pop(RXQ);
                break;
            };
            let written = bufs
                .write_at(&mem, 0, &h.to_bytes())
                .and_then(|_| bufs.write_at(&mem, HDR_LEN as u64, &self.buf[..len]));
            let used = match written {
                Ok(()) => (HDR_LEN + len) as u32,
                Err(e) => {
                    guest_warn!("virtio-vsock: cannot write RX buffer: {e}");
                    0
                }
            };
            q.add_used(&mem, RXQ, head, used);
            n += 1;
        }
        if n > 0 {
            q.signal_used(&mem, RXQ);
        }
    }
}

impl EventHandler for VsockHandler {
    fn start(&mut self, ctl: &mut EventControl, _queues: &mut DeviceQueues) -> io::Result<()> {
        self.mux.start(ctl)
    }

    fn queue_event(&mut self, queue: usize, ctl: &mut EventControl, queues: &mut DeviceQueues) {
        match queue {
            TXQ => {
                self.process_tx(ctl, queues);
                self.process_rx(ctl, queues);
            }
            RXQ => self.process_rx(ctl, queues),
            // The event queue: buffers wait for a transport event we never send.
            _ => {}
        }
    }

    fn fd_event(
        &mut self,
        token: u64,
        events: EventSet,
        ctl: &mut EventControl,
        queues: &mut DeviceQueues,
    ) {
        self.mux.fd_event(token, events, ctl);
        self.process_rx(ctl, queues);
    }
}

/// The virtio vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    worker: WorkerSlot,
}

impl Vsock {
    /// A device for guest CID `cid` whose host side listens on a new UNIX socket at `path`.
    /// Fails if the CID is reserved or the socket cannot be created (missing directory,
    /// path already taken by a socket or any other file).
    pub fn new(cid: u64, path: &Path) -> io::Result<Self> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest CID {cid} is reserved (valid: {MIN_GUEST_CID}..={MAX_GUEST_CID})"),
            ));
        }
        let listener = UnixListener::bind(path).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => io::Error::new(
                e.kind(),
                "the path is taken (a socket or another file is there)",
            ),
            io::ErrorKind::NotFound => io::Error::new(e.kind(), "its directory does not exist"),
            _ => e,
        })?;
        Ok(Self {
            cid,
            path: path.to_path_buf(),
            listener,
            worker: WorkerSlot::default(),
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The host listening socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker.stop();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX
    }

    fn config_len(&self) -> usize {
        8
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let listener = self.listener.try_clone()?;
        let mux = Muxer::new(self.cid, self.path.clone(), listener)?;
        let handler = VsockHandler {
            mux,
            buf: vec![0u8; MAX_PAYLOAD],
        };
        self.worker.start_events("virtio-vsock", 3, ctx, handler)
    }

    fn worker(&self) -> &WorkerSlot {
        &self.worker
    }

    fn worker_mut(&mut self) -> &mut WorkerSlot {
        &mut self.worker
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;

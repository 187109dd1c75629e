//! virtio-net (virtio 1.x) on a tap device: one receive and one transmit queue, no control
//! queue, no multiqueue.
//!
//! Every frame crosses the tap with a 12-byte `virtio_net_hdr_v1` in front ([`tap`]), the
//! header the driver uses too, so checksum and segmentation offloads pass through unchanged:
//! the guest's `NEEDS_CSUM`/GSO frames go to the tap as they are (`CSUM`, `HOST_TSO4/6`), and
//! the tap hands us partially checksummed and large frames only for the offloads the driver
//! accepted (`GUEST_CSUM`, `GUEST_TSO4/6`, set with `TUNSETOFFLOAD` when the worker starts).
//!
//! The device runs on an event worker ([`super::event_worker`]) that watches the two queue
//! notifications and the tap:
//!
//! - **Receive.** A frame is read from the tap only when the receive queue has a buffer for
//!   it, into one bounded buffer ([`MAX_FRAME`] bytes), and copied into as many chains as it
//!   needs (`MRG_RXBUF`; `num_buffers` in the first chain's header). When the ring runs dry
//!   the tap's `EPOLLIN` interest is dropped and the queue's notification enabled; the
//!   driver's next notification turns it on again. So a guest that stops reading makes the
//!   VMM hold at most one frame: the rest waits in the tap's own (bounded) queue, where the
//!   kernel drops what does not fit. The chains of one frame are published to the used ring
//!   at once (the driver never sees part of a frame).
//! - **Transmit.** Each chain is copied out (header and frame, at most [`MAX_FRAME`] bytes)
//!   and written to the tap; a failed write drops the frame (logged, rate limited) and the
//!   chain is returned all the same.
//! - Per event at most [`RX_BUDGET`] frames or a queue's size of chains are handled; the tap
//!   is level-triggered and a cut transmit round re-arms its queue, so the worker's stop
//!   event is never starved.
//! - A tap that fails (read errors other than "nothing queued", `EPOLLERR`/`EPOLLHUP`, for
//!   example the interface was deleted) is dropped from the worker, the link is reported down
//!   (config change interrupt) and transmitted frames are dropped; the VMM goes on.
//!
//! Nothing the guest writes into a chain can make the device panic, block or allocate more
//! than the two frame buffers: chains are validated by [`parse_chain`], sizes are bounded.

pub mod tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::chain::{parse_chain, ChainBuffers};
use super::event_worker::{DeviceQueues, EventControl, EventHandler};
use super::worker::WorkerSlot;
use super::{device_type, features, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::guest_warn;
pub use tap::{Tap, TapError, TapIo, VNET_HDR_LEN};

/// Queue size of both queues.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Largest frame with its header the device moves: a 64 KiB GSO frame, its Ethernet (and
/// VLAN) header and the virtio-net header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535 + 18;
/// Frames received per event at most.
pub const RX_BUDGET: usize = 64;
/// Default MTU reported to the guest.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU accepted (IPv4's minimum).
pub const MIN_MTU: u16 = 68;

const RX: usize = 0;
const TX: usize = 1;
const MAX_DESCRIPTORS: usize = 1024;
const TAP_TOKEN: u64 = 0;
const CONFIG_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: u64 = 10;

/// virtio-net feature bits (virtio 1.2, 5.1.3).
pub mod net_features {
    /// Device handles packets with partial checksum.
    pub const CSUM: u64 = 1 << 0;
    /// Driver handles packets with partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// Device reports its MTU.
    pub const MTU: u64 = 1 << 3;
    /// Device has a MAC address.
    pub const MAC: u64 = 1 << 5;
    /// Driver takes TSOv4 frames.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// Driver takes TSOv6 frames.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// Device takes TSOv4 frames.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// Device takes TSOv6 frames.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Driver can merge receive buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// Configuration status field (link up) is available.
    pub const STATUS: u64 = 1 << 16;
}
use net_features as nf;

/// `status` bit: link up.
pub const LINK_UP: u16 = 1;

/// Guest-visible settings of a NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address.
    pub mac: [u8; 6],
    /// MTU reported to the driver.
    pub mtu: u16,
}

/// `TUN_F_*` flags for the offloads the driver accepted (what the tap may hand us).
pub fn tap_offload(acked: u64) -> libc::c_uint {
    let mut f = 0;
    if acked & nf::GUEST_CSUM != 0 {
        f |= libc::TUN_F_CSUM;
        if acked & nf::GUEST_TSO4 != 0 {
            f |= libc::TUN_F_TSO4;
        }
        if acked & nf::GUEST_TSO6 != 0 {
            f |= libc::TUN_F_TSO6;
        }
    }
    f
}

/// Frame movement between the queues and a tap, without threads (the tests drive it).
pub(crate) struct NetEngine {
    tap: Arc<dyn TapIo>,
    mrg_rxbuf: bool,
    rx_frame: Vec<u8>,
    rx_pending: Option<RxPending>,
    tx_frame: Vec<u8>,
}

/// A frame read from the tap, partly copied into popped (not yet used) chains.
struct RxPending {
    len: usize,
    written: usize,
    chains: Vec<(u16, u32)>,
    first: Option<ChainBuffers>,
}

/// Why a receive round ended.
#[derive(Debug)]
pub(crate) enum RxStop {
    /// The ring has no (more) buffers; a frame may be held.
    NoBuffers,
    /// The tap has nothing queued.
    TapEmpty,
    /// [`RX_BUDGET`] frames were handled.
    Budget,
    /// The tap failed.
    TapFailed(io::Error),
}

/// Result of one round over a queue.
#[derive(Debug, Default)]
pub(crate) struct Round {
    /// Chains went to the used ring.
    pub used: bool,
    /// More than one chain was published at once (the queue's own notification bookkeeping
    /// counts one): signal without asking it.
    pub force_signal: bool,
}

impl NetEngine {
    pub(crate) fn new(tap: Arc<dyn TapIo>, acked: u64) -> Self {
        NetEngine {
            tap,
            mrg_rxbuf: acked & nf::MRG_RXBUF != 0,
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_frame: vec![0; MAX_FRAME],
        }
    }

    /// Moves frames from the tap into the receive queue `q`, bounded.
    pub(crate) fn receive(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
        round: &mut Round,
    ) -> RxStop {
        for _ in 0..RX_BUDGET {
            if self.rx_pending.is_none() {
                // Read only with a buffer to put the frame in.
                if q.pop_descriptor_chain(mem).is_none() {
                    return RxStop::NoBuffers;
                }
                q.go_to_previous_position();
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n <= VNET_HDR_LEN => continue, // nothing to deliver
                    Ok(n) => {
                        self.rx_pending = Some(RxPending {
                            len: n,
                            written: 0,
                            chains: Vec::new(),
                            first: None,
                        })
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return RxStop::TapEmpty,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return RxStop::TapFailed(e),
                }
            }
            if !self.fill_pending(mem, q, round) {
                return RxStop::NoBuffers;
            }
        }
        RxStop::Budget
    }

    /// Copies the held frame into chains; false when the ring ran dry first (the frame and
    /// its chains stay held).
    fn fill_pending(&mut self, mem: &GuestMemoryMmap, q: &mut Queue, round: &mut Round) -> bool {
        let Some(p) = self.rx_pending.as_mut() else {
            return true;
        };
        let qsize = usize::from(q.size()).max(1);
        while p.written < p.len {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return false;
            };
            let head = chain.head_index();
            let bufs = match parse_chain(mem, chain, MAX_DESCRIPTORS) {
                Ok(b) => b,
                Err(e) => {
                    guest_warn!("virtio-net: bad receive chain: {e}");
                    return_chain(mem, q, head, 0, round);
                    continue;
                }
            };
            let cap = usize::try_from(bufs.writable_len()).unwrap_or(usize::MAX);
            let rest = p.len - p.written;
            if cap == 0 || (p.chains.is_empty() && cap < VNET_HDR_LEN) {
                guest_warn!("virtio-net: receive chain of {cap} bytes is too small");
                return_chain(mem, q, head, 0, round);
                continue;
            }
            if !self.mrg_rxbuf && cap < rest {
                guest_warn!(
                    "virtio-net: frame of {} bytes dropped: receive buffer of {cap} bytes",
                    p.len
                );
                // The chain was not written: give it back for the next frame.
                q.go_to_previous_position();
                self.rx_pending = None;
                return true;
            }
            let n = cap.min(rest);
            if let Err(e) = bufs.write_at(mem, 0, &self.rx_frame[p.written..p.written + n]) {
                guest_warn!("virtio-net: cannot write receive chain: {e}");
                return_chain(mem, q, head, 0, round);
                continue;
            }
            if p.chains.is_empty() {
                p.first = Some(bufs);
            }
            p.chains.push((head, n as u32));
            p.written += n;
            if p.written < p.len && p.chains.len() >= qsize {
                // The whole ring cannot hold it (tiny buffers): drop it.
                guest_warn!("virtio-net: frame of {} bytes does not fit the ring", p.len);
                let chains = std::mem::take(&mut p.chains);
                self.rx_pending = None;
                publish(mem, q, &chains, true, round);
                return true;
            }
        }
        let nb = (p.chains.len() as u16).to_le_bytes();
        if let Some(first) = &p.first {
            if let Err(e) = first.write_at(mem, NUM_BUFFERS_OFFSET, &nb) {
                guest_warn!("virtio-net: cannot write num_buffers: {e}");
            }
        }
        let chains = std::mem::take(&mut p.chains);
        self.rx_pending = None;
        publish(mem, q, &chains, false, round);
        true
    }

    /// Whether a frame is held waiting for receive buffers.
    #[cfg(test)]
    pub(crate) fn holding(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Sends the chains of the transmit queue `q` to the tap (or drops them when `tap_ok` is
    /// false), at most `budget`. Returns the number handled.
    pub(crate) fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
        tap_ok: bool,
        budget: usize,
        round: &mut Round,
    ) -> usize {
        let mut handled = 0;
        while handled < budget {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            handled += 1;
            let head = chain.head_index();
            match parse_chain(mem, chain, MAX_DESCRIPTORS) {
                Ok(bufs) => self.send(mem, &bufs, tap_ok),
                Err(e) => guest_warn!("virtio-net: bad transmit chain: {e}"),
            }
            return_chain(mem, q, head, 0, round);
        }
        handled
    }

    fn send(&mut self, mem: &GuestMemoryMmap, bufs: &ChainBuffers, tap_ok: bool) {
        let len = bufs.readable_len();
        if len <= VNET_HDR_LEN as u64 || len > MAX_FRAME as u64 {
            guest_warn!("virtio-net: transmit chain of {len} bytes dropped");
            return;
        }
        let len = len as usize;
        if let Err(e) = bufs.read_at(mem, 0, &mut self.tx_frame[..len]) {
            guest_warn!("virtio-net: cannot read transmit chain: {e}");
            return;
        }
        if !tap_ok {
            return;
        }
        match self.tap.write_frame(&self.tx_frame[..len]) {
            Ok(_) => {}
            Err(e) => guest_warn!("virtio-net: tap write failed, frame dropped: {e}"),
        }
    }
}

fn return_chain(mem: &GuestMemoryMmap, q: &mut Queue, head: u16, len: u32, round: &mut Round) {
    match q.add_used(mem, head, len) {
        Ok(()) => round.used = true,
        Err(e) => guest_warn!("virtio-net: cannot return chain {head}: {e}"),
    }
}

/// Puts `chains` into the used ring and only then moves the used index, so the driver sees
/// all of a frame's buffers at once. `zero` returns them with length 0.
fn publish(
    mem: &GuestMemoryMmap,
    q: &mut Queue,
    chains: &[(u16, u32)],
    zero: bool,
    round: &mut Round,
) {
    let Some((&(last_head, last_len), rest)) = chains.split_last() else {
        return;
    };
    let size = q.size().max(1);
    let start = q.next_used();
    for (k, &(head, len)) in rest.iter().enumerate() {
        let slot = u64::from(start.wrapping_add(k as u16) % size);
        let addr = q.used_ring().checked_add(4 + 8 * slot);
        let len = if zero { 0 } else { len };
        let ok = addr.is_some_and(|a| {
            mem.write_obj(u32::from(head).to_le(), GuestAddress(a))
                .is_ok()
                && mem.write_obj(len.to_le(), GuestAddress(a + 4)).is_ok()
        });
        if !ok {
            guest_warn!("virtio-net: cannot write the used ring");
        }
    }
    if !rest.is_empty() {
        q.set_next_used(start.wrapping_add(rest.len() as u16));
        round.force_signal = true;
    }
    // Moves the used index past all of them (release ordering).
    return_chain(mem, q, last_head, if zero { 0 } else { last_len }, round);
}

/// The virtio network device.
pub struct Net {
    config: NetConfig,
    tap: Arc<dyn TapIo>,
    tap_fd: RawFd,
    tap_name: String,
    status: Arc<AtomicU16>,
    worker: WorkerSlot,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("config", &self.config)
            .field("tap", &self.tap_name)
            .finish()
    }
}

impl Net {
    /// A NIC on `tap`.
    pub fn new(tap: Tap, config: NetConfig) -> Self {
        let tap_fd = tap.as_raw_fd();
        let tap_name = tap.name().to_string();
        Net {
            config,
            tap: Arc::new(tap),
            tap_fd,
            tap_name,
            status: Arc::new(AtomicU16::new(LINK_UP)),
            worker: WorkerSlot::default(),
        }
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.config.mac);
        c[6..8].copy_from_slice(&self.status.load(Ordering::SeqCst).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[NET_QUEUE_SIZE, NET_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | nf::CSUM
            | nf::GUEST_CSUM
            | nf::MTU
            | nf::MAC
            | nf::GUEST_TSO4
            | nf::GUEST_TSO6
            | nf::HOST_TSO4
            | nf::HOST_TSO6
            | nf::MRG_RXBUF
            | nf::STATUS
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if off >= CONFIG_LEN {
            return;
        }
        let c = self.config_bytes();
        let n = data.len().min(CONFIG_LEN - off);
        data[..n].copy_from_slice(&c[off..off + n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR / legacy, not offered.
        log::debug!(
            "virtio-net: ignored config write at {offset:#x} len {}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let index = |i: usize| ctx.queues.get(i).map_or(i as u16, |q| q.index);
        let handler = NetHandler {
            interrupt: ctx.interrupt.clone(),
            queue_index: [index(RX), index(TX)],
            engine: NetEngine::new(self.tap.clone(), ctx.acked_features),
            offload: tap_offload(ctx.acked_features),
            tap_fd: self.tap_fd,
            tap_state: TapState::Reading,
            status: self.status.clone(),
        };
        self.status.store(LINK_UP, Ordering::SeqCst);
        self.worker.start_events("virtio-net", 2, ctx, handler)
    }

    fn worker(&self) -> &WorkerSlot {
        &self.worker
    }

    fn worker_mut(&mut self) -> &mut WorkerSlot {
        &mut self.worker
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TapState {
    /// Watched for input.
    Reading,
    /// Not watched: the receive ring is empty.
    Parked,
    /// Failed and removed from the worker.
    Failed,
}

/// The worker side of a [`Net`].
struct NetHandler {
    engine: NetEngine,
    offload: libc::c_uint,
    tap_fd: RawFd,
    tap_state: TapState,
    status: Arc<AtomicU16>,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue_index: [u16; 2],
}

impl NetHandler {
    fn set_tap_watch(&mut self, ctl: &mut EventControl, on: bool) {
        if self.tap_state == TapState::Failed {
            return;
        }
        let events = if on { EventSet::IN } else { EventSet::empty() };
        match ctl.modify(self.tap_fd, events, TAP_TOKEN) {
            Ok(()) => {
                self.tap_state = if on {
                    TapState::Reading
                } else {
                    TapState::Parked
                }
            }
            Err(e) => guest_warn!("virtio-net: cannot change the tap's epoll interest: {e}"),
        }
    }

    fn tap_failed(&mut self, ctl: &mut EventControl, queues: &mut DeviceQueues, why: &str) {
        if self.tap_state == TapState::Failed {
            return;
        }
        guest_warn!("virtio-net: tap failed ({why}); link down, frames are dropped");
        if let Err(e) = ctl.remove(self.tap_fd) {
            log::debug!("virtio-net: cannot remove the tap from epoll: {e}");
        }
        self.tap_state = TapState::Failed;
        self.status.store(0, Ordering::SeqCst);
        queues.signal_config();
    }

    fn signal(&self, queues: &mut DeviceQueues, mem: &GuestMemoryMmap, i: usize, round: &Round) {
        if round.force_signal {
            // Resets the queue's count of added chains, which undercounts here.
            if let Some(q) = queues.queue_mut(i) {
                let _ = q.needs_notification(mem);
            }
            if let Err(e) = self.interrupt.signal_used_queue(self.queue_index[i]) {
                crate::guest_error!("virtio-net: queue {i}: interrupt failed: {e}");
            }
        } else if round.used {
            queues.signal_used(mem, i);
        }
    }

    fn receive(&mut self, ctl: &mut EventControl, queues: &mut DeviceQueues) {
        if self.tap_state == TapState::Failed {
            return;
        }
        let guard = queues.memory();
        let mem: &GuestMemoryMmap = &guard;
        let mut round = Round::default();
        let mut rearm = false;
        // Buffers arriving while notifications were off send us round again, a few times
        // at most per event (the tap stays readable if frames are left).
        for again in (0..4).rev() {
            let Some(q) = queues.queue_mut(RX) else {
                return;
            };
            match self.engine.receive(mem, q, &mut round) {
                RxStop::NoBuffers => {
                    // Ask for a notification when buffers come; recheck after enabling it.
                    match q.enable_notification(mem) {
                        Ok(true) if again > 0 => continue,
                        // Come back through the event loop for the rest.
                        Ok(true) => rearm = true,
                        Ok(false) => self.set_tap_watch(ctl, false),
                        Err(e) => {
                            guest_warn!("virtio-net: receive queue: {e}");
                            self.set_tap_watch(ctl, false);
                        }
                    }
                }
                RxStop::TapEmpty | RxStop::Budget => {
                    if self.tap_state == TapState::Parked {
                        self.set_tap_watch(ctl, true);
                    }
                }
                RxStop::TapFailed(e) => {
                    self.signal(queues, mem, RX, &round);
                    self.tap_failed(ctl, queues, &e.to_string());
                    return;
                }
            }
            break;
        }
        if rearm {
            queues.rearm(RX);
        }
        self.signal(queues, mem, RX, &round);
    }

    fn transmit(&mut self, queues: &mut DeviceQueues) {
        let guard = queues.memory();
        let mem: &GuestMemoryMmap = &guard;
        let mut round = Round::default();
        let tap_ok = self.tap_state != TapState::Failed;
        let Some(q) = queues.queue_mut(TX) else {
            return;
        };
        let budget = usize::from(q.size()).max(1);
        let mut handled = 0;
        loop {
            if let Err(e) = q.disable_notification(mem) {
                log::debug!("virtio-net: transmit queue: {e}");
            }
            let n = self
                .engine
                .transmit(mem, q, tap_ok, budget - handled, &mut round);
            handled += n;
            if handled >= budget {
                queues.rearm(TX);
                break;
            }
            match q.enable_notification(mem) {
                Ok(true) if n > 0 => continue,
                _ => break,
            }
        }
        self.signal(queues, mem, TX, &round);
    }
}

impl EventHandler for NetHandler {
    fn start(&mut self, ctl: &mut EventControl, queues: &mut DeviceQueues) -> io::Result<()> {
        if let Err(e) = self.engine.tap.set_offload(self.offload) {
            // The tap then hands over only complete, checksummed frames: still correct.
            log::warn!("virtio-net: TUNSETOFFLOAD {:#x} failed: {e}", self.offload);
        }
        ctl.add(self.tap_fd, EventSet::IN, TAP_TOKEN)?;
        self.tap_state = TapState::Reading;
        self.transmit(queues);
        self.receive(ctl, queues);
        Ok(())
    }

    fn queue_event(&mut self, queue: usize, ctl: &mut EventControl, queues: &mut DeviceQueues) {
        match queue {
            RX => self.receive(ctl, queues),
            TX => self.transmit(queues),
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
        if token != TAP_TOKEN {
            return;
        }
        if events.contains(EventSet::IN) {
            self.receive(ctl, queues);
        }
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            self.tap_failed(ctl, queues, "error or hang-up on the tap");
        }
    }
}

#[cfg(test)]
mod tests;

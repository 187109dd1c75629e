//! Worker threads for devices driven by host file descriptors as well as by their queues.
//!
//! A virtio-blk or virtio-rng request is complete as soon as its chain is handled, which is
//! what [`QueueHandler`](super::worker::QueueHandler) models. A network or vsock device is
//! different: its receive chains wait in the ring until the host side (a tap, a UNIX socket)
//! has data, and host file descriptors come and go while the device runs. An
//! [`EventHandler`] gets one callback per ready event (a queue notification or a host file
//! descriptor it registered through [`EventControl`]) and drives its queues itself through
//! [`DeviceQueues`].
//!
//! The thread is a [`Worker`] like the others: the same stop signal, pause gate and seccomp
//! thread hook, so reset, removal, pause and resume behave the same for every device.
//! Handlers bound the work they do per callback and either rely on level-triggered host file
//! descriptors or [`DeviceQueues::rearm`] a queue to come back, so a stop request is never
//! starved.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, error};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::features::RING_EVENT_IDX;
use super::worker::{PauseGate, StopSignal, Worker, KILL_TOKEN, PAUSE_TOKEN};
use super::{ActivateContext, ActiveQueue, GuestMemoryHandle, VirtioInterrupt};

/// Tokens of host file descriptors registered by handlers must be below this; the worker
/// uses the tokens above it for queue notifications and its own control events.
pub const MAX_TOKEN: u64 = 1 << 32;

/// Events delivered per `epoll_wait`.
const EVENT_BATCH: usize = 64;

/// A device whose worker reacts to queue notifications and to host file descriptors.
pub trait EventHandler: Send + 'static {
    /// Runs once on the worker thread before the loop: register host file descriptors.
    /// An error stops the worker before it handles anything.
    fn start(&mut self, ctl: &mut EventControl, queues: &mut DeviceQueues) -> io::Result<()>;

    /// The driver notified queue `queue` (an index into the activated queues).
    fn queue_event(&mut self, queue: usize, ctl: &mut EventControl, queues: &mut DeviceQueues);

    /// A host file descriptor registered under `token` is ready with `events`.
    fn fd_event(
        &mut self,
        token: u64,
        events: EventSet,
        ctl: &mut EventControl,
        queues: &mut DeviceQueues,
    );
}

/// The worker's epoll set, as handlers see it: host file descriptors only.
pub struct EventControl {
    epoll: Epoll,
}

impl EventControl {
    fn check(token: u64) -> io::Result<()> {
        if token >= MAX_TOKEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("event token {token} is reserved"),
            ));
        }
        Ok(())
    }

    /// Watch `fd` for `events`, reported to [`EventHandler::fd_event`] with `token`.
    pub fn add(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        Self::check(token)?;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Change the events or the token of a watched `fd`.
    pub fn modify(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        Self::check(token)?;
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stop watching `fd` (do it before closing it).
    pub fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// The activated queues of a device, with guest memory and the interrupt path.
pub struct DeviceQueues {
    mem: GuestMemoryHandle,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    stop: StopSignal,
}

impl DeviceQueues {
    fn new(ctx: ActivateContext, stop: StopSignal) -> Self {
        let event_idx = ctx.acked_features & RING_EVENT_IDX != 0;
        let mut queues = ctx.queues;
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        DeviceQueues {
            mem: ctx.mem,
            queues,
            interrupt: ctx.interrupt,
            stop,
        }
    }

    /// The current guest memory; chains popped with it borrow it.
    pub fn memory(&self) -> GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.mem.memory()
    }

    /// Number of queues.
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// Whether there is no queue.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Direct access to queue `i` (use [`QueueT`] methods).
    pub fn queue_mut(&mut self, i: usize) -> Option<&mut Queue> {
        self.queues.get_mut(i).map(|q| &mut q.queue)
    }

    /// The next available chain of queue `i`, if any.
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        i: usize,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        self.queue_mut(i)?.pop_descriptor_chain(mem)
    }

    /// Give the last popped chain of queue `i` back (it is popped again next time).
    pub fn undo_pop(&mut self, i: usize) {
        if let Some(q) = self.queue_mut(i) {
            q.go_to_previous_position();
        }
    }

    /// Whether queue `i` has an available chain.
    pub fn has_available(&mut self, mem: &GuestMemoryMmap, i: usize) -> bool {
        self.queue_mut(i).is_some_and(|q| {
            q.avail_idx(mem, Ordering::Acquire)
                .is_ok_and(|avail| avail.0 != q.next_avail())
        })
    }

    /// Return chain `head` of queue `i` to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, i: usize, head: u16, len: u32) {
        if let Some(q) = self.queue_mut(i) {
            if let Err(e) = q.add_used(mem, head, len) {
                crate::guest_warn!("virtio: queue {i}: cannot return chain {head}: {e}");
            }
        }
    }

    /// Interrupt the driver for queue `i` if it wants one (event-index aware).
    pub fn signal_used(&mut self, mem: &GuestMemoryMmap, i: usize) {
        let Some(aq) = self.queues.get_mut(i) else {
            return;
        };
        if aq.queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.signal_used_queue(aq.index) {
                crate::guest_error!("virtio: queue {i}: interrupt failed: {e}");
            }
        }
    }

    /// Ask the driver to notify queue `i` again; true if chains arrived meanwhile.
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap, i: usize) -> bool {
        match self.queue_mut(i).map(|q| q.enable_notification(mem)) {
            Some(Ok(more)) => more,
            Some(Err(e)) => {
                debug!("virtio: queue {i}: cannot enable notifications: {e}");
                false
            }
            None => false,
        }
    }

    /// Tell the driver not to notify queue `i` (the device polls it meanwhile).
    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap, i: usize) {
        if let Some(Err(e)) = self.queue_mut(i).map(|q| q.disable_notification(mem)) {
            debug!("virtio: queue {i}: cannot disable notifications: {e}");
        }
    }

    /// Make queue `i` ready again, so the worker comes back to it after other events.
    pub fn rearm(&self, i: usize) {
        if let Some(q) = self.queues.get(i) {
            if let Err(e) = q.event.write(1) {
                crate::guest_error!("virtio: queue {i}: cannot re-arm: {e}");
            }
        }
    }

    /// Raise the configuration-change interrupt.
    pub fn signal_config(&self) {
        if let Err(e) = self.interrupt.signal_config_change() {
            crate::guest_error!("virtio: configuration interrupt failed: {e}");
        }
    }

    /// Raised when the worker must stop; long work checks it between slices.
    pub fn stop(&self) -> &StopSignal {
        &self.stop
    }
}

/// Start a worker thread named `name` driving `handler` with the queues of `ctx`.
pub(super) fn spawn<E: EventHandler>(
    name: &str,
    ctx: ActivateContext,
    mut handler: E,
) -> io::Result<Worker> {
    let stop = StopSignal::default();
    let gate = PauseGate::default();
    let mut queues = DeviceQueues::new(ctx, stop.clone());
    let epoll = Epoll::new()?;
    for (i, q) in queues.queues.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            q.event.as_raw_fd(),
            EpollEvent::new(EventSet::IN, MAX_TOKEN + i as u64),
        )?;
    }
    Worker::spawn_loop(name, epoll, stop, gate, move |epoll, _kill, pause, gate| {
        let mut ctl = EventControl { epoll };
        run(&mut ctl, &mut queues, &mut handler, &pause, &gate);
    })
}

fn run<E: EventHandler>(
    ctl: &mut EventControl,
    queues: &mut DeviceQueues,
    handler: &mut E,
    pause: &EventFd,
    gate: &PauseGate,
) {
    let stop = queues.stop.clone();
    if let Err(e) = handler.start(ctl, queues) {
        crate::guest_error!("virtio worker: cannot start: {e}");
        return;
    }
    // Chains made available before activation have no notification of their own.
    for i in 0..queues.len() {
        if stop.is_raised() {
            return;
        }
        handler.queue_event(i, ctl, queues);
    }
    let mut events = vec![EpollEvent::default(); EVENT_BATCH];
    loop {
        let n = match ctl.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio worker: epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == KILL_TOKEN || stop.is_raised() {
                return;
            }
            if token == PAUSE_TOKEN {
                let _ = pause.read();
                gate.park(&stop);
                continue;
            }
            // Paused between events: nothing is handled until resumed.
            gate.park(&stop);
            if stop.is_raised() {
                return;
            }
            if token >= MAX_TOKEN {
                let i = (token - MAX_TOKEN) as usize;
                if let Some(q) = queues.queues.get(i) {
                    // Non-blocking: a spurious wake-up reads EAGAIN, which is harmless.
                    let _ = q.event.read();
                    handler.queue_event(i, ctl, queues);
                }
            } else {
                handler.fd_event(token, ev.event_set(), ctl, queues);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::super::test_utils::{activate_context, mem, TestInterrupt, TestQueue};
    use super::super::worker::WorkerSlot;
    use super::*;

    #[derive(Default)]
    struct Seen {
        queue: AtomicUsize,
        fd: AtomicUsize,
        started: AtomicUsize,
        tokens: Mutex<Vec<u64>>,
    }

    struct Probe {
        seen: Arc<Seen>,
        host: EventFd,
    }

    impl EventHandler for Probe {
        fn start(&mut self, ctl: &mut EventControl, _q: &mut DeviceQueues) -> io::Result<()> {
            self.seen.started.fetch_add(1, Ordering::SeqCst);
            assert!(ctl
                .add(self.host.as_raw_fd(), EventSet::IN, MAX_TOKEN)
                .is_err());
            ctl.add(self.host.as_raw_fd(), EventSet::IN, 7)
        }
        fn queue_event(&mut self, _i: usize, _c: &mut EventControl, _q: &mut DeviceQueues) {
            self.seen.queue.fetch_add(1, Ordering::SeqCst);
        }
        fn fd_event(&mut self, t: u64, _e: EventSet, c: &mut EventControl, _q: &mut DeviceQueues) {
            let _ = self.host.read();
            self.seen.fd.fetch_add(1, Ordering::SeqCst);
            self.seen.tokens.lock().unwrap().push(t);
            if self.seen.fd.load(Ordering::SeqCst) == 2 {
                c.remove(self.host.as_raw_fd()).unwrap();
            }
        }
    }

    fn wait_until(f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn host_fds_and_queues_reach_the_handler_and_stop_joins() {
        let seen = Arc::new(Seen::default());
        let host = EventFd::new(EFD_NONBLOCK).unwrap();
        let poke = host.try_clone().unwrap();
        let (ctx, notify) = activate_context(&mem(), 2, Arc::new(TestInterrupt::default()));
        let mut slot = WorkerSlot::default();
        let handler = Probe {
            seen: seen.clone(),
            host,
        };
        slot.start_events("test-events", 2, ctx, handler).unwrap();
        // Both queues are visited once at start.
        wait_until(|| seen.queue.load(Ordering::SeqCst) >= 2);
        assert_eq!(seen.started.load(Ordering::SeqCst), 1);
        notify[1].write(1).unwrap();
        wait_until(|| seen.queue.load(Ordering::SeqCst) >= 3);
        poke.write(1).unwrap();
        wait_until(|| seen.fd.load(Ordering::SeqCst) >= 1);
        poke.write(1).unwrap();
        wait_until(|| seen.fd.load(Ordering::SeqCst) >= 2);
        // Removed after the second event: a third poke is not delivered.
        poke.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.fd.load(Ordering::SeqCst), 2);
        assert_eq!(*seen.tokens.lock().unwrap(), vec![7, 7]);
        // Paused: a notification waits until resume.
        assert!(slot.pause(Duration::from_secs(5)));
        let before = seen.queue.load(Ordering::SeqCst);
        notify[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.queue.load(Ordering::SeqCst), before);
        slot.resume();
        wait_until(|| seen.queue.load(Ordering::SeqCst) > before);
        slot.stop();
        assert!(!slot.is_active());
    }

    struct FailStart;
    impl EventHandler for FailStart {
        fn start(&mut self, _c: &mut EventControl, _q: &mut DeviceQueues) -> io::Result<()> {
            Err(io::Error::other("no"))
        }
        fn queue_event(&mut self, _i: usize, _c: &mut EventControl, _q: &mut DeviceQueues) {
            panic!("must not run");
        }
        fn fd_event(
            &mut self,
            _t: u64,
            _e: EventSet,
            _c: &mut EventControl,
            _q: &mut DeviceQueues,
        ) {
            panic!("must not run");
        }
    }

    #[test]
    fn a_failed_start_ends_the_thread_and_stop_still_joins() {
        let (ctx, _notify) = activate_context(&mem(), 1, Arc::new(TestInterrupt::default()));
        let mut slot = WorkerSlot::default();
        slot.start_events("test-fail", 1, ctx, FailStart).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        slot.stop();
    }

    #[test]
    fn device_queues_pop_undo_and_return_chains() {
        let m = mem();
        let irq = Arc::new(TestInterrupt::default());
        let (ctx, _notify) = activate_context(&m, 1, irq.clone());
        let tq = TestQueue::new(0x10_0000, 16);
        let mut dq = DeviceQueues::new(ctx, StopSignal::default());
        let guard = dq.memory();
        assert!(!dq.has_available(&guard, 0));
        assert!(dq.pop(&guard, 0).is_none());
        let head = tq.add_chain(&m, &[(0x20_0000, 64, true)]);
        assert!(dq.has_available(&guard, 0));
        let chain = dq.pop(&guard, 0).unwrap();
        assert_eq!(chain.head_index(), head);
        assert!(!dq.has_available(&guard, 0));
        dq.undo_pop(0);
        assert!(dq.has_available(&guard, 0));
        let chain = dq.pop(&guard, 0).unwrap();
        dq.add_used(&guard, 0, chain.head_index(), 64);
        dq.signal_used(&guard, 0);
        assert_eq!(tq.used_idx(&m), 1);
        assert_eq!(tq.used_elem(&m, 0), (u32::from(head), 64));
        assert_eq!(irq.used.load(Ordering::SeqCst), 1);
        // Out-of-range queue indices are ignored.
        assert!(dq.pop(&guard, 5).is_none());
        dq.add_used(&guard, 5, 0, 0);
        dq.signal_used(&guard, 5);
        dq.undo_pop(5);
        dq.rearm(5);
        assert!(!dq.has_available(&guard, 5));
    }

    #[test]
    fn wrong_queue_count_is_refused() {
        let (ctx, _notify) = activate_context(&mem(), 1, Arc::new(TestInterrupt::default()));
        let mut slot = WorkerSlot::default();
        assert!(slot.start_events("test-count", 2, ctx, FailStart).is_err());
        assert!(!slot.is_active());
    }
}

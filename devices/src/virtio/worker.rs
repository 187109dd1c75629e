//! Per-device worker thread and the queue processing loop.
//!
//! [`QueueProcessor`] owns the activated queues and pops/handles/returns descriptor chains;
//! it is synchronous so tests can drive it directly. [`Worker`] runs a `QueueProcessor` on a
//! dedicated thread that waits with epoll on every queue's EventFd plus a kill EventFd.
//! [`Worker::stop`] (also run on drop) writes the kill EventFd and joins the thread; the
//! thread owns its EventFd duplicates and the epoll fd, so nothing leaks after the join.
//!
//! Robustness against the guest: each wake-up handles at most a bounded number of chains per
//! queue (then re-arms itself through the queue EventFd so the kill event is never starved),
//! and a queue whose available index is inconsistent stops being polled until the next
//! notification instead of spinning.
//!
//! Stopping takes bounded time whatever the guest queued: [`Worker::stop`] raises a
//! [`StopSignal`] before waking the thread, the processor checks it before each chain, and
//! handlers check it between the bounded slices of a large request (virtio-blk copies at most
//! [`IO_CHUNK`](super::block::IO_CHUNK) bytes between checks). A chain cut short this way is
//! abandoned, not completed: the worker is only stopped on reset, removal or shutdown, and
//! after a reset the device must not touch the queues again (virtio 1.2, 2.4.1: "the device
//! MUST NOT send notifications or interact with the queues after indicating completion of
//! the reset"), so no status byte or used entry is written for it.
//!
//! Pausing (the VM's `vm.pause`) parks the thread at a [`PauseGate`] between requests:
//! [`Worker::pause`] closes the gate, wakes the thread and waits until it has parked (a
//! request in progress finishes first), so no queued request completes while the VM is
//! paused; [`Worker::resume`] opens the gate again.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::features::RING_EVENT_IDX;
use super::{ActivateContext, ActivateError, ActiveQueue, GuestMemoryHandle, VirtioInterrupt};

pub(super) const KILL_TOKEN: u64 = u64::MAX;
pub(super) const PAUSE_TOKEN: u64 = u64::MAX - 1;

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    parked: bool,
}

/// Where a worker parks between requests while its device is paused.
#[derive(Clone, Debug, Default)]
pub struct PauseGate(Arc<(Mutex<GateState>, Condvar)>);

impl PauseGate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        self.state().closed = true;
    }

    fn open(&self) {
        self.state().closed = false;
        self.0 .1.notify_all();
    }

    /// Wakes a parked worker so it sees a stop.
    fn wake(&self) {
        self.0 .1.notify_all();
    }

    /// Worker side: park while the gate is closed (and no stop was asked).
    pub(super) fn park(&self, stop: &StopSignal) {
        let mut st = self.state();
        while st.closed && !stop.is_raised() {
            st.parked = true;
            self.0 .1.notify_all();
            st = self.0 .1.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked = false;
    }

    /// VMM side: wait until the worker has parked, at most `timeout`.
    fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        while !st.parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .0
                 .1
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// Raised when the worker must stop; checked between chains and between the slices of a
/// large request.
#[derive(Clone, Debug, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// Ask the work to stop.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Device-specific request handling.
pub trait QueueHandler: Send + 'static {
    /// Handle one chain popped from queue `queue` (index into the activated queues) and
    /// return the number of bytes written into the chain's device-writable buffers, or
    /// `None` if the work was abandoned because `stop` was raised (nothing is returned to
    /// the guest then; see the module docs). Handlers check `stop` between bounded slices
    /// of work.
    fn process_chain(
        &mut self,
        queue: usize,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        stop: &StopSignal,
    ) -> Option<u32>;
}

/// The queues of an active device and the loop that services them.
pub struct QueueProcessor<H> {
    mem: GuestMemoryHandle,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    handler: H,
    stop: StopSignal,
    gate: PauseGate,
}

impl<H: QueueHandler> QueueProcessor<H> {
    /// Take over the queues of `ctx`.
    pub fn new(ctx: ActivateContext, handler: H) -> Self {
        let event_idx = ctx.acked_features & RING_EVENT_IDX != 0;
        let mut queues = ctx.queues;
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        QueueProcessor {
            mem: ctx.mem,
            queues,
            interrupt: ctx.interrupt,
            handler,
            stop: StopSignal::default(),
            gate: PauseGate::default(),
        }
    }

    /// The gate [`process_queue`](Self::process_queue) parks at while paused.
    pub fn pause_gate(&self) -> &PauseGate {
        &self.gate
    }

    /// The signal that makes [`process_queue`](Self::process_queue) give up early.
    pub fn stop_signal(&self) -> &StopSignal {
        &self.stop
    }

    /// The device-specific handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Handle the available chains of queue `i` (bounded), return them to the used ring and
    /// signal the guest if needed. Returns the number of chains handled.
    pub fn process_queue(&mut self, i: usize) -> usize {
        let Some(aq) = self.queues.get_mut(i) else {
            return 0;
        };
        let guard = self.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let q = &mut aq.queue;
        let budget = usize::from(q.size()).max(1) * 2;
        let mut handled = 0usize;
        let mut used_any = false;
        'rounds: loop {
            if let Err(e) = q.disable_notification(mem) {
                debug!("virtio: queue {i}: cannot disable notifications: {e}");
            }
            let mut popped = 0usize;
            loop {
                // Paused: no request is taken (so none completes) until resumed.
                self.gate.park(&self.stop);
                if self.stop.is_raised() {
                    // Stopping for a reset: leave the rest of the queue alone.
                    break 'rounds;
                }
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                let Some(len) = self.handler.process_chain(i, mem, chain, &self.stop) else {
                    // Abandoned on a stop request: not returned to the guest.
                    break 'rounds;
                };
                match q.add_used(mem, head, len) {
                    Ok(()) => used_any = true,
                    Err(e) => {
                        crate::guest_warn!("virtio: queue {i}: cannot return chain {head}: {e}")
                    }
                }
                handled += 1;
                if handled >= budget {
                    // Come back through the event loop so a kill request is not starved.
                    if let Err(e) = aq.event.write(1) {
                        crate::guest_error!("virtio: queue {i}: cannot re-arm: {e}");
                    }
                    break 'rounds;
                }
            }
            match q.enable_notification(mem) {
                // More work arrived while notifications were off; but never spin on a queue
                // that claims work yet yields no chain (corrupt available index).
                Ok(true) if popped > 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    debug!("virtio: queue {i}: cannot enable notifications: {e}");
                    break;
                }
            }
        }
        if used_any && q.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.signal_used_queue(aq.index) {
                crate::guest_error!("virtio: queue {i}: interrupt failed: {e}");
            }
        }
        handled
    }
}

/// A running worker thread.
pub struct Worker {
    kill: EventFd,
    pause: EventFd,
    stop: StopSignal,
    gate: PauseGate,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl Worker {
    /// Start a thread named `name` servicing `processor`.
    pub fn spawn<H: QueueHandler>(name: &str, processor: QueueProcessor<H>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        for (i, q) in processor.queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let stop = processor.stop.clone();
        let gate = processor.gate.clone();
        let mut processor = processor;
        Self::spawn_loop(
            name,
            epoll,
            stop,
            gate,
            move |epoll, _kill, pause, _gate| run(&epoll, &mut processor, &pause),
        )
    }

    /// Start a thread named `name` running `body` with `epoll`, to which the kill
    /// ([`KILL_TOKEN`]) and pause ([`PAUSE_TOKEN`]) EventFds are added first; `body` gets
    /// them (keep the kill fd alive while it is registered) and must return promptly once
    /// the kill event fires or `stop` is raised, and park at `gate` on the pause event.
    pub(super) fn spawn_loop<F>(
        name: &str,
        epoll: Epoll,
        stop: StopSignal,
        gate: PauseGate,
        body: F,
    ) -> io::Result<Self>
    where
        F: FnOnce(Epoll, EventFd, EventFd, PauseGate) + Send + 'static,
    {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let pause = EventFd::new(EFD_NONBLOCK)?;
        let thread_kill = kill.try_clone()?;
        let thread_pause = pause.try_clone()?;
        epoll.ctl(
            ControlOperation::Add,
            thread_kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            thread_pause.as_raw_fd(),
            EpollEvent::new(EventSet::IN, PAUSE_TOKEN),
        )?;
        let thread_name = name.to_string();
        let thread_gate = gate.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                run_thread_hook(&thread_name);
                body(epoll, thread_kill, thread_pause, thread_gate);
            })?;
        Ok(Worker {
            kill,
            pause,
            stop,
            gate,
            thread: Some(thread),
        })
    }

    /// Parks the thread between requests and waits, at most `timeout`,
    /// until it has (a request in progress finishes first). Returns whether
    /// it parked in time; it parks anyway as soon as it can.
    pub fn pause(&self, timeout: Duration) -> bool {
        if self.thread.is_none() {
            return true;
        }
        self.gate.close();
        if let Err(e) = self.pause.write(1) {
            error!("virtio worker: cannot signal a pause: {e}");
        }
        self.gate.wait_parked(timeout)
    }

    /// Lets a paused thread go on.
    pub fn resume(&self) {
        self.gate.open();
    }

    /// Whether the thread has not been stopped.
    pub fn is_running(&self) -> bool {
        self.thread.is_some()
    }

    /// Ask the thread to exit and wait for it; bounded in time whatever the guest queued
    /// (the thread checks the stop signal between bounded slices of work). Idempotent.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.raise();
            self.gate.wake();
            if let Err(e) = self.kill.write(1) {
                error!("virtio worker: cannot signal exit: {e}");
            }
            if t.join().is_err() {
                error!("virtio worker: thread panicked");
            }
        }
    }
}

/// The worker of a device: started when the driver activates the device,
/// stopped (and joined) on reset.
#[derive(Debug, Default)]
pub struct WorkerSlot(Option<Worker>);

impl WorkerSlot {
    /// Starts a thread named `name` serving `handler`, after checking the
    /// device is not active yet and the driver enabled `queues` queues.
    pub fn start<H: QueueHandler>(
        &mut self,
        name: &str,
        queues: usize,
        ctx: ActivateContext,
        handler: H,
    ) -> Result<(), ActivateError> {
        self.check(name, queues, &ctx)?;
        self.0 = Some(Worker::spawn(name, QueueProcessor::new(ctx, handler))?);
        Ok(())
    }

    /// Like [`start`](Self::start), for a device driven by host file descriptors as well
    /// as its queues (see [`event_worker`](super::event_worker)).
    pub fn start_events<E: super::event_worker::EventHandler>(
        &mut self,
        name: &str,
        queues: usize,
        ctx: ActivateContext,
        handler: E,
    ) -> Result<(), ActivateError> {
        self.check(name, queues, &ctx)?;
        self.0 = Some(super::event_worker::spawn(name, ctx, handler)?);
        Ok(())
    }

    fn check(&self, name: &str, queues: usize, ctx: &ActivateContext) -> Result<(), ActivateError> {
        if self.0.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if ctx.queues.len() != queues {
            return Err(ActivateError::BadQueues(format!(
                "{name} needs {queues} queue(s), got {}",
                ctx.queues.len()
            )));
        }
        Ok(())
    }

    /// Stops the thread, if any.
    pub fn stop(&mut self) {
        if let Some(mut w) = self.0.take() {
            w.stop();
        }
    }

    /// Whether a thread is running.
    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }

    /// Parks the thread between requests (see [`Worker::pause`]); true when
    /// there is none or it parked within `timeout`.
    pub fn pause(&self, timeout: Duration) -> bool {
        self.0.as_ref().is_none_or(|w| w.pause(timeout))
    }

    /// Lets a paused thread go on.
    pub fn resume(&self) {
        if let Some(w) = &self.0 {
            w.resume();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<H: QueueHandler>(epoll: &Epoll, processor: &mut QueueProcessor<H>, pause: &EventFd) {
    // Requests queued before activation (or before this thread started) have no pending
    // notification of their own.
    for i in 0..processor.num_queues() {
        if processor.stop.is_raised() {
            return;
        }
        processor.process_queue(i);
    }
    let mut events = vec![EpollEvent::default(); processor.num_queues() + 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio worker: epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == KILL_TOKEN || processor.stop.is_raised() {
                return;
            }
            if token == PAUSE_TOKEN {
                let _ = pause.read();
                processor.gate.park(&processor.stop);
                continue;
            }
            let i = token as usize;
            if let Some(q) = processor.queues.get(i) {
                // Non-blocking: a spurious wake-up reads EAGAIN, which is harmless.
                let _ = q.event.read();
                processor.process_queue(i);
            }
        }
    }
}

/// A function every worker thread runs first, once its setup is done, with
/// the thread's name (the device kind, e.g. `virtio-blk`): the VMM installs
/// that back end's seccomp filter there. Process-wide; none by default.
static THREAD_HOOK: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Sets the hook run first by every worker thread started from now on.
/// Only the first call has an effect.
pub fn set_thread_hook(hook: fn(&str)) {
    let _ = THREAD_HOOK.set(hook);
}

fn run_thread_hook(name: &str) {
    if let Some(hook) = THREAD_HOOK.get() {
        hook(name);
    }
}

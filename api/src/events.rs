//! The VM's event stream: what happened to the VM and its devices, each
//! event with a monotonic timestamp, delivered to any number of followers
//! without ever blocking the VMM.
//!
//! [`VmEvent`] is both the embedding API's event and one line of
//! `GET /api/v1/vm.events` and `--event-monitor` (newline-delimited JSON,
//! e.g. `{"timestamp_us":1234,"event":"device-added","id":"d1",
//! "pci_path":"01/00"}`).
//!
//! [`EventBus::publish`] appends the event to every follower's queue, which
//! holds at most [`QUEUE_CAPACITY`] events. A follower that does not keep up
//! loses the events that arrive while its queue is full (the newest ones;
//! what is queued stays, in order), and where the loss happened it receives
//! `{"event":"dropped","count":N}` saying how many it lost. Publishing takes
//! one short lock and never waits for a follower.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most events queued for one follower.
pub const QUEUE_CAPACITY: usize = 256;

/// Why a VM stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted or reset (a panic with `panic=-1` included).
    Reboot,
    /// `vm.shutdown` (or a signal) stopped it after the grace period.
    Shutdown,
    /// `vmm.shutdown` (or a second signal) stopped it at once.
    VmmShutdown,
    /// The VMM failed (for example a vCPU exit it cannot handle).
    Error,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum VmEventKind {
    /// The VM was built (`vm.create`, or `arbor --kernel`).
    Created,
    /// Its vCPUs started.
    Booted,
    /// `vm.pause` stopped the vCPUs and devices.
    Paused,
    /// `vm.resume` let them run again.
    Resumed,
    /// A device was hot-plugged at `pci_path`.
    DeviceAdded { id: String, pci_path: String },
    /// The guest was asked to release a device.
    DeviceRemovalRequested { id: String, pci_path: String },
    /// The guest released the device (or never took it) and it is gone;
    /// `after_ms` since the removal was requested.
    DeviceReleased {
        id: String,
        pci_path: String,
        after_ms: u64,
    },
    /// The guest did not release the device in time: the removal was
    /// withdrawn and the device stays.
    DeviceRemovalWithdrawn {
        id: String,
        pci_path: String,
        after_ms: u64,
    },
    /// `vm.shutdown` pressed the ACPI power button.
    ShutdownRequested,
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted or reset. A guest panic with `panic=-1` ends
    /// this way.
    Reboot,
    /// The VM stopped running (after `power-off`, `reboot`, or on request).
    Stopped {
        reason: StopReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// `vm.delete` tore the VM down.
    Deleted,
    /// The `arbor` process is exiting with `status`.
    VmmExit { status: i32 },
    /// This follower fell behind and lost `count` events before this one.
    Dropped { count: u64 },
}

/// One event, with the time it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    /// `CLOCK_MONOTONIC` in microseconds (comparable with other processes'
    /// monotonic clocks on the same host, never going back).
    pub timestamp_us: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: VmEventKind,
}

/// `CLOCK_MONOTONIC` now, in microseconds.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000) + (ts.tv_nsec as u64) / 1000
}

impl VmEvent {
    /// `kind`, stamped now.
    pub fn now(kind: VmEventKind) -> VmEvent {
        VmEvent {
            timestamp_us: monotonic_us(),
            kind,
        }
    }

    /// The event as one line of the stream (JSON and a newline).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"event":"error","error":"cannot encode the event"}"#.to_string()
        });
        s.push('\n');
        s
    }
}

#[derive(Default)]
struct Queue {
    events: VecDeque<VmEvent>,
    dropped: u64,
    /// The time of the last event dropped (the `dropped` marker's).
    dropped_at_us: u64,
    closed: bool,
}

struct Follower {
    queue: Mutex<Queue>,
    ready: Condvar,
    notify: tokio::sync::Notify,
}

impl Follower {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Bus {
    followers: Vec<Weak<Follower>>,
    closed: bool,
}

/// Fans events out to followers. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct EventBus(Arc<Mutex<Bus>>);

impl EventBus {
    /// A bus with no followers.
    pub fn new() -> EventBus {
        EventBus::default()
    }

    fn lock(&self) -> MutexGuard<'_, Bus> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new follower, receiving the events published from now on.
    pub fn subscribe(&self) -> Subscription {
        let f = Arc::new(Follower {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            notify: tokio::sync::Notify::new(),
        });
        let mut bus = self.lock();
        if bus.closed {
            f.lock().closed = true;
        }
        bus.followers.push(Arc::downgrade(&f));
        Subscription(f)
    }

    /// Stamps `kind` with the time and sends it to every follower; never
    /// blocks on one (a full queue counts the event as dropped).
    pub fn emit(&self, kind: VmEventKind) {
        let mut bus = self.lock();
        // Stamped under the lock, so that the stamps follow the order.
        Self::deliver(&mut bus, VmEvent::now(kind));
    }

    /// Sends `event` to every follower (see [`EventBus::emit`]).
    pub fn publish(&self, event: VmEvent) {
        Self::deliver(&mut self.lock(), event);
    }

    fn deliver(bus: &mut Bus, event: VmEvent) {
        bus.followers.retain(|w| {
            let Some(f) = w.upgrade() else {
                return false;
            };
            {
                let mut q = f.lock();
                // Lost events are reported where they were lost: a marker
                // goes into the queue before the next event that fits.
                let room = QUEUE_CAPACITY - q.events.len().min(QUEUE_CAPACITY);
                let needed = if q.dropped > 0 { 2 } else { 1 };
                if room < needed {
                    q.dropped += 1;
                    q.dropped_at_us = event.timestamp_us;
                } else {
                    if q.dropped > 0 {
                        let count = std::mem::take(&mut q.dropped);
                        let timestamp_us = q.dropped_at_us;
                        q.events.push_back(VmEvent {
                            timestamp_us,
                            kind: VmEventKind::Dropped { count },
                        });
                    }
                    q.events.push_back(event.clone());
                }
            }
            f.ready.notify_all();
            f.notify.notify_one();
            true
        });
    }

    /// Ends every follower's stream once it has read what is queued; later
    /// followers get an empty stream.
    pub fn close(&self) {
        let mut bus = self.lock();
        bus.closed = true;
        for f in bus.followers.iter().filter_map(Weak::upgrade) {
            f.lock().closed = true;
            f.ready.notify_all();
            f.notify.notify_one();
        }
    }

    /// How many followers there are.
    pub fn followers(&self) -> usize {
        self.lock()
            .followers
            .iter()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// One follower of an [`EventBus`]; dropping it unsubscribes.
pub struct Subscription(Arc<Follower>);

/// What a follower's queue gave.
enum Next {
    Event(VmEvent),
    Empty,
    Closed,
}

impl Subscription {
    fn take(&self) -> Next {
        let mut q = self.0.lock();
        if let Some(e) = q.events.pop_front() {
            return Next::Event(e);
        }
        if q.dropped > 0 {
            let count = std::mem::take(&mut q.dropped);
            return Next::Event(VmEvent {
                timestamp_us: q.dropped_at_us,
                kind: VmEventKind::Dropped { count },
            });
        }
        if q.closed {
            Next::Closed
        } else {
            Next::Empty
        }
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Option<VmEvent> {
        match self.take() {
            Next::Event(e) => Some(e),
            _ => None,
        }
    }

    /// Waits up to `timeout` for the next event; `None` on timeout or
    /// when the stream has ended.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<VmEvent> {
        let deadline = std::time::Instant::now() + timeout;
        let mut q = self.0.lock();
        loop {
            if q.dropped > 0 || !q.events.is_empty() || q.closed {
                drop(q);
                return self.try_recv();
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            q = self
                .0
                .ready
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the next event; `None` once the stream has ended.
    pub fn recv(&self) -> Option<VmEvent> {
        let mut q = self.0.lock();
        loop {
            if q.dropped > 0 || !q.events.is_empty() || q.closed {
                drop(q);
                return self.try_recv();
            }
            q = self.0.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Async version of [`Subscription::recv`].
    pub async fn next(&self) -> Option<VmEvent> {
        loop {
            let notified = self.0.notify.notified();
            match self.take() {
                Next::Event(e) => return Some(e),
                Next::Closed => return None,
                Next::Empty => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_order() {
        let bus = EventBus::new();
        let s = bus.subscribe();
        bus.emit(VmEventKind::Created);
        bus.emit(VmEventKind::DeviceAdded {
            id: "d".into(),
            pci_path: "01/00".into(),
        });
        let a = s.try_recv().unwrap();
        let b = s.try_recv().unwrap();
        assert!(a.timestamp_us <= b.timestamp_us);
        let line = b.to_line();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "device-added");
        assert_eq!(v["pci_path"], "01/00");
        let back: VmEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, b);
        assert!(s.try_recv().is_none());
    }

    #[test]
    fn a_slow_follower_loses_events_and_is_told() {
        let bus = EventBus::new();
        let slow = bus.subscribe();
        let fast = bus.subscribe();
        for i in 0..(QUEUE_CAPACITY as u64 + 10) {
            bus.emit(VmEventKind::VmmExit { status: i as i32 });
            assert!(fast.try_recv().is_some());
        }
        let mut n = 0;
        let mut last = None;
        while let Some(e) = slow.try_recv() {
            n += 1;
            last = Some(e.kind);
        }
        assert_eq!(n, QUEUE_CAPACITY + 1);
        assert_eq!(last, Some(VmEventKind::Dropped { count: 10 }));
        // After a loss, the marker comes before the next event.
        bus.emit(VmEventKind::Booted);
        bus.emit(VmEventKind::Paused);
        assert_eq!(slow.try_recv().unwrap().kind, VmEventKind::Booted);
        for _ in 0..QUEUE_CAPACITY + 3 {
            bus.emit(VmEventKind::Resumed);
        }
        let kinds: Vec<VmEventKind> =
            std::iter::from_fn(|| slow.try_recv().map(|e| e.kind)).collect();
        assert_eq!(kinds.len(), QUEUE_CAPACITY + 1);
        assert_eq!(kinds[0], VmEventKind::Paused);
        assert_eq!(kinds[QUEUE_CAPACITY], VmEventKind::Dropped { count: 4 });
        bus.close();
        assert!(slow.recv().is_none());
        drop(slow);
        assert_eq!(bus.followers(), 1);
    }

    #[test]
    fn async_follower_wakes() {
        let bus = EventBus::new();
        let s = bus.subscribe();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let b2 = bus.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b2.emit(VmEventKind::Booted);
            b2.close();
        });
        rt.block_on(async {
            assert_eq!(s.next().await.unwrap().kind, VmEventKind::Booted);
            assert!(s.next().await.is_none());
        });
    }
}

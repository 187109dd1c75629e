//! Message-signalled interrupt abstraction.
//!
//! Devices never talk to KVM. They own an `Arc<dyn MsiInterruptGroup>` (one group per device,
//! one entry per vector) and report two things through it:
//!
//! - [`MsiInterruptGroup::update`]: the guest (re)programmed a vector's address/data or
//!   (un)masked it. The VMM updates its GSI routing table entry for that vector.
//! - [`MsiInterruptGroup::trigger`]: the device wants to deliver the vector now. Masking has
//!   already been applied by the caller ([`crate::MsixConfig`] / [`crate::MsiConfig`] keep
//!   pending bits), so the implementation just injects (typically by writing the irqfd
//!   returned by [`MsiInterruptGroup::notifier`]).
//!
//! [`RecordingMsiGroup`] is an implementation without KVM, backed by one `EventFd` per vector,
//! that records every call; it is meant for tests.

use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An MSI message as programmed by the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (64-bit; the upper half is 0 for 32-bit MSI).
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

/// A group of MSI or MSI-X vectors belonging to one device.
///
/// Implementations must be cheap to call from device worker threads and must not call back
/// into the device (they are invoked with the device's interrupt state locked).
pub trait MsiInterruptGroup: Send + Sync {
    /// Inject `vector` into the guest.
    fn trigger(&self, vector: u16) -> io::Result<()>;

    /// Record the current message for `vector` and whether it is masked (masked covers the
    /// per-vector mask, the function mask and the capability being disabled). A masked vector
    /// will not be triggered; the VMM may keep or drop the route.
    fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> io::Result<()>;

    /// The EventFd that injects `vector` when written (e.g. a KVM irqfd), if any.
    fn notifier(&self, vector: u16) -> Option<&EventFd>;
}

/// A legacy, level-triggered, shareable INTx line, for guests that do not
/// enable MSI or MSI-X. The device calls [`IntxInterrupt::assert`] when it
/// raises its interrupt; the line stays asserted until the guest's EOI, after
/// which the VMM asserts it again for as long as the device still has the
/// interrupt pending (its status register not yet read).
pub trait IntxInterrupt: Send + Sync {
    /// Assert the line.
    fn assert(&self) -> io::Result<()>;

    /// The eventfd that asserts the line when written, for a device whose
    /// interrupt is raised outside the VMM (a passthrough back end signals
    /// it directly). `None` if the line has no such descriptor.
    fn eventfd(&self) -> Option<&EventFd> {
        None
    }

    /// The eventfd signalled when the guest ends the interrupt (EOI of a
    /// level-triggered line), for a back end that masks the line each time
    /// it fires and unmasks it then (kernel VFIO). `None` if the line has
    /// no such descriptor.
    fn resample_eventfd(&self) -> Option<&EventFd> {
        None
    }
}

/// State recorded per vector by [`RecordingMsiGroup`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordedVector {
    /// Last message passed to `update`.
    pub msg: MsiMessage,
    /// Last mask state passed to `update`.
    pub masked: bool,
    /// Number of `update` calls.
    pub updates: u32,
    /// Number of `trigger` calls.
    pub triggers: u32,
}

/// Test implementation of [`MsiInterruptGroup`]: one non-blocking EventFd per vector, written
/// on every trigger, plus a record of all calls.
#[derive(Debug)]
pub struct RecordingMsiGroup {
    eventfds: Vec<EventFd>,
    vectors: Mutex<Vec<RecordedVector>>,
}

impl RecordingMsiGroup {
    /// Create a group with `count` vectors.
    pub fn new(count: u16) -> io::Result<Self> {
        let mut eventfds = Vec::with_capacity(count as usize);
        for _ in 0..count {
            eventfds.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(RecordingMsiGroup {
            eventfds,
            vectors: Mutex::new(vec![RecordedVector::default(); count as usize]),
        })
    }

    /// Snapshot of what was recorded for `vector`.
    pub fn vector(&self, vector: u16) -> Option<RecordedVector> {
        self.vectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vector as usize)
            .copied()
    }

    /// Number of triggers recorded for `vector` (0 for an unknown vector).
    pub fn trigger_count(&self, vector: u16) -> u32 {
        self.vector(vector).map(|v| v.triggers).unwrap_or(0)
    }
}

impl MsiInterruptGroup for RecordingMsiGroup {
    fn trigger(&self, vector: u16) -> io::Result<()> {
        let mut vectors = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        let entry = vectors
            .get_mut(vector as usize)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        entry.triggers += 1;
        self.eventfds[vector as usize].write(1)
    }

    fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> io::Result<()> {
        let mut vectors = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        let entry = vectors
            .get_mut(vector as usize)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        entry.msg = msg;
        entry.masked = masked;
        entry.updates += 1;
        Ok(())
    }

    fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.eventfds.get(vector as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_group_counts_and_signals() {
        let g = RecordingMsiGroup::new(2).unwrap();
        g.trigger(1).unwrap();
        g.trigger(1).unwrap();
        assert_eq!(g.trigger_count(1), 2);
        assert_eq!(g.notifier(1).unwrap().read().unwrap(), 2);
        assert!(g.trigger(2).is_err());
        assert!(g.notifier(2).is_none());
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        g.update(0, msg, true).unwrap();
        let v = g.vector(0).unwrap();
        assert_eq!(v.msg, msg);
        assert!(v.masked);
        assert_eq!(v.updates, 1);
    }
}

//! Virtio devices and the virtio-pci (modern, virtio 1.x only) transport.
//!
//! Layering:
//!
//! - [`VirtioDevice`] is what a device type (block, rng, ...) implements: its features, its
//!   configuration space, its queue sizes, and `activate`/`reset`.
//! - [`VirtioPciDevice`] (in [`pci_transport`]) wraps a `VirtioDevice` into a
//!   [`pci::PciDevice`]: configuration space with the virtio vendor capabilities, one 64-bit
//!   memory BAR holding common config, ISR, device config, notify area and the MSI-X
//!   table/PBA, feature negotiation and the device status state machine ([`common_config`]).
//!   When the driver sets DRIVER_OK it hands the enabled queues to
//!   [`VirtioDevice::activate`]; a status write of 0 (or drop) calls [`VirtioDevice::reset`].
//! - [`worker`] runs one thread per activated device: it waits (epoll) on the per-queue
//!   notification EventFds (which the VMM binds to ioeventfds at the notify addresses) and a
//!   kill EventFd, pops descriptor chains, hands them to a [`worker::QueueHandler`] and signals
//!   used buffers through a [`VirtioInterrupt`].
//! - [`chain`] validates guest descriptor chains (loops, out-of-memory addresses, too many
//!   descriptors, wrong direction) and offers scatter/gather copies; guest input never panics.
//! - [`event_worker`] runs the thread of a device driven by host file descriptors as well as
//!   its queues (network, vsock): receive chains wait in the ring until the host side has
//!   data, and the handler registers and drops host file descriptors as it goes.
//! - [`block`], [`rng`] and [`net`] (virtio-net on a tap) are the device types.

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub mod block;
pub mod chain;
pub mod common_config;
pub mod event_worker;
pub mod interrupt;
pub mod net;
pub mod pci_transport;
pub mod rng;
pub mod vsock;
pub mod worker;

#[cfg(test)]
pub(crate) mod test_utils;

pub use block::{Block, BlockConfig};
pub use interrupt::VirtioInterrupt;
pub use net::{Net, NetConfig, Tap, TapError};
pub use pci_transport::{VirtioPciDevice, VirtioPciError, VirtioPciOptions};
pub use rng::Rng;
pub use vsock::Vsock;

/// Guest memory as seen by virtio devices (swappable for memory hot-plug).
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap>;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// Guest OS has found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// Guest OS knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// Device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// Driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Transport-level feature bits.
pub mod features {
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// Used/avail event index notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x compliance (required by this transport).
    pub const VERSION_1: u64 = 1 << 32;
}

/// Virtio device type IDs.
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device (vsock).
    pub const VSOCK: u32 = 19;
}

/// `queue_msix_vector` / `config_msix_vector` value meaning "no vector".
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// An enabled virtqueue handed to a device on activation.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index within the device.
    pub index: u16,
    /// Queue state (addresses, size, indices).
    pub queue: Queue,
    /// Notification EventFd: written by the guest's notify (through an ioeventfd or the
    /// transport's own BAR handler). A duplicate of the transport's fd.
    pub event: EventFd,
}

/// Everything a device needs to start processing.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryHandle,
    /// Used-buffer and configuration-change interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The queues the driver enabled.
    pub queues: Vec<ActiveQueue>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Activation failure.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// Wrong number of queues, or a queue the device cannot use.
    #[error("invalid queue configuration: {0}")]
    BadQueues(String),
    /// The device is already active.
    #[error("device already active")]
    AlreadyActive,
    /// Failed to create the worker thread or its file descriptors.
    #[error("failed to start worker: {0}")]
    Worker(#[from] io::Error),
}

/// A virtio device type, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device type ID (see [`device_type`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue (a power of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits offered to the driver (must include [`features::VERSION_1`]).
    fn features(&self) -> u64;

    /// Size of the device-specific configuration space in bytes.
    fn config_len(&self) -> usize;

    /// Read the device-specific configuration space. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write the device-specific configuration space (read-only fields are ignored).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Start processing the given queues (called on DRIVER_OK).
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// The device's worker thread slot (started by `activate`).
    fn worker(&self) -> &worker::WorkerSlot;

    /// The device's worker thread slot, mutably.
    fn worker_mut(&mut self) -> &mut worker::WorkerSlot;

    /// Stop processing: stop and join any worker thread, drop the queues. Idempotent.
    fn reset(&mut self) {
        self.worker_mut().stop();
    }

    /// Whether the device is currently active.
    fn is_active(&self) -> bool {
        self.worker().is_active()
    }

    /// Stop taking requests (the VM is paused) and wait, at most `timeout`, until no
    /// request is in progress. Returns whether that happened in time.
    fn pause(&mut self, timeout: std::time::Duration) -> bool {
        self.worker().pause(timeout)
    }

    /// Take requests again after [`VirtioDevice::pause`].
    fn resume(&mut self) {
        self.worker().resume()
    }

    /// PCI class code for the transport (base << 16 | sub << 8 | prog-if).
    fn pci_class(&self) -> u32 {
        match self.device_type() {
            device_type::NET => 0x02_0000,
            device_type::BLOCK => 0x01_8000,
            device_type::CONSOLE => 0x07_8000,
            _ => 0x00_ff00,
        }
    }
}

//! Interrupts raised by virtio devices.
//!
//! Devices only know [`VirtioInterrupt`]: "queue N has used buffers" and "my configuration
//! changed". The PCI transport implements it with [`VirtioPciInterrupt`]: it sets the ISR bits
//! (for drivers polling ISR) and triggers the MSI-X vector the driver assigned to the queue
//! (or to configuration changes) through the shared [`pci::MsixConfig`], which applies
//! masking and pending bits before reaching the VMM's [`pci::MsiInterruptGroup`].

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use pci::{IntxInterrupt, MsixConfig};

use super::VIRTIO_MSI_NO_VECTOR;

/// ISR bit: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// Interrupt sink of a virtio device.
pub trait VirtioInterrupt: Send + Sync {
    /// Queue `queue_index` has new used buffers.
    fn signal_used_queue(&self, queue_index: u16) -> io::Result<()>;
    /// The device-specific configuration changed.
    fn signal_config_change(&self) -> io::Result<()>;
}

/// MSI-X vector assignment shared between the common configuration (which the driver
/// programs) and the interrupt path (worker threads).
#[derive(Debug)]
pub struct VectorTable {
    /// Vector for configuration changes.
    pub config: AtomicU16,
    /// Vector of each queue.
    pub queues: Vec<AtomicU16>,
}

impl VectorTable {
    /// All vectors set to "no vector".
    pub fn new(num_queues: usize) -> Self {
        VectorTable {
            config: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queues: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        }
    }

    /// Reset every vector to "no vector".
    pub fn reset(&self) {
        self.config.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for q in &self.queues {
            q.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
    }
}

/// [`VirtioInterrupt`] for the PCI transport.
pub struct VirtioPciInterrupt {
    pub(crate) msix: Arc<MsixConfig>,
    /// The INTx line used while the driver has not enabled MSI-X.
    pub(crate) intx: Option<Arc<dyn IntxInterrupt>>,
    pub(crate) isr: Arc<AtomicU8>,
    pub(crate) vectors: Arc<VectorTable>,
    pub(crate) config_generation: Arc<AtomicU8>,
}

impl VirtioPciInterrupt {
    fn trigger(&self, vector: u16) -> io::Result<()> {
        if !self.msix.enabled() {
            // Legacy interrupt: the ISR bit is set; raise the line.
            return match &self.intx {
                Some(intx) => intx.assert(),
                None => Ok(()),
            };
        }
        if vector == VIRTIO_MSI_NO_VECTOR {
            return Ok(());
        }
        self.msix.trigger(vector)
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn signal_used_queue(&self, queue_index: u16) -> io::Result<()> {
        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        let vector = self
            .vectors
            .queues
            .get(queue_index as usize)
            .map(|v| v.load(Ordering::Acquire))
            .unwrap_or(VIRTIO_MSI_NO_VECTOR);
        self.trigger(vector)
    }

    fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        self.trigger(self.vectors.config.load(Ordering::Acquire))
    }
}

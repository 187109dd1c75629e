//! The virtio-pci common configuration structure (`virtio_pci_common_cfg`) and the device
//! status state machine.
//!
//! Reads are served from a snapshot of the 0x40-byte structure (any size, any alignment);
//! writes are accepted only with the natural width of each field (64-bit queue addresses as
//! one 8-byte or two 4-byte writes). Rules enforced:
//!
//! - driver features can only be written between DRIVER and FEATURES_OK and are masked with
//!   the offered features;
//! - FEATURES_OK is refused (reads back clear) unless VIRTIO_F_VERSION_1 was accepted;
//! - DRIVER_OK is refused without FEATURES_OK; status bits cannot be cleared except by
//!   writing 0, which resets queues, features, selectors and MSI-X vector assignments;
//! - queue size, addresses and enable are frozen once the queue is enabled or DRIVER_OK is
//!   set; invalid sizes/alignments are ignored; out-of-range MSI-X vectors read back as
//!   `VIRTIO_MSI_NO_VECTOR`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use log::debug;
use virtio_queue::{Queue, QueueT};

use super::interrupt::VectorTable;
use super::{features, status, VIRTIO_MSI_NO_VECTOR};

/// Size of the common configuration structure (virtio 1.2 layout).
pub const COMMON_CFG_LEN: usize = 0x40;

/// What a write requires from the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommonWrite {
    /// Nothing.
    None,
    /// The driver wrote 0 to device_status: stop the device.
    Reset,
    /// DRIVER_OK was just set: activate the device.
    Activate,
    /// FAILED was just set: the driver gave up; stop processing.
    Failed,
}

/// State behind the common configuration structure.
#[derive(Debug)]
pub struct CommonConfig {
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    vectors: Arc<VectorTable>,
    num_msix_vectors: u16,
    config_generation: Arc<AtomicU8>,
}

impl CommonConfig {
    /// State for a device offering `device_features` with queues of `queue_max_sizes`.
    pub fn new(
        device_features: u64,
        queue_max_sizes: &[u16],
        vectors: Arc<VectorTable>,
        num_msix_vectors: u16,
        config_generation: Arc<AtomicU8>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = queue_max_sizes
            .iter()
            .map(|&s| Queue::new(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CommonConfig {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
            vectors,
            num_msix_vectors,
            config_generation,
        })
    }

    /// Device status.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Set DEVICE_NEEDS_RESET.
    pub fn set_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
    }

    /// Features accepted by the driver.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The queues as configured by the driver.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Return to the state after power-on (queues, features, status, selectors, vectors).
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.vectors.reset();
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn image(&self) -> [u8; COMMON_CFG_LEN] {
        let mut b = [0u8; COMMON_CFG_LEN];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        let half = |v: u64, sel: u32| match sel {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(
            0x04,
            &half(self.device_features, self.device_feature_select).to_le_bytes(),
        );
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(
            0x0c,
            &half(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(
            0x10,
            &self.vectors.config.load(Ordering::Acquire).to_le_bytes(),
        );
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status]);
        put(0x15, &[self.config_generation.load(Ordering::Acquire)]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected_queue() {
            let vector = self
                .vectors
                .queues
                .get(usize::from(self.queue_select))
                .map(|v| v.load(Ordering::Acquire))
                .unwrap_or(VIRTIO_MSI_NO_VECTOR);
            put(0x18, &q.size().to_le_bytes());
            put(0x1a, &vector.to_le_bytes());
            put(0x1c, &u16::from(q.ready()).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes());
            put(0x20, &q.desc_table().to_le_bytes());
            put(0x28, &q.avail_ring().to_le_bytes());
            put(0x30, &q.used_ring().to_le_bytes());
            put(0x38, &self.queue_select.to_le_bytes());
        }
        b
    }

    /// Read `data.len()` bytes at `offset` (bytes past the structure read as zero).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let img = self.image();
        for (i, d) in data.iter_mut().enumerate() {
            if let Some(b) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| img.get(o))
            {
                *d = *b;
            }
        }
    }

    fn checked_vector(&self, v: u16) -> u16 {
        if v < self.num_msix_vectors {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn queue_writable(&self) -> Option<usize> {
        let i = usize::from(self.queue_select);
        let q = self.queues.get(i)?;
        (!q.ready() && self.status & status::DRIVER_OK == 0).then_some(i)
    }

    /// Write `data` at `offset`; returns what the transport must do.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> CommonWrite {
        let mut v = [0u8; 8];
        if data.len() > 8 {
            return CommonWrite::None;
        }
        v[..data.len()].copy_from_slice(data);
        let v64 = u64::from_le_bytes(v);
        let v32 = v64 as u32;
        let v16 = v64 as u16;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            (0x0c, 4) => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    debug!("virtio: driver features written in the wrong state");
                    return CommonWrite::None;
                }
                let (shift, mask) = match self.driver_feature_select {
                    0 => (0, 0xffff_ffffu64),
                    1 => (32, 0xffff_ffff_0000_0000u64),
                    _ => return CommonWrite::None,
                };
                let value = (u64::from(v32) << shift) & self.device_features & mask;
                self.driver_features = (self.driver_features & !mask) | value;
            }
            (0x10, 2) => {
                let vec = self.checked_vector(v16);
                self.vectors.config.store(vec, Ordering::Release);
            }
            (0x14, 1) => return self.write_status(data[0]),
            (0x16, 2) => self.queue_select = v16,
            (0x18, 2) => {
                if let Some(i) = self.queue_writable() {
                    if self.queues[i].try_set_size(v16).is_err() {
                        debug!("virtio: queue {i}: invalid size {v16}");
                    }
                }
            }
            (0x1a, 2) => {
                let vec = self.checked_vector(v16);
                if let Some(slot) = self.vectors.queues.get(usize::from(self.queue_select)) {
                    slot.store(vec, Ordering::Release);
                }
            }
            (0x1c, 2) => {
                if v16 == 1 {
                    if let Some(i) = self.queue_writable() {
                        self.queues[i].set_ready(true);
                    }
                }
            }
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(4) => {
                let Some(i) = self.queue_writable() else {
                    return CommonWrite::None;
                };
                let field = (offset - 0x20) / 8;
                let high = offset % 8 == 4;
                if high && data.len() == 8 {
                    return CommonWrite::None;
                }
                let (lo, hi) = match (high, data.len()) {
                    (false, 8) => (Some(v32), Some((v64 >> 32) as u32)),
                    (false, _) => (Some(v32), None),
                    (true, _) => (None, Some(v32)),
                };
                let q = &mut self.queues[i];
                match field {
                    0 => q.set_desc_table_address(lo, hi),
                    1 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => debug!(
                "virtio: ignored common config write at {offset:#x} len {}",
                data.len()
            ),
        }
        CommonWrite::None
    }

    fn write_status(&mut self, v: u8) -> CommonWrite {
        if v == 0 {
            self.reset();
            return CommonWrite::Reset;
        }
        let old = self.status;
        let mut new = (v & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if old & !new != 0 {
            debug!("virtio: driver tried to clear status bits ({old:#x} -> {v:#x})");
            return CommonWrite::None;
        }
        let newly = |bit: u8, new: u8| new & bit != 0 && old & bit == 0;
        if newly(status::FEATURES_OK, new) && self.driver_features & features::VERSION_1 == 0 {
            debug!("virtio: FEATURES_OK refused, VIRTIO_F_VERSION_1 not accepted");
            new &= !status::FEATURES_OK;
        }
        if newly(status::DRIVER_OK, new) && new & status::FEATURES_OK == 0 {
            debug!("virtio: DRIVER_OK refused without FEATURES_OK");
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if newly(status::DRIVER_OK, new) {
            CommonWrite::Activate
        } else if newly(status::FAILED, new) {
            CommonWrite::Failed
        } else {
            CommonWrite::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc() -> CommonConfig {
        CommonConfig::new(
            features::VERSION_1 | features::RING_EVENT_IDX | 0x7,
            &[256, 64],
            Arc::new(VectorTable::new(2)),
            3,
            Arc::new(AtomicU8::new(0)),
        )
        .unwrap()
    }

    fn r(c: &CommonConfig, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        c.read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(c: &mut CommonConfig, off: u64, v: u64, len: usize) -> CommonWrite {
        c.write(off, &v.to_le_bytes()[..len])
    }

    #[test]
    fn feature_negotiation() {
        let mut c = cc();
        assert_eq!(r(&c, 0x04, 4), 0x2000_0007);
        w(&mut c, 0x00, 1, 4);
        assert_eq!(r(&c, 0x04, 4), 1);
        w(&mut c, 0x00, 7, 4);
        assert_eq!(r(&c, 0x04, 4), 0);
        // Not yet DRIVER: ignored.
        w(&mut c, 0x0c, 0xffff_ffff, 4);
        assert_eq!(c.driver_features(), 0);
        w(
            &mut c,
            0x14,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
            1,
        );
        w(&mut c, 0x0c, 0xffff_ffff, 4);
        assert_eq!(c.driver_features(), 0x2000_0007);
        // FEATURES_OK without VERSION_1 is refused.
        w(&mut c, 0x14, 0x0b, 1);
        assert_eq!(c.status(), 0x03);
        w(&mut c, 0x08, 1, 4);
        w(&mut c, 0x0c, 0xffff_ffff, 4);
        assert_eq!(c.driver_features(), 0x1_2000_0007);
        assert_eq!(r(&c, 0x0c, 4), 1);
        w(&mut c, 0x14, 0x0b, 1);
        assert_eq!(c.status(), 0x0b);
        // Features frozen after FEATURES_OK.
        w(&mut c, 0x0c, 0, 4);
        assert_eq!(c.driver_features(), 0x1_2000_0007);
        // Clearing bits is refused; DRIVER_OK activates once.
        assert_eq!(w(&mut c, 0x14, 0x03, 1), CommonWrite::None);
        assert_eq!(c.status(), 0x0b);
        assert_eq!(w(&mut c, 0x14, 0x0f, 1), CommonWrite::Activate);
        assert_eq!(w(&mut c, 0x14, 0x0f, 1), CommonWrite::None);
        assert_eq!(w(&mut c, 0x14, 0x8f, 1), CommonWrite::Failed);
        assert_eq!(w(&mut c, 0x14, 0, 1), CommonWrite::Reset);
        assert_eq!(c.status(), 0);
        assert_eq!(c.driver_features(), 0);
    }

    #[test]
    fn driver_ok_needs_features_ok() {
        let mut c = cc();
        assert_eq!(w(&mut c, 0x14, 0x07, 1), CommonWrite::None);
        assert_eq!(c.status(), 0x03);
        // The device-owned NEEDS_RESET bit is kept and cannot be set by the driver.
        w(&mut c, 0x14, 0x43, 1);
        assert_eq!(c.status(), 0x03);
        c.set_needs_reset();
        w(&mut c, 0x14, 0x03, 1);
        assert_eq!(c.status(), 0x43);
    }

    #[test]
    fn queue_configuration() {
        let mut c = cc();
        assert_eq!(r(&c, 0x12, 2), 2);
        assert_eq!(r(&c, 0x18, 2), 256);
        w(&mut c, 0x16, 1, 2);
        assert_eq!(r(&c, 0x18, 2), 64);
        assert_eq!(r(&c, 0x1e, 2), 1);
        w(&mut c, 0x18, 32, 2);
        assert_eq!(r(&c, 0x18, 2), 32);
        w(&mut c, 0x18, 33, 2); // not a power of two
        w(&mut c, 0x18, 128, 2); // above max
        w(&mut c, 0x18, 0, 2);
        assert_eq!(r(&c, 0x18, 2), 32);
        w(&mut c, 0x20, 0x1000, 4);
        w(&mut c, 0x24, 0x1, 4);
        w(&mut c, 0x28, 0x2_0000_2000, 8);
        w(&mut c, 0x30, 0x3000, 4);
        w(&mut c, 0x34, 0, 4);
        w(&mut c, 0x30, 0x3001, 4); // misaligned: ignored
        assert_eq!(r(&c, 0x20, 8), 0x1_0000_1000);
        assert_eq!(r(&c, 0x28, 8), 0x2_0000_2000);
        assert_eq!(r(&c, 0x30, 8), 0x3000);
        // Vectors: valid ones stick, others read NO_VECTOR.
        w(&mut c, 0x1a, 2, 2);
        assert_eq!(r(&c, 0x1a, 2), 2);
        w(&mut c, 0x1a, 3, 2);
        assert_eq!(r(&c, 0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        w(&mut c, 0x10, 0, 2);
        assert_eq!(r(&c, 0x10, 2), 0);
        // Enable freezes the queue.
        w(&mut c, 0x1c, 1, 2);
        assert_eq!(r(&c, 0x1c, 2), 1);
        w(&mut c, 0x18, 16, 2);
        w(&mut c, 0x20, 0x8000, 4);
        assert_eq!(r(&c, 0x18, 2), 32);
        assert_eq!(r(&c, 0x20, 8), 0x1_0000_1000);
        // Out-of-range queue select: zeros, writes ignored.
        w(&mut c, 0x16, 9, 2);
        assert_eq!(r(&c, 0x18, 2), 0);
        w(&mut c, 0x1c, 1, 2);
        w(&mut c, 0x1a, 0, 2);
        // Odd accesses do not panic.
        let mut b = [0u8; 8];
        c.read(0x3e, &mut b);
        c.read(u64::MAX, &mut b);
        c.write(0x21, &[1, 2]);
        c.write(0x24, &[0; 8]);
        c.write(0x14, &[]);
        c.write(0x00, &[0; 16]);
        // Reset clears queues and vectors.
        w(&mut c, 0x14, 0, 1);
        w(&mut c, 0x16, 1, 2);
        assert_eq!(r(&c, 0x18, 2), 64);
        assert_eq!(r(&c, 0x1c, 2), 0);
        assert_eq!(r(&c, 0x20, 8), 0);
        assert_eq!(r(&c, 0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    }
}

//! MSI capability.
//!
//! [`MsiCapability`] describes the register layout (vector count, 64-bit address, per-vector
//! masking); [`MsiConfig`] is the delivery state machine. The registers themselves live in the
//! configuration space ([`crate::PciConfiguration`]), which calls
//! [`MsiConfig::registers_written`] after every write into the capability; the pending bits
//! register is read back from [`MsiConfig::pending_bits`]. Multiple-message MSI derives the
//! vector number from the low bits of the message data, as the spec requires.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, error};

use crate::interrupt::{MsiInterruptGroup, MsiMessage};
use crate::PciError;

/// MSI capability ID.
pub const MSI_CAP_ID: u8 = 0x05;
/// Message control: enable.
pub const MSI_CTL_ENABLE: u16 = 1;
const MSI_CTL_64BIT: u16 = 1 << 7;
const MSI_CTL_PER_VECTOR_MASK: u16 = 1 << 8;

/// Layout of an MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCapability {
    /// Vectors the function can use: 1, 2, 4, 8, 16 or 32.
    pub max_vectors: u8,
    /// 64-bit message address capable.
    pub addr_64bit: bool,
    /// Per-vector masking capable.
    pub per_vector_mask: bool,
}

impl MsiCapability {
    /// Validate and build.
    pub fn new(max_vectors: u8, addr_64bit: bool, per_vector_mask: bool) -> Result<Self, PciError> {
        if !max_vectors.is_power_of_two() || max_vectors > 32 {
            return Err(PciError::InvalidCapability("MSI vector count"));
        }
        Ok(MsiCapability {
            max_vectors,
            addr_64bit,
            per_vector_mask,
        })
    }

    fn mmc(&self) -> u16 {
        self.max_vectors.trailing_zeros() as u16
    }

    /// Offset of the message control word from the capability start.
    pub const CONTROL: usize = 2;
    /// Offset of the low address dword from the capability start.
    pub const ADDR_LO: usize = 4;

    /// Offset of the high address dword, if 64-bit.
    pub fn addr_hi_offset(&self) -> Option<usize> {
        self.addr_64bit.then_some(8)
    }

    /// Offset of the message data word.
    pub fn data_offset(&self) -> usize {
        if self.addr_64bit {
            12
        } else {
            8
        }
    }

    /// Offset of the mask bits register, if per-vector masking.
    pub fn mask_offset(&self) -> Option<usize> {
        self.per_vector_mask.then_some(self.data_offset() + 4)
    }

    /// Offset of the pending bits register, if per-vector masking.
    pub fn pending_offset(&self) -> Option<usize> {
        self.per_vector_mask.then_some(self.data_offset() + 8)
    }

    /// Total capability length including the ID/next bytes.
    pub fn len(&self) -> usize {
        match self.pending_offset() {
            Some(p) => p + 4,
            None => self.data_offset() + 4,
        }
    }

    /// Whether the capability is empty (never: kept for API symmetry with `len`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Initial body after the ID/next bytes.
    pub fn body(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.len() - 2];
        let mut ctl = self.mmc() << 1;
        if self.addr_64bit {
            ctl |= MSI_CTL_64BIT;
        }
        if self.per_vector_mask {
            ctl |= MSI_CTL_PER_VECTOR_MASK;
        }
        b[0..2].copy_from_slice(&ctl.to_le_bytes());
        b
    }

    /// Writable bits of the body.
    pub fn writable_mask(&self) -> Vec<u8> {
        let mut m = vec![0u8; self.len() - 2];
        let mut put =
            |off: usize, bytes: &[u8]| m[off - 2..off - 2 + bytes.len()].copy_from_slice(bytes);
        // Enable and Multiple Message Enable.
        put(Self::CONTROL, &0x0071u16.to_le_bytes());
        put(Self::ADDR_LO, &0xffff_fffcu32.to_le_bytes());
        if let Some(hi) = self.addr_hi_offset() {
            put(hi, &u32::MAX.to_le_bytes());
        }
        put(self.data_offset(), &0xffffu16.to_le_bytes());
        if let Some(mask) = self.mask_offset() {
            let bits = if self.max_vectors == 32 {
                u32::MAX
            } else {
                (1u32 << self.max_vectors) - 1
            };
            put(mask, &bits.to_le_bytes());
        }
        m
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct MsiState {
    enabled: bool,
    vectors_enabled: u16,
    addr: u64,
    data: u16,
    mask: u32,
    pending: u32,
}

impl MsiState {
    fn masked(&self, v: u16) -> bool {
        !self.enabled || v >= self.vectors_enabled || self.mask & (1 << v) != 0
    }

    fn msg(&self, v: u16) -> MsiMessage {
        let low_bits = self.vectors_enabled.max(1) - 1;
        MsiMessage {
            addr: self.addr,
            data: u32::from((self.data & !low_bits) | (v & low_bits)),
        }
    }
}

/// MSI delivery state of one function.
pub struct MsiConfig {
    cap: MsiCapability,
    state: Mutex<MsiState>,
    group: Arc<dyn MsiInterruptGroup>,
}

impl std::fmt::Debug for MsiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiConfig")
            .field("cap", &self.cap)
            .field("state", &*self.lock())
            .finish()
    }
}

impl MsiConfig {
    /// Create the state for `cap`, delivering through `group`.
    pub fn new(cap: MsiCapability, group: Arc<dyn MsiInterruptGroup>) -> Self {
        MsiConfig {
            cap,
            state: Mutex::new(MsiState {
                vectors_enabled: 1,
                ..Default::default()
            }),
            group,
        }
    }

    fn lock(&self) -> MutexGuard<'_, MsiState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The capability layout.
    pub fn capability(&self) -> &MsiCapability {
        &self.cap
    }

    /// The interrupt group the vectors are delivered through.
    pub fn group(&self) -> &Arc<dyn MsiInterruptGroup> {
        &self.group
    }

    /// Whether MSI is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Number of vectors enabled by the guest (Multiple Message Enable).
    pub fn vectors_enabled(&self) -> u16 {
        self.lock().vectors_enabled
    }

    /// The message `vector` would send.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        (vector < u16::from(self.cap.max_vectors)).then(|| self.lock().msg(vector))
    }

    /// Pending bits (per-vector masking only).
    pub fn pending_bits(&self) -> u32 {
        self.lock().pending
    }

    /// Called by the configuration space after the guest wrote into the capability, with the
    /// current register values.
    pub fn registers_written(&self, control: u16, addr: u64, data: u16, mask: u32) {
        let mut st = self.lock();
        let old = *st;
        let mme = ((control >> 4) & 0x7).min(self.cap.mmc());
        st.enabled = control & MSI_CTL_ENABLE != 0;
        st.vectors_enabled = 1 << mme;
        st.addr = addr;
        st.data = data;
        st.mask = if self.cap.per_vector_mask { mask } else { 0 };
        for v in 0..u16::from(self.cap.max_vectors) {
            let (was_masked, masked) = (old.masked(v), st.masked(v));
            if was_masked != masked || old.msg(v) != st.msg(v) {
                if let Err(e) = self.group.update(v, st.msg(v), masked) {
                    error!("MSI: failed to update vector {v}: {e}");
                }
            }
            if !masked && st.pending & (1 << v) != 0 {
                st.pending &= !(1 << v);
                if let Err(e) = self.group.trigger(v) {
                    error!("MSI: failed to deliver pending vector {v}: {e}");
                }
            }
        }
    }

    /// Signal `vector`. Dropped while MSI is disabled or the vector is not enabled; pended if
    /// masked (per-vector masking).
    pub fn trigger(&self, vector: u16) -> io::Result<()> {
        if vector >= u16::from(self.cap.max_vectors) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI vector {vector} out of range"),
            ));
        }
        let mut st = self.lock();
        if !st.enabled || vector >= st.vectors_enabled {
            debug!("MSI: vector {vector} dropped");
            return Ok(());
        }
        if st.mask & (1 << vector) != 0 {
            st.pending |= 1 << vector;
            return Ok(());
        }
        self.group.trigger(vector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingMsiGroup;

    #[test]
    fn layout() {
        let c = MsiCapability::new(4, true, true).unwrap();
        assert_eq!(c.len(), 24);
        assert_eq!(c.data_offset(), 12);
        assert_eq!(c.mask_offset(), Some(16));
        assert_eq!(c.pending_offset(), Some(20));
        assert_eq!(u16::from_le_bytes([c.body()[0], c.body()[1]]), 0x184);
        let c32 = MsiCapability::new(1, false, false).unwrap();
        assert_eq!(c32.len(), 12);
        assert_eq!(c32.writable_mask().len(), 10);
        assert!(MsiCapability::new(3, false, false).is_err());
        assert!(MsiCapability::new(64, false, false).is_err());
    }

    #[test]
    fn multi_message_and_masking() {
        let g = Arc::new(RecordingMsiGroup::new(4).unwrap());
        let m = MsiConfig::new(MsiCapability::new(4, true, true).unwrap(), g.clone());
        // Enable with MME = 2 (4 vectors) and mask vector 3.
        m.registers_written(0x21, 0xfee0_0000, 0x40, 0b1000);
        assert_eq!(m.vectors_enabled(), 4);
        assert_eq!(m.message(2).unwrap().data, 0x42);
        m.trigger(2).unwrap();
        assert_eq!(g.trigger_count(2), 1);
        m.trigger(3).unwrap();
        assert_eq!(g.trigger_count(3), 0);
        assert_eq!(m.pending_bits(), 0b1000);
        m.registers_written(0x21, 0xfee0_0000, 0x40, 0);
        assert_eq!(g.trigger_count(3), 1);
        assert_eq!(m.pending_bits(), 0);
        // MME beyond MMC is clamped.
        m.registers_written(0x71, 0xfee0_0000, 0x40, 0);
        assert_eq!(m.vectors_enabled(), 4);
        // Disabled: dropped.
        m.registers_written(0x0, 0xfee0_0000, 0x40, 0);
        m.trigger(0).unwrap();
        assert_eq!(g.trigger_count(0), 0);
        assert!(g.vector(0).unwrap().masked);
        assert!(m.trigger(4).is_err());
    }
}

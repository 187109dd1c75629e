//! MSI-X: the capability registers and the table/PBA state machine.
//!
//! The capability (in configuration space) only holds the message control word (table
//! size, function mask, enable) and the BAR locations of the table and of the Pending Bit
//! Array. The table and PBA themselves live in a BAR, so the device forwards the BAR accesses
//! that fall into those ranges to [`MsixConfig::read_table`] / [`MsixConfig::write_table`] /
//! [`MsixConfig::read_pba`].
//!
//! [`MsixConfig`] is shared (`Arc`) between the vCPU thread (BAR/config accesses) and device
//! worker threads (which call [`MsixConfig::trigger`]); its state is behind a mutex.
//! Delivery rules: a vector fires only if MSI-X is enabled, the function is not masked and the
//! vector's mask bit is clear; otherwise its PBA bit is set and the message is sent when the
//! vector becomes unmasked. Every change of a vector's message or effective mask is pushed to
//! the [`MsiInterruptGroup`] so the VMM can update its routes.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, error};

use crate::interrupt::{MsiInterruptGroup, MsiMessage};
use crate::PciError;

/// MSI-X capability ID.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Size of one table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const MSIX_CTL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_CTL_FUNCTION_MASK: u16 = 1 << 14;
/// Maximum number of vectors.
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// Vector control: mask bit.
pub const MSIX_VECTOR_MASKED: u32 = 1;

/// Layout of the MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Number of vectors (1..=2048).
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in its BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Validate and build.
    pub fn new(
        table_size: u16,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Result<Self, PciError> {
        if table_size == 0 || table_size > MAX_MSIX_VECTORS {
            return Err(PciError::InvalidCapability("MSI-X table size"));
        }
        if table_bar > 5 || pba_bar > 5 {
            return Err(PciError::InvalidCapability("MSI-X BAR index"));
        }
        if table_offset & 7 != 0 || pba_offset & 7 != 0 {
            return Err(PciError::InvalidCapability("MSI-X offset alignment"));
        }
        Ok(MsixCapability {
            table_size,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
        })
    }

    /// Table size in bytes.
    pub fn table_len(&self) -> u64 {
        u64::from(self.table_size) * MSIX_TABLE_ENTRY_SIZE
    }

    /// PBA size in bytes (whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.table_size).div_ceil(64) * 8
    }

    /// Capability body after the ID/next bytes: message control, table and PBA locators.
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(10);
        b.extend_from_slice(&(self.table_size - 1).to_le_bytes());
        b.extend_from_slice(&(self.table_offset | u32::from(self.table_bar)).to_le_bytes());
        b.extend_from_slice(&(self.pba_offset | u32::from(self.pba_bar)).to_le_bytes());
        b
    }

    /// Writable bits of the body: only enable and function mask.
    pub fn writable_mask(&self) -> Vec<u8> {
        let mut m = vec![0u8; 10];
        m[..2].copy_from_slice(&(MSIX_CTL_ENABLE | MSIX_CTL_FUNCTION_MASK).to_le_bytes());
        m
    }
}

/// One MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixTableEntry {
    /// Message address, low dword.
    pub addr_lo: u32,
    /// Message address, high dword.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0 = masked).
    pub vector_ctl: u32,
}

impl MsixTableEntry {
    fn masked_default() -> Self {
        MsixTableEntry {
            vector_ctl: MSIX_VECTOR_MASKED,
            ..Default::default()
        }
    }

    /// Whether the per-vector mask bit is set.
    pub fn masked(&self) -> bool {
        self.vector_ctl & MSIX_VECTOR_MASKED != 0
    }

    /// The programmed message.
    pub fn msg(&self) -> MsiMessage {
        MsiMessage {
            addr: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.addr_lo.to_le_bytes());
        b[4..8].copy_from_slice(&self.addr_hi.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12..16].copy_from_slice(&self.vector_ctl.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        let dw = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        MsixTableEntry {
            addr_lo: dw(0),
            addr_hi: dw(4),
            data: dw(8),
            vector_ctl: dw(12),
        }
    }
}

#[derive(Debug)]
struct MsixState {
    table: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

impl MsixState {
    fn effectively_masked(&self, v: usize) -> bool {
        !self.enabled || self.function_masked || self.table[v].masked()
    }

    fn pending(&self, v: usize) -> bool {
        self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, pending: bool) {
        if pending {
            self.pba[v / 64] |= 1 << (v % 64);
        } else {
            self.pba[v / 64] &= !(1 << (v % 64));
        }
    }
}

/// MSI-X table, PBA and control state of one function.
pub struct MsixConfig {
    state: Mutex<MsixState>,
    group: Arc<dyn MsiInterruptGroup>,
    num_vectors: u16,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("num_vectors", &self.num_vectors)
            .field("state", &*self.lock())
            .finish()
    }
}

impl MsixConfig {
    /// Create the state for `num_vectors` vectors (1..=2048), all masked, MSI-X disabled.
    pub fn new(num_vectors: u16, group: Arc<dyn MsiInterruptGroup>) -> Result<Self, PciError> {
        if num_vectors == 0 || num_vectors > MAX_MSIX_VECTORS {
            return Err(PciError::InvalidCapability("MSI-X vector count"));
        }
        Ok(MsixConfig {
            state: Mutex::new(MsixState {
                table: vec![MsixTableEntry::masked_default(); num_vectors as usize],
                pba: vec![0; (num_vectors as usize).div_ceil(64)],
                enabled: false,
                function_masked: false,
            }),
            group,
            num_vectors,
        })
    }

    fn lock(&self) -> MutexGuard<'_, MsixState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.num_vectors
    }

    /// Table size in bytes.
    pub fn table_len(&self) -> u64 {
        u64::from(self.num_vectors) * MSIX_TABLE_ENTRY_SIZE
    }

    /// PBA size in bytes.
    pub fn pba_len(&self) -> u64 {
        u64::from(self.num_vectors).div_ceil(64) * 8
    }

    /// The interrupt group the vectors are delivered through.
    pub fn group(&self) -> &Arc<dyn MsiInterruptGroup> {
        &self.group
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.lock().function_masked
    }

    /// A copy of table entry `vector`.
    pub fn entry(&self, vector: u16) -> Option<MsixTableEntry> {
        self.lock().table.get(vector as usize).copied()
    }

    /// Whether the PBA bit of `vector` is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let st = self.lock();
        (vector as usize) < st.table.len() && st.pending(vector as usize)
    }

    fn push_update(&self, st: &MsixState, v: usize) {
        let masked = st.effectively_masked(v);
        if let Err(e) = self.group.update(v as u16, st.table[v].msg(), masked) {
            error!("MSI-X: failed to update vector {v}: {e}");
        }
    }

    fn deliver_if_pending(&self, st: &mut MsixState, v: usize) {
        if !st.effectively_masked(v) && st.pending(v) {
            st.set_pending(v, false);
            if let Err(e) = self.group.trigger(v as u16) {
                error!("MSI-X: failed to deliver pending vector {v}: {e}");
            }
        }
    }

    /// Apply the enable and function mask bits of the message control register. Returns
    /// whether anything changed.
    pub fn set_control(&self, enabled: bool, function_masked: bool) -> bool {
        let mut st = self.lock();
        if st.enabled == enabled && st.function_masked == function_masked {
            return false;
        }
        let before: Vec<bool> = (0..st.table.len())
            .map(|v| st.effectively_masked(v))
            .collect();
        st.enabled = enabled;
        st.function_masked = function_masked;
        for (v, was_masked) in before.into_iter().enumerate() {
            if was_masked != st.effectively_masked(v) {
                self.push_update(&st, v);
                self.deliver_if_pending(&mut st, v);
            }
        }
        true
    }

    /// Read from the table at byte `offset` within the table. Accesses of 1 to 8 bytes that
    /// stay within one entry are served; anything else reads as zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((v, off)) = self.table_index(offset, data.len()) else {
            debug!(
                "MSI-X: ignored table read at {offset:#x} len {}",
                data.len()
            );
            return;
        };
        let bytes = self.lock().table[v].to_bytes();
        data.copy_from_slice(&bytes[off..off + data.len()]);
    }

    /// Write to the table at byte `offset` within the table (1 to 8 bytes within one entry;
    /// anything else is ignored).
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let Some((v, off)) = self.table_index(offset, data.len()) else {
            debug!(
                "MSI-X: ignored table write at {offset:#x} len {}",
                data.len()
            );
            return;
        };
        let mut st = self.lock();
        let old = st.table[v];
        let was_masked = st.effectively_masked(v);
        let mut bytes = old.to_bytes();
        bytes[off..off + data.len()].copy_from_slice(data);
        let mut new = MsixTableEntry::from_bytes(&bytes);
        // Only the mask bit of vector control is implemented; the rest is reserved.
        new.vector_ctl &= MSIX_VECTOR_MASKED;
        st.table[v] = new;
        if new != old {
            self.push_update(&st, v);
        }
        if was_masked && !st.effectively_masked(v) {
            self.deliver_if_pending(&mut st, v);
        }
    }

    /// Read the PBA at byte `offset` within the PBA (1 to 8 bytes within one qword; anything
    /// else reads as zero).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if len == 0
            || len > 8
            || offset % 8 + len > 8
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.pba_len())
        {
            debug!("MSI-X: ignored PBA read at {offset:#x} len {len}");
            return;
        }
        let qword = self.lock().pba[(offset / 8) as usize].to_le_bytes();
        let off = (offset % 8) as usize;
        data.copy_from_slice(&qword[off..off + data.len()]);
    }

    /// PBA writes are ignored (the PBA is read-only).
    pub fn write_pba(&self, offset: u64, data: &[u8]) {
        debug!("MSI-X: ignored PBA write at {offset:#x} len {}", data.len());
    }

    /// Signal `vector`: delivered now if unmasked, otherwise marked pending. Dropped (with
    /// `Ok`) while MSI-X is disabled. Errors for an out-of-range vector.
    pub fn trigger(&self, vector: u16) -> io::Result<()> {
        let mut st = self.lock();
        let v = vector as usize;
        if v >= st.table.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector {vector} out of range"),
            ));
        }
        if !st.enabled {
            debug!("MSI-X: vector {vector} dropped, MSI-X disabled");
            return Ok(());
        }
        if st.effectively_masked(v) {
            st.set_pending(v, true);
            return Ok(());
        }
        self.group.trigger(vector)
    }

    /// Return to the power-on state: all vectors masked and zeroed, PBA clear, disabled.
    pub fn reset(&self) {
        let mut st = self.lock();
        let n = st.table.len();
        for v in 0..n {
            st.table[v] = MsixTableEntry::masked_default();
        }
        st.pba.fill(0);
        st.enabled = false;
        st.function_masked = false;
        for v in 0..n {
            self.push_update(&st, v);
        }
    }

    fn table_index(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if len == 0 || len > 8 {
            return None;
        }
        let v = offset / MSIX_TABLE_ENTRY_SIZE;
        let off = (offset % MSIX_TABLE_ENTRY_SIZE) as usize;
        if v >= u64::from(self.num_vectors) || off + len > MSIX_TABLE_ENTRY_SIZE as usize {
            return None;
        }
        Some((v as usize, off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingMsiGroup;

    fn setup(n: u16) -> (Arc<RecordingMsiGroup>, MsixConfig) {
        let g = Arc::new(RecordingMsiGroup::new(n).unwrap());
        let m = MsixConfig::new(n, g.clone()).unwrap();
        (g, m)
    }

    fn program(m: &MsixConfig, v: u16, addr: u64, data: u32, masked: bool) {
        let base = u64::from(v) * 16;
        m.write_table(base, &(addr as u32).to_le_bytes());
        m.write_table(base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn capability_layout() {
        let cap = MsixCapability::new(3, 0, 0x8000, 0, 0xc000).unwrap();
        assert_eq!(cap.body(), vec![2, 0, 0x00, 0x80, 0, 0, 0x00, 0xc0, 0, 0]);
        assert_eq!(cap.writable_mask()[..2], [0, 0xc0]);
        assert_eq!(cap.table_len(), 48);
        assert_eq!(cap.pba_len(), 8);
        assert!(MsixCapability::new(0, 0, 0, 0, 0).is_err());
        assert!(MsixCapability::new(2049, 0, 0, 0, 0).is_err());
        assert!(MsixCapability::new(1, 6, 0, 0, 0).is_err());
        assert!(MsixCapability::new(1, 0, 4, 0, 0).is_err());
    }

    #[test]
    fn entries_start_masked_and_table_roundtrips() {
        let (_g, m) = setup(4);
        let mut d = [0u8; 4];
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        program(&m, 2, 0x1_fee0_1000, 0x4055, false);
        let mut q = [0u8; 8];
        m.read_table(32, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        // Reserved vector-control bits read as zero.
        m.write_table(2 * 16 + 12, &0xffff_fffeu32.to_le_bytes());
        m.read_table(2 * 16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
    }

    #[test]
    fn out_of_range_accesses_are_ignored() {
        let (g, m) = setup(2);
        m.write_table(32, &[0xff; 4]);
        m.write_table(u64::MAX - 3, &[0xff; 4]);
        m.write_table(14, &[0xff; 4]); // crosses entry boundary
        m.write_table(0, &[0xff; 16]); // too large
        m.write_table(0, &[]);
        let mut d = [0xaau8; 4];
        m.read_table(32, &mut d);
        assert_eq!(d, [0; 4]);
        m.read_pba(8, &mut d);
        assert_eq!(d, [0; 4]);
        m.read_pba(u64::MAX, &mut d);
        let mut q8 = [0u8; 8];
        m.read_pba(u64::MAX - 7, &mut q8);
        m.read_table(u64::MAX - 7, &mut q8);
        m.write_table(u64::MAX - 7, &q8);
        m.write_pba(0, &[0xff; 8]);
        let mut q = [0u8; 8];
        m.read_pba(0, &mut q);
        assert_eq!(q, [0; 8]);
        assert!(m.trigger(2).is_err());
        assert_eq!(g.vector(0).unwrap().updates, 0);
    }

    #[test]
    fn masked_vector_sets_pending_and_fires_on_unmask() {
        let (g, m) = setup(2);
        program(&m, 1, 0xfee0_0000, 0x30, true);
        m.set_control(true, false);
        m.trigger(1).unwrap();
        assert_eq!(g.trigger_count(1), 0);
        assert!(m.is_pending(1));
        let mut q = [0u8; 8];
        m.read_pba(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0b10);
        // Unmask: pending vector is delivered and the PBA bit cleared.
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(g.trigger_count(1), 1);
        assert!(!m.is_pending(1));
        let rec = g.vector(1).unwrap();
        assert!(!rec.masked);
        assert_eq!(rec.msg.data, 0x30);
        m.trigger(1).unwrap();
        assert_eq!(g.trigger_count(1), 2);
    }

    #[test]
    fn function_mask_and_enable() {
        let (g, m) = setup(1);
        program(&m, 0, 0xfee0_0000, 0x31, false);
        // Disabled: interrupts are dropped, not pended.
        m.trigger(0).unwrap();
        assert_eq!(g.trigger_count(0), 0);
        assert!(!m.is_pending(0));
        assert!(g.vector(0).unwrap().masked);
        assert!(m.set_control(true, true));
        assert!(!m.set_control(true, true));
        m.trigger(0).unwrap();
        assert!(m.is_pending(0));
        assert_eq!(g.trigger_count(0), 0);
        m.set_control(true, false);
        assert_eq!(g.trigger_count(0), 1);
        assert!(!g.vector(0).unwrap().masked);
        m.set_control(false, false);
        assert!(g.vector(0).unwrap().masked);
        m.reset();
        assert!(m.entry(0).unwrap().masked());
        assert!(!m.enabled());
    }
}

//! ECAM (PCI Express enhanced configuration access, "MMCONFIG").
//!
//! Each function gets a 4 KiB window in an MMIO region; the offset of an access inside the
//! region encodes bus (bits 27:20), device (19:15), function (14:12) and register (11:0). The
//! VMM registers the region (1 MiB per bus it exposes; 256 MiB for buses 0-255) and forwards
//! accesses, with their offset inside the region, to [`PciRoot::ecam_read`] and
//! [`PciRoot::ecam_write`].

use crate::bus::{ConfigWriteResult, PciBdf, PciRoot};

/// Size of the ECAM window of one bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Size of an ECAM region covering buses 0-255.
pub const ECAM_MAX_SIZE: u64 = 256 * ECAM_BUS_SIZE;

/// A decoded ECAM offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamAddress {
    /// Function addressed.
    pub bdf: PciBdf,
    /// Byte offset within the function's configuration space (0..4096).
    pub register: u16,
}

impl EcamAddress {
    /// Decode an offset inside the ECAM region; `None` beyond bus 255.
    pub fn decode(offset: u64) -> Option<Self> {
        if offset >= ECAM_MAX_SIZE {
            return None;
        }
        Some(EcamAddress {
            bdf: PciBdf {
                bus: (offset >> 20) as u8,
                device: ((offset >> 15) & 0x1f) as u8,
                function: ((offset >> 12) & 0x7) as u8,
            },
            register: (offset & 0xfff) as u16,
        })
    }

    /// Encode back to an offset.
    pub fn encode(&self) -> u64 {
        (u64::from(self.bdf.bus) << 20)
            | (u64::from(self.bdf.device) << 15)
            | (u64::from(self.bdf.function) << 12)
            | u64::from(self.register & 0xfff)
    }
}

impl PciRoot {
    /// MMIO read at `offset` inside the ECAM region. Accesses of 1, 2 or 4 bytes within a
    /// dword are served; anything else (or an absent function) reads all-ones.
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        match EcamAddress::decode(offset) {
            Some(a) => self.config_read(a.bdf, a.register, data),
            None => data.fill(0xff),
        }
    }

    /// MMIO write at `offset` inside the ECAM region. Returns what the write changed, if it
    /// reached a function.
    pub fn ecam_write(&self, offset: u64, data: &[u8]) -> Option<ConfigWriteResult> {
        let a = EcamAddress::decode(offset)?;
        self.config_write(a.bdf, a.register, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_encode() {
        let a = EcamAddress::decode(0x0123_c804).unwrap();
        assert_eq!(
            a.bdf,
            PciBdf {
                bus: 0x12,
                device: 7,
                function: 4
            }
        );
        assert_eq!(a.register, 0x804);
        assert_eq!(a.encode(), 0x0123_c804);
        assert_eq!(EcamAddress::decode(ECAM_MAX_SIZE), None);
        assert_eq!(EcamAddress::decode(u64::MAX), None);
        let last = EcamAddress::decode(ECAM_MAX_SIZE - 1).unwrap();
        assert_eq!(last.bdf.bus, 255);
        assert_eq!(last.bdf.device, 31);
        assert_eq!(last.bdf.function, 7);
        assert_eq!(last.register, 0xfff);
    }

    #[test]
    fn host_bridge_through_ecam() {
        let root = PciRoot::with_host_bridge();
        let mut d = [0u8; 4];
        root.ecam_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x29c0_8086);
        let mut w = [0u8; 2];
        root.ecam_read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x29c0);
        // Absent function, bad size, dword-crossing access and out-of-range offset.
        root.ecam_read(1 << 15, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut q = [0u8; 8];
        root.ecam_read(0, &mut q);
        assert_eq!(q, [0xff; 8]);
        root.ecam_read(2, &mut d);
        assert_eq!(d, [0xff; 4]);
        root.ecam_read(ECAM_MAX_SIZE, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(root.ecam_write(1 << 15, &[0; 4]).is_none());
        assert!(root.ecam_write(ECAM_MAX_SIZE + 4, &[0; 4]).is_none());
    }
}

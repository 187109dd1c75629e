//! Base Address Registers.
//!
//! A BAR is described by a [`PciBarConfig`] (index, size, region type, prefetchable). The
//! register encoding follows the PCI spec: the low bits are read-only type flags, the address
//! bits below the size are hard-wired to zero, so writing all-ones and reading back yields the
//! size mask ("BAR sizing"). 64-bit BARs use two consecutive registers; the upper register is
//! entirely address bits. The register file itself lives in [`crate::config`], which uses the
//! masks computed here.

use crate::PciError;

/// Number of BARs in a type 0 header.
pub const NUM_BARS_TYPE0: usize = 6;
/// Number of BARs in a type 1 (bridge) header.
pub const NUM_BARS_TYPE1: usize = 2;
/// Register index (dword) of BAR 0.
pub const BAR0_REG: usize = 4;

const BAR_IO_FLAG: u32 = 0x1;
const BAR_MEM64_FLAG: u32 = 0x4;
const BAR_PREFETCH_FLAG: u32 = 0x8;
/// Address bits of an I/O BAR register.
pub const BAR_IO_ADDR_MASK: u32 = 0xffff_fffc;
/// Address bits of a memory BAR register.
pub const BAR_MEM_ADDR_MASK: u32 = 0xffff_fff0;
/// Smallest memory BAR.
pub const MIN_MEM_BAR_SIZE: u64 = 16;
/// Smallest I/O BAR.
pub const MIN_IO_BAR_SIZE: u64 = 4;
/// Largest I/O BAR allowed by the PCI spec.
pub const MAX_IO_BAR_SIZE: u64 = 256;

/// The address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarRegion {
    /// I/O port space.
    Io,
    /// Memory space, 32-bit address.
    Mmio32,
    /// Memory space, 64-bit address (uses two BAR registers).
    Mmio64,
}

impl BarRegion {
    /// Whether the region is memory (as opposed to I/O).
    pub fn is_memory(self) -> bool {
        !matches!(self, BarRegion::Io)
    }
}

/// Description of one BAR a device implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarConfig {
    /// BAR index (0..=5 for type 0, 0..=1 for type 1). A 64-bit BAR also uses `index + 1`.
    pub index: usize,
    /// Size in bytes; a power of two.
    pub size: u64,
    /// Address space.
    pub region: BarRegion,
    /// Prefetchable (memory BARs only).
    pub prefetchable: bool,
}

impl PciBarConfig {
    /// Build and validate a BAR description. `max_bars` is 6 for type 0 and 2 for type 1.
    pub fn new(
        index: usize,
        size: u64,
        region: BarRegion,
        prefetchable: bool,
    ) -> Result<Self, PciError> {
        let bar = PciBarConfig {
            index,
            size,
            region,
            prefetchable: prefetchable && region.is_memory(),
        };
        bar.validate(NUM_BARS_TYPE0)?;
        Ok(bar)
    }

    pub(crate) fn validate(&self, max_bars: usize) -> Result<(), PciError> {
        let regs = if self.region == BarRegion::Mmio64 {
            2
        } else {
            1
        };
        if self.index + regs > max_bars {
            return Err(PciError::InvalidBarIndex(self.index));
        }
        let bad_size = PciError::InvalidBarSize {
            index: self.index,
            size: self.size,
        };
        if !self.size.is_power_of_two() {
            return Err(bad_size);
        }
        match self.region {
            BarRegion::Io if !(MIN_IO_BAR_SIZE..=MAX_IO_BAR_SIZE).contains(&self.size) => {
                Err(bad_size)
            }
            BarRegion::Mmio32 if self.size < MIN_MEM_BAR_SIZE || self.size > (1 << 31) => {
                Err(bad_size)
            }
            BarRegion::Mmio64 if self.size < MIN_MEM_BAR_SIZE || self.size > (1 << 63) => {
                Err(bad_size)
            }
            _ => Ok(()),
        }
    }

    /// The read-only flag bits of the (low) BAR register.
    pub fn flags(&self) -> u32 {
        match self.region {
            BarRegion::Io => BAR_IO_FLAG,
            BarRegion::Mmio32 => {
                if self.prefetchable {
                    BAR_PREFETCH_FLAG
                } else {
                    0
                }
            }
            BarRegion::Mmio64 => {
                BAR_MEM64_FLAG
                    | if self.prefetchable {
                        BAR_PREFETCH_FLAG
                    } else {
                        0
                    }
            }
        }
    }

    /// Writable bits of the low register.
    pub fn low_mask(&self) -> u32 {
        let addr_mask = if self.region == BarRegion::Io {
            BAR_IO_ADDR_MASK
        } else {
            BAR_MEM_ADDR_MASK
        };
        (!(self.size - 1) as u32) & addr_mask
    }

    /// Writable bits of the high register (64-bit BARs only; 0 otherwise).
    pub fn high_mask(&self) -> u32 {
        if self.region == BarRegion::Mmio64 {
            (!(self.size - 1) >> 32) as u32
        } else {
            0
        }
    }

    /// Whether `addr` is a valid (size-aligned, in-range) address for this BAR.
    pub fn address_valid(&self, addr: u64) -> bool {
        if addr & (self.size - 1) != 0 {
            return false;
        }
        match self.region {
            BarRegion::Io | BarRegion::Mmio32 => addr
                .checked_add(self.size - 1)
                .is_some_and(|end| end <= u32::MAX as u64),
            BarRegion::Mmio64 => addr.checked_add(self.size - 1).is_some(),
        }
    }

    /// Register values (low, high) that encode `addr`.
    pub fn encode(&self, addr: u64) -> (u32, u32) {
        (
            (addr as u32 & self.low_mask()) | self.flags(),
            (addr >> 32) as u32 & self.high_mask(),
        )
    }

    /// Decode the address held by register values (low, high).
    pub fn decode(&self, low: u32, high: u32) -> u64 {
        let low = u64::from(low & self.low_mask());
        if self.region == BarRegion::Mmio64 {
            (u64::from(high & self.high_mask()) << 32) | low
        } else {
            low
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(PciBarConfig::new(0, 0x1000, BarRegion::Mmio32, false).is_ok());
        assert!(PciBarConfig::new(0, 0x1001, BarRegion::Mmio32, false).is_err());
        assert!(PciBarConfig::new(0, 8, BarRegion::Mmio32, false).is_err());
        assert!(PciBarConfig::new(5, 0x1000, BarRegion::Mmio64, false).is_err());
        assert!(PciBarConfig::new(4, 0x1000, BarRegion::Mmio64, false).is_ok());
        assert!(PciBarConfig::new(6, 0x1000, BarRegion::Mmio32, false).is_err());
        assert!(PciBarConfig::new(0, 512, BarRegion::Io, false).is_err());
        assert!(PciBarConfig::new(0, 2, BarRegion::Io, false).is_err());
        assert!(PciBarConfig::new(0, 0, BarRegion::Io, false).is_err());
        // I/O BARs are never prefetchable.
        assert!(
            !PciBarConfig::new(0, 16, BarRegion::Io, true)
                .unwrap()
                .prefetchable
        );
    }

    #[test]
    fn encoding() {
        let io = PciBarConfig::new(0, 0x20, BarRegion::Io, false).unwrap();
        assert_eq!(io.flags(), 1);
        assert_eq!(io.low_mask(), 0xffff_ffe0);
        assert_eq!(io.encode(0xc040), (0xc041, 0));

        let m32 = PciBarConfig::new(1, 0x1000, BarRegion::Mmio32, true).unwrap();
        assert_eq!(m32.flags(), 0x8);
        assert_eq!(m32.low_mask(), 0xffff_f000);
        assert_eq!(m32.decode(0xfebf_f008, 0), 0xfebf_f000);

        let m64 = PciBarConfig::new(2, 0x2_0000_0000, BarRegion::Mmio64, true).unwrap();
        assert_eq!(m64.flags(), 0xc);
        assert_eq!(m64.low_mask(), 0);
        assert_eq!(m64.high_mask(), 0xffff_fffe);
        assert_eq!(m64.encode(0x40_0000_0000), (0xc, 0x40));
        assert_eq!(m64.decode(0xc, 0x40), 0x40_0000_0000);
        assert!(m64.address_valid(0x40_0000_0000));
        assert!(!m64.address_valid(0x40_1000_0000));
        assert!(!m32.address_valid(0xffff_f800));
        assert!(!m32.address_valid(0x1_0000_0000));
    }
}

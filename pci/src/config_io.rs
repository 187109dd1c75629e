//! Legacy configuration access mechanism #1: the `0xCF8` address latch and the `0xCFC`
//! data window.
//!
//! A dword write to `0xCF8` latches enable (bit 31), bus (23:16), device (15:11),
//! function (10:8) and dword register (7:2); reserved bits read back as zero. Accesses to
//! `0xCFC..=0xCFF` (1, 2 or 4 bytes, not crossing `0xCFF`) then reach the latched register plus
//! the port's byte offset. With the enable bit clear, data reads return all-ones and writes
//! are dropped. Only dword accesses to `0xCF8` touch the latch (byte accesses there belong to
//! other chipset registers, e.g. the reset control register at `0xCF9`).
//!
//! [`PciConfigIo`] holds the latch only; the VMM passes the [`PciRoot`] on each access.

use crate::bus::{ConfigWriteResult, PciBdf, PciRoot};

/// First port of the mechanism.
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Number of ports (`0xCF8..=0xCFF`).
pub const PCI_CONFIG_IO_PORT_SIZE: u16 = 8;
const ENABLE_BIT: u32 = 1 << 31;
const ADDRESS_MASK: u32 = 0x80ff_fffc;

/// The `0xCF8` address latch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PciConfigIo {
    address: u32,
}

impl PciConfigIo {
    /// A latch with enable clear.
    pub fn new() -> Self {
        Self::default()
    }

    /// Current latch value.
    pub fn address(&self) -> u32 {
        self.address
    }

    fn target(&self, port_offset: u64, len: usize) -> Option<(PciBdf, u16)> {
        if self.address & ENABLE_BIT == 0 {
            return None;
        }
        if !(4..8).contains(&port_offset) {
            return None;
        }
        let byte = port_offset - 4;
        if !matches!(len, 1 | 2 | 4) || byte + len as u64 > 4 {
            return None;
        }
        let bdf = PciBdf {
            bus: (self.address >> 16) as u8,
            device: ((self.address >> 11) & 0x1f) as u8,
            function: ((self.address >> 8) & 0x7) as u8,
        };
        Some((bdf, (self.address & 0xfc) as u16 + byte as u16))
    }

    /// Port read at `port_offset` (0 = `0xCF8` .. 7 = `0xCFF`).
    pub fn read(&self, root: &PciRoot, port_offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if port_offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        if let Some((bdf, reg)) = self.target(port_offset, data.len()) {
            root.config_read(bdf, reg, data);
        }
    }

    /// Port write at `port_offset`. Returns what a configuration write changed.
    pub fn write(
        &mut self,
        root: &PciRoot,
        port_offset: u64,
        data: &[u8],
    ) -> Option<ConfigWriteResult> {
        if port_offset == 0 {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(b) & ADDRESS_MASK;
            }
            return None;
        }
        let (bdf, reg) = self.target(port_offset, data.len())?;
        root.config_write(bdf, reg, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(bus: u32, dev: u32, func: u32, reg: u32) -> [u8; 4] {
        (ENABLE_BIT | (bus << 16) | (dev << 11) | (func << 8) | reg).to_le_bytes()
    }

    #[test]
    fn latch_and_data_window() {
        let root = PciRoot::with_host_bridge();
        let mut io = PciConfigIo::new();
        let mut d = [0u8; 4];
        // Enable clear: all-ones.
        io.read(&root, 4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Reserved bits and the low two bits are not latched.
        io.write(&root, 0, &0xffff_ffffu32.to_le_bytes());
        io.read(&root, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), ADDRESS_MASK);
        // Byte writes to 0xCF8..0xCFB do not touch the latch.
        io.write(&root, 0, &addr(0, 0, 0, 0));
        io.write(&root, 1, &[0x12]);
        assert_eq!(io.address(), u32::from_le_bytes(addr(0, 0, 0, 0)));

        io.read(&root, 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x29c0_8086);
        let mut w = [0u8; 2];
        io.read(&root, 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x29c0);
        let mut b = [0u8; 1];
        io.read(&root, 7, &mut b);
        assert_eq!(b[0], 0x29);
        // Word access crossing 0xCFF.
        io.read(&root, 7, &mut w);
        assert_eq!(w, [0xff; 2]);
        // Class code via register 8.
        io.write(&root, 0, &addr(0, 0, 0, 8));
        io.read(&root, 4, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_0000);
        // Absent device.
        io.write(&root, 0, &addr(0, 5, 0, 0));
        io.read(&root, 4, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(io.write(&root, 4, &[0; 4]).is_none());
        // Port offsets outside the window.
        io.read(&root, u64::MAX, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(io.write(&root, u64::MAX - 1, &[0; 2]).is_none());
        // Absent bus.
        io.write(&root, 0, &addr(3, 0, 0, 0));
        io.read(&root, 4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn byte_writes_reach_the_right_byte() {
        let root = PciRoot::with_host_bridge();
        let mut io = PciConfigIo::new();
        // Interrupt line is byte 0 of register 0x3c.
        io.write(&root, 0, &addr(0, 0, 0, 0x3c));
        io.write(&root, 4, &[0x0b]);
        let mut d = [0u8; 4];
        io.read(&root, 4, &mut d);
        assert_eq!(d[0], 0x0b);
        // Cache line size: byte 0 of 0x0c written through port 0xCFC.
        io.write(&root, 0, &addr(0, 0, 0, 0x0c));
        io.write(&root, 4, &[0x10]);
        io.read(&root, 4, &mut d);
        assert_eq!(d[0], 0x10);
    }
}

//! Legacy INTx routing: which IOAPIC line a device's INTx pin reaches.
//!
//! The VMM's firmware tables and its interrupt wiring must agree, so both
//! take the routing from here: the root bus's `_PRT` maps (slot, pin) to one
//! of [`INTX_LINES`] lines starting at GSI [`INTX_GSI_BASE`], and devices
//! behind bridges reach the root bus through the standard bridge swizzle.

use crate::PciPath;

/// First GSI of the PCI INTx lines (IOAPIC pins 16-23).
pub const INTX_GSI_BASE: u32 = 16;
/// Number of PCI INTx lines.
pub const INTX_LINES: u32 = 8;

/// The GSI of pin `pin` (0 = INTA .. 3 = INTD) of root-bus slot `slot`, as
/// the root bus's `_PRT` describes it: `16 + (slot + pin) % 8`.
pub fn root_intx_gsi(slot: u8, pin: u8) -> u32 {
    INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % INTX_LINES
}

/// The GSI the guest expects for INTA of the device at `path`: the pin is
/// swizzled through every bridge (`(pin + slot) % 4`) and the result is
/// routed by the root bus's `_PRT` ([`root_intx_gsi`]).
pub fn intx_gsi(path: &PciPath) -> u32 {
    let slots = path.slots();
    let mut pin = 0u8; // INTA
    for s in slots.iter().skip(1).rev() {
        pin = ((u32::from(pin) + u32::from(s.slot)) % 4) as u8;
    }
    let root = slots.first().map(|s| s.slot).unwrap_or(0);
    root_intx_gsi(root, pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PciPath {
        s.parse().unwrap()
    }

    #[test]
    fn root_bus_lines() {
        assert_eq!(root_intx_gsi(0, 0), 16);
        assert_eq!(root_intx_gsi(3, 0), 19);
        assert_eq!(root_intx_gsi(7, 1), 16);
        assert_eq!(root_intx_gsi(31, 3), 16 + 34 % 8);
        for slot in 0..32u8 {
            for pin in 0..4u8 {
                let g = root_intx_gsi(slot, pin);
                assert!((INTX_GSI_BASE..INTX_GSI_BASE + INTX_LINES).contains(&g));
            }
        }
    }

    #[test]
    fn swizzle() {
        // Root bus: slot s, INTA -> 16 + s % 8.
        assert_eq!(intx_gsi(&p("03")), 19);
        assert_eq!(intx_gsi(&p("0a")), 18);
        // Behind the bridge in root slot 1, device slot 0: pin A.
        assert_eq!(intx_gsi(&p("01/00")), 17);
        // Device slot 2 behind bridge in root slot 9: pin C -> (9 + 2) % 8.
        assert_eq!(intx_gsi(&p("09/02")), 16 + 3);
        // Two levels: (0 + 1) then + 0 = pin B at root slot 3.
        assert_eq!(intx_gsi(&p("03/00/01")), 16 + 4);
        // The swizzle wraps at four pins: slot 5 behind root slot 0 -> pin B.
        assert_eq!(intx_gsi(&p("00/05")), 17);
    }
}

//! Legacy INTx routing: which IOAPIC line a device's INTx pin reaches.
//!
//! The VMM's firmware tables and its interrupt wiring must agree, so both
//! take the routing from here: the root bus's `_PRT` maps (slot, pin) to one
//! of [`INTX_LINES`] lines starting at GSI [`INTX_GSI_BASE`], and devices
//! behind bridges reach the root bus through the standard bridge swizzle.

use crate::{PciPath, Topology};

/// First GSI of the PCI INTx lines (IOAPIC pins 16-23).
pub const INTX_GSI_BASE: u32 = 16;
/// Number of PCI INTx lines.
pub const INTX_LINES: u32 = 8;

/// The GSI of pin `pin` (0 = INTA .. 3 = INTD) of root-bus slot `slot`, as
/// the root bus's `_PRT` describes it: `16 + (slot + pin) % 8`.
pub fn root_intx_gsi(slot: u8, pin: u8) -> u32 {
    INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % INTX_LINES
}

/// The root-bus slot and pin (0 = INTA .. 3 = INTD) that INTA of the
/// device at `path` reaches: the pin is swizzled through every bridge
/// (`(pin + slot) % 4`).
pub fn root_pin(path: &PciPath) -> (u8, u8) {
    let slots = path.slots();
    let mut pin = 0u8; // INTA
    for s in slots.iter().skip(1).rev() {
        pin = ((u32::from(pin) + u32::from(s.slot)) % 4) as u8;
    }
    let root = slots.first().map(|s| s.slot).unwrap_or(0);
    (root, pin)
}

/// The GSI the guest expects for INTA of the device at `path`: its
/// [`root_pin`] routed by the root bus's `_PRT` ([`root_intx_gsi`]).
pub fn intx_gsi(path: &PciPath) -> u32 {
    let (slot, pin) = root_pin(path);
    root_intx_gsi(slot, pin)
}

/// The (root-bus slot, pin) pairs the root bus's `_PRT` must route for
/// `topology`, in slot then pin order: INTA of every root-bus slot (every
/// function the VMM shows uses INTA), and the [`root_pin`] of every port and
/// of every slot open to devices behind a port.
///
/// Only these pins can be asserted, so a `_PRT` listing them and no other is
/// complete. It is far shorter than all 128 (slot, pin) pairs when few slots
/// hold bridges, and every entry costs the guest's ACPI interpreter objects
/// to build when it loads the DSDT.
pub fn routed_root_pins(topology: &Topology) -> Vec<(u8, u8)> {
    let mut pins = [1u8; 32]; // bit p: pin p; INTA everywhere
    let mut mark = |path: &PciPath| {
        let (slot, pin) = root_pin(path);
        if let Some(m) = pins.get_mut(usize::from(slot)) {
            *m |= 1 << pin;
        }
    };
    for port in topology.ports() {
        mark(&port.path);
        for &slot in port.device_slots() {
            if let Some(path) = port.device_path(slot) {
                mark(&path);
            }
        }
    }
    (0..32u8)
        .flat_map(|slot| {
            let m = pins[usize::from(slot)];
            (0..4u8)
                .filter(move |p| m & (1 << p) != 0)
                .map(move |p| (slot, p))
        })
        .collect()
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

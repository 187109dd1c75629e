//! The ACPI PCI hotplug register block: how the VMM and the DSDT's slot
//! methods talk about hotplug events (the model QEMU's and Cloud
//! Hypervisor's ACPI hotplug share: bitmaps of slots, a bus selector).
//!
//! | offset | access | register | meaning                                                   |
//! |--------|--------|----------|-----------------------------------------------------------|
//! | 0x0    | R      | PCIU     | slots of the selected bus with a new device; read clears   |
//! | 0x4    | R      | PCID     | slots of the selected bus whose device should be removed   |
//! | 0x8    | W      | B0EJ     | the guest ejected these slots of the selected bus (`_EJ0`)   |
//! | 0xc    | R/W    | BSEL     | bus selector: 0 is the root bus, others are bridges         |
//!
//! The VMM posts events with [`PciHotplugController::device_added`] and
//! [`PciHotplugController::request_removal`], then raises the GED's hotplug
//! event; the DSDT's scan method walks every selector, reads PCIU and PCID
//! and notifies the slots. Each ejected slot is reported, by selector and
//! slot, to the [`EjectSink`] the VMM gave the controller.

use std::collections::BTreeMap;
use std::sync::Mutex;

use std::sync::Arc;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

/// Size of the register block.
pub const PCI_HOTPLUG_MMIO_SIZE: u64 = 0x10;

/// Where the controller reports the guest's ejects (called on a vCPU
/// thread, with no lock of the controller held).
pub trait EjectSink: Send + Sync {
    /// The guest ejected `slot` of the bus with selector `bsel` (`_EJ0`).
    fn ejected(&self, bsel: u32, slot: u8);
}

#[derive(Default)]
struct State {
    select: u32,
    up: BTreeMap<u32, u32>,
    down: BTreeMap<u32, u32>,
}

/// The register block.
pub struct PciHotplugController {
    state: Mutex<State>,
    sink: Arc<dyn EjectSink>,
}

impl PciHotplugController {
    /// A controller reporting guest ejects to `sink`.
    pub fn new(sink: Arc<dyn EjectSink>) -> Self {
        PciHotplugController {
            state: Mutex::new(State::default()),
            sink,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A device appeared in `slot` of bus selector `sel`.
    pub fn device_added(&self, sel: u32, slot: u8) {
        if slot < 32 {
            let mut s = self.state();
            *s.up.entry(sel).or_default() |= 1 << slot;
            if let Some(d) = s.down.get_mut(&sel) {
                *d &= !(1 << slot);
            }
        }
    }

    /// Take back an announcement the guest has not read yet (the device left
    /// before the guest looked). Returns whether it was still pending.
    pub fn withdraw_add(&self, sel: u32, slot: u8) -> bool {
        if slot >= 32 {
            return false;
        }
        let mut s = self.state();
        let Some(up) = s.up.get_mut(&sel) else {
            return false;
        };
        let pending = *up & (1 << slot) != 0;
        *up &= !(1 << slot);
        pending
    }

    /// Ask the guest to release the device in `slot` of `sel`.
    pub fn request_removal(&self, sel: u32, slot: u8) {
        if slot < 32 {
            *self.state().down.entry(sel).or_default() |= 1 << slot;
        }
    }

    /// Withdraw a removal request (the guest did not answer in time).
    pub fn cancel_removal(&self, sel: u32, slot: u8) {
        if slot < 32 {
            if let Some(d) = self.state().down.get_mut(&sel) {
                *d &= !(1 << slot);
            }
        }
    }

    /// Whether a removal of `slot` of `sel` is pending.
    pub fn removal_pending(&self, sel: u32, slot: u8) -> bool {
        slot < 32
            && self
                .state()
                .down
                .get(&sel)
                .is_some_and(|d| d & (1 << slot) != 0)
    }
}

impl DeviceMmio for PciHotplugController {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let mut s = self.state();
        let sel = s.select;
        let v = match offset {
            0x0 => s.up.remove(&sel).unwrap_or(0),
            0x4 => s.down.get(&sel).copied().unwrap_or(0),
            0xc => sel,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let mut s = self.state();
        match offset {
            0x8 => {
                let sel = s.select;
                if let Some(d) = s.down.get_mut(&sel) {
                    *d &= !v;
                }
                drop(s);
                for slot in (0..32u8).filter(|slot| v & (1 << slot) != 0) {
                    self.sink.ejected(sel, slot);
                }
            }
            0xc => s.select = v,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u32, u8)>>);

    impl EjectSink for Recorder {
        fn ejected(&self, bsel: u32, slot: u8) {
            self.0.lock().unwrap().push((bsel, slot));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<(u32, u8)> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    fn read(c: &PciHotplugController, off: u64) -> u32 {
        let mut d = [0u8; 4];
        c.mmio_read(MmioAddress(0), off, &mut d);
        u32::from_le_bytes(d)
    }

    fn write(c: &PciHotplugController, off: u64, v: u32) {
        c.mmio_write(MmioAddress(0), off, &v.to_le_bytes());
    }

    #[test]
    fn add_remove_eject_cycle() {
        let rec = Arc::new(Recorder::default());
        let c = PciHotplugController::new(rec.clone());
        c.device_added(0, 3);
        c.device_added(2, 5);
        assert_eq!(read(&c, 0x0), 1 << 3);
        assert_eq!(read(&c, 0x0), 0, "PCIU clears on read");
        write(&c, 0xc, 2);
        assert_eq!(read(&c, 0xc), 2);
        assert_eq!(read(&c, 0x0), 1 << 5);
        write(&c, 0xc, 0);
        c.request_removal(0, 3);
        assert!(c.removal_pending(0, 3));
        assert_eq!(read(&c, 0x4), 1 << 3);
        assert_eq!(read(&c, 0x4), 1 << 3, "PCID stays until ejected");
        write(&c, 0x8, 1 << 3);
        assert_eq!(rec.take(), vec![(0, 3)]);
        assert_eq!(read(&c, 0x4), 0);
        assert!(rec.take().is_empty());
        write(&c, 0xc, 2);
        write(&c, 0x8, (1 << 5) | (1 << 7));
        assert_eq!(
            rec.take(),
            vec![(2, 5), (2, 7)],
            "ejects name their bus and slot"
        );
        write(&c, 0xc, 0);
        c.request_removal(0, 4);
        c.cancel_removal(0, 4);
        assert_eq!(read(&c, 0x4), 0);
    }

    #[test]
    fn hostile_accesses() {
        let rec = Arc::new(Recorder::default());
        let c = PciHotplugController::new(rec.clone());
        c.device_added(0, 40);
        c.request_removal(0, 200);
        assert_eq!(read(&c, 0x0), 0);
        let mut b = [0xffu8; 2];
        c.mmio_read(MmioAddress(0), 0, &mut b);
        assert_eq!(b, [0, 0]);
        c.mmio_write(MmioAddress(0), 0x8, &[1, 2]);
        assert!(rec.take().is_empty());
        assert_eq!(read(&c, 0x44), 0);
        // One write reports at most the 32 slots of a bus.
        write(&c, 0x8, u32::MAX);
        assert_eq!(rec.take().len(), 32);
    }
}

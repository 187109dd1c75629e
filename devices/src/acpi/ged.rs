//! Generic Event Device (ACPI0013): how a hardware-reduced machine tells
//! the guest that something happened. The VMM sets event bits and raises
//! the GED's interrupt; the DSDT's `_EVT` method reads the event register
//! (which clears it) and notifies the objects concerned: the power button
//! or the PCI hotplug slots.
//!
//! Register block (MMIO, `GED_MMIO_SIZE` bytes):
//!
//! | offset | access | meaning                                        |
//! |--------|--------|------------------------------------------------|
//! | 0      | R, 4   | pending events, cleared by the read            |
//!
//! The interrupt is held until the VMM says the guest can take it
//! ([`Ged::set_ready`]): an edge raised while the guest's interrupt
//! controllers are still unprogrammed is lost at best, and at worst arrives
//! through the reset-state PIC as a CPU exception vector (IRQ 5 is #BR) and
//! kills the booting guest. Events posted meanwhile stay pending and are
//! announced by one interrupt when the guest becomes ready.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;
use vmm_sys_util::eventfd::EventFd;

/// Event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 0;
/// Event bit: a PCI hotplug slot changed.
pub const GED_EVENT_PCI_HOTPLUG: u32 = 1 << 1;
/// Size of the register block.
pub const GED_MMIO_SIZE: u64 = 0x10;

/// The GED: pending events plus the interrupt that announces them.
pub struct Ged {
    pending: AtomicU32,
    interrupt: EventFd,
    acknowledged: AtomicU32,
    ready: AtomicBool,
}

impl Ged {
    /// A GED raising `interrupt` (an irqfd) when events are posted, once
    /// the guest is ready for it.
    pub fn new(interrupt: EventFd) -> Arc<Self> {
        Arc::new(Ged {
            pending: AtomicU32::new(0),
            interrupt,
            acknowledged: AtomicU32::new(0),
            ready: AtomicBool::new(false),
        })
    }

    /// Posts `events` and interrupts the guest, or holds the interrupt
    /// until [`Ged::set_ready`] if the guest cannot take it yet.
    pub fn notify(&self, events: u32) -> std::io::Result<()> {
        self.pending.fetch_or(events, Ordering::SeqCst);
        if self.ready.load(Ordering::SeqCst) {
            self.interrupt.write(1)?;
        }
        Ok(())
    }

    /// The guest can take the interrupt from now on: raise it at once if
    /// events were held.
    pub fn set_ready(&self) -> std::io::Result<()> {
        self.ready.store(true, Ordering::SeqCst);
        if self.pending.load(Ordering::SeqCst) != 0 {
            self.interrupt.write(1)?;
        }
        Ok(())
    }

    /// Whether the interrupt is enabled (see [`Ged::set_ready`]).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Whether events wait for the guest to become ready.
    pub fn holding(&self) -> bool {
        !self.is_ready() && self.pending.load(Ordering::SeqCst) != 0
    }

    /// Events the guest has read (acknowledged) since the last call.
    pub fn take_acknowledged(&self) -> u32 {
        self.acknowledged.swap(0, Ordering::AcqRel)
    }
}

impl DeviceMmio for Ged {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset != 0 || data.len() != 4 {
            data.fill(0);
            return;
        }
        let events = self.pending.swap(0, Ordering::AcqRel);
        self.acknowledged.fetch_or(events, Ordering::AcqRel);
        data.copy_from_slice(&events.to_le_bytes());
    }

    fn mmio_write(&self, _base: MmioAddress, _offset: MmioAddressOffset, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn interrupt_held_until_ready() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let ged = Ged::new(irq.try_clone().unwrap());
        assert!(!ged.holding());
        ged.notify(GED_EVENT_PCI_HOTPLUG).unwrap();
        ged.notify(GED_EVENT_POWER_BUTTON).unwrap();
        assert!(
            irq.read().is_err(),
            "no interrupt before the guest is ready"
        );
        assert!(ged.holding());
        ged.set_ready().unwrap();
        assert_eq!(irq.read().unwrap(), 1, "one interrupt for the held events");
        assert!(!ged.holding());
        let mut d = [0u8; 4];
        ged.mmio_read(MmioAddress(0), 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 3);
        // Ready with nothing pending raises nothing.
        let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
        let quiet = Ged::new(irq2.try_clone().unwrap());
        quiet.set_ready().unwrap();
        assert!(irq2.read().is_err());
    }

    #[test]
    fn events_are_read_once() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let ged = Ged::new(irq.try_clone().unwrap());
        ged.set_ready().unwrap();
        ged.notify(GED_EVENT_POWER_BUTTON).unwrap();
        ged.notify(GED_EVENT_PCI_HOTPLUG).unwrap();
        assert_eq!(irq.read().unwrap(), 2);
        let mut d = [0u8; 4];
        ged.mmio_read(MmioAddress(0), 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 3);
        ged.mmio_read(MmioAddress(0), 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        assert_eq!(ged.take_acknowledged(), 3);
        assert_eq!(ged.take_acknowledged(), 0);
        // Bad sizes and offsets read zero and do not consume events.
        ged.notify(GED_EVENT_POWER_BUTTON).unwrap();
        let mut b = [0xffu8; 2];
        ged.mmio_read(MmioAddress(0), 0, &mut b);
        assert_eq!(b, [0, 0]);
        ged.mmio_read(MmioAddress(0), 8, &mut d);
        assert_eq!(d, [0; 4]);
        ged.mmio_write(MmioAddress(0), 0, &[1, 2, 3, 4]);
        ged.mmio_read(MmioAddress(0), 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
    }
}

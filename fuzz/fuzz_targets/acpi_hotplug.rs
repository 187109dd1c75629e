//! Register accesses against the ACPI PCI hotplug register block and the
//! GED, interleaved with the VMM's own calls (add, removal request,
//! cancel, notify, ready).
//!
//! Input: records of 7 bytes: op, offset, size, value (u32 LE).

#![no_main]

use std::sync::{Arc, Mutex};

use devices::acpi::{EjectSink, Ged, PciHotplugController, GED_EVENT_PCI_HOTPLUG};
use libfuzzer_sys::fuzz_target;
use vm_device::bus::MmioAddress;
use vm_device::DeviceMmio;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Default)]
struct Recorder(Mutex<Vec<(u32, u8)>>);

impl EjectSink for Recorder {
    fn ejected(&self, bsel: u32, slot: u8) {
        assert!(slot < 32);
        self.0.lock().unwrap().push((bsel, slot));
    }
}

const SIZES: [usize; 4] = [1, 2, 4, 8];

fuzz_target!(|data: &[u8]| {
    let sink = Arc::new(Recorder::default());
    let hp = PciHotplugController::new(sink.clone());
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let ged = Ged::new(irq.try_clone().unwrap());
    let base = MmioAddress(0);
    for rec in data.chunks_exact(7) {
        let op = rec[0];
        let offset = u64::from(rec[1]);
        let size = SIZES[usize::from(rec[2] & 3)];
        let value = u32::from_le_bytes([rec[3], rec[4], rec[5], rec[6]]);
        let bytes = value.to_le_bytes();
        let mut buf = [0u8; 8];
        let wide = u64::from(value) | (u64::from(value) << 32);
        buf.copy_from_slice(&wide.to_le_bytes());
        let sel = value & 0x7;
        let slot = rec[1] & 0x1f;
        match op % 10 {
            0 => {
                hp.mmio_read(base, offset, &mut buf[..size]);
                if offset == 0 && size == 4 {
                    // PCIU is read-to-clear.
                    let mut again = [0xffu8; 4];
                    hp.mmio_read(base, 0, &mut again);
                    assert_eq!(again, [0; 4]);
                }
            }
            1 => hp.mmio_write(base, offset, &buf[..size]),
            2 => hp.mmio_write(base, 0xc, &bytes),
            3 => {
                hp.device_added(sel, slot);
            }
            4 => {
                hp.request_removal(sel, slot);
                assert!(hp.removal_pending(sel, slot));
            }
            5 => {
                hp.cancel_removal(sel, slot);
                assert!(!hp.removal_pending(sel, slot));
            }
            6 => {
                ged.mmio_read(base, offset, &mut buf[..size]);
                if offset == 0 && size == 4 {
                    // The event register is read-to-clear.
                    let mut again = [0xffu8; 4];
                    ged.mmio_read(base, 0, &mut again);
                    assert_eq!(again, [0; 4]);
                }
            }
            7 => ged.mmio_write(base, offset, &buf[..size]),
            8 => {
                let _ = ged.notify(value & 3 | GED_EVENT_PCI_HOTPLUG);
            }
            _ => {
                let _ = ged.set_ready();
                assert!(ged.is_ready());
                let _ = ged.take_acknowledged();
            }
        }
        // Drain the interrupt so the eventfd counter never saturates.
        let _ = irq.read();
    }
    for (_, slot) in sink.0.lock().unwrap().iter() {
        assert!(*slot < 32);
    }
});

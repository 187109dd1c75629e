//! Boot-timer port: a guest (or a patched init) writes a byte to
//! `BOOT_TIMER_PORT` to mark a milestone; the VMM logs the time since it
//! started, so a benchmark can read boot phases from the VMM's log.

use std::time::Instant;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// The I/O port of the boot timer.
pub const BOOT_TIMER_PORT: u16 = 0x440;

/// Records milestones relative to `start`.
pub struct BootTimer {
    start: Instant,
    marks: Vec<(u8, u128)>,
}

impl BootTimer {
    /// A timer counting from `start` (the VMM's own start time).
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            marks: Vec::new(),
        }
    }

    /// Milestones seen so far: (code, microseconds since start).
    pub fn marks(&self) -> &[(u8, u128)] {
        &self.marks
    }
}

impl MutDevicePio for BootTimer {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            return;
        }
        let us = self.start.elapsed().as_micros();
        // Bounded: a guest spinning on the port cannot grow memory forever.
        if self.marks.len() < 256 {
            self.marks.push((data[0], us));
        }
        crate::guest_info!("boot milestone {:#04x} at {} us", data[0], us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_bounded() {
        let mut t = BootTimer::new(Instant::now());
        for _ in 0..1000 {
            t.pio_write(PioAddress(BOOT_TIMER_PORT), 0, &[1]);
        }
        assert_eq!(t.marks().len(), 256);
        t.pio_write(PioAddress(BOOT_TIMER_PORT), 1, &[1]);
        assert_eq!(t.marks().len(), 256);
    }
}

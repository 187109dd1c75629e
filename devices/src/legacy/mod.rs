//! Legacy platform devices on the x86 I/O port bus: the 16550 UART, the
//! CMOS real-time clock, the i8042 reset line, the ACPI power-management
//! registers (sleep control/status and reset) and the boot-timer port.
//!
//! Each device implements `vm_device::MutDevicePio`; the VMM wraps it in a
//! `Mutex` and registers it on its port I/O bus. Nothing a guest writes to
//! these ports can panic: unknown offsets are ignored, reads of unknown
//! registers return all-ones or zero as the hardware would.

mod boot_timer;
mod cmos;
mod i8042;
mod power;
mod serial;

pub use boot_timer::{BootTimer, BOOT_TIMER_PORT};
pub use cmos::Cmos;
pub use i8042::I8042;
pub use power::{AcpiPmRegisters, ACPI_PM_PORT, RESET_VALUE, SLEEP_TYPE_S5};
pub use serial::{SerialDevice, SERIAL_PORT, SERIAL_PORT_LEN};

use vmm_sys_util::eventfd::EventFd;

/// `EventFd` adapter for vm-superio's `Trigger` (the crate does not
/// implement it for `EventFd` itself).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`; triggering writes 1 to it.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// The wrapped event file descriptor.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

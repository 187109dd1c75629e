//! ACPI hardware-reduced power-management registers on the I/O port bus.
//!
//! The FADT points the guest at three one-byte registers:
//!
//! | port                | register       | effect                                   |
//! |---------------------|----------------|------------------------------------------|
//! | `ACPI_PM_PORT`      | sleep control  | `SLP_EN` with `SLP_TYP` = 5 (S5) powers off |
//! | `ACPI_PM_PORT + 1`  | sleep status   | reads 0x80 (`WAK_STS`) after a wake       |
//! | `ACPI_PM_PORT + 2`  | reset          | writing `RESET_VALUE` resets the machine   |
//!
//! The DSDT's `_S5` package carries `SLP_TYP` = 5 so that the guest writes
//! `(5 << 2) | (1 << 5)` to the sleep control register on power-off.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use super::EventFdTrigger;
use vm_superio::Trigger;

/// Base port of the three registers.
pub const ACPI_PM_PORT: u16 = 0x600;
/// The value the guest writes to the reset register.
pub const RESET_VALUE: u8 = 0x1;
/// `SLP_TYP` the DSDT advertises for S5 (soft off).
pub const SLEEP_TYPE_S5: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Sleep control, sleep status and reset registers.
pub struct AcpiPmRegisters {
    power_off: EventFdTrigger,
    reset: EventFdTrigger,
}

impl AcpiPmRegisters {
    /// Registers that signal `power_off` on S5 entry and `reset` on reset.
    pub fn new(power_off: EventFdTrigger, reset: EventFdTrigger) -> Self {
        AcpiPmRegisters { power_off, reset }
    }
}

impl MutDevicePio for AcpiPmRegisters {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 && offset == 1 {
            // WAK_STS: the machine is awake.
            data[0] = 0x80;
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let value = data[0];
        let result = match offset {
            0 if value & SLP_EN != 0
                && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLEEP_TYPE_S5 =>
            {
                self.power_off.trigger()
            }
            2 if value == RESET_VALUE => self.reset.trigger(),
            _ => Ok(()),
        };
        if let Err(e) = result {
            crate::guest_warn!("acpi pm: failed to signal the VMM: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn dev() -> (AcpiPmRegisters, EventFd, EventFd) {
        let off = EventFd::new(EFD_NONBLOCK).unwrap();
        let rst = EventFd::new(EFD_NONBLOCK).unwrap();
        let d = AcpiPmRegisters::new(
            EventFdTrigger::new(off.try_clone().unwrap()),
            EventFdTrigger::new(rst.try_clone().unwrap()),
        );
        (d, off, rst)
    }

    #[test]
    fn s5_powers_off_and_other_states_do_not() {
        let (mut d, off, rst) = dev();
        let base = PioAddress(ACPI_PM_PORT);
        d.pio_write(base, 0, &[(3 << 2) | SLP_EN]);
        d.pio_write(base, 0, &[5 << 2]);
        assert!(off.read().is_err());
        d.pio_write(base, 0, &[(5 << 2) | SLP_EN]);
        assert_eq!(off.read().unwrap(), 1);
        assert!(rst.read().is_err());
    }

    #[test]
    fn reset_register() {
        let (mut d, off, rst) = dev();
        let base = PioAddress(ACPI_PM_PORT);
        d.pio_write(base, 2, &[7]);
        d.pio_write(base, 2, &[1, 1]);
        assert!(rst.read().is_err());
        d.pio_write(base, 2, &[RESET_VALUE]);
        assert_eq!(rst.read().unwrap(), 1);
        assert!(off.read().is_err());
        let mut b = [0u8; 1];
        d.pio_read(base, 1, &mut b);
        assert_eq!(b[0], 0x80);
    }
}

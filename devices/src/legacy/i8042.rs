//! The i8042 keyboard controller, reduced to what a guest without a
//! keyboard uses: the status port and the CPU reset command (0xFE on port
//! 0x64), through vm-superio's model.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::I8042Device;

use super::EventFdTrigger;

/// i8042 at ports 0x60-0x64; register it over that 5-port range.
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset` when the guest asks for a CPU reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042 {
            inner: I8042Device::new(reset),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() != 1 || offset > 4 {
            data.fill(0xff);
            return;
        }
        data[0] = self.inner.read(offset as u8);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 || offset > 4 {
            return;
        }
        if let Err(e) = self.inner.write(offset as u8, data[0]) {
            crate::guest_warn!("i8042: failed to signal reset: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        let base = PioAddress(0x60);
        dev.pio_write(base, 4, &[0x12]);
        assert!(evt.read().is_err());
        dev.pio_write(base, 4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        // Junk is ignored.
        dev.pio_write(base, 7, &[0xfe]);
        dev.pio_write(base, 4, &[0xfe, 0]);
        assert!(evt.read().is_err());
    }
}

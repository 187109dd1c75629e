//! 16550A UART (vm-superio's model) on the port I/O bus.

use std::io::Write;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;

/// A UART whose transmitted bytes go to `out` and whose interrupt line is an
/// `EventFd` (registered by the VMM as an irqfd for the UART's IRQ).
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART raising `interrupt` and writing its output to `out`.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(interrupt, out),
        }
    }

    /// Queues host input for the guest to read; returns how many bytes fit
    /// in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                crate::guest_warn!("serial: failed to queue input: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn fifo_room(&self) -> usize {
        self.serial.fifo_capacity()
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            // Once per guest byte when the output fails: rate-limited.
            crate::guest_warn!("serial: write failed: {e:?}");
        }
        if offset == 0 {
            // Keep the console responsive: push each line out as it completes.
            if data[0] == b'\n' {
                let _ = self.serial.writer_mut().flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Counts the log records whose message starts with a given prefix (the logger is
    /// process-wide; other tests' lines do not match the prefix).
    struct CountingLogger;
    static SERIAL_FAILURES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    impl log::Log for CountingLogger {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            if r.args().to_string().starts_with("serial: write failed") {
                SERIAL_FAILURES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        fn flush(&self) {}
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("console gone"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::other("console gone"))
        }
    }

    #[test]
    fn failing_output_is_logged_rate_limited() {
        static LOGGER: CountingLogger = CountingLogger;
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Trace);
        let evt = EventFd::new(0).unwrap();
        let mut dev = SerialDevice::new(EventFdTrigger::new(evt), Box::new(Broken));
        let start = std::time::Instant::now();
        for _ in 0..20_000 {
            dev.pio_write(PioAddress(0x3f8), 0, b"x");
        }
        let secs = start.elapsed().as_secs() as usize + 1;
        let lines = SERIAL_FAILURES.load(std::sync::atomic::Ordering::SeqCst);
        assert!(lines >= 1, "the first failure is logged");
        assert!(
            lines
                <= crate::log_limit::BURST as usize
                    + secs * crate::log_limit::LINES_PER_SEC as usize,
            "{lines} lines for 20000 failed bytes in {secs} s"
        );
    }

    #[test]
    fn transmit_and_bad_accesses() {
        let sink = Sink::default();
        let evt = EventFd::new(0).unwrap();
        let mut dev = SerialDevice::new(EventFdTrigger::new(evt), Box::new(sink.clone()));
        let base = PioAddress(0x3f8);
        for b in b"hi\n" {
            dev.pio_write(base, 0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Wrong sizes and offsets are ignored.
        dev.pio_write(base, 9, &[1]);
        dev.pio_write(base, 0, &[1, 2]);
        let mut d = [0u8; 2];
        dev.pio_read(base, 0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        // Input is readable at offset 0 once queued.
        assert_eq!(dev.enqueue_input(b"x"), 1);
        let mut r = [0u8];
        dev.pio_read(base, 0, &mut r);
        assert_eq!(r[0], b'x');
    }
}

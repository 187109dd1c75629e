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
    /// Shadows of the line control, interrupt enable and modem control
    /// registers, for [`SerialDevice::set_tx_coalescing`].
    lcr: u8,
    ier: u8,
    mcr: u8,
    /// Called with `true` when transmit-register writes may be coalesced
    /// (no transmit interrupt enabled, no loopback), `false` when not.
    tx_coalescing: Option<(TxCoalescingHook, bool)>,
}

/// See [`SerialDevice::set_tx_coalescing`].
pub type TxCoalescingHook = Box<dyn FnMut(bool) + Send>;

/// First I/O port of the first UART (COM1); it takes eight.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Ports the UART decodes.
pub const SERIAL_PORT_LEN: u16 = 8;

const LCR_DLAB: u8 = 0x80;
const IER_THRI: u8 = 0x02;
const MCR_LOOP: u8 = 0x10;

impl SerialDevice {
    /// A UART raising `interrupt` and writing its output to `out`.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(interrupt, out),
            lcr: 0,
            ier: 0,
            mcr: 0,
            tx_coalescing: None,
        }
    }

    /// Whether a write to the transmit register can wait for the guest's
    /// next exit: nothing the guest sees depends on it sooner (no transmit
    /// interrupt to raise, no loopback into the receive buffer).
    fn tx_write_can_wait(&self) -> bool {
        self.ier & IER_THRI == 0 && self.mcr & MCR_LOOP == 0
    }

    /// Installs `hook`, called now and whenever the answer changes with
    /// whether writes to the transmit register may be coalesced (delivered
    /// at the guest's next exit instead of exiting themselves).
    pub fn set_tx_coalescing(&mut self, mut hook: TxCoalescingHook) {
        let now = self.tx_write_can_wait();
        hook(now);
        self.tx_coalescing = Some((hook, now));
    }

    fn track_registers(&mut self, offset: PioAddressOffset, value: u8) {
        match offset {
            1 if self.lcr & LCR_DLAB == 0 => self.ier = value,
            3 => self.lcr = value,
            4 => self.mcr = value,
            _ => return,
        }
        let now = self.tx_write_can_wait();
        if let Some((hook, was)) = self.tx_coalescing.as_mut() {
            if *was != now {
                hook(now);
                *was = now;
            }
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
        self.track_registers(offset, data[0]);
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

    /// The coalescing hook follows the transmit interrupt enable and
    /// loopback bits, and only reports changes; a divisor latch write at
    /// the IER's offset is not an IER write.
    #[test]
    fn tx_coalescing_follows_thri_and_loopback() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let evt = EventFd::new(0).unwrap();
        let mut dev = SerialDevice::new(EventFdTrigger::new(evt), Box::new(Sink::default()));
        let s = seen.clone();
        dev.set_tx_coalescing(Box::new(move |on| s.lock().unwrap().push(on)));
        let base = PioAddress(0x3f8);
        dev.pio_write(base, 1, &[0x01]); // receive interrupt only: no change
        dev.pio_write(base, 1, &[0x03]); // + transmit interrupt
        dev.pio_write(base, 1, &[0x03]);
        dev.pio_write(base, 1, &[0x00]);
        dev.pio_write(base, 3, &[0x80]); // DLAB: offset 1 is the divisor
        dev.pio_write(base, 1, &[0x02]);
        dev.pio_write(base, 3, &[0x03]);
        dev.pio_write(base, 4, &[0x10]); // loopback
        dev.pio_write(base, 4, &[0x0b]);
        assert_eq!(*seen.lock().unwrap(), vec![true, false, true, false, true]);
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

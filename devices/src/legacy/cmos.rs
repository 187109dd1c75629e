//! MC146818-style CMOS real-time clock at ports 0x70 (index) and 0x71
//! (data). Time registers read the host's UTC clock; the other 128 bytes
//! are plain CMOS memory. The update-in-progress bit is never set, so a
//! guest reading the clock never waits.

use std::time::{SystemTime, UNIX_EPOCH};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const B_24H: u8 = 0x02;
const B_BINARY: u8 = 0x04;

/// The CMOS device; register it over ports 0x70-0x71.
pub struct Cmos {
    index: u8,
    memory: [u8; 128],
    now: fn() -> u64,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Cmos {
    /// A CMOS clock reading the host's time.
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    /// A CMOS clock reading seconds since the epoch from `now` (for tests).
    pub fn with_clock(now: fn() -> u64) -> Self {
        let mut memory = [0u8; 128];
        memory[REG_A as usize] = 0x26;
        memory[REG_B as usize] = B_24H;
        memory[REG_D as usize] = 0x80;
        Cmos {
            index: 0,
            memory,
            now,
        }
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.memory[REG_B as usize] & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn read_register(&self, reg: u8) -> u8 {
        let secs = (self.now)();
        let days = (secs / 86_400) as i64;
        let tod = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        match reg {
            REG_SECONDS => self.encode((tod % 60) as u32),
            REG_MINUTES => self.encode(((tod / 60) % 60) as u32),
            REG_HOURS => self.encode((tod / 3600) as u32),
            // 1970-01-01 was a Thursday; CMOS counts Sunday as 1.
            REG_WEEKDAY => self.encode(((days + 4).rem_euclid(7) + 1) as u32),
            REG_DAY => self.encode(day),
            REG_MONTH => self.encode(month),
            REG_YEAR => self.encode(year.rem_euclid(100) as u32),
            REG_CENTURY => self.encode((year / 100) as u32),
            // Reading C clears pending interrupt flags; none are ever raised.
            REG_C => 0,
            r => self.memory[(r & 0x7f) as usize],
        }
    }
}

impl MutDevicePio for Cmos {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            0 => self.index,
            1 => self.read_register(self.index),
            _ => 0xff,
        };
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            // Bit 7 is the NMI mask, not part of the index.
            0 => self.index = data[0] & 0x7f,
            1 => match self.index {
                // The clock follows the host: time writes are dropped, as are
                // writes to the read-only C and D registers.
                REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
                | REG_YEAR | REG_CENTURY | REG_C | REG_D => {}
                // Keep the update-in-progress bit clear.
                REG_A => self.memory[REG_A as usize] = data[0] & 0x7f,
                i => self.memory[i as usize] = data[0],
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23 12:34:56 UTC, a Monday.
    fn fixed() -> u64 {
        1_795_437_296
    }

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        let base = PioAddress(0x70);
        c.pio_write(base, 0, &[reg]);
        let mut d = [0u8];
        c.pio_read(base, 1, &mut d);
        d[0]
    }

    #[test]
    fn bcd_time() {
        let mut c = Cmos::with_clock(fixed);
        assert_eq!(read(&mut c, REG_SECONDS), 0x56);
        assert_eq!(read(&mut c, REG_MINUTES), 0x34);
        assert_eq!(read(&mut c, REG_HOURS), 0x12);
        assert_eq!(read(&mut c, REG_DAY), 0x23);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_WEEKDAY), 0x02);
        assert_eq!(read(&mut c, REG_D), 0x80);
        assert_eq!(read(&mut c, REG_A) & 0x80, 0);
    }

    #[test]
    fn binary_mode_and_memory() {
        let mut c = Cmos::with_clock(fixed);
        let base = PioAddress(0x70);
        c.pio_write(base, 0, &[REG_B]);
        c.pio_write(base, 1, &[B_24H | B_BINARY]);
        assert_eq!(read(&mut c, REG_SECONDS), 56);
        c.pio_write(base, 0, &[0x80 | 0x40]);
        c.pio_write(base, 1, &[0xab]);
        assert_eq!(read(&mut c, 0x40), 0xab);
        // Time registers ignore writes; junk sizes are ignored.
        c.pio_write(base, 0, &[REG_SECONDS]);
        c.pio_write(base, 1, &[0]);
        assert_eq!(read(&mut c, REG_SECONDS), 56);
        c.pio_write(base, 1, &[0, 0]);
        let mut d = [0u8; 2];
        c.pio_read(base, 1, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}

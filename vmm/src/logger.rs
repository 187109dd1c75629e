//! A minimal `log` backend writing `arbor: [SECONDS] LEVEL: message` lines to
//! stderr, SECONDS counted from the logger's start (the VMM's start). The
//! level comes from `ARBOR_LOG` (error, warn, info, debug, trace or off, in
//! any case; default warn); an unknown value is reported, then warn is used.

use std::io::Write;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    level: LevelFilter,
    start: Instant,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let lvl = match record.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            let t = self.start.elapsed();
            let _ = writeln!(
                std::io::stderr().lock(),
                "arbor: [{:4}.{:03}] {lvl}: {}",
                t.as_secs(),
                t.subsec_millis(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// The level an `ARBOR_LOG` value names, in any case; `None` if unknown.
pub fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value.trim().to_ascii_lowercase().as_str() {
        "error" => LevelFilter::Error,
        "warn" | "warning" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        "off" => LevelFilter::Off,
        _ => return None,
    })
}

/// Installs the logger once; later calls are ignored.
pub fn init() {
    let value = std::env::var("ARBOR_LOG").ok();
    let parsed = value.as_deref().map(parse_level);
    let level = parsed.flatten().unwrap_or(LevelFilter::Warn);
    let logger = Box::leak(Box::new(StderrLogger {
        level,
        start: Instant::now(),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
        if let (Some(v), Some(None)) = (&value, parsed) {
            log::warn!(
                "ARBOR_LOG={v:?} is not a level (error, warn, info, debug, trace, off); using warn"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_in_any_case() {
        assert_eq!(parse_level("INFO"), Some(LevelFilter::Info));
        assert_eq!(parse_level("Debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level(" warn "), Some(LevelFilter::Warn));
        assert_eq!(parse_level("OFF"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
        assert_eq!(parse_level(""), None);
    }
}

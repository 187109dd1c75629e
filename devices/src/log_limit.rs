//! Rate limiting for log lines a guest can trigger.
//!
//! A guest decides how often a failing serial write, a bad descriptor chain or a failed disk
//! read happens, so logging each occurrence lets it fill the host's logs (a failing console
//! once produced 19 MB of stderr in 10 s). Every such call site goes through
//! [`guest_log!`](crate::guest_log), which gives the site its own [`LogLimiter`]: a token
//! bucket that lets a burst of [`BURST`] lines through (a booting guest enabling MSI-X on all
//! its devices at once loses nothing) and then at most [`LINES_PER_SEC`] lines per second; the
//! first line let through after some were dropped says how many were suppressed.

use std::sync::Mutex;
use std::time::Instant;

#[doc(hidden)]
pub use log as __log;

/// Sustained lines per second and call site let through by [`guest_log!`](crate::guest_log).
pub const LINES_PER_SEC: u32 = 5;
/// Lines a call site may log at once before the rate applies.
pub const BURST: u32 = 20;

#[derive(Debug)]
struct State {
    last: Option<Instant>,
    tokens: f64,
    suppressed: u64,
}

/// A token bucket: `burst` events at once, then `per_sec` per second; counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    per_sec: u32,
    burst: u32,
    state: Mutex<State>,
}

impl LogLimiter {
    /// A limiter letting `burst` events through at once and `per_sec` per second after that
    /// (usable in a `static`).
    pub const fn new(per_sec: u32, burst: u32) -> Self {
        LogLimiter {
            per_sec,
            burst,
            state: Mutex::new(State {
                last: None,
                tokens: burst as f64,
                suppressed: 0,
            }),
        }
    }

    /// Whether an event happening now may be logged: `Some(k)` with the number of events
    /// suppressed since the last one let through, or `None` to drop it.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`admit`](Self::admit) at time `now` (for tests).
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = s.last {
            // A clock going backwards refills nothing.
            let dt = now.saturating_duration_since(last).as_secs_f64();
            s.tokens = (s.tokens + dt * f64::from(self.per_sec)).min(f64::from(self.burst));
        }
        if s.last.is_none_or(|l| now > l) {
            s.last = Some(now);
        }
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
            None
        }
    }
}

/// `log!` for lines a guest can trigger, rate-limited per call site (see the module docs):
/// `guest_log!(log::Level::Warn, "virtio-blk: read failed: {e}")`.
#[macro_export]
macro_rules! guest_log {
    ($lvl:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimiter = $crate::log_limit::LogLimiter::new(
            $crate::log_limit::LINES_PER_SEC,
            $crate::log_limit::BURST,
        );
        if let ::core::option::Option::Some(suppressed) = LIMIT.admit() {
            if suppressed > 0 {
                $crate::log_limit::__log::log!(
                    $lvl,
                    "{} ({} similar messages suppressed)",
                    ::core::format_args!($($arg)+),
                    suppressed
                );
            } else {
                $crate::log_limit::__log::log!($lvl, $($arg)+);
            }
        }
    }};
}

/// [`guest_log!`](crate::guest_log) at warning level.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => { $crate::guest_log!($crate::log_limit::__log::Level::Warn, $($arg)+) };
}

/// [`guest_log!`](crate::guest_log) at error level.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => { $crate::guest_log!($crate::log_limit::__log::Level::Error, $($arg)+) };
}

/// [`guest_log!`](crate::guest_log) at info level.
#[macro_export]
macro_rules! guest_info {
    ($($arg:tt)+) => { $crate::guest_log!($crate::log_limit::__log::Level::Info, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate_and_reports_suppressed() {
        let l = LogLimiter::new(2, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit_at(t0), Some(0));
        }
        // A flood inside the same instant is dropped and counted.
        for i in 0..1000u64 {
            assert_eq!(l.admit_at(t0 + Duration::from_micros(i)), None);
        }
        // Half a second later one token is back: the line carries the count.
        let t1 = t0 + Duration::from_millis(501);
        assert_eq!(l.admit_at(t1), Some(1000));
        assert_eq!(l.admit_at(t1), None);
        // A long pause refills the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.admit_at(t2).is_some());
        }
        assert_eq!(l.admit_at(t2), None);
        // A clock that goes backwards does not panic nor refill.
        assert_eq!(l.admit_at(t0), None);
        assert_eq!(l.admit_at(t2), None);
    }

    #[test]
    fn sustained_flood_is_bounded_by_the_rate() {
        let l = LogLimiter::new(5, 20);
        let t0 = Instant::now();
        // 10 s of 100 000 events per second.
        let admitted = (0..1_000_000u64)
            .filter(|i| l.admit_at(t0 + Duration::from_micros(i * 10)).is_some())
            .count();
        assert!((20 + 49..=20 + 51).contains(&admitted), "{admitted}");
    }

    #[test]
    fn zero_budget_drops_everything() {
        let l = LogLimiter::new(0, 0);
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
    }

    #[test]
    fn macro_sites_compile_at_every_level() {
        for _ in 0..1000 {
            crate::guest_warn!("flood {}", 1);
        }
        crate::guest_info!("other site");
        crate::guest_error!("third site: {}", "x");
        crate::guest_log!(log::Level::Debug, "fourth site");
    }
}

//! Rate limiting for log lines a guest can trigger.
//!
//! A guest decides how often a failing serial write, a bad descriptor chain or a failed disk
//! read happens, so logging each occurrence lets it fill the host's logs (a failing console
//! once produced 19 MB of stderr in 10 s). Every such call site goes through
//! [`guest_log!`](crate::guest_log), which gives the site its own [`LogLimiter`]: at most
//! [`LINES_PER_SEC`] lines per second; the first line let through after some were dropped says
//! how many were suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[doc(hidden)]
pub use log as __log;

/// Lines per second and call site let through by [`guest_log!`](crate::guest_log).
pub const LINES_PER_SEC: u32 = 5;

const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

/// Lets at most `per_window` events through per one-second window and counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    per_window: u32,
    state: Mutex<State>,
}

impl LogLimiter {
    /// A limiter letting `per_window` events through each second (usable in a `static`).
    pub const fn new(per_window: u32) -> Self {
        LogLimiter {
            per_window,
            state: Mutex::new(State {
                window_start: None,
                in_window: 0,
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
        let new_window = match s.window_start {
            Some(start) => now.saturating_duration_since(start) >= WINDOW,
            None => true,
        };
        if new_window {
            s.window_start = Some(now);
            s.in_window = 0;
        }
        if s.in_window < self.per_window {
            s.in_window += 1;
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
        static LIMIT: $crate::log_limit::LogLimiter =
            $crate::log_limit::LogLimiter::new($crate::log_limit::LINES_PER_SEC);
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

    #[test]
    fn limits_per_window_and_reports_suppressed() {
        let l = LogLimiter::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit_at(t0), Some(0));
        }
        // A flood inside the same second is dropped and counted.
        for i in 0..1000u64 {
            assert_eq!(l.admit_at(t0 + Duration::from_micros(i)), None);
        }
        // Next second: the first line carries the count, then the count restarts.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(l.admit_at(t1), Some(1000));
        assert_eq!(l.admit_at(t1), Some(0));
        assert_eq!(l.admit_at(t1), Some(0));
        assert_eq!(l.admit_at(t1), None);
        assert_eq!(l.admit_at(t1 + Duration::from_secs(5)), Some(1));
        // A clock that goes backwards does not panic nor open the gate.
        assert_eq!(l.admit_at(t0), Some(0));
    }

    #[test]
    fn zero_budget_drops_everything() {
        let l = LogLimiter::new(0);
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
    }

    #[test]
    fn macro_sites_are_independent_and_bounded() {
        // Each expansion has its own limiter; a flood through one site costs no more than
        // LINES_PER_SEC lines per second, which is all we can observe without a logger.
        let mut admitted = 0;
        for _ in 0..10_000 {
            static L: LogLimiter = LogLimiter::new(LINES_PER_SEC);
            if L.admit().is_some() {
                admitted += 1;
            }
            crate::guest_warn!("flood {}", 1);
        }
        assert!(admitted <= LINES_PER_SEC as usize * 3, "{admitted}");
        crate::guest_info!("other site");
        crate::guest_error!("third site: {}", "x");
    }
}

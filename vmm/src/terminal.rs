//! Raw mode for an interactive console, restored on drop.

pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts `fd` in raw mode (keeping Ctrl-C), if it is a terminal.
    pub fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_lflag |= libc::ISIG;
        // SAFETY: `raw` is a valid termios for this fd.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The console's escape key, Ctrl-A, as in QEMU's `-nographic` console.
pub const ESCAPE: u8 = 0x01;

/// What an escape sequence asks the VMM to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeAction {
    /// `Ctrl-A x`: stop the VM now.
    Quit,
    /// `Ctrl-A h` (or `?`): print the escape keys.
    Help,
}

/// The escape keys, as `Ctrl-A h` prints them (terminal in raw mode: CR LF).
pub const ESCAPE_HELP: &str = "\r\narbor console: Ctrl-A x  stop the VM and exit\r\n\
               Ctrl-A h  this help\r\n\
               Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n\
               Ctrl-C  shut the guest down (ACPI power button; twice: stop at once)\r\n";

/// Separates the escape sequences from the bytes typed for the guest. The
/// escape may end one read and its key start the next.
#[derive(Debug, Default)]
pub struct ConsoleEscape {
    pending: bool,
}

impl ConsoleEscape {
    /// Appends to `guest` the bytes of `input` meant for the guest and
    /// returns the last action asked for, if any (`Quit` wins).
    pub fn filter(&mut self, input: &[u8], guest: &mut Vec<u8>) -> Option<EscapeAction> {
        let mut action = None;
        for &b in input {
            if !self.pending {
                if b == ESCAPE {
                    self.pending = true;
                } else {
                    guest.push(b);
                }
                continue;
            }
            self.pending = false;
            match b {
                b'x' | b'X' => action = Some(EscapeAction::Quit),
                b'h' | b'H' | b'?' if action != Some(EscapeAction::Quit) => {
                    action = Some(EscapeAction::Help)
                }
                b'h' | b'H' | b'?' => {}
                ESCAPE => guest.push(ESCAPE),
                // Not an escape key: both go to the guest.
                other => guest.extend_from_slice(&[ESCAPE, other]),
            }
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(e: &mut ConsoleEscape, input: &[u8]) -> (Vec<u8>, Option<EscapeAction>) {
        let mut out = Vec::new();
        let a = e.filter(input, &mut out);
        (out, a)
    }

    #[test]
    fn escape_keys() {
        let mut e = ConsoleEscape::default();
        assert_eq!(run(&mut e, b"ls\r"), (b"ls\r".to_vec(), None));
        assert_eq!(
            run(&mut e, b"a\x01xb"),
            (b"ab".to_vec(), Some(EscapeAction::Quit))
        );
        assert_eq!(run(&mut e, b"\x01h"), (vec![], Some(EscapeAction::Help)));
        assert_eq!(run(&mut e, b"\x01\x01"), (vec![ESCAPE], None));
        assert_eq!(run(&mut e, b"\x01q"), (vec![ESCAPE, b'q'], None));
        // Split across reads.
        assert_eq!(run(&mut e, b"z\x01"), (b"z".to_vec(), None));
        assert_eq!(run(&mut e, b"X"), (vec![], Some(EscapeAction::Quit)));
        // Quit is not overridden by a later help.
        assert_eq!(
            run(&mut e, b"\x01x\x01h"),
            (vec![], Some(EscapeAction::Quit))
        );
        // Ctrl-C is left to the terminal (SIGINT), never filtered here.
        assert_eq!(run(&mut e, b"\x03"), (vec![3], None));
    }
}

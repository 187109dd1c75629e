//! A tap device opened for virtio-net: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte
//! `virtio_net_hdr_v1` in front of every frame (`TUNSETVNETHDRSZ`), non-blocking.
//!
//! Arbor attaches to taps, it does not create them: the runtime creates the tap (often inside
//! a network namespace, owned by the user Arbor runs as: `ip tuntap add dev NAME mode tap user
//! UID`), because Arbor drops `CAP_NET_ADMIN` with every other capability. [`Tap::open`]
//! attaches by name with `TUNSETIFF`; the kernel would *create* a missing tap for a caller with
//! `CAP_NET_ADMIN` (a VMM run with `--capabilities keep`), so a tap that is not persistent
//! after the attach (one this call just created) is closed again, which deletes it, and the
//! name is refused as missing. A tap another process is attached to answers `EBUSY`.
//! [`Tap::from_fd`] takes over an already-open descriptor (inherited or passed with
//! `SCM_RIGHTS`) after checking with `TUNGETIFF` that it is a tap with those flags.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Size of the header the tap puts before each frame: `virtio_net_hdr_v1` (with
/// `num_buffers`), the header virtio 1.x drivers use.
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &CStr = c"/dev/net/tun";

/// Why a tap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or has characters an interface name cannot have.
    #[error("invalid tap name '{0}': 1 to 15 bytes, no '/', whitespace, ':' or NUL")]
    BadName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// No tap of that name (or no permission to attach to it).
    #[error("tap '{0}' does not exist or this process may not use it (create it beforehand, owned by the VMM's user: ip tuntap add dev {0} mode tap user UID)")]
    NotFound(String),
    /// Another process (or device) already has the tap open.
    #[error("tap '{0}' is already in use")]
    Busy(String),
    /// `TUNSETIFF` failed otherwise (for example the name is a tun, not a tap).
    #[error("cannot attach to tap '{name}': {source}")]
    Attach {
        /// Tap name.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// The descriptor is not an open tap with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
    #[error("file descriptor {fd} is not a tap opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR: {why}")]
    NotATap {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong with it.
        why: String,
    },
    /// Another ioctl or fcntl failed.
    #[error("tap '{name}': {what} failed: {source}")]
    Setup {
        /// Tap name.
        name: String,
        /// The call.
        what: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
}

/// An attached tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether `name` can be an interface name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

fn ifreq_with_name(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (arrays, integers, pointers in a union); all-zero is a
    // valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `TUNGETIFF` on `fd`: the tap's name and flags.
fn get_iff(fd: RawFd) -> io::Result<(String, libc::c_int)> {
    let mut ifr = ifreq_with_name("");
    // SAFETY: TUNGETIFF writes at most a `struct ifreq` into the valid, writable `ifr`; a
    // descriptor that is not a tun file fails with an error and writes nothing.
    let r = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr as *mut libc::ifreq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF filled the union's flags member (a short).
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    Ok((ifreq_name(&ifr), libc::c_int::from(flags) & 0xffff))
}

const WANTED: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

impl Tap {
    /// Attaches to the existing tap `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        // SAFETY: TUN_PATH is a NUL-terminated path; open has no memory effects beyond
        // reading it. The returned descriptor is owned right below.
        let fd = unsafe {
            libc::open(
                TUN_PATH.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut ifr = ifreq_with_name(name);
        ifr.ifr_ifru.ifru_flags = WANTED as libc::c_short;
        // SAFETY: TUNSETIFF reads (and may update the name in) the valid `ifr`.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::ENODEV) => TapError::NotFound(name.to_string()),
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                _ => TapError::Attach {
                    name: name.to_string(),
                    source: e,
                },
            });
        }
        let (_, flags) = get_iff(file.as_raw_fd()).map_err(|source| TapError::Setup {
            name: name.to_string(),
            what: "TUNGETIFF",
            source,
        })?;
        if flags & libc::IFF_PERSIST == 0 {
            // This call created it (CAP_NET_ADMIN): dropping `file` deletes it again.
            return Err(TapError::NotFound(name.to_string()));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Takes over `fd`, an open tap (its flags must include `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`); made non-blocking. On error `fd` is closed.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let not_tap = |why: String| TapError::NotATap { fd: raw, why };
        let (name, flags) = get_iff(raw).map_err(|e| not_tap(format!("TUNGETIFF: {e}")))?;
        if flags & libc::IFF_TAP == 0 {
            return Err(not_tap(format!("'{name}' is a tun device, not a tap")));
        }
        if flags & WANTED != WANTED {
            return Err(not_tap(format!(
                "'{name}' was opened without IFF_NO_PI or IFF_VNET_HDR"
            )));
        }
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
        let r = unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK)
            }
        };
        if r < 0 {
            return Err(TapError::Setup {
                name,
                what: "fcntl(O_NONBLOCK)",
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file: File::from(fd),
            name,
        };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the valid `size`.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(TapError::Setup {
                name: self.name.clone(),
                what: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `TUNSETOFFLOAD`: which offloads (`TUN_F_*`) the tap may hand us in received frames.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Frame I/O as the device uses it; a trait so the tests substitute a fake tap.
pub trait TapIo: Send + Sync {
    /// Reads one frame (with its header) into `buf`; `WouldBlock` when none is queued.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (with its header).
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize>;
    /// `TUNSETOFFLOAD` (see [`Tap::set_offload`]).
    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()>;
}

impl TapIo for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.file, buf)
    }

    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &self.file, buf)
    }

    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("tap0"));
        assert!(valid_name(&"a".repeat(15)));
        assert!(!valid_name(&"a".repeat(16)));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(".."));
        assert!(matches!(Tap::open("a b"), Err(TapError::BadName(_))));
    }

    #[test]
    fn from_fd_refuses_what_is_not_a_tap() {
        let f = File::open("/dev/null").unwrap();
        let e = Tap::from_fd(OwnedFd::from(f)).unwrap_err();
        assert!(matches!(e, TapError::NotATap { .. }), "{e}");
        assert!(e.to_string().contains("is not a tap"), "{e}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(a)),
            Err(TapError::NotATap { .. })
        ));
    }

    #[test]
    fn ifreq_name_round_trip() {
        let ifr = ifreq_with_name("tap-x");
        assert_eq!(ifreq_name(&ifr), "tap-x");
    }
}

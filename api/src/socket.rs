//! Creation and removal of the API's UNIX socket.
//!
//! - The socket file is created with mode 0600: the mode is given to the
//!   socket's descriptor (`fchmod(2)`) before `bind(2)`, which creates the
//!   file with it (less the umask), so the file is never wider and no path
//!   is ever passed to `chmod(2)`: a symbolic link planted at the path
//!   between `bind` and a `chmod` cannot redirect the mode change.
//! - A socket file left by a dead process (connecting to it fails with
//!   `ECONNREFUSED`) is unlinked and replaced.
//! - A socket some live process is listening on is refused, as is any path
//!   that is not a socket (regular file, directory, symbolic link...).
//! - [`SocketFile`] removes the file when dropped, but only if the path still
//!   names the socket this process created.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Mode of the socket file.
pub const SOCKET_MODE: u32 = 0o600;

/// The listening socket's backlog.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Why the API socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The path is empty, too long for `sockaddr_un` or contains a NUL.
    #[error("invalid API socket path '{path}': {reason}")]
    InvalidPath { path: PathBuf, reason: &'static str },
    /// Another process is listening on the socket.
    #[error("API socket '{0}' is in use by another process")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("'{0}' exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("cannot {action} API socket '{path}': {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The socket file this process created; removes it when dropped.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time (seconds, nanoseconds) of the socket:
    /// inode numbers are reused, so the change time tells a replacement
    /// created at the same inode apart.
    identity: (u64, u64, i64, i64),
}

fn identity(md: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (md.dev(), md.ino(), md.ctime(), md.ctime_nsec())
}

impl SocketFile {
    /// Path of the socket.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Remove only our own socket: another server may have replaced it.
        match std::fs::symlink_metadata(&self.path) {
            Ok(md) if md.file_type().is_socket() && identity(&md) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::warn!("cannot remove API socket {}: {e}", self.path.display());
                }
            }
            Ok(_) => log::warn!(
                "API socket {} was replaced by another file; leaving it",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

/// Clears the way for a new socket at `path`: nothing there is fine, a stale
/// socket is unlinked, anything else is an error.
fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect", path)(e)),
    };
    if !md.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("replacing stale API socket {}", path.display());
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("remove stale", path)(e)),
            }
        }
        Err(e) => Err(io_err("probe existing", path)(e)),
    }
}

/// Creates a listening, non-blocking, close-on-exec socket at `path` with
/// mode 0600, replacing a stale one.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let bytes = path.as_os_str().as_bytes();
    let invalid = |reason| SocketError::InvalidPath {
        path: path.to_path_buf(),
        reason,
    };
    // SAFETY: sockaddr_un is plain old data; all-zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() {
        return Err(invalid("the path is empty"));
    }
    if bytes.len() >= addr.sun_path.len() {
        return Err(invalid("the path is longer than 107 bytes"));
    }
    if bytes.contains(&0) {
        return Err(invalid("the path contains a NUL byte"));
    }
    clear_stale(path)?;

    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let addr_len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;

    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(io_err("create", path)(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a freshly created descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // The mode of the file bind() creates is the socket inode's mode less
    // the umask: set it on the descriptor, never through the path.
    // SAFETY: fchmod(2) on a descriptor we own; the result is checked.
    if unsafe { libc::fchmod(fd.as_raw_fd(), SOCKET_MODE as libc::mode_t) } < 0 {
        return Err(io_err("set the mode of", path)(io::Error::last_os_error()));
    }

    // SAFETY: `addr` is a valid sockaddr_un and `addr_len` covers the family
    // and the NUL-terminated path inside it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            addr_len as libc::socklen_t,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::AddrInUse {
            // Someone created the path between the check and bind().
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        return Err(io_err("bind", path)(e));
    }
    // From here on the file is ours: remove it on any failure.
    let remove_on_error = RemoveOnError(path);
    #[cfg(test)]
    tests::after_bind(path);
    // lstat(2): a symbolic link now at the path is reported, not followed.
    let md = std::fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if !md.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }

    // A deep backlog: hundreds of clients connecting at once wait to be
    // accepted instead of failing with EAGAIN (the kernel caps it at
    // net.core.somaxconn).
    // SAFETY: listen(2) on a descriptor we own; the result is checked.
    if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } < 0 {
        return Err(io_err("listen on", path)(io::Error::last_os_error()));
    }
    std::mem::forget(remove_on_error);
    let file = SocketFile {
        path: path.to_path_buf(),
        identity: identity(&md),
    };
    Ok((UnixListener::from(fd), file))
}

/// Unlinks a just-bound socket if setting it up fails.
struct RemoveOnError<'a>(&'a Path);

impl Drop for RemoveOnError<'_> {
    fn drop(&mut self) {
        // Only a socket: whatever else is there now is not ours.
        if let Ok(md) = std::fs::symlink_metadata(self.0) {
            if md.file_type().is_socket() {
                let _ = std::fs::remove_file(self.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::os::unix::fs::PermissionsExt;
    use vmm_sys_util::tempdir::TempDir;

    type Hook = Box<dyn Fn(&Path)>;

    thread_local! {
        /// Run by `bind` right after `bind(2)`, on the binding thread only.
        static AFTER_BIND: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    pub(super) fn after_bind(path: &Path) {
        AFTER_BIND.with(|h| {
            if let Some(hook) = h.borrow().as_ref() {
                hook(path);
            }
        });
    }

    fn tmp() -> TempDir {
        TempDir::new_with_prefix("/tmp/arbor-api-sock-").unwrap()
    }

    #[test]
    fn creates_0600_socket_and_removes_it() {
        let dir = tmp();
        let path = dir.as_path().join("api.sock");
        let (listener, file) = bind(&path).unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();
        drop(listener);
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tmp();
        let path = dir.as_path().join("api.sock");
        // A socket file with no listener behind it.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (listener, file) = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        drop(listener);
        drop(file);
    }

    #[test]
    fn refuses_non_sockets_and_bad_paths() {
        let dir = tmp();
        let path = dir.as_path().join("file");
        std::fs::write(&path, b"keep me").unwrap();
        let e = bind(&path).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket(_)));
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
        assert!(matches!(
            bind(Path::new("")),
            Err(SocketError::InvalidPath { .. })
        ));
        let long = dir.as_path().join("x".repeat(120));
        assert!(matches!(bind(&long), Err(SocketError::InvalidPath { .. })));
        let missing_dir = dir.as_path().join("no/such/dir.sock");
        assert!(matches!(bind(&missing_dir), Err(SocketError::Io { .. })));
    }

    #[test]
    fn does_not_remove_a_replacement() {
        let dir = tmp();
        let path = dir.as_path().join("api.sock");
        let (listener, file) = bind(&path).unwrap();
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"other").unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"other");
    }

    #[test]
    fn mode_is_not_set_through_a_planted_symlink() {
        let dir = tmp();
        let path = dir.as_path().join("api.sock");
        let victim = dir.as_path().join("victim");
        std::fs::write(&victim, b"secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Right after bind(2), someone swaps the new socket for a symbolic
        // link to another file of ours.
        let target = victim.clone();
        AFTER_BIND.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |p: &Path| {
                std::fs::remove_file(p).unwrap();
                std::os::unix::fs::symlink(&target, p).unwrap();
            }))
        });
        let res = bind(&path);
        AFTER_BIND.with(|h| *h.borrow_mut() = None);
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "the mode change followed the planted link");
        assert!(matches!(res, Err(SocketError::NotASocket(_))), "{res:?}");
        // The link is left alone (it is not ours), and so is its target.
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
    }

    #[test]
    fn the_file_is_never_wider_than_0600() {
        let dir = tmp();
        let path = dir.as_path().join("api.sock");
        let seen = std::rc::Rc::new(RefCell::new(0));
        let s = seen.clone();
        AFTER_BIND.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |p: &Path| {
                *s.borrow_mut() =
                    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
            }))
        });
        let res = bind(&path);
        AFTER_BIND.with(|h| *h.borrow_mut() = None);
        let (listener, file) = res.unwrap();
        assert_eq!(*seen.borrow(), 0o600, "mode right after bind(2)");
        drop(listener);
        drop(file);
    }
}

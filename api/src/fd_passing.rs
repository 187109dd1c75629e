//! File descriptors passed with API requests (`SCM_RIGHTS`).
//!
//! Some requests hand the VMM an open file instead of a name: `vm.add-net` with `"fd": N`
//! uses the N-th descriptor (from 0) passed with the request, as Cloud Hypervisor's
//! `add-net fd=` does. The client attaches the descriptors as `SCM_RIGHTS` ancillary data to
//! the bytes of its request (any of its `sendmsg` calls); the server reads every connection
//! with `recvmsg` ([`FdStream`]), collects what arrives, and when a request's body is
//! complete hands the descriptors received so far to that request ([`PassedFds`]), leaving
//! the connection's list empty. A descriptor the request does not use is closed when the
//! request is done. So a client passing descriptors sends one request at a time on its
//! connection and waits for the answer (as every Arbor client does). At most
//! [`MAX_FDS_PER_CONNECTION`] descriptors wait on a connection; the kernel closes the ones
//! that do not fit in one message's control buffer, and the server closes the rest.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

/// Most descriptors that may wait on one connection (and be passed with one message).
pub const MAX_FDS_PER_CONNECTION: usize = 8;

/// Descriptors received with one request; the VMM takes the ones it uses, the others are
/// closed with the last clone.
#[derive(Clone, Debug, Default)]
pub struct PassedFds(Arc<Mutex<Vec<Option<OwnedFd>>>>);

impl PartialEq for PassedFds {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for PassedFds {}

impl PassedFds {
    /// Descriptors in the order they were received.
    pub fn new(fds: Vec<OwnedFd>) -> Self {
        PassedFds(Arc::new(Mutex::new(fds.into_iter().map(Some).collect())))
    }

    /// How many were passed.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none was passed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes descriptor `index`; `None` if it was not passed or is taken already.
    pub fn take(&self, index: usize) -> Option<OwnedFd> {
        self.lock().get_mut(index).and_then(Option::take)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<OwnedFd>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A UNIX stream that receives descriptors with whatever it reads and can send descriptors
/// with its next write.
#[derive(Debug)]
pub struct FdStream {
    inner: UnixStream,
    received: Arc<Mutex<Vec<OwnedFd>>>,
    to_send: Vec<OwnedFd>,
}

/// The descriptors a connection received and nobody took yet.
#[derive(Clone, Debug, Default)]
pub struct ReceivedFds(Arc<Mutex<Vec<OwnedFd>>>);

impl ReceivedFds {
    /// Takes everything received so far.
    pub fn take_all(&self) -> PassedFds {
        let fds = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        PassedFds::new(fds)
    }
}

impl FdStream {
    /// Wraps `inner`.
    pub fn new(inner: UnixStream) -> Self {
        FdStream {
            inner,
            received: Arc::default(),
            to_send: Vec::new(),
        }
    }

    /// The connection's received descriptors, shared with the stream.
    pub fn received(&self) -> ReceivedFds {
        ReceivedFds(Arc::clone(&self.received))
    }

    /// Sends `fds` with the next bytes written (then closes them here).
    pub fn send_with_next_write(&mut self, fds: Vec<OwnedFd>) {
        self.to_send = fds;
    }

    fn keep(&self, fds: Vec<OwnedFd>) {
        let mut list = self.received.lock().unwrap_or_else(|e| e.into_inner());
        for fd in fds {
            if list.len() < MAX_FDS_PER_CONNECTION {
                list.push(fd);
            } else {
                log::warn!("API connection: too many passed descriptors, closing one");
            }
        }
    }
}

const CMSG_BUF_LEN: usize = 256;

/// One `recvmsg` into `buf`; the descriptors that came with it are returned.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; CMSG_BUF_LEN / 8];
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: `msg` points at `iov` (into `buf`) and `cbuf`, both valid and writable for the
    // lengths given, for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* helpers walk the control buffer the kernel filled, within
    // `msg_controllen`; each SCM_RIGHTS payload holds `(cmsg_len - CMSG_LEN(0)) / 4` new
    // descriptors that this process now owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, fds))
}

/// One `sendmsg` of `buf` with `fds` attached.
pub fn send_with_fds(fd: RawFd, buf: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    let mut cbuf = [0u64; CMSG_BUF_LEN / 8];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    if raw.len() > MAX_FDS_PER_CONNECTION || space > std::mem::size_of_val(&cbuf) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS_PER_CONNECTION} descriptors per request"),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is `space` bytes (checked above), enough for one header
        // with `payload` bytes of descriptors, which are copied from `raw`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), payload);
        }
    }
    // SAFETY: `msg` points at `iov` (over `buf`, only read) and the control buffer, valid for
    // the call; the descriptors stay open until it returns.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let dst = buf.initialize_unfilled();
            match this
                .inner
                .try_io(Interest::READABLE, || recv_with_fds(fd, dst))
            {
                Ok((n, fds)) => {
                    this.keep(fds);
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.to_send.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        loop {
            ready!(this.inner.poll_write_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let fds = &this.to_send;
            match this
                .inner
                .try_io(Interest::WRITABLE, || send_with_fds(fd, buf, fds))
            {
                Ok(n) => {
                    this.to_send.clear();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn file_with(text: &str) -> std::fs::File {
        let mut f = tempfile_in_tmp();
        f.write_all(text.as_bytes()).unwrap();
        f.rewind().unwrap();
        f
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "arbor-fdpass-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn descriptors_travel_with_the_bytes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = UnixStream::pair().unwrap();
            let mut client = FdStream::new(a);
            let mut server = FdStream::new(b);
            let received = server.received();
            let f = file_with("hello");
            client.send_with_next_write(vec![OwnedFd::from(f)]);
            client.write_all(b"PUT /x").await.unwrap();
            client.write_all(b" more").await.unwrap();
            let mut buf = vec![0u8; 11];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"PUT /x more");
            let passed = received.take_all();
            assert_eq!(passed.len(), 1);
            assert!(received.take_all().is_empty(), "taken once");
            let mut f = std::fs::File::from(passed.take(0).unwrap());
            let mut text = String::new();
            f.read_to_string(&mut text).unwrap();
            assert_eq!(text, "hello");
            assert!(passed.take(0).is_none());
            assert!(passed.take(5).is_none());
        });
    }

    #[test]
    fn too_many_descriptors_are_closed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = UnixStream::pair().unwrap();
            let mut server = FdStream::new(b);
            let received = server.received();
            for _ in 0..2 {
                let fds: Vec<OwnedFd> = (0..MAX_FDS_PER_CONNECTION)
                    .map(|_| OwnedFd::from(file_with("x")))
                    .collect();
                a.writable().await.unwrap();
                send_with_fds(a.as_raw_fd(), b"ab", &fds).unwrap();
            }
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(received.take_all().len(), MAX_FDS_PER_CONNECTION);
            let too_many: Vec<OwnedFd> = (0..MAX_FDS_PER_CONNECTION + 1)
                .map(|_| OwnedFd::from(file_with("x")))
                .collect();
            assert!(send_with_fds(a.as_raw_fd(), b"c", &too_many).is_err());
        });
    }
}

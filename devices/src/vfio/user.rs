//! The vfio-user back end: the `vfio_user` crate's [`Client`] over the
//! server's UNIX socket.
//!
//! What the crate's client does not do, and what this wrapper does about it:
//! - It blocks without a timeout, and panics on some malformed replies
//!   during the handshake (a size that underflows, a capability length that
//!   does not match). The handshake (connect, version, device and region
//!   information) therefore runs on a helper thread that the caller waits
//!   for at most [`CONNECT_TIMEOUT`]: a peer that is not a vfio-user server
//!   (it never answers, or answers garbage) gives an error, never a hang or
//!   a panic of the VMM. A peer that never answers keeps that helper thread
//!   blocked until it closes the connection. One risk remains inside the
//!   crate: it allocates the size a version reply claims (up to 4 GiB,
//!   zeroed, so lazily) before reading it; the socket is the operator's
//!   choice, never the guest's.
//! - It does not check the `error` field of replies, and reads a reply of
//!   the size it expects: a server that answers a request with an error
//!   (a bare header) desynchronises the stream. Errors the server reports
//!   are therefore not distinguished from successes; a server that exits
//!   or closes the connection is (the next request fails, the function is
//!   marked failed and reads all-ones).
//! - It does not serve messages the server sends on its own (`DMA_READ`,
//!   `DMA_WRITE`): servers get every guest RAM region with its memfd
//!   ([`VfioBackend::dma_map`]) and access guest memory directly, so they
//!   have no need of them; a server that sends them anyway desynchronises
//!   the stream as above.
//! - It does not negotiate `max_msg_fds`; interrupts are given one eventfd
//!   per message.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vfio_user::Client;
use vmm_sys_util::eventfd::EventFd;

use super::{IrqInfo, RegionInfo, RegionMmap, VfioBackend, REGION_MMAP};

/// How long the handshake with a server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER: disable.
const IRQ_SET_DATA_NONE_TRIGGER: u32 = (1 << 0) | (1 << 5);
/// VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER.
const IRQ_SET_EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);

/// Errors connecting to a vfio-user server.
#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    #[error("vfio-user socket '{0}': {1}")]
    Socket(String, #[source] io::Error),
    #[error("vfio-user socket '{0}' is not a UNIX socket")]
    NotSocket(String),
    #[error("vfio-user server at '{0}': {1}")]
    Handshake(String, String),
    #[error(
        "vfio-user server at '{0}' did not complete the handshake within {1:?} \
         (is it a vfio-user server?)"
    )]
    Timeout(String, Duration),
}

/// A vfio-user server's device.
pub struct VfioUserBackend {
    client: Option<Client>,
    socket: PathBuf,
}

fn to_io(e: vfio_user::Error) -> io::Error {
    match e {
        vfio_user::Error::StreamRead(e)
        | vfio_user::Error::StreamWrite(e)
        | vfio_user::Error::Connect(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl VfioUserBackend {
    /// Connects to the server listening on `socket` and reads the device's
    /// regions. Fails if `socket` is not a UNIX socket, nobody listens, or
    /// the peer does not complete a vfio-user handshake in time.
    pub fn connect(socket: &Path) -> Result<Self, VfioUserError> {
        Self::connect_timeout(socket, CONNECT_TIMEOUT)
    }

    /// [`VfioUserBackend::connect`] with a given handshake timeout.
    pub fn connect_timeout(socket: &Path, timeout: Duration) -> Result<Self, VfioUserError> {
        let shown = socket.display().to_string();
        let meta =
            std::fs::metadata(socket).map_err(|e| VfioUserError::Socket(shown.clone(), e))?;
        if !meta.file_type().is_socket() {
            return Err(VfioUserError::NotSocket(shown));
        }
        let (tx, rx) = mpsc::channel();
        let path = socket.to_path_buf();
        std::thread::Builder::new()
            .name("arbor-vfio-user".into())
            .spawn(move || {
                // A panic in the client (malformed reply) unwinds this thread
                // only; the sender is dropped and the caller sees it.
                let _ = tx.send(Client::new(&path));
            })
            .map_err(|e| VfioUserError::Handshake(shown.clone(), e.to_string()))?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(client)) => Ok(VfioUserBackend {
                client: Some(client),
                socket: socket.to_path_buf(),
            }),
            Ok(Err(vfio_user::Error::Connect(e))) => Err(VfioUserError::Socket(shown, e)),
            Ok(Err(e)) => Err(VfioUserError::Handshake(shown, e.to_string())),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(VfioUserError::Timeout(shown, timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(VfioUserError::Handshake(
                shown,
                "malformed reply during the handshake".into(),
            )),
        }
    }

    /// The server's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn client(&mut self) -> io::Result<&mut Client> {
        self.client
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "connection closed"))
    }
}

impl VfioBackend for VfioUserBackend {
    fn describe(&self) -> String {
        format!("vfio-user {}", self.socket.display())
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let r = self.client.as_ref()?.region(index)?;
        Some(RegionInfo {
            index,
            size: r.size,
            flags: r.flags,
        })
    }

    fn region_mmap(&self, index: u32) -> Option<RegionMmap<'_>> {
        let r = self.client.as_ref()?.region(index)?;
        let fo = r.file_offset.as_ref()?;
        if r.flags & REGION_MMAP == 0 {
            return None;
        }
        // No sparse mmap capability: the whole region may be mapped.
        let areas = if r.sparse_areas.is_empty() {
            vec![(0, r.size)]
        } else {
            r.sparse_areas.iter().map(|a| (a.offset, a.size)).collect()
        };
        Some(RegionMmap {
            fd: fo.file().as_fd(),
            offset: fo.start(),
            areas,
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.client()?
            .region_read(index, offset, data)
            .map_err(to_io)
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.client()?
            .region_write(index, offset, data)
            .map_err(to_io)
    }

    fn irq_info(&mut self, index: u32) -> Option<IrqInfo> {
        let i = self.client().ok()?.get_irq_info(index).ok()?;
        Some(IrqInfo {
            index: i.index,
            count: i.count,
        })
    }

    fn set_irq_eventfds(&mut self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let fds = fds.as_slice();
        let client = self.client()?;
        if fds.is_empty() {
            client.set_irqs(index, IRQ_SET_DATA_NONE_TRIGGER, 0, 0, &[])
        } else {
            client.set_irqs(index, IRQ_SET_EVENTFD_TRIGGER, 0, fds.len() as u32, fds)
        }
        .map_err(to_io)
    }

    fn dma_map(&mut self, iova: u64, size: u64, file: &File, offset: u64) -> io::Result<()> {
        self.client()?
            .dma_map(offset, iova, size, file.as_raw_fd())
            .map_err(to_io)
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> io::Result<()> {
        self.client()?.dma_unmap(iova, size).map_err(to_io)
    }

    fn reset(&mut self) -> io::Result<()> {
        self.client()?.reset().map_err(to_io)
    }

    fn close(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.shutdown();
        }
    }
}

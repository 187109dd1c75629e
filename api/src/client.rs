//! A blocking client for the Arbor API.
//!
//! Each call opens a connection to the UNIX socket, runs one HTTP/1.1
//! exchange with hyper on a private current-thread tokio runtime, and closes
//! the connection. The typed methods turn error answers into
//! [`ClientError::Api`]; [`Client::request`] returns any answer as-is for
//! callers (such as `arbor-remote`) that want the raw JSON.
//!
//! ```no_run
//! let client = api::client::Client::new("/run/arbor.sock");
//! let info = client.vm_info()?;
//! println!("{} devices", info.devices.len());
//! # Ok::<(), api::client::ClientError>(())
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::message::ApiErrorKind;
use crate::server::Endpoint;
use crate::types::{
    AddDeviceResponse, DiskConfig, ErrorBody, NetConfig, RemoveDeviceRequest, RngConfig, VmInfo,
    VmmPingResponse, VsockConfig,
};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to the API socket '{path}': {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The path exists but is not a UNIX socket (a directory, a file...).
    #[error("'{path}' is {what}, not a UNIX socket: give the path arbor's --api-socket named")]
    NotASocket { path: PathBuf, what: &'static str },
    /// The client's runtime could not be created.
    #[error("cannot create the client runtime: {0}")]
    Runtime(#[source] io::Error),
    /// The HTTP exchange failed (connection reset, malformed answer...).
    #[error("HTTP exchange with the VMM failed: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("cannot build the request: {0}")]
    Request(String),
    /// No answer came within the configured timeout.
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
    /// The VMM answered with an error status.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    /// The VMM answered success with a body that does not decode.
    #[error("cannot decode the VMM's answer (HTTP {status}): {reason}")]
    Decode { status: u16, reason: String },
    /// The request body could not be encoded.
    #[error("cannot encode the request: {0}")]
    Encode(#[source] serde_json::Error),
}

impl ClientError {
    /// For [`ClientError::Api`], the error class of the status.
    pub fn api_error_kind(&self) -> Option<ApiErrorKind> {
        match self {
            ClientError::Api { status, .. } => ApiErrorKind::from_status_code(*status),
            _ => None,
        }
    }

    /// Whether the VMM answered at all (the error is an API error answer).
    pub fn is_api_error(&self) -> bool {
        matches!(self, ClientError::Api { .. })
    }
}

/// An answer as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body bytes (JSON, or empty for 204).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error` field of an error body, or the body text, or the status.
    pub fn error_message(&self) -> String {
        if let Ok(e) = serde_json::from_slice::<ErrorBody>(&self.body) {
            return e.error;
        }
        let text = String::from_utf8_lossy(&self.body).trim().to_string();
        if text.is_empty() {
            format!("HTTP status {}", self.status)
        } else {
            text
        }
    }

    fn into_api_error(self) -> ClientError {
        ClientError::Api {
            status: self.status,
            message: self.error_message(),
        }
    }

    /// Decodes a success body, or turns an error answer into
    /// [`ClientError::Api`].
    pub fn json<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        if !self.is_success() {
            return Err(self.into_api_error());
        }
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Decode {
            status: self.status,
            reason: e.to_string(),
        })
    }

    /// Checks for a success status, ignoring any body.
    pub fn success(self) -> Result<(), ClientError> {
        if self.is_success() {
            Ok(())
        } else {
            Err(self.into_api_error())
        }
    }
}

/// A client bound to one API socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client for the socket at `socket`, with no timeout.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            timeout: None,
        }
    }

    /// Gives up on any call taking longer than `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the answer whatever its status.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        self.request_with_fds(method, path, body, Vec::new())
    }

    /// [`Client::request`], passing `fds` with the request's bytes
    /// (`SCM_RIGHTS`; see [`crate::fd_passing`]). They are closed here
    /// once sent.
    pub fn request_with_fds(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<RawResponse, ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost");
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        runtime.block_on(async {
            let exchange = exchange(&self.socket, request, fds);
            match self.timeout {
                Some(t) => tokio::time::timeout(t, exchange)
                    .await
                    .map_err(|_| ClientError::Timeout(t))?,
                None => exchange.await,
            }
        })
    }

    /// Sends a request to `endpoint` with an optional JSON body.
    pub fn call<T: Serialize>(
        &self,
        endpoint: Endpoint,
        body: Option<&T>,
    ) -> Result<RawResponse, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::Encode)?;
        self.request(endpoint.method(), endpoint.path(), body)
    }

    fn call_empty(&self, endpoint: Endpoint) -> Result<RawResponse, ClientError> {
        self.call::<()>(endpoint, None)
    }

    /// `GET vmm.ping`.
    pub fn vmm_ping(&self) -> Result<VmmPingResponse, ClientError> {
        self.call_empty(Endpoint::VmmPing)?.json()
    }

    /// `PUT vmm.shutdown`: stops the VMM process.
    pub fn vmm_shutdown(&self) -> Result<(), ClientError> {
        self.call_empty(Endpoint::VmmShutdown)?.success()
    }

    /// `GET vm.info`.
    pub fn vm_info(&self) -> Result<VmInfo, ClientError> {
        self.call_empty(Endpoint::VmInfo)?.json()
    }

    /// `PUT vm.add-disk`.
    pub fn vm_add_disk(&self, config: &DiskConfig) -> Result<AddDeviceResponse, ClientError> {
        self.call(Endpoint::VmAddDisk, Some(config))?.json()
    }

    /// `PUT vm.add-net`; `fds` are passed with the request (`SCM_RIGHTS`),
    /// and `config.fd` names one of them by index.
    pub fn vm_add_net(
        &self,
        config: &NetConfig,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<AddDeviceResponse, ClientError> {
        let body = serde_json::to_vec(config).map_err(ClientError::Encode)?;
        let e = Endpoint::VmAddNet;
        self.request_with_fds(e.method(), e.path(), Some(body), fds)?
            .json()
    }

    /// `PUT vm.add-rng`.
    pub fn vm_add_rng(&self, config: &RngConfig) -> Result<AddDeviceResponse, ClientError> {
        self.call(Endpoint::VmAddRng, Some(config))?.json()
    }

    /// `PUT vm.add-vsock`.
    pub fn vm_add_vsock(&self, config: &VsockConfig) -> Result<AddDeviceResponse, ClientError> {
        self.call(Endpoint::VmAddVsock, Some(config))?.json()
    }

    /// `PUT vm.add-device`.
    pub fn vm_add_device(
        &self,
        config: &crate::types::DeviceConfig,
    ) -> Result<AddDeviceResponse, ClientError> {
        self.call(Endpoint::VmAddDevice, Some(config))?.json()
    }

    /// `PUT vm.add-user-device`.
    pub fn vm_add_user_device(
        &self,
        config: &crate::types::UserDeviceConfig,
    ) -> Result<AddDeviceResponse, ClientError> {
        self.call(Endpoint::VmAddUserDevice, Some(config))?.json()
    }

    /// `PUT vm.remove-device`.
    pub fn vm_remove_device(&self, id: &str) -> Result<(), ClientError> {
        let req = RemoveDeviceRequest { id: id.to_string() };
        self.call(Endpoint::VmRemoveDevice, Some(&req))?.success()
    }

    /// `PUT vm.pause`.
    pub fn vm_pause(&self) -> Result<(), ClientError> {
        self.call_empty(Endpoint::VmPause)?.success()
    }

    /// `PUT vm.resume`.
    pub fn vm_resume(&self) -> Result<(), ClientError> {
        self.call_empty(Endpoint::VmResume)?.success()
    }

    /// `PUT vm.shutdown`: shuts the VM down (the VMM keeps running).
    pub fn vm_shutdown(&self) -> Result<(), ClientError> {
        self.call_empty(Endpoint::VmShutdown)?.success()
    }

    /// `PUT vm.create` with the whole configuration (the JSON that
    /// `arbor --print-config` prints); answers the new VM's `vm.info`.
    pub fn vm_create(&self, config: &serde_json::Value) -> Result<VmInfo, ClientError> {
        self.call(Endpoint::VmCreate, Some(config))?.json()
    }

    /// `PUT vm.boot`.
    pub fn vm_boot(&self) -> Result<(), ClientError> {
        self.call_empty(Endpoint::VmBoot)?.success()
    }

    /// `PUT vm.delete`.
    pub fn vm_delete(&self) -> Result<(), ClientError> {
        self.call_empty(Endpoint::VmDelete)?.success()
    }

    /// `GET vm.events`: follows the event stream on a connection of its
    /// own (the client's timeout applies to each read).
    pub fn vm_events(&self) -> Result<EventStream, ClientError> {
        EventStream::open(&self.socket, self.timeout)
    }
}

/// A followed `GET vm.events` stream, read line by line (blocking).
pub struct EventStream {
    reader: io::BufReader<std::os::unix::net::UnixStream>,
    /// Bytes of the current chunk not read yet.
    chunk_left: usize,
    pending: Vec<u8>,
    ended: bool,
}

fn io_error(socket: &Path, e: io::Error) -> ClientError {
    connect_error(socket, e)
}

/// Why connecting to `socket` failed: says so when the path is not a
/// socket at all (connect(2) only answers "Connection refused" then).
fn connect_error(socket: &Path, source: io::Error) -> ClientError {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::metadata(socket) {
        let t = m.file_type();
        let what = if t.is_dir() {
            Some("a directory")
        } else if t.is_file() {
            Some("a regular file")
        } else if t.is_socket() {
            None
        } else {
            Some("not a file arbor creates")
        };
        if let Some(what) = what {
            return ClientError::NotASocket {
                path: socket.to_path_buf(),
                what,
            };
        }
    }
    ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    }
}

impl EventStream {
    fn open(socket: &Path, timeout: Option<Duration>) -> Result<EventStream, ClientError> {
        use std::io::{BufRead, Write};
        let mut stream =
            std::os::unix::net::UnixStream::connect(socket).map_err(|e| io_error(socket, e))?;
        stream
            .set_read_timeout(timeout)
            .map_err(|e| io_error(socket, e))?;
        stream
            .write_all(
                format!(
                    "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    Endpoint::VmEvents.path()
                )
                .as_bytes(),
            )
            .map_err(|e| io_error(socket, e))?;
        let mut reader = io::BufReader::new(stream);
        let mut status_line = String::new();
        reader
            .read_line(&mut status_line)
            .map_err(|e| io_error(socket, e))?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Decode {
                status: 0,
                reason: format!("bad status line '{}'", status_line.trim()),
            })?;
        let mut chunked = false;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| io_error(socket, e))?;
            let line = line.trim_end();
            if n == 0 || line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().unwrap_or(0).min(1 << 20);
            }
        }
        if status != 200 {
            let mut body = vec![0u8; length];
            let _ = std::io::Read::read_exact(&mut reader, &mut body);
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Api { status, message });
        }
        if !chunked {
            return Err(ClientError::Decode {
                status,
                reason: "the event stream is not chunked".into(),
            });
        }
        Ok(EventStream {
            reader,
            chunk_left: 0,
            pending: Vec::new(),
            ended: false,
        })
    }

    /// Reads more of the chunked body into `pending`; false at its end.
    fn fill(&mut self) -> io::Result<bool> {
        use std::io::{BufRead, Read};
        if self.ended {
            return Ok(false);
        }
        if self.chunk_left == 0 {
            let mut size = String::new();
            if self.reader.read_line(&mut size)? == 0 {
                self.ended = true;
                return Ok(false);
            }
            let size = size.trim();
            if size.is_empty() {
                // The CRLF closing the previous chunk.
                return Ok(true);
            }
            let hex = size.split(';').next().unwrap_or("");
            self.chunk_left = usize::from_str_radix(hex, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if self.chunk_left == 0 {
                self.ended = true;
                return Ok(false);
            }
        }
        let mut buf = vec![0u8; self.chunk_left.min(8192)];
        let n = self.reader.read(&mut buf)?;
        if n == 0 {
            self.ended = true;
            return Ok(false);
        }
        self.chunk_left -= n;
        self.pending.extend_from_slice(&buf[..n]);
        Ok(true)
    }

    /// The next line of the stream (without its newline); `None` once the
    /// stream has ended. A read timeout is an error.
    pub fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(Some(
                    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                ));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// The next event; `None` once the stream has ended.
    pub fn next_event(&mut self) -> io::Result<Option<crate::events::VmEvent>> {
        match self.next_line()? {
            None => Ok(None),
            Some(line) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// One HTTP/1.1 exchange over a fresh connection.
async fn exchange(
    socket: &Path,
    request: Request<Full<Bytes>>,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<RawResponse, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| connect_error(socket, source))?;
    let mut stream = crate::fd_passing::FdStream::new(stream);
    stream.send_with_next_write(fds);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::debug!("API client connection ended with an error: {e}");
        }
    });
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    drop(sender);
    // The connection closes once the sender is gone; don't wait for it.
    driver.abort();
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

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
    AddDeviceResponse, DiskConfig, ErrorBody, RemoveDeviceRequest, RngConfig, VmInfo,
    VmmPingResponse,
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
            let exchange = exchange(&self.socket, request);
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

    /// `PUT vm.add-rng`.
    pub fn vm_add_rng(&self, config: &RngConfig) -> Result<AddDeviceResponse, ClientError> {
        self.call(Endpoint::VmAddRng, Some(config))?.json()
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
}

/// One HTTP/1.1 exchange over a fresh connection.
async fn exchange(
    socket: &Path,
    request: Request<Full<Bytes>>,
) -> Result<RawResponse, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
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

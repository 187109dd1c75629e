//! The HTTP/JSON server on the API's UNIX socket.
//!
//! [`start_server`] binds the socket (see [`crate::socket`]) in the caller's
//! thread, so a path problem is reported at once, then spawns one `arbor-api`
//! thread running a current-thread tokio runtime. hyper serves HTTP/1.1 on
//! each connection. For every request the thread:
//!
//! 1. finds the route in [`ROUTES`] (unknown path: 404; known path with
//!    another method: 405 with an `Allow` header);
//! 2. reads the body (at most [`MAX_BODY_SIZE`] bytes), parses it into the
//!    endpoint's type with unknown fields rejected, and validates it (400);
//! 3. sends an [`ApiMessage`] to the VMM and writes the wake-up `EventFd`;
//! 4. awaits the answer on the message's one-shot channel, which does not
//!    block the runtime, and turns it into 200 (JSON), 204 (no body) or an
//!    error status with `{"error": "..."}`.
//!
//! `GET vm.events` is the exception: the API thread answers it itself with
//! a kept-open stream of the [`crate::events::EventBus`] given to
//! [`start_server_with_events`] (one follower task per connection).
//!
//! [`ROUTES`] is the single source of truth for paths and methods: the
//! router uses it, and a test checks `openapi.json` against it.
//!
//! Limits, so that clients cannot hold the API or the VMM's descriptors:
//!
//! - at most [`MAX_CONNECTIONS`] connections are open at once. A connection
//!   beyond the cap is accepted, then the oldest connection that has no
//!   request in progress (idle keep-alive, or still sending its headers) is
//!   closed to make room; if every connection has a request in progress,
//!   the new one is closed at once;
//! - a request's headers must arrive within [`HEADER_READ_TIMEOUT`] (hyper's
//!   `header_read_timeout`, which also closes idle keep-alive connections
//!   after that time), and its body within [`BODY_READ_TIMEOUT`] of the
//!   headers, or it is answered 408 and the connection closed;
//! - while fewer than [`FD_RESERVE`] descriptors are left under
//!   `RLIMIT_NOFILE`, new connections are accepted and closed at once, so
//!   the VMM keeps descriptors for itself (disks, eventfds, hot-plug). The
//!   count (the size of `/proc/self/fd`, or a listing of it on kernels
//!   before 6.2) is reused for 100 ms unless it was near the reserve.
//!
//! Dropping the [`ApiServerHandle`] (or calling
//! [`ApiServerHandle::shutdown`]) stops accepting, lets requests in flight
//! finish for up to [`SHUTDOWN_GRACE`], joins the thread and removes the
//! socket.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinSet;
use vmm_sys_util::eventfd::EventFd;

use crate::events::EventBus;
use crate::fd_passing::{FdStream, PassedFds, ReceivedFds};
use crate::message::{ApiError, ApiMessage, ApiReply, ApiRequest, ApiResponse};
use crate::socket::{self, SocketError};
use crate::types::{DeviceConfig, UserDeviceConfig};
use crate::types::{
    DiskConfig, EmptyRequest, ErrorBody, NetConfig, RemoveDeviceRequest, RngConfig, VsockConfig,
};

/// Prefix shared by every route.
pub const API_PREFIX: &str = "/api/v1/";
/// Largest accepted request body.
pub const MAX_BODY_SIZE: usize = 64 * 1024;
/// How long shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body once its headers
/// have arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long [`start_server`] waits for the API thread to start serving.
const READY_WAIT: Duration = Duration::from_secs(1);
/// How long [`start_server`] then waits for the clients that connected
/// while the thread started to be answered: a client that connects early
/// and sends nothing holds the VMM's start this long at most.
const SETTLE_WAIT: Duration = Duration::from_millis(100);
/// Descriptors kept free for the VMM: below this many left under
/// `RLIMIT_NOFILE`, new API connections are closed at once.
pub const FD_RESERVE: u64 = 64;

/// Every operation the API offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /api/v1/vmm.ping`
    VmmPing,
    /// `PUT /api/v1/vmm.shutdown`
    VmmShutdown,
    /// `GET /api/v1/vm.info`
    VmInfo,
    /// `PUT /api/v1/vm.add-disk`
    VmAddDisk,
    /// `PUT /api/v1/vm.add-rng`
    VmAddRng,
    /// `PUT /api/v1/vm.add-net`
    VmAddNet,
    /// `PUT /api/v1/vm.remove-device`
    VmRemoveDevice,
    /// `PUT /api/v1/vm.pause`
    VmPause,
    /// `PUT /api/v1/vm.resume`
    VmResume,
    /// `PUT /api/v1/vm.shutdown`
    VmShutdown,
    /// `PUT /api/v1/vm.create`
    VmCreate,
    /// `PUT /api/v1/vm.boot`
    VmBoot,
    /// `PUT /api/v1/vm.delete`
    VmDelete,
    /// `GET /api/v1/vm.events`: served by the API thread itself.
    VmEvents,
    /// `PUT /api/v1/vm.add-vsock`
    VmAddVsock,
    /// `PUT /api/v1/vm.add-user-device`
    VmAddUserDevice,
    /// `PUT /api/v1/vm.add-device`
    VmAddDevice,
}

/// One entry of the route table.
#[derive(Debug, Clone)]
pub struct Route {
    /// The only method the path answers to.
    pub method: Method,
    /// Full path, starting with [`API_PREFIX`].
    pub path: &'static str,
    /// What the route does.
    pub endpoint: Endpoint,
}

const fn route(endpoint: Endpoint) -> Route {
    Route {
        method: endpoint.method(),
        path: endpoint.path(),
        endpoint,
    }
}

/// The server's route table: every [`Endpoint`] once.
pub const ROUTES: &[Route] = &[
    route(Endpoint::VmmPing),
    route(Endpoint::VmmShutdown),
    route(Endpoint::VmInfo),
    route(Endpoint::VmAddDisk),
    route(Endpoint::VmAddRng),
    route(Endpoint::VmAddNet),
    route(Endpoint::VmRemoveDevice),
    route(Endpoint::VmPause),
    route(Endpoint::VmResume),
    route(Endpoint::VmShutdown),
    route(Endpoint::VmCreate),
    route(Endpoint::VmBoot),
    route(Endpoint::VmDelete),
    route(Endpoint::VmEvents),
    route(Endpoint::VmAddVsock),
    route(Endpoint::VmAddUserDevice),
    route(Endpoint::VmAddDevice),
];

impl Endpoint {
    /// Every endpoint.
    pub const ALL: &'static [Endpoint] = &[
        Endpoint::VmmPing,
        Endpoint::VmmShutdown,
        Endpoint::VmInfo,
        Endpoint::VmAddDisk,
        Endpoint::VmAddRng,
        Endpoint::VmAddNet,
        Endpoint::VmRemoveDevice,
        Endpoint::VmPause,
        Endpoint::VmResume,
        Endpoint::VmShutdown,
        Endpoint::VmCreate,
        Endpoint::VmBoot,
        Endpoint::VmDelete,
        Endpoint::VmEvents,
        Endpoint::VmAddVsock,
        Endpoint::VmAddUserDevice,
        Endpoint::VmAddDevice,
    ];

    /// The full path, starting with [`API_PREFIX`].
    pub const fn path(self) -> &'static str {
        match self {
            Endpoint::VmmPing => "/api/v1/vmm.ping",
            Endpoint::VmmShutdown => "/api/v1/vmm.shutdown",
            Endpoint::VmInfo => "/api/v1/vm.info",
            Endpoint::VmAddDisk => "/api/v1/vm.add-disk",
            Endpoint::VmAddRng => "/api/v1/vm.add-rng",
            Endpoint::VmAddNet => "/api/v1/vm.add-net",
            Endpoint::VmRemoveDevice => "/api/v1/vm.remove-device",
            Endpoint::VmPause => "/api/v1/vm.pause",
            Endpoint::VmResume => "/api/v1/vm.resume",
            Endpoint::VmShutdown => "/api/v1/vm.shutdown",
            Endpoint::VmCreate => "/api/v1/vm.create",
            Endpoint::VmBoot => "/api/v1/vm.boot",
            Endpoint::VmDelete => "/api/v1/vm.delete",
            Endpoint::VmEvents => "/api/v1/vm.events",
            Endpoint::VmAddVsock => "/api/v1/vm.add-vsock",
            Endpoint::VmAddUserDevice => "/api/v1/vm.add-user-device",
            Endpoint::VmAddDevice => "/api/v1/vm.add-device",
        }
    }

    /// The method: GET for queries, PUT for everything else.
    pub const fn method(self) -> Method {
        match self {
            Endpoint::VmmPing | Endpoint::VmInfo | Endpoint::VmEvents => Method::GET,
            _ => Method::PUT,
        }
    }

    /// The endpoint name: its path without [`API_PREFIX`], e.g. `vm.info`.
    pub fn name(self) -> &'static str {
        let path = self.path();
        match path.strip_prefix(API_PREFIX) {
            Some(name) => name,
            None => path,
        }
    }

    /// Whether `response` is the kind of answer this endpoint expects.
    pub fn accepts(self, response: &ApiResponse) -> bool {
        match self {
            Endpoint::VmmPing => matches!(response, ApiResponse::VmmPing(_)),
            Endpoint::VmInfo | Endpoint::VmCreate => matches!(response, ApiResponse::VmInfo(_)),
            Endpoint::VmEvents => false,
            Endpoint::VmAddDisk
            | Endpoint::VmAddRng
            | Endpoint::VmAddNet
            | Endpoint::VmAddVsock
            | Endpoint::VmAddUserDevice
            | Endpoint::VmAddDevice => {
                matches!(response, ApiResponse::DeviceAdded(_))
            }
            Endpoint::VmmShutdown
            | Endpoint::VmPause
            | Endpoint::VmResume
            | Endpoint::VmShutdown
            | Endpoint::VmBoot
            | Endpoint::VmDelete
            | Endpoint::VmRemoveDevice => matches!(response, ApiResponse::Empty),
        }
    }

    /// Parses and validates a request body for this endpoint.
    pub fn parse_request(self, body: &[u8]) -> Result<ApiRequest, ApiError> {
        Ok(match self {
            Endpoint::VmmPing => no_body(self, body).map(|()| ApiRequest::VmmPing)?,
            Endpoint::VmmShutdown => no_body(self, body).map(|()| ApiRequest::VmmShutdown)?,
            Endpoint::VmInfo => no_body(self, body).map(|()| ApiRequest::VmInfo)?,
            Endpoint::VmPause => no_body(self, body).map(|()| ApiRequest::VmPause)?,
            Endpoint::VmResume => no_body(self, body).map(|()| ApiRequest::VmResume)?,
            Endpoint::VmShutdown => no_body(self, body).map(|()| ApiRequest::VmShutdown)?,
            Endpoint::VmBoot => no_body(self, body).map(|()| ApiRequest::VmBoot)?,
            Endpoint::VmDelete => no_body(self, body).map(|()| ApiRequest::VmDelete)?,
            Endpoint::VmEvents => {
                no_body(self, body)?;
                return Err(ApiError::internal(
                    "vm.events is a stream served by the API thread, not a request",
                ));
            }
            Endpoint::VmCreate => {
                let value: serde_json::Value = json_body(self, body, false)?;
                ApiRequest::VmCreate(Box::new(value))
            }
            Endpoint::VmAddDisk => {
                let config: DiskConfig = json_body(self, body, false)?;
                config.validate()?;
                ApiRequest::VmAddDisk(config)
            }
            Endpoint::VmAddRng => {
                let config: RngConfig = json_body(self, body, true)?;
                config.validate()?;
                ApiRequest::VmAddRng(config)
            }
            Endpoint::VmAddNet => {
                let config: NetConfig = json_body(self, body, false)?;
                config.validate()?;
                // The descriptors are attached by the connection (`handle`).
                ApiRequest::VmAddNet(config, PassedFds::default())
            }
            Endpoint::VmRemoveDevice => {
                let req: RemoveDeviceRequest = json_body(self, body, false)?;
                req.validate()?;
                ApiRequest::VmRemoveDevice(req)
            }
            Endpoint::VmAddVsock => {
                let config: VsockConfig = json_body(self, body, false)?;
                config.validate()?;
                if !config.socket.starts_with('/') {
                    return Err(ApiError::bad_request(format!(
                        "'socket' must be absolute, not '{}': the VMM's working directory is \
                         not the client's",
                        config.socket
                    )));
                }
                ApiRequest::VmAddVsock(config)
            }
            Endpoint::VmAddUserDevice => {
                let config: UserDeviceConfig = json_body(self, body, false)?;
                config.validate()?;
                ApiRequest::VmAddUserDevice(config)
            }
            Endpoint::VmAddDevice => {
                let config: DeviceConfig = json_body(self, body, false)?;
                config.validate()?;
                ApiRequest::VmAddDevice(config)
            }
        })
    }
}

/// Why a method and path do not name an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// No route has this path.
    NotFound,
    /// The path exists with another method.
    MethodNotAllowed(Method),
}

/// Looks up the endpoint for `method` and `path`.
pub fn find_route(method: &Method, path: &str) -> Result<Endpoint, RouteError> {
    let route = ROUTES
        .iter()
        .find(|r| r.path == path)
        .ok_or(RouteError::NotFound)?;
    if route.method == *method {
        Ok(route.endpoint)
    } else {
        Err(RouteError::MethodNotAllowed(route.method.clone()))
    }
}

/// Parses `body` as a JSON object (arrays would otherwise fill struct fields
/// by position) and then as `T`, rejecting unknown fields.
fn parse_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if !value.is_object() {
        return Err("expected a JSON object".to_string());
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// Accepts an absent body or `{}` for endpoints that take no parameters.
/// Only an empty body is absent: one of only whitespace is not JSON and is
/// refused like any other (schemathesis found `"\n"` taken for `{}`).
fn no_body(endpoint: Endpoint, body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    parse_object::<EmptyRequest>(body).map(|_| ()).map_err(|e| {
        ApiError::bad_request(format!(
            "{} takes no parameters, so its body must be empty or {{}}: {e}",
            endpoint.name()
        ))
    })
}

/// Parses a JSON object body; an empty body counts as `{}` when `empty_ok`.
fn json_body<T: DeserializeOwned>(
    endpoint: Endpoint,
    body: &[u8],
    empty_ok: bool,
) -> Result<T, ApiError> {
    // Empty only, as in `no_body`: whitespace is invalid JSON.
    let body: &[u8] = match (body.is_empty(), empty_ok) {
        (true, true) => b"{}",
        (true, false) => {
            return Err(ApiError::bad_request(format!(
                "{} needs a JSON object as its request body",
                endpoint.name()
            )))
        }
        (false, _) => body,
    };
    parse_object(body).map_err(|e| {
        ApiError::bad_request(format!("invalid {} request body: {e}", endpoint.name()))
    })
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The tokio runtime could not be built.
    #[error("cannot create the API server's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The API thread could not be spawned.
    #[error("cannot spawn the API thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The thread hook (see [`set_thread_hook`]) failed: the API thread
    /// ended without serving.
    #[error("{0}")]
    ThreadHook(String),
}

/// What every connection task shares.
struct Context {
    sender: Sender<ApiMessage>,
    wake: EventFd,
    events: Option<EventBus>,
    /// Answer `vmm.ping` here with this version (see [`ServerOptions`]).
    ping_version: Option<String>,
}

impl Context {
    /// Hands `request` to the VMM and waits for its answer.
    async fn dispatch(&self, request: ApiRequest) -> ApiReply {
        let name = request.name();
        let (message, answer) = ApiMessage::new(request);
        if self.sender.send(message).is_err() {
            return Err(ApiError::internal(
                "the VMM is no longer accepting API requests",
            ));
        }
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the VMM for {name}: {e}");
        }
        answer.recv().await.unwrap_or_else(|| {
            Err(ApiError::internal(format!(
                "the VMM dropped the {name} request without answering"
            )))
        })
    }
}

/// The body of an event stream: lines handed over by the follower task.
pub struct EventBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// An answer's body: whole, or an event stream.
type ApiBody = http_body_util::Either<Full<Bytes>, EventBody>;

type HttpResponse = Response<ApiBody>;

/// Lines in flight between a follower task and its connection; beyond
/// them, events wait in the follower's queue (see [`crate::events`]).
const STREAM_LINES_IN_FLIGHT: usize = 16;

/// `GET vm.events`: a kept-open answer of newline-delimited JSON events.
/// A task follows the bus and hands lines to the body; when the client does
/// not read, the body is not polled, the task waits, and the bus drops the
/// events this follower cannot hold (counted, and reported to it).
fn events_response(ctx: &Context) -> HttpResponse {
    let Some(bus) = &ctx.events else {
        return error_response(StatusCode::NOT_FOUND, "this server has no event stream");
    };
    let sub = bus.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_LINES_IN_FLIGHT);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tx.closed() => break,
                ev = sub.next() => match ev {
                    Some(e) => {
                        if tx.send(Bytes::from(e.to_line())).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
    });
    let mut resp = Response::new(http_body_util::Either::Right(EventBody(rx)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

fn bytes_response(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    if status != StatusCode::NO_CONTENT {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    resp
}

fn error_response(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    let body = ErrorBody {
        error: message.into(),
    };
    let bytes = serde_json::to_vec(&body)
        .unwrap_or_else(|_| br#"{"error":"the error message could not be encoded"}"#.to_vec());
    bytes_response(status, bytes)
}

fn api_error_response(e: ApiError) -> HttpResponse {
    let status =
        StatusCode::from_u16(e.kind.status_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_response(status, e.message)
}

fn json_response<T: Serialize>(value: &T) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(bytes) => bytes_response(StatusCode::OK, bytes),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        ),
    }
}

fn reply_response(endpoint: Endpoint, reply: ApiReply) -> HttpResponse {
    match reply {
        Ok(resp) if !endpoint.accepts(&resp) => {
            log::error!(
                "the VMM answered {} with the wrong kind of reply: {resp:?}",
                endpoint.name()
            );
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the VMM gave an unexpected answer to {}", endpoint.name()),
            )
        }
        Ok(ApiResponse::Empty) => bytes_response(StatusCode::NO_CONTENT, Vec::new()),
        Ok(ApiResponse::VmmPing(p)) => json_response(&p),
        Ok(ApiResponse::VmInfo(i)) => json_response(&i),
        Ok(ApiResponse::DeviceAdded(d)) => json_response(&d),
        Err(e) => api_error_response(e),
    }
}

/// Serves one HTTP request.
async fn handle(req: Request<Incoming>, ctx: &Context, received: &ReceivedFds) -> HttpResponse {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    log::debug!("API request {method} {path}");
    let endpoint = match find_route(&method, &path) {
        Ok(endpoint) => endpoint,
        Err(RouteError::NotFound) => {
            return error_response(
                StatusCode::NOT_FOUND,
                format!("unknown API endpoint '{path}'"),
            )
        }
        Err(RouteError::MethodNotAllowed(allowed)) => {
            let mut resp = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} accepts only {allowed}, not {method}"),
            );
            if let Ok(v) = HeaderValue::from_str(allowed.as_str()) {
                resp.headers_mut().insert(ALLOW, v);
            }
            return resp;
        }
    };
    let collect = Limited::new(req.into_body(), MAX_BODY_SIZE).collect();
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, collect).await {
        Err(_) => {
            log::warn!("API {method} {path}: the body did not arrive in time; closing");
            let mut resp = error_response(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            );
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        Ok(body) => body,
    };
    let body = match body {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("the request body is larger than {MAX_BODY_SIZE} bytes"),
            )
        }
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    };
    if endpoint == Endpoint::VmEvents {
        if let Err(e) = no_body(endpoint, &body) {
            return api_error_response(e);
        }
        return events_response(ctx);
    }
    if let (Endpoint::VmmPing, Some(version)) = (endpoint, &ctx.ping_version) {
        // Answered here, not by the VMM's loop: the API serves from the
        // VMM's first milliseconds, while the VM is still being built.
        if let Err(e) = no_body(endpoint, &body) {
            return api_error_response(e);
        }
        return json_response(&crate::types::VmmPingResponse {
            version: version.clone(),
        });
    }
    // Descriptors passed with this request: `vm.add-net` may use them;
    // any other request (or an error) closes them.
    let fds = received.take_all();
    let request = match endpoint.parse_request(&body) {
        Ok(ApiRequest::VmAddNet(config, _)) => ApiRequest::VmAddNet(config, fds),
        Ok(request) => request,
        Err(e) => return api_error_response(e),
    };
    let resp = reply_response(endpoint, ctx.dispatch(request).await);
    if resp.status().is_server_error() {
        log::warn!("API {method} {path} failed with {}", resp.status());
    }
    resp
}

/// One open connection, as the accept loop sees it.
#[derive(Default)]
struct Slot {
    /// Requests in progress (handler running: body, VMM, answer).
    busy: AtomicUsize,
    /// Closes the connection to make room for a new one.
    evict: Notify,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Registry {
    next: u64,
    open: BTreeMap<u64, Arc<Slot>>,
}

type SharedRegistry = Arc<Mutex<Registry>>;

fn lock(registry: &SharedRegistry) -> std::sync::MutexGuard<'_, Registry> {
    // The registry stays consistent whatever panicked while holding it.
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Makes room for one more connection: under the cap there is room;
    /// at the cap the oldest idle connection is evicted; with none idle
    /// there is no room.
    fn admit(&mut self, max: usize) -> Option<(u64, Arc<Slot>)> {
        while self.open.len() >= max {
            let idle = self
                .open
                .iter()
                .find(|(_, s)| s.busy.load(Ordering::SeqCst) == 0)
                .map(|(id, _)| *id)?;
            if let Some(slot) = self.open.remove(&idle) {
                log::debug!("closing an idle API connection to make room");
                slot.evict.notify_one();
            }
        }
        let id = self.next;
        self.next += 1;
        let slot = Arc::new(Slot::default());
        self.open.insert(id, Arc::clone(&slot));
        Some((id, slot))
    }
}

/// Removes a connection from the registry when its task ends.
struct Registered {
    registry: SharedRegistry,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.registry).open.remove(&self.id);
    }
}

/// Marks a request in progress on its connection.
struct Busy(Arc<Slot>);

/// One connection taken before the API thread's runtime first ran whose
/// first request is not answered yet (see `start_server_with_options`).
struct Settling(Arc<AtomicUsize>);

impl Settling {
    fn new(count: &Arc<AtomicUsize>) -> Settling {
        count.fetch_add(1, Ordering::SeqCst);
        Settling(Arc::clone(count))
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Busy {
    fn new(slot: &Arc<Slot>) -> Busy {
        slot.busy.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(slot))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Descriptors this process has open. Linux 6.2 and later give the count
/// as the size of `/proc/self/fd` (one `statx`, however many are open);
/// older kernels report 0 there, and the directory is listed instead (one
/// entry per descriptor: a millisecond with a thousand, as a VMM with 64
/// disks has).
fn open_descriptors() -> Option<u64> {
    match std::fs::metadata("/proc/self/fd") {
        Ok(m) if m.len() > 0 => Some(m.len()),
        // The directory's own descriptor is listed too: count it as used.
        _ => Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64),
    }
}

/// Descriptors left under the soft `RLIMIT_NOFILE`; `None` when unlimited
/// or unknown.
fn descriptors_left() -> Option<u64> {
    // SAFETY: rlimit is plain old data; all-zeroes is a valid value.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit(2) writes into the rlimit we pass; checked.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(lim.rlim_cur.saturating_sub(open_descriptors()?))
}

/// How long a count of the free descriptors is trusted.
const FD_COUNT_FRESH: Duration = Duration::from_millis(100);

/// The accept loop's view of the free descriptors. Counting them (see
/// [`open_descriptors`]: on older kernels a listing of a directory with an
/// entry per descriptor, hundreds in a VMM with many devices) is too
/// costly for every connection: a count is reused for [`FD_COUNT_FRESH`],
/// less one per connection accepted since, and never when it was near
/// [`FD_RESERVE`].
#[derive(Default)]
struct FdBudget {
    /// The last count and when it was taken.
    last: Option<(std::time::Instant, Option<u64>)>,
    /// Connections accepted since.
    accepted: u64,
}

impl FdBudget {
    /// Whether fewer than [`FD_RESERVE`] descriptors are left; call once
    /// per accepted connection.
    fn short(&mut self, now: std::time::Instant) -> bool {
        self.short_with(now, descriptors_left)
    }

    /// [`FdBudget::short`] with the counting function given.
    fn short_with(&mut self, now: std::time::Instant, count: impl FnOnce() -> Option<u64>) -> bool {
        // Far enough from the reserve that a burst of connections and the
        // VMM's own descriptors within the freshness window cannot cross it.
        let far = 2 * FD_RESERVE + MAX_CONNECTIONS as u64;
        let left = match self.last {
            Some((at, left))
                if now.saturating_duration_since(at) < FD_COUNT_FRESH
                    && left.is_none_or(|l| l.saturating_sub(self.accepted) >= far) =>
            {
                left.map(|l| l.saturating_sub(self.accepted))
            }
            _ => {
                let left = count();
                self.last = Some((now, left));
                self.accepted = 0;
                left
            }
        };
        self.accepted += 1;
        left.is_some_and(|left| left < FD_RESERVE)
    }
}

/// Serves one connection until it ends, the server closes, or it is
/// evicted to make room.
async fn serve_connection(
    stream: UnixStream,
    ctx: Arc<Context>,
    mut closing: watch::Receiver<bool>,
    slot: Arc<Slot>,
    registered: Registered,
    settling: Option<Settling>,
) {
    let _registered = registered;
    let evict = Arc::clone(&slot);
    let stream = FdStream::new(stream);
    let received = stream.received();
    // Released when the first request's headers are in. The runtime cannot
    // park before the task that handles it yields: an answer ready at once
    // is written first; one that waits (for its body, or for the VMM, which
    // may itself wait for this thread to settle) lets the starter go on.
    let settling = Mutex::new(settling);
    let service = service_fn(move |req| {
        drop(
            settling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let ctx = Arc::clone(&ctx);
        let busy = Busy::new(&slot);
        let received = received.clone();
        async move {
            let resp = handle(req, &ctx, &received).await;
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let closed = async move {
        // An error means the server is gone: close as well.
        let _ = closing.wait_for(|c| *c).await;
    };
    // Eviction first: an evicted connection must not start a request (the
    // accept loop and the connections share one thread, so it was idle
    // when it was chosen).
    tokio::select! {
        biased;
        () = evict.evict.notified() => {}
        res = conn.as_mut() => {
            if let Err(e) = res {
                log::debug!("API connection ended with an error: {e}");
            }
        }
        () = closed => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                log::debug!("API connection ended with an error while closing: {e}");
            }
        }
    }
}

/// The accept loop; returns once `stop` fires (or its sender is dropped)
/// and the connections have finished or the grace period is over.
async fn serve(
    listener: UnixListener,
    ctx: Arc<Context>,
    mut stop: oneshot::Receiver<()>,
    early: Vec<(std::os::unix::net::UnixStream, Settling)>,
) {
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let registry = SharedRegistry::default();
    // Whether the last connection was refused (to log once per episode).
    let mut refusing = false;
    let mut fds = FdBudget::default();
    let mut early = early.into_iter();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = match early.next() {
            Some((stream, settling)) => stream
                .set_nonblocking(true)
                .and_then(|()| UnixStream::from_std(stream))
                .map(|stream| (stream, Some(settling))),
            None => tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => accepted.map(|(stream, _)| (stream, None)),
            },
        };
        match accepted {
            Ok((stream, settling)) => {
                if fds.short(std::time::Instant::now()) {
                    if !refusing {
                        log::warn!(
                            "fewer than {FD_RESERVE} descriptors left: refusing API connections"
                        );
                    }
                    refusing = true;
                    drop(stream);
                    continue;
                }
                let (admitted, evicted) = {
                    let mut registry = lock(&registry);
                    let full = registry.open.len() >= MAX_CONNECTIONS;
                    (registry.admit(MAX_CONNECTIONS), full)
                };
                let Some((id, slot)) = admitted else {
                    if !refusing {
                        log::warn!(
                            "{MAX_CONNECTIONS} API requests in progress: refusing connections"
                        );
                    }
                    refusing = true;
                    drop(stream);
                    continue;
                };
                refusing = false;
                let registered = Registered {
                    registry: Arc::clone(&registry),
                    id,
                };
                connections.spawn(serve_connection(
                    stream,
                    Arc::clone(&ctx),
                    closing_rx.clone(),
                    slot,
                    registered,
                    settling,
                ));
                if evicted {
                    // Let the evicted connection close before the next
                    // accept (a yield costs a wake-up of the runtime:
                    // only when needed).
                    tokio::task::yield_now().await;
                }
            }
            Err(e) => {
                log::warn!("cannot accept an API connection: {e}");
                // Typically out of descriptors: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        log::warn!("API requests still in flight at shutdown were abandoned");
    }
}

/// Owns the API thread: stops it and removes the socket when dropped.
#[derive(Debug)]
pub struct ApiServerHandle {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServerHandle {
    /// Path of the socket being served.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Stops the server, waits for the thread and removes the socket; the
    /// same as dropping the handle.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the API thread panicked");
            }
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Creates the socket at `path` and starts the API thread.
///
/// Each request becomes an [`ApiMessage`] sent on `sender`, followed by a
/// write of 1 to `wake` so the VMM's event loop looks at the channel. The
/// socket is ready for connections when this returns, and the API thread
/// has run its thread hook (bounded by one second) and then been idle once:
/// the first request of each client that connected meanwhile has been
/// answered, or waits for its body or for the VMM (bounded by 100 ms).
///
/// To make shutdown immediate, the VMM should drop its receiver (and any
/// unanswered [`crate::ReplySender`]) before dropping the handle: requests
/// still waiting for an answer otherwise hold shutdown for up to
/// [`SHUTDOWN_GRACE`].
pub fn start_server(
    path: impl AsRef<Path>,
    sender: Sender<ApiMessage>,
    wake: EventFd,
) -> Result<ApiServerHandle, ServerError> {
    start_server_with_events(path, sender, wake, None)
}

/// [`start_server`], with `GET vm.events` following `events` (without a
/// bus, that endpoint answers 404). Close the bus before dropping the
/// handle, so that event streams end and shutdown does not wait for them.
pub fn start_server_with_events(
    path: impl AsRef<Path>,
    sender: Sender<ApiMessage>,
    wake: EventFd,
    events: Option<EventBus>,
) -> Result<ApiServerHandle, ServerError> {
    start_server_with_options(
        path,
        sender,
        wake,
        ServerOptions {
            events,
            ping_version: None,
        },
    )
}

/// What the server does beyond handing requests to the VMM.
#[derive(Default)]
pub struct ServerOptions {
    /// `GET vm.events` follows this bus (without one, that endpoint
    /// answers 404).
    pub events: Option<EventBus>,
    /// With a version, the server answers `vmm.ping` itself, so the API
    /// answers while the VMM is still building the VM (the answer then
    /// says the process serves its API; `vm.info` tells about the VM).
    /// Without, `vmm.ping` goes to the VMM like every request.
    pub ping_version: Option<String>,
}

/// [`start_server`] with [`ServerOptions`].
pub fn start_server_with_options(
    path: impl AsRef<Path>,
    sender: Sender<ApiMessage>,
    wake: EventFd,
    options: ServerOptions,
) -> Result<ApiServerHandle, ServerError> {
    let ServerOptions {
        events,
        ping_version,
    } = options;
    let path = path.as_ref();
    let (std_listener, socket_file) = socket::bind(path)?;
    // Sent once by the thread: its hook's failure, or that it is about to
    // serve.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    // Sent once, at the runtime's first park with no early client (see
    // below) unanswered.
    let (idle_tx, idle_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let idle_tx = Mutex::new(Some(idle_tx));
    // Connections taken before the runtime first ran whose first request
    // is not answered yet: the thread is idle only once they are.
    let settling = Arc::new(AtomicUsize::new(0));
    let on_park = {
        let settling = Arc::clone(&settling);
        move || {
            if settling.load(Ordering::SeqCst) == 0 {
                let taken = idle_tx
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(tx) = taken {
                    let _ = tx.send(());
                }
            }
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(on_park)
        .build()
        .map_err(ServerError::Runtime)?;
    let ctx = Arc::new(Context {
        sender,
        wake,
        events,
        ping_version,
    });
    let (stop_tx, stop_rx) = oneshot::channel();
    let socket_path = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("arbor-api".to_string())
        .spawn(move || {
            // Dropped last: the socket disappears once nothing listens on it.
            let _socket_file = socket_file;
            if let Some(hook) = THREAD_HOOK.get() {
                if let Err(e) = hook(&socket_path) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            }
            // Clients that connected while the thread started (a client
            // polling for the socket): taken now, before the runtime's
            // first park, which would otherwise hand the CPU back to the
            // starter before it has seen them. The listener is
            // non-blocking (`socket::bind`): this stops at the first
            // `EAGAIN`.
            let mut early = Vec::new();
            while early.len() < MAX_CONNECTIONS {
                match std_listener.accept() {
                    Ok((stream, _)) => early.push((stream, Settling::new(&settling))),
                    Err(_) => break,
                }
            }
            let listener = {
                let _guard = runtime.enter();
                match UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot serve the API socket: {e}")));
                        return;
                    }
                }
            };
            let _ = ready_tx.send(Ok(()));
            runtime.block_on(serve(listener, ctx, stop_rx, early));
            drop(runtime);
        })
        .map_err(ServerError::Thread)?;
    // Wait until the thread has run its hook, then until it is first idle
    // (its runtime parks), so that connections already waiting are
    // answered first. Here a woken thread that has to wait for another CPU
    // can wait milliseconds while its starter goes on building the VM;
    // waiting hands it this one. Both bounded, and a thread that died
    // early only makes this return sooner.
    match ready_rx.recv_timeout(READY_WAIT) {
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(ServerError::ThreadHook(e));
        }
        Ok(Ok(())) => {
            let _ = idle_rx.recv_timeout(SETTLE_WAIT);
        }
        Err(_) => {}
    }
    log::info!("API server listening on {}", path.display());
    Ok(ApiServerHandle {
        path: path.to_path_buf(),
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// The hook API threads run first (see [`set_thread_hook`]).
pub type ThreadHook = fn(socket: &Path) -> Result<(), String>;

/// A function the API thread runs first, once its runtime is built (the
/// VMM confines the thread there). Process-wide; none by default.
static THREAD_HOOK: std::sync::OnceLock<ThreadHook> = std::sync::OnceLock::new();

/// Sets the hook run first by API threads started from now on, with the
/// socket's path. If it fails, the thread ends without serving and
/// [`start_server`] returns [`ServerError::ThreadHook`] with its message.
/// Only the first call has an effect.
pub fn set_thread_hook(hook: ThreadHook) {
    let _ = THREAD_HOOK.set(hook);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn route_table_is_consistent() {
        let mut paths = HashSet::new();
        let mut endpoints = HashSet::new();
        for r in ROUTES {
            assert!(r.path.starts_with(API_PREFIX), "{}", r.path);
            assert!(paths.insert(r.path), "duplicate path {}", r.path);
            assert!(endpoints.insert(r.endpoint), "duplicate {:?}", r.endpoint);
        }
        let all: HashSet<_> = Endpoint::ALL.iter().copied().collect();
        assert_eq!(endpoints, all);
    }

    #[test]
    fn lookup() {
        assert_eq!(
            find_route(&Method::GET, "/api/v1/vm.info"),
            Ok(Endpoint::VmInfo)
        );
        assert_eq!(
            find_route(&Method::PUT, "/api/v1/vm.info"),
            Err(RouteError::MethodNotAllowed(Method::GET))
        );
        assert_eq!(
            find_route(&Method::GET, "/api/v1/vm.nothing"),
            Err(RouteError::NotFound)
        );
        assert_eq!(Endpoint::VmAddDisk.name(), "vm.add-disk");
    }

    #[test]
    fn open_descriptors_counts_what_is_open() {
        // Other test threads open and close descriptors meanwhile: one
        // quiet attempt out of many must see exactly the five opened.
        let mut seen = Vec::new();
        for _ in 0..50 {
            let before = open_descriptors().unwrap();
            let files: Vec<_> = (0..5)
                .map(|_| std::fs::File::open("/proc/self/status").unwrap())
                .collect();
            let with = open_descriptors().unwrap();
            drop(files);
            if with == before + 5 {
                return;
            }
            seen.push((before, with));
        }
        panic!("never counted five more descriptors: {seen:?}");
    }

    #[test]
    fn descriptor_counts_are_reused_only_while_fresh_and_far_from_the_reserve() {
        let t0 = std::time::Instant::now();
        let mut b = FdBudget::default();
        let mut counts = 0;
        let mut count = |left: u64| {
            counts += 1;
            Some(left)
        };
        assert!(!b.short_with(t0, || count(10_000)));
        // Fresh and far: reused.
        assert!(!b.short_with(t0 + Duration::from_millis(50), || count(0)));
        // Stale: counted again, and now short.
        assert!(b.short_with(t0 + FD_COUNT_FRESH, || count(FD_RESERVE - 1)));
        // Near the reserve: counted every time.
        let t1 = t0 + FD_COUNT_FRESH;
        assert!(!b.short_with(t1, || count(FD_RESERVE + 10)));
        assert!(b.short_with(t1, || count(FD_RESERVE - 1)));
        assert_eq!(counts, 4);
        // Unlimited: never short, and reused while fresh.
        let mut b = FdBudget::default();
        assert!(!b.short_with(t0, || None));
        assert!(!b.short_with(t0, || Some(0)));
    }

    #[test]
    fn admission_evicts_the_oldest_idle_connection() {
        let mut reg = Registry::default();
        let slots: Vec<_> = (0..3).map(|_| reg.admit(3).unwrap()).collect();
        // The oldest is busy: the next oldest idle one makes room.
        let _busy = Busy::new(&slots[0].1);
        let (id, _) = reg.admit(3).unwrap();
        assert_eq!(id, 3);
        let open: Vec<u64> = reg.open.keys().copied().collect();
        assert_eq!(open, [0, 2, 3]);
        // The evicted connection is told at once (the permit is stored).
        let evicted = Arc::clone(&slots[1].1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), evicted.evict.notified())
                .await
                .unwrap()
        });
        // Every connection busy: no room, nothing evicted.
        let _b2 = Busy::new(&slots[2].1);
        let all: Vec<_> = reg.open.values().cloned().collect();
        let _b3 = Busy::new(&all[2]);
        assert!(reg.admit(3).is_none());
        assert_eq!(reg.open.len(), 3);
    }

    #[test]
    fn request_parsing() {
        assert_eq!(
            Endpoint::VmPause.parse_request(b""),
            Ok(ApiRequest::VmPause)
        );
        assert_eq!(
            Endpoint::VmPause.parse_request(b" {} "),
            Ok(ApiRequest::VmPause)
        );
        let e = Endpoint::VmPause
            .parse_request(b"{\"now\":true}")
            .unwrap_err();
        assert!(e.message.contains("takes no parameters"), "{e}");
        assert_eq!(
            Endpoint::VmAddRng.parse_request(b""),
            Ok(ApiRequest::VmAddRng(RngConfig::default()))
        );
        let e = Endpoint::VmAddDisk.parse_request(b"").unwrap_err();
        assert_eq!(
            e.message,
            "vm.add-disk needs a JSON object as its request body"
        );
        let e = Endpoint::VmAddDisk
            .parse_request(br#"{"path":"/a","bogus":1}"#)
            .unwrap_err();
        assert!(e.message.contains("unknown field `bogus`"), "{e}");
        let e = Endpoint::VmRemoveDevice
            .parse_request(br#"{"id":"has space"}"#)
            .unwrap_err();
        assert!(e.message.contains("'id' may contain only"), "{e}");
    }

    #[test]
    fn a_parsed_body_survives_its_own_json() {
        // Found by the http_request fuzz target: without exact float
        // parsing, a number read back from its own JSON differed in the
        // last digit.
        let body = br#"{"i/":7777777777777776.277}"#;
        let first = Endpoint::VmCreate.parse_request(body).unwrap();
        let ApiRequest::VmCreate(value) = &first else {
            panic!("{first:?}");
        };
        let again = serde_json::to_vec(value).unwrap();
        assert_eq!(Endpoint::VmCreate.parse_request(&again), Ok(first));
    }
}

//! What the API thread hands to the VMM, and what the VMM answers.
//!
//! The API thread parses and validates each HTTP request into an
//! [`ApiRequest`], wraps it in an [`ApiMessage`] together with a one-shot
//! [`ReplySender`], sends the message on a `std::sync::mpsc` channel and
//! writes the VMM's wake-up `EventFd`. The VMM, in its event loop, drains the
//! channel and answers each message exactly once:
//!
//! ```no_run
//! # use api::{ApiMessage, ApiRequest, ApiResponse, ApiError, ApiReply};
//! # fn handle(r: ApiRequest) -> ApiReply { Err(ApiError::internal("x")) }
//! # let (tx, rx) = std::sync::mpsc::channel::<ApiMessage>();
//! while let Ok(ApiMessage { request, reply }) = rx.try_recv() {
//!     let answer = handle(request);
//!     // The requester may have gone (client disconnected): nothing to do.
//!     let _ = reply.send(answer);
//! }
//! ```
//!
//! Sending never blocks, so the VMM may answer from any thread, now or later
//! (for instance once the guest has acknowledged a hot-unplug).

use tokio::sync::oneshot;

use crate::fd_passing::PassedFds;
use crate::types::{
    AddDeviceResponse, DiskConfig, NetConfig, RemoveDeviceRequest, RngConfig, VmInfo,
    VmmPingResponse, VsockConfig,
};
use crate::types::{DeviceConfig, UserDeviceConfig};

/// A validated request for the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET vmm.ping`: answer [`ApiResponse::VmmPing`].
    VmmPing,
    /// `PUT vmm.shutdown`: answer [`ApiResponse::Empty`], then stop the VMM
    /// (dropping the [`crate::ApiServerHandle`] still delivers the answer).
    VmmShutdown,
    /// `GET vm.info`: answer [`ApiResponse::VmInfo`].
    VmInfo,
    /// `PUT vm.pause`: answer [`ApiResponse::Empty`]; 409 if not running.
    VmPause,
    /// `PUT vm.resume`: answer [`ApiResponse::Empty`]; 409 if not paused.
    VmResume,
    /// `PUT vm.shutdown`: answer [`ApiResponse::Empty`].
    VmShutdown,
    /// `PUT vm.add-disk`: answer [`ApiResponse::DeviceAdded`].
    VmAddDisk(DiskConfig),
    /// `PUT vm.add-rng`: answer [`ApiResponse::DeviceAdded`].
    VmAddRng(RngConfig),
    /// `PUT vm.add-net`: answer [`ApiResponse::DeviceAdded`]. The
    /// descriptors passed with the request (`"fd": N` names the N-th).
    VmAddNet(NetConfig, PassedFds),
    /// `PUT vm.remove-device`: answer [`ApiResponse::Empty`] once the device
    /// is gone; 404 for an unknown id.
    VmRemoveDevice(RemoveDeviceRequest),
    /// `PUT vm.create`: the whole VM configuration, a JSON object the VMM
    /// parses as its command line (`vmm::VmConfig::from_json`); answer
    /// [`ApiResponse::VmInfo`] of the created VM; 400 for a bad
    /// configuration, 409 when a VM exists.
    VmCreate(Box<serde_json::Value>),
    /// `PUT vm.boot`: answer [`ApiResponse::Empty`] once the vCPUs run; 409
    /// unless the VM is created.
    VmBoot,
    /// `PUT vm.delete`: answer [`ApiResponse::Empty`] once the VM is gone;
    /// 409 unless it is created or shut down.
    VmDelete,
    /// `PUT vm.add-vsock`: answer [`ApiResponse::DeviceAdded`]; 409 when the
    /// VM has a vsock device already.
    VmAddVsock(VsockConfig),
    /// `PUT vm.add-user-device`: answer [`ApiResponse::DeviceAdded`].
    VmAddUserDevice(UserDeviceConfig),
    /// `PUT vm.add-device`: answer [`ApiResponse::DeviceAdded`].
    VmAddDevice(DeviceConfig),
}

impl ApiRequest {
    /// The endpoint name, e.g. `vm.add-disk`, for logs and messages.
    pub fn name(&self) -> &'static str {
        match self {
            ApiRequest::VmmPing => "vmm.ping",
            ApiRequest::VmmShutdown => "vmm.shutdown",
            ApiRequest::VmInfo => "vm.info",
            ApiRequest::VmPause => "vm.pause",
            ApiRequest::VmResume => "vm.resume",
            ApiRequest::VmShutdown => "vm.shutdown",
            ApiRequest::VmAddDisk(_) => "vm.add-disk",
            ApiRequest::VmAddRng(_) => "vm.add-rng",
            ApiRequest::VmAddNet(..) => "vm.add-net",
            ApiRequest::VmRemoveDevice(_) => "vm.remove-device",
            ApiRequest::VmCreate(_) => "vm.create",
            ApiRequest::VmBoot => "vm.boot",
            ApiRequest::VmDelete => "vm.delete",
            ApiRequest::VmAddVsock(_) => "vm.add-vsock",
            ApiRequest::VmAddUserDevice(_) => "vm.add-user-device",
            ApiRequest::VmAddDevice(_) => "vm.add-device",
        }
    }
}

/// A successful answer from the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiResponse {
    /// No body: HTTP 204.
    Empty,
    /// HTTP 200 with a [`VmmPingResponse`].
    VmmPing(VmmPingResponse),
    /// HTTP 200 with a [`VmInfo`].
    VmInfo(VmInfo),
    /// HTTP 200 with an [`AddDeviceResponse`].
    DeviceAdded(AddDeviceResponse),
}

/// The HTTP status class of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// 400: the request is malformed or its values are invalid.
    BadRequest,
    /// 404: unknown device or port id (or unknown route).
    NotFound,
    /// 409: the request is valid but clashes with the VM's state: no free
    /// slot, duplicate id, wrong life-cycle state.
    Conflict,
    /// 500: the VMM failed.
    Internal,
}

impl ApiErrorKind {
    /// The HTTP status code.
    pub fn status_code(self) -> u16 {
        match self {
            ApiErrorKind::BadRequest => 400,
            ApiErrorKind::NotFound => 404,
            ApiErrorKind::Conflict => 409,
            ApiErrorKind::Internal => 500,
        }
    }

    /// The kind for a status code, if it is one of the four.
    pub fn from_status_code(code: u16) -> Option<Self> {
        match code {
            400 => Some(ApiErrorKind::BadRequest),
            404 => Some(ApiErrorKind::NotFound),
            409 => Some(ApiErrorKind::Conflict),
            500 => Some(ApiErrorKind::Internal),
            _ => None,
        }
    }
}

/// A failed request: a status class and one sentence for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Which HTTP status the error maps to.
    pub kind: ApiErrorKind,
    /// One clear sentence, sent as `{"error": message}`.
    pub message: String,
}

impl ApiError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    /// A 400 error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::BadRequest, message)
    }

    /// A 404 error.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::NotFound, message)
    }

    /// A 409 error.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Conflict, message)
    }

    /// A 500 error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Internal, message)
    }
}

/// The VMM's answer to one request.
pub type ApiReply = Result<ApiResponse, ApiError>;

/// The sending half of a request's reply channel. Sending never blocks.
#[derive(Debug)]
pub struct ReplySender(oneshot::Sender<ApiReply>);

impl ReplySender {
    /// Delivers the answer. Fails, handing the answer back, when the
    /// requester is gone (the client disconnected or the server stopped).
    pub fn send(self, reply: ApiReply) -> Result<(), ApiReply> {
        self.0.send(reply)
    }

    /// Whether the requester is gone, so the answer would be dropped.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The receiving half of a request's reply channel.
#[derive(Debug)]
pub struct ReplyReceiver(oneshot::Receiver<ApiReply>);

impl ReplyReceiver {
    /// Waits for the answer; `None` if the [`ReplySender`] was dropped
    /// without answering.
    pub async fn recv(self) -> Option<ApiReply> {
        self.0.await.ok()
    }

    /// Blocking version of [`ReplyReceiver::recv`]; must not be called from
    /// inside an async runtime.
    pub fn blocking_recv(self) -> Option<ApiReply> {
        self.0.blocking_recv().ok()
    }
}

/// A request on its way to the VMM, with the channel for the answer.
#[derive(Debug)]
pub struct ApiMessage {
    /// The validated request.
    pub request: ApiRequest,
    /// Where the answer goes; answer exactly once.
    pub reply: ReplySender,
}

impl ApiMessage {
    /// Wraps `request`, returning the message and the receiver for its
    /// answer.
    pub fn new(request: ApiRequest) -> (ApiMessage, ReplyReceiver) {
        let (tx, rx) = oneshot::channel();
        (
            ApiMessage {
                request,
                reply: ReplySender(tx),
            },
            ReplyReceiver(rx),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_round_trip() {
        let (msg, rx) = ApiMessage::new(ApiRequest::VmPause);
        assert_eq!(msg.request.name(), "vm.pause");
        assert!(!msg.reply.is_closed());
        msg.reply.send(Ok(ApiResponse::Empty)).unwrap();
        assert_eq!(rx.blocking_recv(), Some(Ok(ApiResponse::Empty)));
    }

    #[test]
    fn dropped_sender_and_receiver() {
        let (msg, rx) = ApiMessage::new(ApiRequest::VmInfo);
        drop(msg);
        assert_eq!(rx.blocking_recv(), None);
        let (msg, rx) = ApiMessage::new(ApiRequest::VmInfo);
        drop(rx);
        assert!(msg.reply.is_closed());
        assert!(msg.reply.send(Err(ApiError::internal("x"))).is_err());
    }

    #[test]
    fn status_codes() {
        for kind in [
            ApiErrorKind::BadRequest,
            ApiErrorKind::NotFound,
            ApiErrorKind::Conflict,
            ApiErrorKind::Internal,
        ] {
            assert_eq!(
                ApiErrorKind::from_status_code(kind.status_code()),
                Some(kind)
            );
        }
        assert_eq!(ApiErrorKind::from_status_code(405), None);
    }
}

//! Arbor's HTTP/JSON control API.
//!
//! The VMM is controlled over a UNIX socket carrying HTTP/1.1 with JSON
//! bodies, under `/api/v1/`. This crate holds everything on the API side of
//! the VMM and nothing of the VMM itself:
//!
//! - [`types`]: the JSON wire types and their validation.
//! - [`message`]: [`ApiRequest`], [`ApiResponse`], [`ApiError`] and the
//!   [`ApiMessage`] the API thread sends to the VMM.
//! - [`server`]: [`start_server`], the route table [`ROUTES`] and the
//!   request handling.
//! - [`socket`]: creation (mode 0600, stale-socket replacement) and removal
//!   of the socket file.
//! - [`client`]: a blocking client with one function per endpoint.
//! - [`events`]: [`events::VmEvent`] and the bus that fans the event
//!   stream out to followers without blocking the VMM.
//! - [`fd_passing`]: descriptors passed with a request (`SCM_RIGHTS`),
//!   for `vm.add-net` with `fd`.
//! - [`kv`]: the `key=value,key=value` option parser shared with the `arbor`
//!   command line.
//!
//! `openapi.json` next to this crate's `Cargo.toml` documents the API; a
//! test keeps it in step with [`ROUTES`].

pub mod client;
pub mod events;
pub mod fd_passing;
pub mod kv;
pub mod message;
pub mod server;
pub mod socket;
pub mod types;

pub use hyper::Method;
pub use message::{
    ApiError, ApiErrorKind, ApiMessage, ApiReply, ApiRequest, ApiResponse, ReplyReceiver,
    ReplySender,
};
pub use server::{
    set_thread_hook, start_server, start_server_with_events, start_server_with_options,
    ApiServerHandle, Endpoint, Route, ServerError, ServerOptions, ThreadHook, API_PREFIX, ROUTES,
};
pub use socket::SocketError;

/// The OpenAPI 3 description of the API (the contents of `openapi.json`).
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

//! Bytes -> the API's request routing and body parsing.
//!
//! Input: one byte choosing the method, then the path up to the first `\n`,
//! then the body. Exercises `api::server::find_route` and
//! `Endpoint::parse_request` (what the HTTP server runs on every request)
//! without starting a server. Invariant: a request that parses survives a
//! JSON round trip unchanged.

#![no_main]

use api::server::find_route;
use api::{ApiRequest, Method};
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 6] = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = Method::from_bytes(METHODS[usize::from(m) % METHODS.len()].as_bytes()).unwrap();
    let (path, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    // The server sees paths as UTF-8 strings (hyper's URI); short paths
    // that do not name a route are the common case.
    let path = String::from_utf8_lossy(path);
    let Ok(endpoint) = find_route(&method, &path) else {
        return;
    };
    assert_eq!(endpoint.path(), path);
    assert_eq!(endpoint.method(), method);
    let Ok(request) = endpoint.parse_request(body) else {
        return;
    };
    // What was accepted is accepted again, unchanged, from its own JSON.
    let json = match &request {
        ApiRequest::VmAddDisk(c) => serde_json::to_vec(c).unwrap(),
        ApiRequest::VmAddRng(c) => serde_json::to_vec(c).unwrap(),
        ApiRequest::VmAddVsock(c) => serde_json::to_vec(c).unwrap(),
        ApiRequest::VmRemoveDevice(r) => serde_json::to_vec(r).unwrap(),
        ApiRequest::VmAddUserDevice(c) => serde_json::to_vec(c).unwrap(),
        ApiRequest::VmAddDevice(c) => serde_json::to_vec(c).unwrap(),
        ApiRequest::VmCreate(v) => serde_json::to_vec(v).unwrap(),
        _ => b"{}".to_vec(),
    };
    assert_eq!(endpoint.parse_request(&json).as_ref(), Ok(&request));
});

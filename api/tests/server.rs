//! The API server against a fake VMM: every route, request validation, error
//! mapping, and the socket's life cycle.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api::client::{Client, ClientError, RawResponse};
use api::types::{DeviceKind, DiskConfig, RngConfig, VmState};
use api::{start_server, ApiErrorKind, Method, ServerError, SocketError, ROUTES};
use common::{Fixture, FAKE_VERSION, SLOW_REPLY};
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

fn raw(f: &Fixture, method: Method, path: &str, body: &str) -> RawResponse {
    let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
    f.client().request(method, path, body).unwrap()
}

fn error_of(r: &RawResponse) -> String {
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 1, "error body has exactly one field: {v}");
    obj["error"].as_str().unwrap().to_string()
}

fn expect_error(r: &RawResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let msg = error_of(r);
    assert!(msg.contains(needle), "'{msg}' lacks '{needle}'");
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/json",
        "error bodies are JSON"
    );
}

#[test]
fn ping_goes_through_the_vmm_and_wakes_it() {
    let f = Fixture::new();
    let r = raw(&f, Method::GET, "/api/v1/vmm.ping", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("content-type").unwrap(), "application/json");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v, json!({"version": FAKE_VERSION}));
    assert_eq!(f.client().vmm_ping().unwrap().version, FAKE_VERSION);
    assert!(f.wakes.load(Ordering::SeqCst) >= 2);
}

#[test]
fn info_lists_devices_and_topology() {
    let f = Fixture::new();
    let r = raw(&f, Method::GET, "/api/v1/vm.info", "");
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["devices"][0]["id"], "rootdisk");
    assert_eq!(v["devices"][0]["kind"], "disk");
    assert_eq!(v["devices"][0]["pci_path"], "00:02.0");
    assert_eq!(v["devices"][0]["hotplugged"], false);
    let rp0 = &v["topology"][0];
    assert_eq!(rp0["id"], "rp0");
    assert_eq!(rp0["type"], "pcie_root_port");
    assert_eq!(rp0["hotplug"], "pcie_native");
    assert_eq!(rp0["pci_path"], "00:04.0");
    assert_eq!(rp0["secondary_bus"], Value::Null);
    assert_eq!(rp0["slots"][0]["device"], Value::Null);
    let info = f.client().vm_info().unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.topology.len(), 2);
}

#[test]
fn add_and_remove_devices() {
    let f = Fixture::new();
    let c = f.client();

    let r = raw(
        &f,
        Method::PUT,
        "/api/v1/vm.add-disk",
        r#"{"path": "/images/data.raw", "readonly": true, "id": "data", "serial": "SN1", "port": "rp0"}"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v, json!({"id": "data", "pci_path": "00:04.0/00.0"}));

    // The port's only slot is now taken.
    let r = raw(
        &f,
        Method::PUT,
        "/api/v1/vm.add-disk",
        r#"{"path": "/b", "port": "rp0"}"#,
    );
    expect_error(&r, 409, "no free slot");
    // Duplicate id.
    let r = raw(
        &f,
        Method::PUT,
        "/api/v1/vm.add-disk",
        r#"{"path": "/b", "id": "data"}"#,
    );
    expect_error(&r, 409, "exists");
    // Unknown port.
    let r = raw(&f, Method::PUT, "/api/v1/vm.add-rng", r#"{"port": "nope"}"#);
    expect_error(&r, 404, "no port 'nope'");

    // Exact placement, typed client.
    let added = c
        .vm_add_rng(&RngConfig {
            id: Some("rng0".into()),
            pci_path: Some("00:05.0/01.0".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(added.pci_path, "00:05.0/01.0");
    // A body of only whitespace is not JSON: refused, nothing added.
    let r = raw(&f, Method::PUT, "/api/v1/vm.add-rng", "\n");
    expect_error(&r, 400, "invalid vm.add-rng request body");
    assert_eq!(c.vm_info().unwrap().devices.len(), 3);
    // An empty body means all defaults for add-rng.
    let r = raw(&f, Method::PUT, "/api/v1/vm.add-rng", "");
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("rng"), "{v}");

    let info = c.vm_info().unwrap();
    let data = info.devices.iter().find(|d| d.id == "data").unwrap();
    assert_eq!(data.kind, DeviceKind::Disk);
    assert!(data.hotplugged);
    assert_eq!(data.readonly, Some(true));
    assert_eq!(data.serial.as_deref(), Some("SN1"));
    assert_eq!(data.port.as_deref(), Some("rp0"));
    assert_eq!(info.devices.len(), 4);

    let r = raw(
        &f,
        Method::PUT,
        "/api/v1/vm.remove-device",
        r#"{"id": "data"}"#,
    );
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let r = raw(
        &f,
        Method::PUT,
        "/api/v1/vm.remove-device",
        r#"{"id": "data"}"#,
    );
    expect_error(&r, 404, "no device 'data'");
    let e = c.vm_remove_device("data").unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::NotFound));
    c.vm_remove_device("rng0").unwrap();

    // The slot is free again.
    let added = c
        .vm_add_disk(&DiskConfig {
            path: "/c".into(),
            port: Some("rp0".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(added.pci_path, "00:04.0/00.0");
}

#[test]
fn life_cycle_routes_and_conflicts() {
    let f = Fixture::new();
    let c = f.client();
    let put = |path: &str| raw(&f, Method::PUT, path, "");

    expect_error(&put("/api/v1/vm.resume"), 409, "not paused");
    let r = put("/api/v1/vm.pause");
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert_eq!(c.vm_info().unwrap().state, VmState::Paused);
    expect_error(&put("/api/v1/vm.pause"), 409, "not running");
    c.vm_resume().unwrap();
    c.vm_pause().unwrap();
    assert_eq!(put("/api/v1/vm.resume").status, 204);
    assert_eq!(c.vm_info().unwrap().state, VmState::Running);
    // `{}` is accepted where no parameters are taken.
    assert_eq!(
        raw(&f, Method::PUT, "/api/v1/vm.shutdown", "{}").status,
        204
    );
    assert_eq!(c.vm_info().unwrap().state, VmState::Shutdown);
    let e = c.vm_shutdown().unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::Conflict));
    c.vmm_shutdown().unwrap();
    assert!(f.vm.lock().unwrap().vmm_shutdown_requested);
}

#[test]
fn malformed_requests_are_400() {
    let f = Fixture::new();
    let disk = "/api/v1/vm.add-disk";
    let cases: &[(&str, &str, &str)] = &[
        (
            disk,
            r#"{"path": "/a", "color": "red"}"#,
            "unknown field `color`",
        ),
        (disk, r#"{"path": "/a""#, "invalid vm.add-disk request body"),
        (disk, "not json", "invalid vm.add-disk request body"),
        (disk, r#"{"readonly": true}"#, "missing field `path`"),
        (disk, r#"{"path": 7}"#, "invalid type"),
        (disk, r#"{"path": "/a", "readonly": "yes"}"#, "invalid type"),
        (disk, r#"["/a"]"#, "expected a JSON object"),
        (disk, "null", "expected a JSON object"),
        (disk, "", "needs a JSON object"),
        (disk, r#"{"path": ""}"#, "'path' must not be empty"),
        (
            disk,
            r#"{"path": "/a", "id": "a b"}"#,
            "'id' may contain only",
        ),
        (
            disk,
            r#"{"path": "/a", "serial": "123456789012345678901"}"#,
            "'serial' is longer",
        ),
        (disk, r#"{"path": "/a", "pci_path": "0 0"}"#, "'pci_path'"),
        (
            "/api/v1/vm.add-rng",
            r#"{"iid": "x"}"#,
            "unknown field `iid`",
        ),
        (
            "/api/v1/vm.add-vsock",
            r#"{"cid": 3}"#,
            "missing field `socket`",
        ),
        (
            "/api/v1/vm.add-vsock",
            r#"{"cid": 2, "socket": "/v"}"#,
            "'cid' 2 is reserved",
        ),
        (
            "/api/v1/vm.add-vsock",
            r#"{"cid": 4294967295, "socket": "/v"}"#,
            "'cid' 4294967295 is reserved",
        ),
        (
            "/api/v1/vm.add-vsock",
            r#"{"cid": -3, "socket": "/v"}"#,
            "invalid value",
        ),
        (
            "/api/v1/vm.add-vsock",
            r#"{"cid": 3, "socket": "v.sock"}"#,
            "'socket' must be absolute",
        ),
        ("/api/v1/vm.remove-device", "{}", "missing field `id`"),
        (
            "/api/v1/vm.remove-device",
            r#"{"id": "x", "force": true}"#,
            "unknown field `force`",
        ),
        (
            "/api/v1/vm.remove-device",
            r#"{"id": ""}"#,
            "'id' must not be empty",
        ),
        (
            "/api/v1/vm.pause",
            r#"{"now": true}"#,
            "takes no parameters",
        ),
        ("/api/v1/vmm.shutdown", "[]", "expected a JSON object"),
        ("/api/v1/vm.resume", "null", "takes no parameters"),
    ];
    for (path, body, needle) in cases {
        let r = raw(&f, Method::PUT, path, body);
        expect_error(&r, 400, needle);
    }
    let r = raw(&f, Method::GET, "/api/v1/vm.info", r#"{"verbose": 1}"#);
    expect_error(&r, 400, "takes no parameters");
    // Nothing invalid reached the VMM: it still has only its cold-plugged disk.
    assert_eq!(f.vm.lock().unwrap().info.devices.len(), 1);
}

#[test]
fn oversized_body_is_400() {
    let f = Fixture::new();
    let big = format!(
        r#"{{"path": "{}"}}"#,
        "a".repeat(api::server::MAX_BODY_SIZE)
    );
    let r = raw(&f, Method::PUT, "/api/v1/vm.add-disk", &big);
    expect_error(&r, 400, "larger than");
}

#[test]
fn unknown_routes_are_404_and_wrong_methods_405() {
    let f = Fixture::new();
    for path in [
        "/",
        "/api/v1/",
        "/api/v1/vm.nothing",
        "/api/v2/vm.info",
        "/api/v1/vm.info/",
        "/api/v1/VM.INFO",
    ] {
        expect_error(&raw(&f, Method::GET, path, ""), 404, "unknown API endpoint");
    }
    let r = raw(&f, Method::PUT, "/api/v1/vm.info", "");
    expect_error(&r, 405, "accepts only GET");
    assert_eq!(r.headers.get("allow").unwrap(), "GET");
    let r = raw(&f, Method::GET, "/api/v1/vm.pause", "");
    expect_error(&r, 405, "accepts only PUT");
    assert_eq!(r.headers.get("allow").unwrap(), "PUT");
    let r = raw(&f, Method::POST, "/api/v1/vm.add-disk", r#"{"path": "/a"}"#);
    assert_eq!(r.status, 405);
    // A query string does not change the route.
    assert_eq!(raw(&f, Method::GET, "/api/v1/vmm.ping?x=1", "").status, 200);
}

#[test]
fn every_route_answers() {
    let f = Fixture::new();
    for route in ROUTES {
        let body = match route.path {
            "/api/v1/vm.add-disk" => r#"{"path": "/x"}"#,
            "/api/v1/vm.add-net" => r#"{"tap": "tap0"}"#,
            "/api/v1/vm.remove-device" => r#"{"id": "rootdisk"}"#,
            "/api/v1/vm.create" => r#"{"kernel": "/k"}"#,
            "/api/v1/vm.add-vsock" => r#"{"cid": 3, "socket": "/v.sock"}"#,
            "/api/v1/vm.add-user-device" => r#"{"socket": "/s.sock"}"#,
            "/api/v1/vm.add-device" => r#"{"path": "/sys/bus/pci/devices/0000:03:00.0"}"#,
            _ => "",
        };
        let r = raw(&f, route.method.clone(), route.path, body);
        // The fake VM runs, so the life-cycle requests conflict with its
        // state; this server has no event stream.
        let expected: &[u16] = match route.path {
            "/api/v1/vm.create" | "/api/v1/vm.boot" | "/api/v1/vm.delete" => &[409],
            "/api/v1/vm.events" => &[404],
            _ => &[200, 204],
        };
        assert!(
            expected.contains(&r.status),
            "{} {} -> {} {}",
            route.method,
            route.path,
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
}

#[test]
fn vmm_errors_map_to_statuses() {
    let f = Fixture::new();
    let add = |path: &str| {
        raw(
            &f,
            Method::PUT,
            "/api/v1/vm.add-disk",
            &json!({ "path": path }).to_string(),
        )
    };
    expect_error(&add("/fail"), 500, "cannot open /fail");
    expect_error(
        &add("/wrong-answer"),
        500,
        "unexpected answer to vm.add-disk",
    );
    expect_error(&add("/drop"), 500, "without answering");
    let e = f
        .client()
        .vm_add_disk(&DiskConfig {
            path: "/fail".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, ClientError::Api { status: 500, .. }));
    assert_eq!(e.to_string(), "cannot open /fail: I/O error (HTTP 500)");
}

#[test]
fn a_slow_answer_does_not_block_other_requests() {
    let f = Fixture::new();
    let client = f.client();
    let slow = std::thread::spawn(move || {
        let start = Instant::now();
        let e = client
            .vm_add_disk(&DiskConfig {
                path: "/slow".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.api_error_kind(), Some(ApiErrorKind::Conflict));
        start.elapsed()
    });
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    f.client().vmm_ping().unwrap();
    let ping = start.elapsed();
    let slow = slow.join().unwrap();
    assert!(slow >= SLOW_REPLY, "{slow:?}");
    assert!(
        ping < SLOW_REPLY,
        "ping waited for the slow request: {ping:?}"
    );
}

#[test]
fn concurrent_clients() {
    let f = Fixture::new();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let c = f.client();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    assert_eq!(c.vmm_ping().unwrap().version, FAKE_VERSION);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn vmm_gone_is_500() {
    let dir = common::temp_dir();
    let path = dir.as_path().join("api.sock");
    let (tx, rx) = mpsc::channel();
    let server = start_server(&path, tx, EventFd::new(0).unwrap()).unwrap();
    drop(rx);
    let r = Client::new(&path)
        .request(Method::GET, "/api/v1/vmm.ping", None)
        .unwrap();
    expect_error(&r, 500, "no longer accepting");
    server.shutdown();
}

#[test]
fn ping_answered_by_the_server_while_the_vmm_is_busy() {
    let dir = common::temp_dir();
    let path = dir.as_path().join("api.sock");
    let (tx, rx) = mpsc::channel();
    let options = api::ServerOptions {
        events: None,
        ping_version: Some("9.9.9".into()),
    };
    let server =
        api::start_server_with_options(&path, tx, EventFd::new(0).unwrap(), options).unwrap();
    // Nobody reads the channel (the VMM is still building the VM): ping
    // answers all the same, and only ping.
    let c = Client::new(&path).with_timeout(Duration::from_secs(2));
    assert_eq!(c.vmm_ping().unwrap().version, "9.9.9");
    let r = raw_on(&path, Method::GET, "/api/v1/vmm.ping", "{\"x\":1}");
    assert_eq!(r.status, 400);
    assert!(matches!(c.vm_info(), Err(ClientError::Timeout(_))));
    drop(rx);
    server.shutdown();
}

fn raw_on(path: &std::path::Path, method: Method, endpoint: &str, body: &str) -> RawResponse {
    Client::new(path)
        .request(method, endpoint, Some(body.as_bytes().to_vec()))
        .unwrap()
}

#[test]
fn socket_is_0600_and_removed_on_shutdown() {
    let mut f = Fixture::new();
    let md = std::fs::symlink_metadata(f.socket_path()).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);

    // vmm.shutdown is answered, then the VMM drops the handle.
    f.client().vmm_shutdown().unwrap();
    // An idle keep-alive connection must not hold shutdown up.
    let idle = std::os::unix::net::UnixStream::connect(f.socket_path()).unwrap();
    let took = f.stop_server();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert!(!f.socket_path().exists());
    drop(idle);
    let e = f.client().vmm_ping().unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
}

#[test]
fn explicit_shutdown_removes_the_socket() {
    let dir = common::temp_dir();
    let path = dir.as_path().join("api.sock");
    let (tx, _rx) = mpsc::channel();
    let server = start_server(&path, tx, EventFd::new(0).unwrap()).unwrap();
    assert_eq!(server.socket_path(), path);
    assert!(path.exists());
    server.shutdown();
    assert!(!path.exists());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = common::temp_dir();
    let path = dir.as_path().join("api.sock");
    // A listener that went away without unlinking its socket, as after a crash.
    drop(UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
    let f = Fixture::at(dir, path);
    assert_eq!(f.client().vmm_ping().unwrap().version, FAKE_VERSION);
    let mode = std::fs::metadata(f.socket_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn live_socket_is_refused() {
    let f = Fixture::new();
    let (tx, _rx) = mpsc::channel();
    let e = start_server(f.socket_path(), tx, EventFd::new(0).unwrap()).unwrap_err();
    assert!(
        matches!(e, ServerError::Socket(SocketError::InUse(_))),
        "{e}"
    );
    assert!(e.to_string().contains("in use by another process"), "{e}");
    // The running server is unaffected.
    assert_eq!(f.client().vmm_ping().unwrap().version, FAKE_VERSION);

    // The same for a socket some other program listens on.
    let dir = common::temp_dir();
    let path = dir.as_path().join("other.sock");
    let _other = UnixListener::bind(&path).unwrap();
    let (tx, _rx) = mpsc::channel();
    let e = start_server(&path, tx, EventFd::new(0).unwrap()).unwrap_err();
    assert!(matches!(e, ServerError::Socket(SocketError::InUse(_))));
    assert!(path.exists());
}

#[test]
fn non_socket_path_is_refused() {
    let dir = common::temp_dir();
    let file = dir.as_path().join("file");
    std::fs::write(&file, "data").unwrap();
    let (tx, _rx) = mpsc::channel();
    let e = start_server(&file, tx.clone(), EventFd::new(0).unwrap()).unwrap_err();
    assert!(matches!(e, ServerError::Socket(SocketError::NotASocket(_))));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    let e = start_server(dir.as_path(), tx, EventFd::new(0).unwrap()).unwrap_err();
    assert!(matches!(e, ServerError::Socket(SocketError::NotASocket(_))));
}

/// Reads what the server sends until it closes the connection or `limit`
/// passes; `None` if the connection was still open at `limit`.
fn read_until_closed(stream: &mut UnixStream, limit: Duration) -> Option<(Vec<u8>, Duration)> {
    let start = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some((got, start.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Some((got, start.elapsed()))
            }
            Err(_) => return None,
        }
        if start.elapsed() >= limit {
            return None;
        }
    }
}

#[test]
fn a_partial_body_is_cut_off_within_the_bound() {
    let f = Fixture::new();
    let mut s = UnixStream::connect(f.socket_path()).unwrap();
    // Headers promise 100 bytes; only the start of the body ever comes.
    s.write_all(
        b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"path\": ",
    )
    .unwrap();
    let bound = api::server::BODY_READ_TIMEOUT;
    let (answer, took) = read_until_closed(&mut s, bound + Duration::from_secs(5))
        .expect("the connection was still open after the body timeout");
    assert!(took >= bound - Duration::from_millis(500), "{took:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");
    // Nothing reached the VMM, and it still answers.
    assert_eq!(f.vm.lock().unwrap().info.devices.len(), 1);
    assert_eq!(f.client().vmm_ping().unwrap().version, FAKE_VERSION);
}

#[test]
fn idle_connections_are_capped_and_do_not_block_requests() {
    let f = Fixture::new();
    // A request in progress is never closed to make room.
    let client = f.client();
    let slow = std::thread::spawn(move || {
        client
            .vm_add_disk(&DiskConfig {
                path: "/slow".into(),
                ..Default::default()
            })
            .unwrap_err()
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(f.socket_path()).unwrap())
        .collect();
    // Let the server drain the listen backlog (a full backlog refuses any
    // connect, whatever the server does).
    std::thread::sleep(Duration::from_millis(300));
    // A well-formed request is answered at once, without waiting for the
    // idle connections' header timeout.
    let start = Instant::now();
    assert_eq!(f.client().vmm_ping().unwrap().version, FAKE_VERSION);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "ping took {took:?}");
    let e = slow.join().unwrap();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::Conflict), "{e}");

    // The server keeps at most MAX_CONNECTIONS of them: the others were
    // closed (oldest first) well before the header timeout.
    std::thread::sleep(Duration::from_millis(300));
    let mut open = 0;
    for s in &mut idle {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    assert!(
        open <= api::server::MAX_CONNECTIONS,
        "{open} idle connections still open"
    );
    assert!(
        open > 0,
        "the newest idle connections should have been kept"
    );
}

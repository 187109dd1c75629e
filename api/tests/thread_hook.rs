//! The API thread's hook (`api::set_thread_hook`) and what
//! `start_server` waits for:
//!
//! - a client that connected while the thread was starting (as one polling
//!   for the socket does) has its answer written before `start_server`
//!   returns, when the server answers the request itself (`vmm.ping` with
//!   a version);
//! - such a request that goes to the VMM does not hold `start_server`
//!   (the VMM answers it only afterwards), and an early client that sends
//!   only part of its request holds it 100 ms at most;
//! - a hook that fails ends the thread before it serves: `start_server`
//!   returns the hook's message and the socket is gone.
//!
//! The hook is process-wide, so this file is its own test binary, with one
//! test that runs the cases in turn. The "early client" is connected by
//! the hook itself (the socket is bound by then, the thread not serving
//! yet), so that the test reads its answer the moment `start_server`
//! returns.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use api::types::VmmPingResponse;
use api::{
    start_server, start_server_with_options, ApiRequest, ApiResponse, ServerError, ServerOptions,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

/// The hook fails (case 3).
static FAIL: AtomicBool = AtomicBool::new(false);
/// The hook connects a client and sends its request.
static CONNECT: AtomicBool = AtomicBool::new(false);
/// ... only the request's first line.
static PARTIAL: AtomicBool = AtomicBool::new(false);
/// That client.
static CLIENT: Mutex<Option<UnixStream>> = Mutex::new(None);
/// The socket path the hook was given last.
static SEEN: Mutex<Option<PathBuf>> = Mutex::new(None);

fn hook(socket: &Path) -> Result<(), String> {
    *SEEN.lock().unwrap() = Some(socket.to_path_buf());
    if FAIL.load(Ordering::SeqCst) {
        return Err("refused by the test hook".into());
    }
    if CONNECT.load(Ordering::SeqCst) {
        let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
        let request: &[u8] =
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        let sent = if PARTIAL.load(Ordering::SeqCst) {
            &request[..31]
        } else {
            request
        };
        s.write_all(sent).map_err(|e| e.to_string())?;
        *CLIENT.lock().unwrap() = Some(s);
    }
    Ok(())
}

/// The hook's client: what has arrived already (read without waiting),
/// and the whole answer.
fn answer() -> (String, String) {
    let mut s = CLIENT.lock().unwrap().take().expect("the hook's client");
    s.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 4096];
    let already = match s.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => String::new(),
        Err(e) => panic!("{e}"),
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    (already.clone(), already + &rest)
}

#[test]
fn hook_then_early_clients_then_failure() {
    api::set_thread_hook(hook);
    let dir = TempDir::new().unwrap();
    CONNECT.store(true, Ordering::SeqCst);

    // 1. Answered by the server itself, before start_server returns.
    let sock = dir.as_path().join("local.sock");
    let (tx, _rx) = mpsc::channel();
    let options = ServerOptions {
        events: None,
        ping_version: Some("9.8.7".into()),
    };
    let server = start_server_with_options(&sock, tx, EventFd::new(0).unwrap(), options).unwrap();
    let (already, text) = answer();
    assert!(already.starts_with("HTTP/1.1 200"), "already: {already:?}");
    assert!(text.contains("9.8.7"), "{text}");
    assert_eq!(SEEN.lock().unwrap().as_deref(), Some(sock.as_path()));
    drop(server);

    // 2. Waiting for the VMM: start_server returns well before its bound
    // (one second), then the VMM answers.
    let sock = dir.as_path().join("vmm.sock");
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let server = start_server(&sock, tx, EventFd::new(0).unwrap()).unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(900), "held {waited:?}");
    let msg = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(
        matches!(msg.request, ApiRequest::VmmPing),
        "{:?}",
        msg.request
    );
    let reply = ApiResponse::VmmPing(VmmPingResponse {
        version: "1.2.3".into(),
    });
    msg.reply.send(Ok(reply)).unwrap();
    let (_, text) = answer();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("1.2.3"), "{text}");
    drop(server);

    // 3. An early client that sends part of its request and stops.
    let sock = dir.as_path().join("partial.sock");
    PARTIAL.store(true, Ordering::SeqCst);
    let (tx, _rx) = mpsc::channel();
    let started = Instant::now();
    let server = start_server(&sock, tx, EventFd::new(0).unwrap()).unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(600), "held {waited:?}");
    drop(CLIENT.lock().unwrap().take());
    drop(server);
    PARTIAL.store(false, Ordering::SeqCst);

    // 4. A failing hook.
    let sock = dir.as_path().join("refused.sock");
    CONNECT.store(false, Ordering::SeqCst);
    FAIL.store(true, Ordering::SeqCst);
    let (tx, _rx) = mpsc::channel();
    match start_server(&sock, tx, EventFd::new(0).unwrap()) {
        Err(ServerError::ThreadHook(m)) => assert_eq!(m, "refused by the test hook"),
        other => panic!("{other:?}"),
    }
    assert!(!sock.exists(), "the socket is left behind");
}

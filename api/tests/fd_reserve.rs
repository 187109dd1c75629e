//! The API keeps descriptors free for the VMM under a low `RLIMIT_NOFILE`.
//! Alone in its test binary: it lowers the limit of the whole process.

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Fixture, FAKE_VERSION};

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn set_soft_limit(soft: u64) {
    // SAFETY: rlimit is plain old data; all-zeroes is a valid value.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit(2) writes into the rlimit we pass; checked.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    assert!(lim.rlim_max >= soft, "hard limit {} too low", lim.rlim_max);
    lim.rlim_cur = soft;
    // SAFETY: setrlimit(2) reads the rlimit we pass; checked.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

#[test]
fn idle_connections_do_not_starve_the_vmm_of_descriptors() {
    let f = Fixture::new();
    assert_eq!(f.client().vmm_ping().unwrap().version, FAKE_VERSION);
    // Room for 200 client ends, the server's capped share and its reserve,
    // but not for 200 connections on both sides.
    let base = open_descriptors();
    let limit = base + 200 + api::server::MAX_CONNECTIONS as u64 + api::server::FD_RESERVE + 32;
    set_soft_limit(limit);

    let idle: Vec<UnixStream> = (0..200)
        .map(|i| {
            UnixStream::connect(f.socket_path())
                .unwrap_or_else(|e| panic!("connection {i}: {e} (descriptors exhausted)"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // The VMM can still open files (a hot-plugged disk, its eventfds...).
    let files: Vec<std::fs::File> = (0..32)
        .map(|i| {
            std::fs::File::open("/dev/null")
                .unwrap_or_else(|e| panic!("file {i}: {e} (descriptors exhausted)"))
        })
        .collect();
    drop(files);
    // And the API still answers a well-formed request promptly.
    let start = Instant::now();
    assert_eq!(f.client().vmm_ping().unwrap().version, FAKE_VERSION);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    drop(idle);
}

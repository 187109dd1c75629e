//! `GET vm.events` against a bare server: followers get newline-delimited
//! JSON events in order; one that stops reading holds up neither the
//! publisher (the VMM) nor the other follower, and learns how many events
//! it lost.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use api::client::Client;
use api::events::{EventBus, VmEventKind, QUEUE_CAPACITY};
use api::start_server_with_events;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

#[test]
fn two_followers_one_stalled() {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let (tx, _rx) = mpsc::channel();
    let bus = EventBus::new();
    let server =
        start_server_with_events(&sock, tx, EventFd::new(0).unwrap(), Some(bus.clone())).unwrap();
    let client = Client::new(&sock).with_timeout(Duration::from_secs(20));
    let mut fast = client.vm_events().unwrap();
    let mut stalled = client.vm_events().unwrap();
    // Both are following once the bus has two followers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bus.followers() < 2 {
        assert!(Instant::now() < deadline, "followers never subscribed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Far more than the queue and the socket buffers hold.
    const N: u64 = 50_000;
    let reader = std::thread::spawn(move || {
        let (mut seen, mut lost, mut last) = (0u64, 0u64, None::<i32>);
        let mut stamps = 0u64;
        while let Some(ev) = fast.next_event().unwrap() {
            assert!(ev.timestamp_us >= stamps, "time went back");
            stamps = ev.timestamp_us;
            match ev.kind {
                VmEventKind::VmmExit { status } => {
                    assert!(last.is_none_or(|l| status > l), "out of order");
                    last = Some(status);
                    seen += 1;
                }
                VmEventKind::Dropped { count } => lost += count,
                other => panic!("unexpected {other:?}"),
            }
        }
        (seen, lost)
    });
    let start = Instant::now();
    for i in 0..N {
        bus.emit(VmEventKind::VmmExit { status: i as i32 });
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "publishing took {took:?}");
    // The stalled follower lost events and is told how many first thing
    // after what was queued for it.
    let (mut seen, mut lost) = (0u64, 0u64);
    bus.close();
    while let Some(ev) = stalled.next_event().unwrap() {
        match ev.kind {
            VmEventKind::VmmExit { .. } => seen += 1,
            VmEventKind::Dropped { count } => lost += count,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen + lost, N, "every event is either delivered or counted");
    assert!(lost > 0, "the stalled follower lost nothing?");
    assert!(seen >= QUEUE_CAPACITY as u64, "{seen}");
    let (fast_seen, fast_lost) = reader.join().unwrap();
    assert_eq!(fast_seen + fast_lost, N);
    drop(server);
}

#[test]
fn without_a_bus_there_is_no_stream() {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let (tx, _rx) = mpsc::channel();
    let _server = api::start_server(&sock, tx, EventFd::new(0).unwrap()).unwrap();
    let e = Client::new(&sock).vm_events().err().unwrap();
    assert_eq!(e.api_error_kind(), Some(api::ApiErrorKind::NotFound), "{e}");
}

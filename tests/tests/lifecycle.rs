//! The API-first life cycle against real `arbor` processes: a VMM started
//! with only an API socket gets its whole configuration by `vm.create`,
//! boots it by `vm.boot`, hot-plugs and removes a disk, stops, deletes and
//! creates again, while two clients follow the event stream (one of them
//! never reading) and `--event-monitor` writes it to a file. The same
//! configuration on the command line gives the same `vm.info`, and
//! requests in the wrong state answer 409 and change nothing.
//!
//! One guest boots in this file at a time (the tests share a lock).

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use api::client::Client;
use api::events::{StopReason, VmEvent, VmEventKind};
use api::types::VmState;
use api::ApiErrorKind;
use arbor_tests::{
    arbor_bin, disk_at, guest_kit, kvm_available, raw_disk, timeout, wait_for_socket, Guest,
    Scratch,
};
use serde_json::{json, Value};

/// One guest at a time.
static GUEST: Mutex<()> = Mutex::new(());

/// The JSON `arbor --print-config` prints for `args`.
fn print_config(args: &[String]) -> Value {
    let out = Command::new(arbor_bin())
        .args(args)
        .arg("--print-config")
        .output()
        .expect("run arbor --print-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--print-config prints JSON")
}

fn conflict(r: Result<impl std::fmt::Debug, api::client::ClientError>, state: &str) -> String {
    let e = r.expect_err("a request in the wrong state");
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::Conflict), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(state), "'{state}' not named in: {msg}");
    msg
}

/// The next event of `kind` name (skipping none: every event is checked
/// against `want` in order).
fn expect_events(stream: &mut api::client::EventStream, want: &[&str]) -> Vec<VmEvent> {
    let mut got = Vec::new();
    for name in want {
        let ev = stream
            .next_event()
            .expect("read the event stream")
            .unwrap_or_else(|| panic!("the stream ended before '{name}'; got {got:?}"));
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["event"], *name, "after {got:?}");
        got.push(ev);
    }
    got
}

/// Events are stamped in order, within the test's lifetime.
fn check_timestamps(events: &[VmEvent]) {
    for w in events.windows(2) {
        assert!(
            w[0].timestamp_us <= w[1].timestamp_us,
            "time went back: {w:?}"
        );
    }
    let now = api::events::monotonic_us();
    let first = events.first().map_or(now, |e| e.timestamp_us);
    assert!(now >= first && now - first < 3600 * 1_000_000, "{events:?}");
}

fn kit_args(s: &Scratch) -> Vec<String> {
    let kit = guest_kit();
    raw_disk(&s.path("root.img"), 3);
    vec![
        "--kernel".into(),
        kit.vmlinux.display().to_string(),
        "--initramfs".into(),
        kit.initramfs.display().to_string(),
        "--cmdline".into(),
        kit.cmdline.clone(),
        "--memory".into(),
        "512M".into(),
        "--disk".into(),
        format!(
            "path={},id=rootdisk,serial=ROOT",
            s.path("root.img").display()
        ),
        "--rng".into(),
        "id=rng0".into(),
        "--shutdown-grace".into(),
        "2".into(),
    ]
}

#[test]
fn created_and_booted_over_the_api() {
    if !kvm_available() {
        return;
    }
    let _one = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new("lifecycle");
    let args = kit_args(&s);
    let config = print_config(&args);
    assert_eq!(config["cpus"], 1);
    assert_eq!(config["disk"][0]["id"], "rootdisk");

    // The command line's VM, for its vm.info: started and stopped at once.
    let cli_sock = s.path("cli.sock");
    let mut cli_args = args.clone();
    cli_args.extend(["--api-socket".into(), cli_sock.display().to_string()]);
    let mut cli = Guest::start("lifecycle-cli", &cli_args);
    wait_for_socket(&cli_sock);
    let c = Client::new(&cli_sock).with_timeout(Duration::from_secs(60));
    let cli_info = c.vm_info().expect("vm.info");
    c.vmm_shutdown().expect("vmm.shutdown");
    assert_eq!(cli.wait_exit().code(), Some(0), "{}", cli.stderr());
    drop(cli);

    // The VMM alone.
    let sock = s.path("api.sock");
    let monitor = s.path("events.log");
    let mut g = Guest::start(
        "lifecycle",
        &[
            "--api-socket".into(),
            sock.display().to_string(),
            "--event-monitor".into(),
            format!("path={}", monitor.display()),
        ],
    );
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(60));
    assert_eq!(c.vmm_ping().unwrap().version, env!("CARGO_PKG_VERSION"));
    let empty = c.vm_info().unwrap();
    assert_eq!(empty.state, VmState::NotCreated);
    assert!(empty.devices.is_empty() && empty.topology.is_empty());

    // Two followers; `stalled` never reads until the end.
    let mut events = Client::new(&sock)
        .with_timeout(timeout())
        .vm_events()
        .expect("follow vm.events");
    let mut stalled = Client::new(&sock)
        .with_timeout(timeout())
        .vm_events()
        .expect("follow vm.events");

    // Wrong state, no VM: 409 naming the state, nothing changes.
    let hot = s.path("hot.img");
    raw_disk(&hot, 5);
    conflict(c.vm_boot(), "not created");
    conflict(c.vm_delete(), "not created");
    conflict(c.vm_pause(), "not created");
    conflict(c.vm_shutdown(), "not created");
    conflict(
        c.vm_add_disk(&disk_at(&hot, "hot", None, None)),
        "not created",
    );
    conflict(c.vm_remove_device("rootdisk"), "not created");
    assert_eq!(c.vm_info().unwrap(), empty);

    // A bad configuration: 400 with the command line's message; nothing
    // is created.
    let mut bad = config.clone();
    bad["cpus"] = json!(0);
    let e = c.vm_create(&bad).unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::BadRequest), "{e}");
    assert!(e.to_string().contains("--cpus must be at least 1"), "{e}");
    let mut bad = config.clone();
    bad["disk"][0]["path"] = json!(s.0.display().to_string());
    let e = c.vm_create(&bad).unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::BadRequest), "{e}");
    assert!(e.to_string().contains("a directory"), "{e}");
    assert_eq!(c.vm_info().unwrap(), empty);

    // Create: every cold-plugged device and port has its PCI path already.
    let created = c.vm_create(&config).expect("vm.create");
    assert_eq!(created.state, VmState::Created);
    let ids: Vec<&str> = created.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["rootdisk", "rng0"]);
    assert!(created.devices.iter().all(|d| !d.pci_path.is_empty()));
    assert!(created
        .topology
        .iter()
        .filter(|n| n.id != "root")
        .all(|n| !n.pci_path.is_empty()));
    assert!(created.topology.iter().any(|n| n.id == "rp0"));
    conflict(c.vm_create(&config), "created");
    assert_eq!(c.vm_info().unwrap(), created);

    // Boot, and what a running VM refuses.
    c.vm_boot().expect("vm.boot");
    let running = c.vm_info().unwrap();
    assert_eq!(running.state, VmState::Running);
    conflict(c.vm_boot(), "running");
    conflict(c.vm_create(&config), "running");
    conflict(c.vm_delete(), "running");
    // The same configuration on the command line gave the same vm.info.
    assert_eq!(running, cli_info);

    g.wait_for("Run /init as init process");
    let added = c
        .vm_add_disk(&disk_at(&hot, "hot", Some("rp0"), None))
        .expect("hot-plug");
    g.wait_for("virtio_blk virtio2: [vdb] 10240 512-byte logical blocks");
    c.vm_remove_device("hot").expect("removal");
    // Still served while one follower has not read a thing.
    c.vmm_ping().expect("ping");

    let seen = expect_events(
        &mut events,
        &[
            "created",
            "booted",
            "device-added",
            "device-removal-requested",
            "device-released",
        ],
    );
    check_timestamps(&seen);
    assert_eq!(
        seen[2].kind,
        VmEventKind::DeviceAdded {
            id: "hot".into(),
            pci_path: added.pci_path.clone()
        }
    );
    match &seen[4].kind {
        VmEventKind::DeviceReleased {
            id,
            pci_path,
            after_ms,
        } => {
            assert_eq!((id.as_str(), pci_path), ("hot", &added.pci_path));
            assert!(*after_ms < 10_000, "{after_ms}");
            let between = (seen[4].timestamp_us - seen[3].timestamp_us) / 1000;
            assert!(between.abs_diff(*after_ms) <= 50, "{between} vs {after_ms}");
        }
        other => panic!("{other:?}"),
    }
    // The boot took guest time: the hot-plug came after the kernel ran.
    assert!(seen[2].timestamp_us > seen[1].timestamp_us);

    // Stop: the VMM stays, the VM is shut down and still described.
    c.vm_shutdown().expect("vm.shutdown");
    let stop = expect_events(&mut events, &["shutdown-requested", "stopped"]);
    assert_eq!(
        stop[1].kind,
        VmEventKind::Stopped {
            reason: StopReason::Shutdown,
            error: None
        }
    );
    let stopped = c.vm_info().unwrap();
    assert_eq!(stopped.state, VmState::Shutdown);
    assert_eq!(stopped.devices.len(), 2);
    conflict(c.vm_boot(), "shut down");
    conflict(c.vm_create(&config), "shut down");
    conflict(c.vm_shutdown(), "shut down");
    conflict(
        c.vm_add_disk(&disk_at(&hot, "hot2", None, None)),
        "shut down",
    );
    assert_eq!(c.vm_info().unwrap(), stopped);

    // Delete, and create again in the same process (the image locks went
    // with the first VM).
    c.vm_delete().expect("vm.delete");
    assert_eq!(c.vm_info().unwrap().state, VmState::NotCreated);
    let again = c.vm_create(&config).expect("vm.create again");
    assert_eq!(again, created);
    // A created VM takes a hot-plugged device before it boots.
    let early = c
        .vm_add_disk(&disk_at(&hot, "early", None, None))
        .expect("hot-plug into a created VM");
    assert_eq!(c.vm_info().unwrap().devices.len(), 3);
    c.vm_delete().expect("vm.delete again");
    let tail = expect_events(
        &mut events,
        &["deleted", "created", "device-added", "deleted"],
    );
    assert_eq!(
        tail[2].kind,
        VmEventKind::DeviceAdded {
            id: "early".into(),
            pci_path: early.pci_path
        }
    );

    c.vmm_shutdown().expect("vmm.shutdown");
    let end = expect_events(&mut events, &["vmm-exit"]);
    assert_eq!(end[0].kind, VmEventKind::VmmExit { status: 0 });
    assert!(events.next_event().unwrap().is_none(), "the stream ends");
    assert_eq!(g.wait_exit().code(), Some(0), "{}", g.stderr());

    // The follower that never read got everything (a few events fit its
    // queue), in the same order as the other and the monitor file.
    let mut all = Vec::new();
    while let Some(ev) = stalled.next_event().expect("read") {
        all.push(ev);
    }
    let names = |evs: &[VmEvent]| -> Vec<String> {
        evs.iter()
            .map(|e| {
                serde_json::to_value(e).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let want = [
        "created",
        "booted",
        "device-added",
        "device-removal-requested",
        "device-released",
        "shutdown-requested",
        "stopped",
        "deleted",
        "created",
        "device-added",
        "deleted",
        "vmm-exit",
    ];
    assert_eq!(names(&all), want);
    let text = std::fs::read_to_string(&monitor).expect("event monitor file");
    let logged: Vec<VmEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert_eq!(
        logged, all,
        "the monitor and the stream carry the same events"
    );
}

/// Without a VM, SIGTERM ends the VMM at once (exit 0, socket removed).
#[test]
fn sigterm_without_a_vm() {
    let s = Scratch::new("lifecycle-sigterm");
    let sock = s.path("api.sock");
    let mut g = Guest::start(
        "sigterm",
        &["--api-socket".into(), sock.display().to_string()],
    );
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(30));
    assert_eq!(c.vm_info().unwrap().state, VmState::NotCreated);
    // SAFETY: kill(2) sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(g.pid() as i32, libc::SIGTERM) }, 0);
    assert_eq!(g.wait_exit().code(), Some(0), "{}", g.stderr());
    assert!(!sock.exists(), "socket left behind");
}

/// `--event-monitor fd=N` writes the stream to an inherited descriptor.
#[test]
fn event_monitor_on_an_inherited_descriptor() {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;
    let s = Scratch::new("lifecycle-monitor-fd");
    let sock = s.path("api.sock");
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) writes two descriptors into the array we own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read_end, write_end) = (fds[0], fds[1]);
    let mut cmd = Command::new(arbor_bin());
    cmd.args([
        "--api-socket",
        sock.to_str().unwrap(),
        "--event-monitor",
        "fd=7",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec, only async-signal-safe dup2(2) runs,
    // on descriptors this process owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(write_end, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn arbor");
    // SAFETY: the write end is ours; the child has its own copy as fd 7.
    unsafe { libc::close(write_end) };
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(30));
    conflict(c.vm_boot(), "not created");
    c.vmm_shutdown().expect("vmm.shutdown");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    // SAFETY: the read end is ours and is closed once, by the File.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(read_end) };
    let mut text = String::new();
    pipe.read_to_string(&mut text).unwrap();
    let events: Vec<VmEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert_eq!(
        events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
        [VmEventKind::VmmExit { status: 0 }],
        "{text}"
    );
}

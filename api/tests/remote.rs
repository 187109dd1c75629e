//! `arbor-remote` end to end against the fake VMM.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use api::types::VmState;
use common::{Fixture, FAKE_VERSION};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_arbor-remote");

fn remote(socket: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stderr_error(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {} stderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An API error: exit 1, the JSON error body on stderr.
fn api_error(out: &Output) -> String {
    let text = stderr_error(out, 1);
    let v: Value = serde_json::from_str(&text).unwrap();
    v["error"].as_str().unwrap().to_string()
}

#[test]
fn ping_and_info() {
    let f = Fixture::new();
    let out = remote(&f.socket, &["ping"]);
    assert_eq!(stdout_json(&out)["version"], FAKE_VERSION);
    // Pretty-printed.
    assert!(String::from_utf8_lossy(&out.stdout).contains("\n  \"version\""));
    let v = stdout_json(&remote(&f.socket, &["info"]));
    assert_eq!(v["state"], "running");
    assert_eq!(v["topology"][1]["id"], "rp1");
}

#[test]
fn add_and_remove() {
    let f = Fixture::new();
    let v = stdout_json(&remote(
        &f.socket,
        &[
            "add-disk",
            "path=/images/d.raw,readonly=on,id=d1,serial=S-1,port=rp1",
        ],
    ));
    assert_eq!(v["id"], "d1");
    assert_eq!(v["pci_path"], "00:05.0/00.0");
    // Options spread over several arguments, a bare path, exact placement.
    let v = stdout_json(&remote(
        &f.socket,
        &[
            "add-disk",
            "/images/e.raw",
            "pci_path=00:04.0/00.0",
            "readonly=off",
        ],
    ));
    assert_eq!(v["pci_path"], "00:04.0/00.0");
    // A relative path is made absolute from the client's directory.
    let out = Command::new(BIN)
        .arg("--api-socket")
        .arg(&f.socket)
        .args(["add-disk", "rel.raw", "id=rel"])
        .current_dir("/tmp")
        .output()
        .unwrap();
    assert_eq!(stdout_json(&out)["id"], "rel");
    let v = stdout_json(&remote(&f.socket, &["add-rng", "id=r0"]));
    assert_eq!(v["id"], "r0");
    let v = stdout_json(&remote(&f.socket, &["add-rng"]));
    assert!(v["id"].as_str().unwrap().starts_with("rng"));

    {
        let vm = f.vm.lock().unwrap();
        let d1 = vm.info.devices.iter().find(|d| d.id == "d1").unwrap();
        assert_eq!(d1.readonly, Some(true));
        assert_eq!(d1.serial.as_deref(), Some("S-1"));
        assert_eq!(d1.path.as_deref(), Some("/images/d.raw"));
        let rel = vm.info.devices.iter().find(|d| d.id == "rel").unwrap();
        assert_eq!(rel.path.as_deref(), Some("/tmp/rel.raw"));
    }

    // Both spellings of remove-device; success says what went and how long it took.
    let out = remote(&f.socket, &["remove-device", "d1"]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("removed d1: the guest released it after ")
            && said.trim_end().ends_with(" ms"),
        "{said}"
    );
    let out = remote(&f.socket, &["remove-device", "id=r0"]);
    assert!(out.status.success());
    // add-vsock: a relative socket path is made absolute here too.
    let out = Command::new(BIN)
        .arg("--api-socket")
        .arg(&f.socket)
        .args(["add-vsock", "cid=3,socket=v.sock,id=vs"])
        .current_dir("/tmp")
        .output()
        .unwrap();
    assert_eq!(stdout_json(&out)["id"], "vs");
    {
        let vm = f.vm.lock().unwrap();
        let vs = vm.info.devices.iter().find(|d| d.id == "vs").unwrap();
        assert_eq!(vs.socket.as_deref(), Some("/tmp/v.sock"));
        assert_eq!(vs.cid, Some(3));
    }

    // add-device: a bare first value is the function's sysfs path.
    let v = stdout_json(&remote(
        &f.socket,
        &["add-device", "/sys/bus/pci/devices/0000:03:00.0,id=nic"],
    ));
    assert_eq!(v["id"], "nic");
    {
        let vm = f.vm.lock().unwrap();
        let nic = vm.info.devices.iter().find(|d| d.id == "nic").unwrap();
        assert_eq!(nic.host_bdf.as_deref(), Some("0000:03:00.0"));
    }
    assert!(
        api_error(&remote(&f.socket, &["add-device", "path=/nonexistent"]))
            .contains("does not name a PCI function")
    );

    assert!(api_error(&remote(&f.socket, &["remove-device", "d1"])).contains("no device 'd1'"));
    assert!(api_error(&remote(&f.socket, &["add-disk", "path=/x,id=rootdisk"])).contains("exists"));
    assert!(api_error(&remote(&f.socket, &["add-disk", "path=/x,id=a b"])).contains("'id'"));
}

#[test]
fn life_cycle() {
    let f = Fixture::new();
    for cmd in ["pause", "resume", "pause"] {
        let out = remote(&f.socket, &[cmd]);
        assert!(out.status.success(), "{cmd}");
        assert!(out.stdout.is_empty());
    }
    assert_eq!(f.vm.lock().unwrap().info.state, VmState::Paused);
    assert!(api_error(&remote(&f.socket, &["pause"])).contains("not running"));
    assert!(remote(&f.socket, &["shutdown"]).status.success());
    assert_eq!(f.vm.lock().unwrap().info.state, VmState::Shutdown);
    assert!(remote(&f.socket, &["shutdown-vmm"]).status.success());
    assert!(f.vm.lock().unwrap().vmm_shutdown_requested);
}

#[test]
fn usage_errors_exit_2() {
    let f = Fixture::new();
    let s = &f.socket;
    let cases: &[(&[&str], &str)] = &[
        (&["frobnicate"], "unknown command 'frobnicate'"),
        (&["ping", "x=1"], "ping takes no options"),
        (&["add-disk"], "missing required option 'path'"),
        (
            &["add-disk", "path=/a,colour=red"],
            "unknown option 'colour'",
        ),
        (
            &["add-disk", "path=/a,id=x,id=y"],
            "option 'id' is given more than once",
        ),
        (
            &["add-disk", "path=/a,readonly=maybe"],
            "must be on, off, true or false",
        ),
        (&["add-rng", "r0"], "not of the form key=value"),
        (&["add-vsock", "socket=/v"], "missing required option 'cid'"),
        (&["add-vsock", "cid=x,socket=/v"], "invalid value 'x'"),
        (&["remove-device"], "missing required option 'id'"),
        (&["add-device", "id=x"], "missing required option 'path'"),
        (&["remove-device", "a", "b"], "not of the form key=value"),
        (&["--bogus"], "unknown option '--bogus'"),
    ];
    for (args, needle) in cases {
        let err = stderr_error(&remote(s, args), 2);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Nothing reached the VMM.
    assert_eq!(f.vm.lock().unwrap().info.devices.len(), 1);

    let out = Command::new(BIN).arg("ping").output().unwrap();
    assert!(stderr_error(&out, 2).contains("--api-socket PATH is required"));
    let out = Command::new(BIN).args(["--api-socket"]).output().unwrap();
    assert!(stderr_error(&out, 2).contains("--api-socket needs a path"));
    let out = Command::new(BIN).arg("--api-socket=/x").output().unwrap();
    assert!(stderr_error(&out, 2).contains("no command given"));
}

#[test]
fn help_and_version() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "ping",
        "info",
        "add-disk",
        "add-rng",
        "add-vsock",
        "add-device",
        "remove-device",
        "pause",
        "resume",
        "shutdown",
        "shutdown-vmm",
        "Exit status",
    ] {
        assert!(text.contains(cmd), "help lacks {cmd}");
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("arbor-remote "));
}

#[test]
fn connection_failure_exits_3() {
    let dir = common::temp_dir();
    let missing = dir.as_path().join("nothing.sock");
    let err = stderr_error(&remote(&missing, &["ping"]), 3);
    assert!(err.contains("cannot connect to the API socket"), "{err}");

    // A socket nobody listens on.
    let stale = dir.as_path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let err = stderr_error(&remote(&stale, &["info"]), 3);
    assert!(err.contains("cannot connect"), "{err}");

    // A directory or a regular file: said so, not "Connection refused".
    let err = stderr_error(&remote(dir.as_path(), &["ping"]), 3);
    assert!(err.contains("is a directory, not a UNIX socket"), "{err}");
    let file = dir.as_path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let err = stderr_error(&remote(&file, &["ping"]), 3);
    assert!(
        err.contains("is a regular file, not a UNIX socket"),
        "{err}"
    );
}

#[test]
fn socket_option_equals_form() {
    let f = Fixture::new();
    let out = Command::new(BIN)
        .arg(format!("--api-socket={}", f.socket.display()))
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(stdout_json(&out)["version"], FAKE_VERSION);
}

#[test]
fn create_boot_delete_events() {
    let f = Fixture::new();
    let s = &f.socket;
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let good = dir.as_path().join("vm.json");
    std::fs::write(&good, br#"{"kernel": "/k", "cpus": 2}"#).unwrap();
    let bad = dir.as_path().join("bad.json");
    std::fs::write(&bad, b"{kernel").unwrap();
    let good_s = good.to_str().unwrap();
    for (args, needle) in [
        (vec!["create"], "create takes one argument"),
        (
            vec!["create", "/nonexistent/vm.json"],
            "cannot read '/nonexistent/vm.json'",
        ),
        (vec!["create", bad.to_str().unwrap()], "is not JSON"),
        (vec!["create", good_s, good_s], "create takes one argument"),
        (vec!["boot", "now"], "boot takes no options"),
        (vec!["events", "x=1"], "events takes no options"),
    ] {
        let err = stderr_error(&remote(s, &args), 2);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // The fake VMM has a running VM: the life-cycle requests reach it and
    // are refused as a real one would refuse them.
    assert!(api_error(&remote(s, &["create", good_s])).contains("running"));
    assert!(api_error(&remote(s, &["boot"])).contains("running"));
    assert!(api_error(&remote(s, &["delete"])).contains("running"));
    // The fake server has no event stream: an API error, exit 1.
    let out = remote(s, &["events"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no event stream"));
}

/// `add-net fd=N` passes the program's descriptor N with `SCM_RIGHTS`; the
/// VMM side (here the fake) reads what the descriptor holds.
#[test]
fn add_net_passes_a_descriptor() {
    let f = Fixture::new();
    let dir = std::env::temp_dir().join(format!("arbor-remote-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fake-tap");
    std::fs::write(&file, "tap-from-fd").unwrap();
    // The file is the program's stdin: descriptor 0.
    let out = Command::new(BIN)
        .arg("--api-socket")
        .arg(&f.socket)
        .args(["add-net", "fd=0,id=n0,mac=52:54:00:00:00:01"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert_eq!(stdout_json(&out)["id"], "n0");
    let v = stdout_json(&remote(&f.socket, &["add-net", "tap=tapx,mtu=9000"]));
    assert!(v["id"].as_str().unwrap().starts_with("net"));
    {
        let vm = f.vm.lock().unwrap();
        let n0 = vm.info.devices.iter().find(|d| d.id == "n0").unwrap();
        assert_eq!(n0.tap.as_deref(), Some("tap-from-fd"));
        assert_eq!(n0.mac.as_deref(), Some("52:54:00:00:00:01"));
    }
    // A descriptor the program does not have; bad values (checked by the
    // server before the VMM sees them).
    let out = remote(&f.socket, &["add-net", "fd=999"]);
    assert!(stderr_error(&out, 2).contains("not an open descriptor"));
    assert!(api_error(&remote(&f.socket, &["add-net", "tap=t,mtu=20"])).contains("out of range"));
    assert!(api_error(&remote(
        &f.socket,
        &["add-net", "tap=t,mac=ff:ff:ff:ff:ff:ff"]
    ))
    .contains("multicast"));
    // A raw request naming a descriptor without passing one.
    let c = api::client::Client::new(&f.socket);
    let cfg = api::types::NetConfig {
        fd: Some(0),
        ..Default::default()
    };
    let e = c.vm_add_net(&cfg, Vec::new()).unwrap_err();
    assert!(e.to_string().contains("no descriptor 0"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

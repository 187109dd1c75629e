//! vfio-user passthrough against a server this project did not write: the
//! `vfio_user` crate's example gpio server (vendor 494f, device 0dc8, a
//! 256-byte I/O BAR2, INTx), built from the crate's package in the cargo
//! registry by `resources/vfio-user/build-gpio.sh`. The guest's own driver
//! (`pci-idio-16`) binds to it.
//!
//! One guest boot: cold plug, hot plug into a native root port, an ACPI
//! bridge and the root bus (each answer's `pci_path` resolves to the BDF the
//! driver bound), removal and re-add, then server faults and bad requests
//! (clear API errors, a device whose server died shown failed in vm.info,
//! the VMM keeps running its other devices).

use std::time::Duration;

use api::client::Client;
use api::types::{DeviceKind, DeviceState, UserDeviceConfig};
use api::ApiErrorKind;
use arbor_tests::{
    gpio_server_bin, guest_bdf, kvm_available, wait_count, GpioServer, Guest, Scratch,
};

/// An add request for `srv`'s function, under `port` if given.
fn config(srv: &GpioServer, id: &str, port: Option<&str>) -> UserDeviceConfig {
    UserDeviceConfig {
        port: port.map(String::from),
        ..srv.config(id)
    }
}

/// Checks what the guest printed for the function at `pci_path`: its ids,
/// its I/O BAR2, and the driver enabling I/O decoding. Returns the BDF.
fn check_bound(g: &Guest, mark: usize, pci_path: &str) -> String {
    let tail = wait_count(g, mark, "pci-idio-16", 1);
    let console = g.console();
    let bdf = guest_bdf(pci_path, &console);
    let enabled = format!("pci-idio-16 {bdf}: enabling device (0000 -> 0001)");
    let tail = if tail.contains(&enabled) {
        tail
    } else {
        wait_count(g, mark, &enabled, 1)
    };
    assert!(
        tail.contains(&format!("pci {bdf}: [494f:0dc8] type 00")),
        "[494f:0dc8] not at {bdf} (path {pci_path}):\n{tail}"
    );
    assert!(
        tail.lines().any(|l| l.contains(&format!("pci {bdf}: "))
            && (l.contains("0x18: [io ") || l.contains("BAR 2 [io "))),
        "no I/O BAR2 for {bdf}:\n{tail}"
    );
    bdf
}

#[test]
fn gpio_server_cold_and_hot_plugged() {
    if !kvm_available() {
        return;
    }
    let bin = gpio_server_bin();
    let s = Scratch::new("vfio-user");
    let sock = s.path("api.sock");
    let cold = GpioServer::start(&bin, &s.0, "cold");
    // User space (a shell) lets the guest touch a device whose server died.
    let g = Guest::boot_user(
        "vfio-user",
        1,
        "",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--pci-port",
            "id=rp0,type=root-port,io-reserve=4K",
            "--pci-port",
            "id=rp1,type=root-port",
            "--pci-port",
            "id=br0,type=pci-bridge,io-reserve=4K",
            "--user-device",
            &format!("socket={},id=cold", cold.socket.display()),
            "--remove-timeout",
            "120",
        ],
    );

    // Cold plug: the guest driver binds and probes (it writes the device's
    // registers in BAR2); the server was given guest RAM with its memfd.
    g.wait_for("Run /init as init process");
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    let info = c.vm_info().unwrap();
    let rec = info.devices.iter().find(|d| d.id == "cold").unwrap();
    assert_eq!(rec.kind, DeviceKind::VfioUser);
    assert_eq!(
        rec.socket.as_deref(),
        Some(cold.socket.to_str().unwrap()),
        "{rec:?}"
    );
    check_bound(&g, 0, &rec.pci_path);
    let log = cold.wait_log("write region = 2");
    assert!(
        log.lines()
            .any(|l| l.contains("dma_map") && l.contains("fd = Some")),
        "guest RAM not mapped:\n{log}"
    );

    // Hot plug into a native root port, an ACPI bridge and the root bus.
    let mut servers = Vec::new();
    let mut paths = Vec::new();
    let mut bdfs = Vec::new();
    for (id, port) in [("native", "rp0"), ("acpi", "br0"), ("onroot", "root")] {
        let srv = GpioServer::start(&bin, &s.0, id);
        let mark = g.console().len();
        let added = c
            .vm_add_user_device(&config(&srv, id, Some(port)))
            .unwrap_or_else(|e| panic!("{id}: {e}\n{}", g.stderr()));
        assert_eq!(added.id, id);
        let bdf = check_bound(&g, mark, &added.pci_path);
        srv.wait_log("write region = 2");
        eprintln!("{id}: {} -> {bdf}", added.pci_path);
        paths.push(added.pci_path);
        bdfs.push(bdf);
        servers.push(srv);
    }

    // Bad requests change nothing and leave the VMM running.
    let before = c.vm_info().unwrap().devices;
    let err = |cfg: &UserDeviceConfig| {
        let e = c.vm_add_user_device(cfg).unwrap_err();
        (e.api_error_kind(), e.to_string())
    };
    let mut missing = config(&servers[0], "x", None);
    missing.socket = s.path("missing.sock").display().to_string();
    let (k, m) = err(&missing);
    assert_eq!(k, Some(ApiErrorKind::BadRequest), "{m}");
    assert!(m.contains("missing.sock"), "{m}");
    let file = s.path("file");
    std::fs::write(&file, b"x").unwrap();
    missing.socket = file.display().to_string();
    let (k, m) = err(&missing);
    assert_eq!(k, Some(ApiErrorKind::BadRequest), "{m}");
    assert!(m.contains("not a UNIX socket"), "{m}");
    missing.socket = "relative.sock".into();
    assert_eq!(err(&missing).0, Some(ApiErrorKind::BadRequest));
    // The same server twice, an id in use.
    let (k, m) = err(&config(&servers[0], "again", None));
    assert_eq!(k, Some(ApiErrorKind::Conflict), "{m}");
    assert!(m.contains("already device 'native'"), "{m}");
    // A peer that is not a vfio-user server: one that never answers, one
    // that answers garbage.
    let mute_path = s.path("mute.sock");
    let _mute = std::os::unix::net::UnixListener::bind(&mute_path).unwrap();
    missing.socket = mute_path.display().to_string();
    let (k, m) = err(&missing);
    assert_eq!(k, Some(ApiErrorKind::BadRequest), "{m}");
    assert!(m.contains("handshake"), "{m}");
    let http_path = s.path("http.sock");
    let http = std::os::unix::net::UnixListener::bind(&http_path).unwrap();
    let peer = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut conn, _)) = http.accept() {
            let mut b = [0u8; 256];
            let _ = conn.read(&mut b);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    missing.socket = http_path.display().to_string();
    let (k, m) = err(&missing);
    assert_eq!(k, Some(ApiErrorKind::BadRequest), "{m}");
    assert!(m.contains("vfio-user server at"), "{m}");
    peer.join().unwrap();
    // BARs that do not fit the port's windows (rp1 has no I/O window).
    let nofit = GpioServer::start(&bin, &s.0, "nofit");
    let (k, m) = err(&config(&nofit, "nofit", Some("rp1")));
    assert_eq!(k, Some(ApiErrorKind::Conflict), "{m}");
    drop(nofit);
    assert_eq!(c.vm_info().unwrap().devices, before);

    // Remove (the guest releases it; the server sees the reset) and add
    // again, from a new server, into the same slot.
    c.vm_remove_device("native").unwrap();
    servers[0].wait_log("reset");
    let again = GpioServer::start(&bin, &s.0, "again");
    let mark = g.console().len();
    let mut cfg = config(&again, "native", None);
    cfg.pci_path = Some(paths[0].clone());
    let re = c.vm_add_user_device(&cfg).unwrap();
    assert_eq!(re.pci_path, paths[0]);
    check_bound(&g, mark, &re.pci_path);

    // The server of a device in use exits: once the guest touches the
    // device (its configuration space, from user space), vm.info shows it
    // failed with the reason; the VMM keeps answering, the device is
    // removed cleanly and the others still work.
    let state = |id: &str| {
        let info = c.vm_info().unwrap();
        let d = info.devices.into_iter().find(|d| d.id == id).unwrap();
        (d.state, d.error)
    };
    assert_eq!(state("acpi"), (Some(DeviceState::Ok), None));
    let acpi = servers.remove(1);
    drop(acpi);
    g.wait_shell();
    let (_, out) = g.run(&format!(
        "cat /sys/bus/pci/devices/{}/config > /dev/null; echo read",
        bdfs[1]
    ));
    assert!(out.contains("read"), "{out}");
    let (st, why) = state("acpi");
    assert_eq!(st, Some(DeviceState::Failed), "{why:?}");
    let why = why.unwrap_or_default();
    assert!(why.starts_with("configuration read: "), "{why}");
    assert_eq!(state("cold"), (Some(DeviceState::Ok), None));
    c.vm_remove_device("acpi").unwrap();
    let after = GpioServer::start(&bin, &s.0, "after");
    let mark = g.console().len();
    let added = c
        .vm_add_user_device(&config(&after, "after", Some("br0")))
        .unwrap();
    check_bound(&g, mark, &added.pci_path);
    let ids: Vec<String> = c
        .vm_info()
        .unwrap()
        .devices
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["cold", "onroot", "native", "after"], "{ids:?}");
}

//! Kernel VFIO against a real host function, when one is given:
//! `ARBOR_TEST_VFIO_DEVICE=/sys/bus/pci/devices/DDDD:BB:DD.F` names a
//! function bound to `vfio-pci` whose IOMMU group is viable, on a host with
//! `/dev/vfio/vfio`. Without it the test prints why it is skipped and
//! passes: the machines this project is developed on have no kernel VFIO
//! (no IOMMU, no `/dev/vfio`), so it has not run here.
//!
//! A request takes the function's whole host device and IOMMU group (see
//! ARCHITECTURE.md): name a function whose group holds that one device,
//! or one function with every other endpoint bound to vfio-pci (they are
//! passed through with it; the hot-plug half then needs a port with room
//! for the group's devices).
//!
//! One guest boot: the function is cold-plugged into a native root port
//! and hot-plugged onto the ACPI bridge (after its removal). Each time the
//! guest enumerates it with its host ids at the BDF its `pci_path`
//! resolves to, and `vm.info` lists it with its host BDF, IOMMU group and
//! state `ok`; adding it twice is refused; removal gives it back.

use std::time::Duration;

use api::client::Client;
use api::types::{DeviceConfig, DeviceKind, DeviceState};
use api::ApiErrorKind;
use arbor_tests::{guest_bdf, kvm_available, wait_count, Guest, Scratch};

/// The function to pass through, or why the test cannot run.
fn device_under_test() -> Result<String, String> {
    let path = std::env::var("ARBOR_TEST_VFIO_DEVICE").map_err(|_| {
        "ARBOR_TEST_VFIO_DEVICE is not set (it names /sys/bus/pci/devices/DDDD:BB:DD.F, \
         bound to vfio-pci)"
            .to_string()
    })?;
    if !std::path::Path::new("/dev/vfio/vfio").exists() {
        return Err("/dev/vfio/vfio is missing: this host has no kernel VFIO".into());
    }
    if !kvm_available() {
        return Err("no /dev/kvm".into());
    }
    Ok(path)
}

/// `vendor:device` of the host function, as the guest kernel prints them.
fn host_ids(path: &str) -> String {
    let read = |f: &str| {
        let v = std::fs::read_to_string(format!("{path}/{f}"))
            .unwrap_or_else(|e| panic!("{path}/{f}: {e}"));
        v.trim().trim_start_matches("0x").to_string()
    };
    format!("{}:{}", read("vendor"), read("device"))
}

/// Waits for the guest to enumerate the function at `pci_path`; returns
/// its guest BDF.
fn enumerated(g: &Guest, mark: usize, pci_path: &str, ids: &str) -> String {
    let needle = format!("[{ids}] type 00");
    let tail = wait_count(g, mark, &needle, 1);
    let bdf = guest_bdf(pci_path, &g.console());
    assert!(
        tail.contains(&format!("pci {bdf}: {needle}")),
        "[{ids}] not at {bdf} (path {pci_path}):\n{tail}"
    );
    bdf
}

#[test]
fn host_function_cold_and_hot_plugged() {
    let path = match device_under_test() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("vfio_kernel: skipped: {why}");
            return;
        }
    };
    let ids = host_ids(&path);
    let bdf = path.rsplit('/').next().unwrap_or_default().to_string();
    let s = Scratch::new("vfio-kernel");
    let sock = s.path("api.sock");
    let g = Guest::boot_user(
        "vfio-kernel",
        1,
        "",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--pci-port",
            "id=rp0,type=root-port",
            "--pci-port",
            "id=br0,type=pci-bridge,io-reserve=4K",
            "--device",
            &format!("path={path},id=host,port=rp0"),
            "--remove-timeout",
            "120",
        ],
    );
    g.wait_for("Run /init as init process");
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    let info = c.vm_info().unwrap();
    let rec = info.devices.iter().find(|d| d.id == "host").unwrap();
    assert_eq!(rec.kind, DeviceKind::Vfio);
    assert_eq!(rec.host_bdf.as_deref(), Some(bdf.as_str()), "{rec:?}");
    assert!(rec.iommu_group.is_some(), "{rec:?}");
    assert_eq!(rec.state, Some(DeviceState::Ok), "{rec:?}");
    enumerated(&g, 0, &rec.pci_path, &ids);

    // The same function twice is refused and changes nothing.
    let before = c.vm_info().unwrap().devices;
    let e = c
        .vm_add_device(&DeviceConfig {
            path: path.clone(),
            id: Some("twice".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.api_error_kind(), Some(ApiErrorKind::Conflict), "{e}");
    assert_eq!(c.vm_info().unwrap().devices, before);
    drop(g);

    // Hot plug onto the ACPI bridge, removal, and again.
    let sock2 = s.path("api2.sock");
    let g = Guest::boot_user(
        "vfio-kernel-hot",
        1,
        "",
        &[
            "--api-socket",
            sock2.to_str().unwrap(),
            "--pci-port",
            "id=br0,type=pci-bridge,io-reserve=4K",
            "--remove-timeout",
            "120",
        ],
    );
    g.wait_shell();
    let c = Client::new(&sock2).with_timeout(Duration::from_secs(120));
    for round in 0..2 {
        let mark = g.console().len();
        let added = c
            .vm_add_device(&DeviceConfig {
                path: path.clone(),
                id: Some("hot".into()),
                port: Some("br0".into()),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", g.stderr()));
        let guest = enumerated(&g, mark, &added.pci_path, &ids);
        let (_, out) = g.run(&format!("cat /sys/bus/pci/devices/{guest}/vendor"));
        assert!(out.contains(&format!("0x{}", &ids[..4])), "{out}");
        let info = c.vm_info().unwrap();
        let rec = info.devices.iter().find(|d| d.id == "hot").unwrap();
        assert_eq!(rec.state, Some(DeviceState::Ok), "{rec:?}");
        c.vm_remove_device("hot").unwrap();
        assert!(c.vm_info().unwrap().devices.iter().all(|d| d.id != "hot"));
    }
}

//! Hot-adds at every moment of boot, on every mechanism (native root port,
//! ACPI bridge, ACPI root bus): before the first vCPU runs, during early
//! boot (before the guest has programmed its interrupt controllers), while
//! paused early in boot, and after `Run /init`. Every device must reach its
//! driver and the guest must live: an interrupt raised before the guest can
//! take it used to arrive through the reset-state PIC as exception vector 5
//! and kill the booting kernel.

use std::path::Path;
use std::time::{Duration, Instant};

use api::client::Client;
use api::{ApiMessage, ApiRequest, ApiResponse};
use arbor_tests::{boot_with_api, disk_at, kvm_available, raw_disk, timeout, wait_count, Scratch};

/// The three mechanisms of [`arbor_tests::WITH_ACPI_BRIDGE`]: (port, pci_path).
const PLACES: [(Option<&str>, Option<&str>); 3] = [
    (Some("rp0"), None), // native PCIe hotplug
    (Some("br0"), None), // ACPI hotplug behind a bridge
    (None, Some("0a")),  // ACPI hotplug on the root bus
];

/// What the guest prints when it has probed a disk of `mib` MiB.
fn probed(mib: u64) -> String {
    format!(" {} 512-byte logical blocks", mib * 2048)
}

fn assert_alive(console: &str, stderr: &str) {
    for bad in ["Kernel panic", "bounds: 0000", "Oops"] {
        assert!(
            !console.contains(bad),
            "the guest died ({bad}):\n{console}\nstderr:\n{stderr}"
        );
    }
}

/// Waits until `file` contains every needle.
fn wait_file(file: &Path, needles: &[String]) -> String {
    let deadline = Instant::now() + timeout();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n.as_str())) {
            return text;
        }
        assert_alive(&text, "");
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needles:?}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hotplug_before_the_first_vcpu_and_after_init() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("boot-hotplug-early");
    let console = s.path("console.log");
    let mut cfg = arbor_tests::kit_vm_config(vmm::SerialOutput::file(console.clone()));
    arbor_tests::with_acpi_bridge(&mut cfg);
    let vm = vmm::Vm::new(cfg).expect("build VM");
    let handle = vm.handle();
    // Queue one add per mechanism before the VM runs: they are served
    // before the first vCPU starts.
    let (tx, wake) = handle.channel().expect("channel");
    let mut replies = Vec::new();
    for (i, (port, path)) in PLACES.iter().enumerate() {
        let f = s.path(&format!("pre{i}.img"));
        raw_disk(&f, 2 + i as u64);
        let (msg, rx) = ApiMessage::new(ApiRequest::VmAddDisk(disk_at(
            &f,
            &format!("pre{i}"),
            *port,
            *path,
        )));
        tx.send(msg).expect("queue");
        replies.push(rx);
    }
    wake.write(1).expect("wake");
    let running = vm.start().expect("start");
    for (i, rx) in replies.into_iter().enumerate() {
        match rx.blocking_recv() {
            Some(Ok(ApiResponse::DeviceAdded(a))) => assert_eq!(a.id, format!("pre{i}")),
            other => panic!("add {i} before boot: {other:?}"),
        }
    }
    let mut want: Vec<String> = (0..3).map(|i| probed(2 + i)).collect();
    want.push("Run /init as init process".into());
    wait_file(&console, &want);

    // After /init, once more on every mechanism.
    for (i, (port, path)) in PLACES.iter().enumerate() {
        let f = s.path(&format!("late{i}.img"));
        raw_disk(&f, 12 + i as u64);
        let port = port.map(|p| if p == "rp0" { "rp1" } else { p });
        let path = path.map(|_| "0b");
        handle
            .add_disk(disk_at(&f, &format!("late{i}"), port, path))
            .unwrap_or_else(|e| panic!("add {i} after init: {e:?}"));
    }
    let want: Vec<String> = (0..3).map(|i| probed(12 + i)).collect();
    wait_file(&console, &want);
    // Add and remove at once on every mechanism: whichever comes first, the
    // guest taking the device or the removal, the removal completes.
    for (i, (port, path)) in PLACES.iter().enumerate() {
        let f = s.path(&format!("flash{i}.img"));
        raw_disk(&f, 20 + i as u64);
        let port = port.map(|p| if p == "rp0" { "rp2" } else { p });
        let path = path.map(|_| "0c");
        handle
            .add_disk(disk_at(&f, &format!("flash{i}"), port, path))
            .unwrap_or_else(|e| panic!("flash add {i}: {e:?}"));
        handle
            .remove_device(&format!("flash{i}"))
            .unwrap_or_else(|e| panic!("flash removal {i}: {e:?}"));
    }
    assert_eq!(handle.info().expect("info").devices.len(), 6);
    // Pausing quiesces the six active disks' workers too, and resumes them.
    for _ in 0..3 {
        handle.pause().expect("pause with active disks");
        handle.resume().expect("resume");
    }
    handle.stop().expect("stop");
    assert_eq!(running.wait().expect("run"), vmm::ExitReason::VmmShutdown);
}

#[test]
fn hotplug_during_early_boot_and_while_paused() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("boot-hotplug-paused");
    let sock = s.path("api.sock");
    let g = boot_with_api("boot-hotplug", &sock);
    // The first kernel line: interrupt controllers are not set up yet.
    g.wait_for("Linux version");
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    for (i, (port, path)) in PLACES.iter().enumerate() {
        let f = s.path(&format!("early{i}.img"));
        raw_disk(&f, 4 + i as u64);
        c.vm_add_disk(&disk_at(&f, &format!("early{i}"), *port, *path))
            .unwrap_or_else(|e| panic!("early add {i}: {e}"));
    }
    // Removed before the guest ever enumerated them: released at once, and
    // the guest never sees them.
    for (i, (port, path)) in PLACES.iter().enumerate() {
        let f = s.path(&format!("gone{i}.img"));
        raw_disk(&f, 16 + i as u64);
        let port = port.map(|p| if p == "rp0" { "rp2" } else { p });
        let path = path.map(|_| "0c");
        c.vm_add_disk(&disk_at(&f, &format!("gone{i}"), port, path))
            .unwrap_or_else(|e| panic!("add {i}: {e}"));
        let t = std::time::Instant::now();
        c.vm_remove_device(&format!("gone{i}"))
            .unwrap_or_else(|e| panic!("removal {i} before enumeration: {e}"));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "removal {i} waited for the guest"
        );
    }
    // Paused early in boot, then resumed.
    c.vm_pause().expect("pause");
    for (i, (port, path)) in PLACES.iter().enumerate() {
        let f = s.path(&format!("paused{i}.img"));
        raw_disk(&f, 8 + i as u64);
        let port = port.map(|p| if p == "rp0" { "rp1" } else { p });
        let path = path.map(|_| "0b");
        c.vm_add_disk(&disk_at(&f, &format!("paused{i}"), port, path))
            .unwrap_or_else(|e| panic!("paused add {i}: {e}"));
    }
    c.vm_resume().expect("resume");
    for mib in [4u64, 5, 6, 8, 9, 10] {
        let tail = wait_count(&g, 0, &probed(mib), 1);
        assert_alive(&tail, &g.stderr());
    }
    g.wait_for("Run /init as init process");
    assert_alive(&g.console(), &g.stderr());
    for mib in [16u64, 17, 18] {
        assert!(
            !g.console().contains(&probed(mib)),
            "the guest saw a disk removed before it enumerated it ({mib} MiB)"
        );
    }
    // Every device is where the API said, and the guest still runs.
    let info = c.vm_info().expect("info");
    assert_eq!(info.devices.len(), 6);
    c.vmm_shutdown().expect("shutdown");
}

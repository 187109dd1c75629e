//! Bad inputs get a one-line error and a non-zero exit, before any guest
//! runs: exit status 2 for usage errors, 1 for errors found while building
//! the VM.

use arbor_tests::{
    guest_kit, kvm_available, run_arbor, run_arbor_env, wait_for_socket, Guest, Scratch,
};

fn assert_fails(args: &[&str], code: i32, needle: &str) {
    assert_fails_env(args, &[], code, needle)
}

fn assert_fails_env(args: &[&str], env: &[(&str, &str)], code: i32, needle: &str) {
    let (status, stderr) = run_arbor_env(args, env);
    assert_eq!(status, Some(code), "args {args:?}: stderr {stderr}");
    assert!(
        stderr.contains(needle),
        "args {args:?}: expected '{needle}' in: {stderr}"
    );
    let lines: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("arbor: error"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn usage_errors() {
    assert_fails(&[], 2, "--kernel is required");
    assert_fails(
        &["--kernel", "/nonexistent/vmlinux"],
        2,
        "cannot open kernel",
    );
    assert_fails(&["--kernel", "k", "--frobnicate"], 2, "unknown option");
    assert_fails(&["--kernel", "k", "--cpus", "many"], 2, "--cpus");
    let (code, out) = run_arbor(&["--help"]);
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn bad_vm_shapes() {
    let kit = guest_kit();
    let k = kit.vmlinux.to_str().unwrap();
    assert_fails(
        &["--kernel", k, "--cpus", "0"],
        2,
        "--cpus must be at least 1",
    );
    assert_fails(&["--kernel", k, "--cpus", "255"], 2, "at most 254");
    assert_fails(&["--kernel", k, "--memory", "1M"], 2, "too small");
    assert_fails(&["--kernel", k, "--memory", "1"], 2, "too small"); // 1 MiB
                                                                     // Two 32-port switches with the default reserves: a configuration that
                                                                     // does not fit (it was exit 1, "underflow").
    assert_fails(
        &[
            "--kernel",
            k,
            "--pci-port",
            "id=rpa,type=root-port",
            "--pci-port",
            "id=s0,type=switch,parent=rpa,downstream=32",
            "--pci-port",
            "id=rpb,type=root-port",
            "--pci-port",
            "id=s1,type=switch,parent=rpb,downstream=32",
        ],
        2,
        "leaving nothing for devices on the root bus: use fewer ports or lower their mem-reserve=",
    );
    assert_fails(
        &["--kernel", k, "--memory", "64T"],
        2,
        "more than this host has",
    );
    let long = "x".repeat(3000);
    assert_fails(
        &["--kernel", k, "--cmdline", &long],
        2,
        "command line is 3000 bytes",
    );
    assert_fails(
        &["--kernel", k, "--initramfs", "/nonexistent/initrd"],
        2,
        "cannot open initramfs",
    );
    // 8 MiB is a valid VM size, but the kernel loads at 16 MiB.
    assert_fails(&["--kernel", k, "--memory", "8M"], 1, "cannot load kernel");
}

#[test]
fn garbage_kernel() {
    let s = Scratch::new("bad-input-kernel");
    let g = s.path("garbage");
    std::fs::write(&g, vec![0xa5u8; 64 * 1024]).unwrap();
    assert_fails(
        &["--kernel", g.to_str().unwrap()],
        1,
        "neither an ELF vmlinux nor a bzImage",
    );
    let empty = s.path("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_fails(
        &["--kernel", empty.to_str().unwrap()],
        1,
        "neither an ELF vmlinux nor a bzImage",
    );
    // An ELF header with nothing behind it.
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(128, 0);
    let bad_elf = s.path("bad-elf");
    std::fs::write(&bad_elf, elf).unwrap();
    assert_fails(
        &["--kernel", bad_elf.to_str().unwrap()],
        1,
        "cannot load kernel",
    );
}

#[test]
fn no_kvm() {
    let s = Scratch::new("bad-input-kvm");
    let k = s.path("k-for-kvm");
    std::fs::write(&k, b"\x7fELF").unwrap();
    let k = k.to_str().unwrap();
    assert_fails_env(
        &["--kernel", k],
        &[("ARBOR_KVM_DEVICE", "/nonexistent/kvm")],
        1,
        "cannot open /nonexistent/kvm",
    );
    // A device node that is not KVM: /dev/null answers no KVM ioctl.
    let (code, stderr) = run_arbor_env(&["--kernel", k], &[("ARBOR_KVM_DEVICE", "/dev/null")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("KVM"), "{stderr}");
}

/// A function of this host not bound to vfio-pci, with its driver (none:
/// unbound), if the host has PCI functions in sysfs.
fn host_function_not_for_vfio() -> Option<(String, Option<String>)> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().find_map(|bdf| {
        let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver"))
            .ok()
            .and_then(|l| Some(l.file_name()?.to_string_lossy().into_owned()));
        (driver.as_deref() != Some("vfio-pci")).then_some((bdf, driver))
    })
}

/// `--device` and `vm.add-device` with functions that cannot be passed
/// through: a clear error, and nothing changes. No guest runs (the API
/// half creates a VM without booting it).
#[test]
fn kernel_vfio_devices_that_cannot_be_passed_through() {
    let kit = guest_kit();
    let k = kit.vmlinux.to_str().unwrap();
    assert_fails(
        &["--kernel", k, "--device", "path=/nonexistent"],
        2,
        "--device: '/nonexistent' does not name a PCI function \
         (expected /sys/bus/pci/devices/DDDD:BB:DD.F)",
    );
    assert_fails(
        &["--kernel", k, "--device", "0000:00:00.0"],
        2,
        "--device: 'path' must be absolute",
    );
    assert_fails(
        &["--kernel", k, "--device", "id=nic"],
        2,
        "--device: missing required option 'path'",
    );
    // Partial assignment: host functions as DDDD:BB:DD.F, each once.
    for (opts, why) in [
        (
            "unassigned=09:00.1",
            "--device: 'unassigned': '09:00.1' is not a host PCI function (expected DDDD:BB:DD.F)",
        ),
        (
            "unassigned=0000:09:00.1+0000:09:00.1",
            "--device: 'unassigned' names 0000:09:00.1 twice",
        ),
        (
            "assigned=0000:09:00.0+0000:09:00.8",
            "--device: 'assigned': '0000:09:00.8' is not a host PCI function",
        ),
        (
            "assigned=",
            "--device: option 'assigned' has an empty value",
        ),
        (
            "unassigned=0000:09:00.1+",
            "--device: 'unassigned': '' is not a host PCI function",
        ),
    ] {
        assert_fails(
            &[
                "--kernel",
                k,
                "--device",
                &format!("/sys/bus/pci/devices/0000:09:00.0,{opts}"),
            ],
            2,
            why,
        );
    }
    if let Some(first) = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
    {
        let path = format!("path={}", first.path().display());
        assert_fails(
            &["--kernel", k, "--device", &path, "--device", &path],
            2,
            "is given twice",
        );
    }
    // Two functions of one host device: one --device takes the device whole.
    let mut names: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0].get(..10) == w[1].get(..10)) {
        let (a, b) = (
            format!("/sys/bus/pci/devices/{}", w[0]),
            format!("/sys/bus/pci/devices/{}", w[1]),
        );
        assert_fails(
            &["--kernel", k, "--device", &a, "--device", &b],
            2,
            &format!(
                "--device: {} and {} are functions of one host device, which one --device \
                 takes whole (leave functions out with unassigned=)",
                w[1], w[0]
            ),
        );
    }
    if !kvm_available() {
        return;
    }
    // A real function of this host, bound to its own driver (or to none):
    // refused while the VM is built, naming the function.
    let host = host_function_not_for_vfio();
    if let Some((bdf, driver)) = &host {
        let why = match driver {
            Some(d) => format!("PCI function {bdf} is bound to driver '{d}', not vfio-pci"),
            None => format!("PCI function {bdf} is not bound to vfio-pci (no driver)"),
        };
        assert_fails(
            &[
                "--kernel",
                k,
                "--device",
                &format!("path=/sys/bus/pci/devices/{bdf}"),
            ],
            1,
            &why,
        );
    }

    // The API: a created VM (not booted) refuses with 400 and vm.info
    // does not change.
    let dir = Scratch::new("bad-input-vfio-api");
    let sock = dir.path("api.sock");
    let _ = std::fs::remove_file(&sock);
    let mut vmm = Guest::start(
        "bad-input-vfio",
        &["--api-socket".into(), sock.display().to_string()],
    );
    wait_for_socket(&sock);
    let c = api::client::Client::new(&sock).with_timeout(arbor_tests::timeout());
    c.vm_create(&serde_json::json!({ "kernel": k, "memory": "64M" }))
        .expect("vm.create");
    let before = c.vm_info().unwrap();
    for (assigned, unassigned, why) in [
        (
            None,
            vec!["09:00.1"],
            "'unassigned': '09:00.1' is not a host PCI function",
        ),
        (
            None,
            vec!["0000:09:00.1", "0000:09:00.1"],
            "'unassigned' names 0000:09:00.1 twice",
        ),
        (
            Some(vec![]),
            vec![],
            "'assigned' must name at least one host function",
        ),
    ] {
        let strings = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
        let e = c
            .vm_add_device(&api::types::DeviceConfig {
                path: "/sys/bus/pci/devices/0000:09:00.0".into(),
                assigned: assigned.map(strings),
                unassigned: strings(unassigned),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(
            e.api_error_kind(),
            Some(api::ApiErrorKind::BadRequest),
            "{e}"
        );
        assert!(e.to_string().contains(why), "{why}: {e}");
        assert_eq!(c.vm_info().unwrap(), before, "{why}");
    }
    let mut paths = vec![
        "/nonexistent".to_string(),
        "/sys/bus/pci/devices/0000:ff:1f.7".to_string(),
    ];
    paths.extend(host.map(|(bdf, _)| format!("/sys/bus/pci/devices/{bdf}")));
    for path in paths {
        let e = c
            .vm_add_device(&api::types::DeviceConfig {
                path: path.clone(),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(
            e.api_error_kind(),
            Some(api::ApiErrorKind::BadRequest),
            "{path}: {e}"
        );
        assert_eq!(c.vm_info().unwrap(), before, "{path}");
    }
    c.vmm_shutdown().unwrap();
    assert_eq!(vmm.wait_exit().code(), Some(0), "{}", vmm.stderr());
}

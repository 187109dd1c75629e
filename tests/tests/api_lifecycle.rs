//! The API socket's life cycle and the VM life-cycle endpoints against a
//! real VM: ping, info, pause/resume (with state conflicts), the power
//! button with its grace period, and socket hygiene (mode 0600, removal on
//! exit). These checks need the VM running, not the guest booted, so they
//! do not wait for the guest.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use api::client::Client;
use api::types::VmState;
use arbor_tests::{guest_kit, kvm_available, Guest};

fn socket_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("arbor-{name}-{}.sock", std::process::id()))
}

fn wait_for_socket(p: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "socket {} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lifecycle_over_the_socket() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let sock = socket_path("lifecycle");
    let _ = std::fs::remove_file(&sock);
    let mut g = Guest::boot(
        "api",
        &kit.vmlinux,
        1,
        "",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--shutdown-grace",
            "2",
        ],
    );
    wait_for_socket(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let c = Client::new(&sock).with_timeout(Duration::from_secs(30));
    assert_eq!(c.vmm_ping().unwrap().version, env!("CARGO_PKG_VERSION"));
    let info = c.vm_info().unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.cpus, Some(1));
    assert_eq!(info.memory, Some(512 << 20));

    // Pause, and the conflicts around it.
    let e = c.vm_resume().unwrap_err();
    assert_eq!(e.api_error_kind(), Some(api::ApiErrorKind::Conflict), "{e}");
    c.vm_pause().unwrap();
    assert_eq!(c.vm_info().unwrap().state, VmState::Paused);
    let e = c.vm_pause().unwrap_err();
    assert_eq!(e.api_error_kind(), Some(api::ApiErrorKind::Conflict), "{e}");
    // While paused the guest makes no progress: its console stays still.
    let before = g.console().len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(g.console().len(), before, "guest ran while paused");
    c.vm_resume().unwrap();
    assert_eq!(c.vm_info().unwrap().state, VmState::Running);

    // Unknown device ids are 404.
    let e = c.vm_remove_device("nope").unwrap_err();
    assert_eq!(e.api_error_kind(), Some(api::ApiErrorKind::NotFound), "{e}");

    // A live socket is refused to a second VMM.
    let (code, err) = arbor_tests::run_arbor(&[
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot serve the API"), "{err}");

    // The guest gets the power button once it has booted; this kernel has
    // no user space to act on it, so the grace period ends the VM.
    g.wait_for("ACPI: button: Power Button [PWRB]");
    g.wait_for("Run /init as init process");
    c.vm_shutdown().unwrap();
    let st = g.wait_exit();
    assert_eq!(st.code(), Some(0), "{}", g.stderr());
    assert!(
        g.stderr().contains("it read the button event"),
        "{}",
        g.stderr()
    );
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn embedding_api() {
    if !kvm_available() {
        return;
    }
    let cfg = arbor_tests::kit_vm_config(vmm::SerialOutput::Off);
    let mut vm = vmm::Vm::new(cfg).expect("build VM");
    let events = vm.subscribe();
    let handle = vm.handle();
    let running = vm.start().expect("start");
    assert_eq!(handle.info().unwrap().state, VmState::Running);
    handle.pause().unwrap();
    assert_eq!(handle.info().unwrap().state, VmState::Paused);
    handle.resume().unwrap();
    handle.stop().unwrap();
    assert_eq!(running.wait().unwrap(), vmm::ExitReason::VmmShutdown);
    let mut kinds = Vec::new();
    while let Some(e) = events.recv_timeout(Duration::from_secs(5)) {
        kinds.push(e.kind);
        if matches!(kinds.last(), Some(vmm::VmEventKind::Stopped { .. })) {
            break;
        }
    }
    // Requests sent before the loop runs are served before the vCPUs
    // start: on a busy host all of them may be, and the VM then stops
    // before it boots.
    let booted = kinds.iter().position(|k| *k == vmm::VmEventKind::Booted);
    assert!(booted.is_none_or(|b| b + 1 < kinds.len()), "{kinds:?}");
    kinds.retain(|k| *k != vmm::VmEventKind::Booted);
    assert_eq!(
        kinds,
        [
            vmm::VmEventKind::Paused,
            vmm::VmEventKind::Resumed,
            vmm::VmEventKind::Stopped {
                reason: vmm::StopReason::VmmShutdown,
                error: None
            }
        ]
    );
    // Requests after the end are refused, not hung.
    assert!(handle.info().is_err());
}

//! Filesystem confinement and privileges of a running `arbor`:
//!
//! - a hot-plug of a file outside the `--allow-path` directories
//!   (`/etc/shadow`, a scratch file next to the allowed directory, a link
//!   out of it, a `..` out of it) is refused with 400 and a message naming
//!   the path and `--allow-path`, and changes nothing; a file inside the
//!   allowed directory hot-plugs and the guest sees it;
//! - with the VMM's own check turned off by the test hook, Landlock alone
//!   refuses the same open with EACCES;
//! - every thread has `NoNewPrivs: 1` and no capability but
//!   `CAP_DAC_OVERRIDE`, which also shows that each one was created after
//!   the confinement (Landlock, like capabilities, belongs to the thread);
//! - `--landlock=off --no-new-privs=off --capabilities=keep` turns it all
//!   off.
//!
//! One guest boots (to see the allowed disk); the other VMs do not need
//! the guest, so the test does not wait for them.

use std::path::Path;
use std::time::Duration;

use api::client::Client;
use api::types::DiskConfig;
use api::ApiErrorKind;
use arbor_tests::{guest_kit, kvm_available, raw_disk, wait_for_socket, Guest, Scratch};

/// `CAP_DAC_OVERRIDE`, the one capability `arbor` keeps.
const KEPT: u64 = 1 << 1;

fn disk(path: &Path, id: &str, readonly: bool) -> DiskConfig {
    DiskConfig {
        path: path.display().to_string(),
        id: Some(id.into()),
        readonly,
        ..Default::default()
    }
}

/// For each thread of `pid`: its name, `NoNewPrivs`, `CapEff`, `CapPrm`
/// and `CapBnd`.
fn threads(pid: u32) -> Vec<(String, u64, u64, u64, u64)> {
    let mut out = Vec::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task list");
    for t in dir.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // the thread exited meanwhile
        };
        let field = |name: &str, radix: u32| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v.trim(), radix).ok())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        out.push((
            comm.trim().to_string(),
            field("NoNewPrivs:", 10),
            field("CapEff:", 16),
            field("CapPrm:", 16),
            field("CapBnd:", 16),
        ));
    }
    out
}

fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Guest {
    let kit = guest_kit();
    let mut argv: Vec<String> = vec![
        "--kernel".into(),
        kit.vmlinux.display().to_string(),
        "--initramfs".into(),
        kit.initramfs.display().to_string(),
        "--cmdline".into(),
        kit.cmdline.clone(),
        "--memory".into(),
        "256M".into(),
    ];
    argv.extend(args.iter().map(|s| s.to_string()));
    Guest::start_env(name, &argv, env)
}

fn stop(mut g: Guest, c: &Client, sock: &Path) {
    c.vmm_shutdown().expect("vmm.shutdown");
    let st = g.wait_exit();
    assert!(st.success(), "arbor exited with {st}\n{}", g.stderr());
    // Landlock let it remove its socket.
    assert!(!sock.exists(), "{} left behind", sock.display());
}

#[test]
fn paths_outside_allowed_dirs_are_refused_and_threads_are_confined() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("confine");
    let allowed = s.path("allowed");
    let outside = s.path("outside");
    std::fs::create_dir_all(&allowed).expect("allowed dir");
    std::fs::create_dir_all(&outside).expect("outside dir");
    let inside_img = allowed.join("in.img");
    raw_disk(&inside_img, 1);
    let outside_img = outside.join("out.img");
    raw_disk(&outside_img, 1);
    let link = allowed.join("link.img");
    std::os::unix::fs::symlink(&outside_img, &link).expect("symlink");
    let dotted = allowed.join("../outside/out.img");
    let shadow = Path::new("/etc/shadow");
    let sock = s.path("api.sock");
    let sock_s = sock.display().to_string();
    let allowed_s = allowed.display().to_string();

    // 1. Defaults: the VMM's check, Landlock, no-new-privs, capabilities.
    let g = start(
        "confine",
        &["--api-socket", &sock_s, "--allow-path", &allowed_s],
        &[],
    );
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(30));
    let before = c.vm_info().expect("vm.info").devices;
    for (p, readonly, resolved) in [
        (shadow, true, None),
        (outside_img.as_path(), false, None),
        (link.as_path(), false, Some(&outside_img)),
        (dotted.as_path(), true, Some(&outside_img)),
    ] {
        let e = c
            .vm_add_disk(&disk(p, "bad", readonly))
            .expect_err("outside the allowed directory");
        assert_eq!(e.api_error_kind(), Some(ApiErrorKind::BadRequest), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("'{}'", p.display())) && msg.contains("--allow-path"),
            "{}: {msg}",
            p.display()
        );
        if let Some(r) = resolved {
            assert!(msg.contains(&r.display().to_string()), "{msg}");
        }
    }
    assert_eq!(
        c.vm_info().expect("vm.info").devices,
        before,
        "a refused disk changed the devices"
    );
    let added = c
        .vm_add_disk(&disk(&inside_img, "in", false))
        .expect("a disk in the allowed directory");
    assert!(!added.pci_path.is_empty());
    g.wait_for(" 2048 512-byte logical blocks");

    let t = threads(g.pid());
    assert!(t.len() >= 4, "{t:?}");
    let names: Vec<&str> = t.iter().map(|x| x.0.as_str()).collect();
    for want in ["arbor-api", "arbor-signals", "vcpu0"] {
        assert!(names.contains(&want), "no {want} thread: {names:?}");
    }
    for (name, nnp, eff, prm, bnd) in &t {
        assert_eq!(*nnp, 1, "{name}: NoNewPrivs");
        assert_eq!(eff & !KEPT, 0, "{name}: CapEff {eff:x}");
        assert_eq!(prm & !KEPT, 0, "{name}: CapPrm {prm:x}");
        assert_eq!(bnd & !KEPT, 0, "{name}: CapBnd {bnd:x}");
    }
    assert!(g.stderr().contains("Landlock: confined"), "{}", g.stderr());
    stop(g, &c, &sock);

    // 2. The VMM's own check off (test hook): Landlock alone refuses, at
    // open, with EACCES; --landlock=require is satisfied by this kernel.
    let g = start(
        "confine-ll",
        &[
            "--api-socket",
            &sock_s,
            "--allow-path",
            &allowed_s,
            "--landlock=require",
            "--serial",
            "off",
        ],
        &[("ARBOR_CONFINE_SELFTEST", "skip-path-check")],
    );
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(30));
    let before = c.vm_info().expect("vm.info").devices;
    for (p, readonly) in [(shadow, true), (outside_img.as_path(), false)] {
        let e = c
            .vm_add_disk(&disk(p, "bad", readonly))
            .expect_err("Landlock refuses");
        let msg = e.to_string();
        assert!(
            msg.contains("Permission denied") && msg.contains("os error 13"),
            "{}: {msg}",
            p.display()
        );
    }
    assert_eq!(c.vm_info().expect("vm.info").devices, before);
    c.vm_add_disk(&disk(&inside_img, "in", true))
        .expect("Landlock lets the allowed directory through");
    stop(g, &c, &sock);

    // 3. Everything off: the same open succeeds, and the thread keeps its
    // privileges.
    let g = start(
        "confine-off",
        &[
            "--api-socket",
            &sock_s,
            "--allow-path",
            &allowed_s,
            "--landlock=off",
            "--no-new-privs=off",
            "--capabilities=keep",
            // Installing a seccomp filter sets no-new-privs too.
            "--seccomp=off",
            "--serial",
            "off",
        ],
        &[("ARBOR_CONFINE_SELFTEST", "skip-path-check")],
    );
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(30));
    c.vm_add_disk(&disk(&outside_img, "out", true))
        .expect("nothing confines the VMM");
    let ours = threads(std::process::id())[0].2;
    for (name, nnp, eff, _, _) in threads(g.pid()) {
        assert_eq!(nnp, 0, "{name}: NoNewPrivs");
        assert_eq!(eff, ours, "{name}: CapEff, as this test's");
    }
    stop(g, &c, &sock);
}

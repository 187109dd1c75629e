//! A real guest with user space (the kit's `initramfs-user.cpio`: busybox,
//! `arbor-guest`, a shell on ttyS0 driven through [`Guest::run`]).
//!
//! One boot serves many checks, since a boot costs 20-70 s under this
//! project's emulated KVM: a disk is hot-plugged into each kind of place
//! (root port and switch downstream port with native hotplug, a PCI bridge
//! behind a root port and one three levels deep with ACPI slots, the root
//! bus with ACPI slots); the guest resolves the returned `pci_path` in its
//! own sysfs with `arbor-guest` (`pci::path::resolve_sysfs`), and the BDF
//! must be the one virtio-pci bound and the disk under it must have the
//! right size. Data goes both ways (the guest writes and `fsync`s, the host
//! checks the image; the host writes, the guest checks), a read-only disk
//! refuses the guest's writes, a disk held open in the guest is removed,
//! and `poweroff` in the guest ends `arbor` with status 0. A second boot
//! checks `reboot` (status 3), a third that paths still resolve after the
//! guest renumbered its buses. The three tests take one guest at a time.
//!
//! Timings are printed (`--nocapture`): boot to the first user command, the
//! cost of one `guest.run` round trip, hotplug to driver bound as seen by
//! the guest.
//!
//! Removal of a disk a guest process holds open (measured): the request
//! succeeds as for an idle disk; the guest unbinds virtio-blk regardless of
//! openers, the disk leaves `/sys/block`, the holder keeps running with a
//! dead descriptor (reopening it through `/proc/PID/fd` fails with ENXIO),
//! and the next disk is added to the same port normally.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::client::Client;
use arbor_tests::{disk_at, guest_bdf, kvm_available, raw_disk, wait_for_socket, Guest, Scratch};

/// One guest at a time from this file (guests are slow and the machines
/// shared).
static ONE_GUEST: Mutex<()> = Mutex::new(());

const PORTS: &[&str] = &[
    "id=rp0,type=root-port",
    "id=rp1,type=root-port",
    "id=sw0,type=switch,parent=rp1,downstream=2",
    "id=rp2,type=root-port",
    "id=br0,type=pci-bridge,parent=rp2",
    "id=br1,type=pci-bridge,parent=br0",
];

/// Bytes of pattern written and checked per disk.
const DATA: usize = 1 << 20;

/// The value of the first `key=value` line of `out`.
fn kv<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

/// The BDFs the guest's virtio-pci driver is bound to.
fn is_bdf(w: &str) -> bool {
    let b = w.as_bytes();
    b.len() == 12
        && w.starts_with("0000:")
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

#[test]
fn only_whole_addresses_are_bdfs() {
    assert!(is_bdf("0000:07:00.0"));
    assert!(is_bdf("0000:0a:1f.7"));
    for w in [
        "0000:07:01.0:",
        "0000:07:01",
        "0000:07:01.0x",
        "0000:0g:01.0",
        "0000:07-01.0",
    ] {
        assert!(!is_bdf(w), "{w}");
    }
}

fn virtio_pci_bound(g: &Guest) -> Vec<String> {
    let (st, out) = g.run("ls /sys/bus/pci/drivers/virtio-pci/");
    assert_eq!(st, 0, "{out}");
    // Whole words of the form 0000:bb:dd.f only: the kernel's own lines
    // may print on the console meanwhile ("pci 0000:07:01.0: bridge
    // window ..."), with a colon after the address.
    let mut v: Vec<String> = out
        .split_whitespace()
        .filter(|w| is_bdf(w))
        .map(String::from)
        .collect();
    v.sort();
    v
}

fn read_image(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn write_pattern(p: &Path, seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open image");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.write_all(&arbor_guest::pattern(seed, DATA))
        .expect("write pattern");
    f.sync_all().expect("sync image");
}

#[test]
fn user_space_disks_everywhere() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new("guest-user");
    let sock = s.path("api.sock");
    let sock_arg = sock.display().to_string();
    let mut args: Vec<&str> = vec!["--api-socket", &sock_arg, "--remove-timeout", "60"];
    for p in PORTS {
        args.push("--pci-port");
        args.push(p);
    }
    let mut g = Guest::boot_user("guest-user", 1, "", &args);
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));

    let booted = g.wait_shell();
    let t = Instant::now();
    let (st, out) = g.run("echo hello from $(uname -s)");
    let first = t.elapsed();
    assert_eq!((st, out.trim()), (0, "hello from Linux"), "{out}");
    eprintln!(
        "TIMING boot to shell on ttyS0: {booted:?}; first command done at {:?}",
        booted + first
    );
    let mut trips = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(g.run("true").0, 0);
        trips.push(t.elapsed());
    }
    trips.sort();
    eprintln!(
        "TIMING guest.run round trip (`true`, 5 runs): min {:?}, median {:?}, max {:?}",
        trips[0], trips[2], trips[4]
    );
    // Exit status and output come back separately; stderr is merged.
    let (st, out) = g.run("echo out; echo err >&2; exit_code() { return 7; }; exit_code");
    assert_eq!(st, 7, "{out}");
    assert!(out.contains("out") && out.contains("err"), "{out}");

    // Hot-plug into each kind of place.
    let places: &[(&str, Option<&str>, Option<&str>)] = &[
        ("root port, native", Some("rp0"), None),
        ("switch downstream port, native", Some("sw0.1"), None),
        ("bridge behind a root port, ACPI", Some("br0"), None),
        ("bridge three levels deep, ACPI", Some("br1"), None),
        ("root bus, ACPI", None, Some("1f")),
    ];
    for (i, (what, port, pci_path)) in places.iter().enumerate() {
        let mib = 31 + i as u64;
        let f = s.path(&format!("hot-{i}.img"));
        raw_disk(&f, mib);
        // Every other disk carries a pattern from the host for the guest
        // to check; the others get one from the guest for the host.
        let host_seed = 1000 + i as u64;
        let guest_seed = 2000 + i as u64;
        let host_writes = i % 2 == 1;
        if host_writes {
            write_pattern(&f, host_seed);
        }
        let before = virtio_pci_bound(&g);
        let id = format!("hot{i}");
        let t = Instant::now();
        let added = c
            .vm_add_disk(&disk_at(&f, &id, *port, *pci_path))
            .unwrap_or_else(|e| panic!("{what}: add failed: {e}"));
        let (st, out) = g.run(&format!("arbor-guest wait-device {} 120", added.pci_path));
        assert_eq!(st, 0, "{what}: wait-device {}: {out}", added.pci_path);
        let seen = t.elapsed();
        let bdf = kv(&out, "bdf").unwrap_or_else(|| panic!("{what}: no bdf in {out}"));
        let after = virtio_pci_bound(&g);
        let new: Vec<&String> = after.iter().filter(|b| !before.contains(b)).collect();
        assert_eq!(
            new,
            vec![bdf],
            "{what}: {} resolved to {bdf}, virtio-pci bound {new:?}",
            added.pci_path
        );
        assert_eq!(kv(&out, "driver"), Some("virtio-pci"), "{what}: {out}");
        assert_eq!(
            kv(&out, "virtio-driver"),
            Some("virtio_blk"),
            "{what}: {out}"
        );
        let sectors = (mib << 20) / 512;
        assert_eq!(
            kv(&out, "sectors"),
            Some(sectors.to_string().as_str()),
            "{what}: {out}"
        );
        // The same BDF as the host's view (bridge registers) and as the
        // guest's kernel log (bridge lines).
        let info = c.vm_info().unwrap();
        let dev = info.devices.iter().find(|d| d.id == id).unwrap();
        assert_eq!(dev.bdf.as_deref(), Some(bdf), "{what}");
        assert_eq!(guest_bdf(&added.pci_path, &g.console()), bdf, "{what}");
        let (st, res) = g.run(&format!("arbor-guest resolve {}", added.pci_path));
        assert_eq!(st, 0, "{res}");
        assert_eq!(kv(&res, "bdf"), Some(bdf), "{res}");
        let block = kv(&out, "block").unwrap_or_else(|| panic!("{what}: no block in {out}"));
        let dev_node = format!("/dev/{block}");
        eprintln!(
            "{what}: pci_path {} -> {bdf} ({}), {block}, driver bound {seen:?} after the request",
            added.pci_path,
            kv(&res, "sysfs").unwrap_or("?")
        );

        if host_writes {
            let (st, v) = g.run(&format!(
                "arbor-guest blk-verify {dev_node} {host_seed} {DATA}"
            ));
            assert_eq!(st, 0, "{what}: guest did not read the host's pattern: {v}");
            assert_eq!(
                kv(&v, "checksum"),
                Some(
                    format!(
                        "{:#018x}",
                        arbor_guest::checksum(&arbor_guest::pattern(host_seed, DATA))
                    )
                    .as_str()
                ),
                "{v}"
            );
            eprintln!(
                "{what}: guest verified {DATA} bytes in {} ms",
                kv(&v, "ms").unwrap_or("?")
            );
        } else {
            let (st, w) = g.run(&format!(
                "arbor-guest blk-write {dev_node} {guest_seed} {DATA}"
            ));
            assert_eq!(st, 0, "{what}: guest write failed: {w}");
            // Written with O_DIRECT and fsync'ed: in the image now.
            let img = read_image(&f);
            assert!(
                img[..DATA] == arbor_guest::pattern(guest_seed, DATA)[..],
                "{what}: the image does not hold the guest's pattern"
            );
            assert!(img[DATA..].iter().all(|b| *b == 0), "{what}: wrote past");
            eprintln!(
                "{what}: guest wrote {DATA} bytes in {} ms, host verified",
                kv(&w, "ms").unwrap_or("?")
            );
        }
        let t = Instant::now();
        c.vm_remove_device(&id)
            .unwrap_or_else(|e| panic!("{what}: remove failed: {e}"));
        eprintln!("{what}: removal took {:?}", t.elapsed());
    }

    // A read-only disk: the guest's write fails, the image is unchanged.
    let f = s.path("ro.img");
    raw_disk(&f, 27);
    write_pattern(&f, 77);
    let image_before = read_image(&f);
    let mut ro = disk_at(&f, "ro", Some("rp0"), None);
    ro.readonly = true;
    let added = c.vm_add_disk(&ro).expect("add read-only disk");
    let (st, out) = g.run(&format!("arbor-guest wait-device {} 120", added.pci_path));
    assert_eq!(st, 0, "{out}");
    let block = kv(&out, "block").expect("block device").to_string();
    let (st, ro_out) = g.run(&format!("cat /sys/block/{block}/ro"));
    assert_eq!(
        (st, ro_out.trim()),
        (0, "1"),
        "the guest should see {block} read-only"
    );
    let (st, w) = g.run(&format!("arbor-guest blk-write /dev/{block} 78 {DATA}"));
    assert_ne!(st, 0, "writing a read-only disk succeeded: {w}");
    eprintln!(
        "read-only disk: the guest's write failed as it should: {}",
        w.trim()
    );
    let (st, v) = g.run(&format!("arbor-guest blk-verify /dev/{block} 77 {DATA}"));
    assert_eq!(st, 0, "reading the read-only disk: {v}");
    assert!(
        read_image(&f) == image_before,
        "the read-only image changed"
    );
    c.vm_remove_device("ro").expect("remove read-only disk");

    // Removal while a guest process holds the disk open.
    let f = s.path("held.img");
    raw_disk(&f, 26);
    let added = c
        .vm_add_disk(&disk_at(&f, "held", Some("rp0"), None))
        .expect("add disk to hold");
    let (st, out) = g.run(&format!("arbor-guest wait-device {} 120", added.pci_path));
    assert_eq!(st, 0, "{out}");
    let block = kv(&out, "block").expect("block device").to_string();
    let (st, out) = g.run(&format!(
        "sleep 100000 < /dev/{block} & echo holder=$!; sleep 1; ls -l /proc/$!/fd/0"
    ));
    assert_eq!(st, 0, "{out}");
    let holder = kv(&out, "holder").expect("holder pid").to_string();
    let t = Instant::now();
    let removed = c.vm_remove_device("held");
    let took = t.elapsed();
    let (_, after) = g.run(&format!(
        "ls /sys/block; kill -0 {holder} && echo holder-alive; \
         dd if=/proc/{holder}/fd/0 of=/dev/null bs=512 count=1 2>&1; echo dd=$?"
    ));
    eprintln!(
        "removal with /dev/{block} held open by pid {holder}: {removed:?} after {took:?}; \
         in the guest afterwards:\n{after}"
    );
    assert!(
        removed.is_ok(),
        "removing a disk held open in the guest: {removed:?}"
    );
    assert!(
        !after.contains(&block),
        "{block} still in /sys/block after removal: {after}"
    );
    // The VMM still adds devices.
    let f = s.path("after.img");
    raw_disk(&f, 25);
    let added = c
        .vm_add_disk(&disk_at(&f, "after", Some("rp0"), None))
        .expect("add after the held removal");
    let (st, out) = g.run(&format!("arbor-guest wait-device {} 120", added.pci_path));
    assert_eq!(st, 0, "{out}");
    assert_eq!(kv(&out, "sectors"), Some("51200"), "{out}");
    let _ = g.run(&format!("kill {holder}"));

    // Power-off from user space: arbor exits with status 0.
    let t = Instant::now();
    let _ = g.try_run("poweroff", arbor_tests::timeout());
    let status = g.wait_exit();
    eprintln!("poweroff: arbor exited {status:?} after {:?}", t.elapsed());
    assert_eq!(status.code(), Some(0), "{}", g.stderr());
}

#[test]
fn user_space_reboot_exits_3() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = Guest::boot_user("guest-reboot", 1, "", &[]);
    let booted = g.wait_shell();
    eprintln!("TIMING boot to shell on ttyS0: {booted:?}");
    let _ = g.try_run("reboot", arbor_tests::timeout());
    let status = g.wait_exit();
    assert_eq!(status.code(), Some(3), "{}", g.stderr());
}

/// The guest renumbers the buses (`pci=assign-busses` with 4 bus numbers
/// kept for each hotplug bridge, so the numbers differ from the VMM's):
/// the same `pci_path`s still resolve, in the guest, to the disks, cold-
/// and hot-plugged, and `vm.info` reads the new numbers back.
#[test]
fn user_space_paths_survive_renumbering() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new("guest-renumber");
    let sock = s.path("api.sock");
    let sock_arg = sock.display().to_string();
    let mut args: Vec<String> = vec!["--api-socket".into(), sock_arg];
    for p in PORTS {
        args.push("--pci-port".into());
        args.push(p.to_string());
    }
    let cold = [(22u64, "cold-sw", "sw0.1"), (23, "cold-br1", "br1")];
    for (mib, id, port) in cold {
        let f = s.path(&format!("{id}.img"));
        raw_disk(&f, mib);
        args.push("--disk".into());
        args.push(format!("path={},id={id},port={port}", f.display()));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let g = Guest::boot_user("guest-renumber", 1, "pci=assign-busses,hpbussize=4", &argv);
    wait_for_socket(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(120));
    g.wait_shell();
    let check = |id: &str, mib: u64| -> String {
        let info = c.vm_info().unwrap();
        let dev = info.devices.iter().find(|d| d.id == id).unwrap();
        let (st, out) = g.run(&format!("arbor-guest wait-device {} 120", dev.pci_path));
        assert_eq!(st, 0, "{id}: {out}");
        let bdf = kv(&out, "bdf").unwrap_or("?").to_string();
        assert_eq!(
            kv(&out, "sectors"),
            Some(((mib << 20) / 512).to_string().as_str()),
            "{id} at {}: {out}",
            dev.pci_path
        );
        assert_eq!(dev.bdf.as_deref(), Some(bdf.as_str()), "{id}: vm.info");
        eprintln!("renumbered guest: {id} at {} -> {bdf}", dev.pci_path);
        bdf
    };
    let mut bdfs = Vec::new();
    for (mib, id, _) in cold {
        bdfs.push(check(id, mib));
    }
    // Without renumbering the disk behind br1 is on bus 08 (the VMM's
    // numbering, depth first, one bus per bridge).
    assert_ne!(
        bdfs[1], "0000:08:00.0",
        "the guest did not renumber: pci=assign-busses had no effect"
    );
    let f = s.path("hot.img");
    raw_disk(&f, 24);
    c.vm_add_disk(&disk_at(&f, "hot", Some("br1"), None))
        .expect("hot-plug after renumbering");
    check("hot", 24);
}

//! PCI and virtio with a real guest: the root complex and cold-plugged
//! virtio-blk and virtio-rng devices as the guest kernel enumerates and
//! drives them; reads (a partition table), writes (an ext4 root mounted
//! read-write) and read-only disks.

use arbor_tests::{
    ext4_field, ext4_root, guest_kit, kvm_available, mbr_disk, raw_disk, Guest, Scratch,
};

#[test]
fn enumeration_and_reads() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let s = Scratch::new("pci-enum");
    let plain = s.path("plain.img");
    let parts = s.path("parts.img");
    raw_disk(&plain, 96);
    mbr_disk(&parts, 40);
    let d1 = format!("path={},serial=vol0,id=data", plain.display());
    let d2 = format!("path={},readonly=on", parts.display());
    let mut g = Guest::boot(
        "pci-enum",
        &kit.vmlinux,
        1,
        "arbor_init=poweroff",
        &["--disk", &d1, "--disk", &d2, "--rng", "id=entropy"],
    );
    // Host bridge, the default topology's root ports (root slots 01-08),
    // then the devices in the documented order: disks in command-line
    // order, then the rng, in the root bus's next free slots.
    g.wait_for("ACPI: MCFG");
    g.wait_for("PCI: MMCONFIG for domain 0000 [bus 00-08] at [mem 0xe0000000-0xe08fffff]");
    g.wait_for("OS now controls [PCIeHotplug PCIeCapability]");
    g.wait_for("pci 0000:00:00.0: [8086:29c0] type 00 class 0x060000");
    g.wait_for("pci 0000:00:01.0: [1b36:000c] type 01 class 0x060400");
    g.wait_for("pci 0000:00:08.0: [1b36:000c] type 01 class 0x060400");
    g.wait_for("pci 0000:00:09.0: [1af4:1042] type 00 class 0x018000");
    g.wait_for("pci 0000:00:0a.0: [1af4:1042] type 00 class 0x018000");
    g.wait_for("pci 0000:00:0b.0: [1af4:1044] type 00 class 0x00ff00");
    // The devices have no INTx pin: completing I/O proves MSI-X delivery.
    g.wait_for("virtio_blk virtio0: [vda] 196608 512-byte logical blocks");
    g.wait_for("virtio_blk virtio1: [vdb] 81920 512-byte logical blocks");
    // Reads: the partition table of the second disk.
    g.wait_for(" vdb: vdb1 vdb2");
    g.wait_for("reboot: Power down");
    assert_eq!(g.wait_exit().code(), Some(0), "{}", g.stderr());
    assert!(
        !g.console().contains("[1b36:000e]"),
        "the default topology has no PCI bridge"
    );
    let log = g.stderr();
    assert!(
        log.contains("00:09.0: MSI-X enabled") && log.contains("00:0b.0: MSI-X enabled"),
        "MSI-X not enabled by the guest:\n{log}"
    );
}

/// Boots with `img` as the ext4 root (`root=/dev/vda rw`), waits for the
/// mount, `/init` and the power-off, and checks the exit status.
fn boot_ext4_root(name: &str, img: &std::path::Path, readonly: bool) -> Guest {
    let kit = guest_kit();
    let ro = if readonly { ",readonly=on" } else { "" };
    let mut g = Guest::start(
        name,
        &[
            "--kernel".into(),
            kit.vmlinux.display().to_string(),
            "--cmdline".into(),
            format!(
                "{} root=/dev/vda rw init=/init arbor_init=poweroff",
                kit.cmdline
            ),
            "--disk".into(),
            format!("path={}{ro}", img.display()),
        ],
    );
    g.wait_for("EXT4-fs (vda): mounted filesystem");
    g.wait_for("Run /init as init process");
    g.wait_for("reboot: Power down");
    assert_eq!(g.wait_exit().code(), Some(0), "{}", g.stderr());
    g
}

#[test]
fn ext4_root_read_write() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("pci-ext4");
    let img = s.path("root.img");
    ext4_root(&img, 32, &s);
    assert_eq!(ext4_field(&img, "Mount count"), "0");
    boot_ext4_root("ext4-rw", &img, false);
    // The guest's mount wrote the superblock through virtio-blk.
    assert_eq!(ext4_field(&img, "Mount count"), "1");
    assert_ne!(ext4_field(&img, "Last mount time"), "n/a");
}

#[test]
fn readonly_disk_is_untouched() {
    if !kvm_available() {
        return;
    }
    let s = Scratch::new("pci-ro");
    let img = s.path("root.img");
    ext4_root(&img, 32, &s);
    let before = std::fs::read(&img).unwrap();
    let g = boot_ext4_root("ext4-ro", &img, true);
    assert!(
        g.console().contains("write access unavailable")
            || g.console().contains("readonly")
            || g.console().contains("read-only"),
        "guest did not notice the disk is read-only:\n{}",
        g.console()
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "read-only disk changed"
    );
}

#[test]
fn intx_when_msi_is_off() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let s = Scratch::new("pci-intx");
    let root = s.path("root.img");
    let deep = s.path("deep.img");
    mbr_disk(&root, 41);
    mbr_disk(&deep, 42);
    // pci=nomsi: the guest drives the devices through INTx, routed by the
    // root bus's _PRT (and swizzled by the guest behind the bridges).
    let d1 = format!("path={},readonly=on", root.display());
    let d2 = format!("path={},readonly=on,port=br0", deep.display());
    let mut g = Guest::boot(
        "pci-intx",
        &kit.vmlinux,
        1,
        "pci=nomsi arbor_init=poweroff",
        &[
            "--pci-port",
            "id=rp0,type=root-port",
            "--pci-port",
            "id=br0,type=pci-bridge,parent=rp0",
            "--disk",
            &d1,
            "--disk",
            &d2,
        ],
    );
    g.wait_for("83968 512-byte logical blocks");
    g.wait_for("86016 512-byte logical blocks");
    // Reading the partition tables needs completed I/O: interrupts work.
    g.wait_for(" vda: vda1 vda2");
    g.wait_for(" vdb: vdb1 vdb2");
    g.wait_for("reboot: Power down");
    assert_eq!(g.wait_exit().code(), Some(0), "{}", g.stderr());
    assert!(!g.stderr().contains("MSI-X enabled"), "{}", g.stderr());
}

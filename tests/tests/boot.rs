//! Boots the project's test kernel under `arbor`: both image formats (ELF
//! vmlinux through PVH, bzImage through the 64-bit boot protocol), with 1
//! and 2 vCPUs, and checks the guest's kernel log and `arbor`'s exit status
//! for power-off, reboot and panic.
//!
//! The guest kit's `/init` reads `arbor_init=` from its environment: by
//! default it idles, `poweroff` and `reboot` ask the kernel to do that.

use arbor_tests::{guest_kit, kvm_available, mbr_disk, Guest, Scratch};

/// Exit status `arbor` documents for a guest reset.
const EXIT_GUEST_RESET: i32 = 3;

fn check_common_boot(g: &Guest, cpus: u8) {
    // The MP table's floating pointer, where the kernel's scan looks first
    // after the first KiB (without it, the scan costs seconds here).
    g.wait_for("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]");
    // ACPI tables found through the RSDP the VMM wrote.
    g.wait_for("ACPI: RSDP 0x00000000000E0000");
    for table in ["ACPI: XSDT", "ACPI: FACP", "ACPI: DSDT", "ACPI: APIC"] {
        g.wait_for(table);
    }
    // The MADT describes every vCPU: this uniprocessor kernel reports the
    // CPUs beyond its limit of one.
    if cpus > 1 {
        g.wait_for(&format!("Processor {}/0x{:x} ignored", cpus - 1, cpus - 1));
    }
    // The UART at 0x3f8, IRQ 4.
    g.wait_for("ttyS0 at I/O 0x3f8");
    g.wait_for("Run /init as init process");
    if cpus == 1 {
        assert!(
            !g.console().contains("ignored."),
            "one CPU expected:\n{}",
            g.console()
        );
    }
}

#[test]
fn pvh_one_cpu_powers_off() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let mut g = Guest::boot("pvh-1", &kit.vmlinux, 1, "arbor_init=poweroff", &[]);
    check_common_boot(&g, 1);
    g.wait_for("reboot: Power down");
    let st = g.wait_exit();
    assert_eq!(st.code(), Some(0), "stderr: {}", g.stderr());
    assert!(g.stderr().contains("guest powered off"));
}

#[test]
fn pvh_two_cpus_reboots() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let mut g = Guest::boot("pvh-2", &kit.vmlinux, 2, "arbor_init=reboot", &[]);
    check_common_boot(&g, 2);
    g.wait_for("reboot: Restarting system");
    let st = g.wait_exit();
    assert_eq!(st.code(), Some(EXIT_GUEST_RESET), "stderr: {}", g.stderr());
    assert!(!g.console().contains("Kernel panic"), "{}", g.console());
}

#[test]
fn bzimage_one_cpu_reboots() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let mut g = Guest::boot("bz-1", &kit.bzimage, 1, "arbor_init=reboot", &[]);
    check_common_boot(&g, 1);
    g.wait_for("reboot: Restarting system");
    let st = g.wait_exit();
    assert_eq!(st.code(), Some(EXIT_GUEST_RESET), "stderr: {}", g.stderr());
    assert!(!g.console().contains("Kernel panic"), "{}", g.console());
}

#[test]
fn bzimage_two_cpus_powers_off() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let mut g = Guest::boot("bz-2", &kit.bzimage, 2, "arbor_init=poweroff", &[]);
    check_common_boot(&g, 2);
    g.wait_for("reboot: Power down");
    let st = g.wait_exit();
    assert_eq!(st.code(), Some(0), "stderr: {}", g.stderr());
}

#[test]
fn panic_ends_with_reset_status() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    // No such init: the kernel panics, and panic=-1 turns that into a reboot.
    let mut g = Guest::boot(
        "panic",
        &kit.vmlinux,
        1,
        "rdinit=/nonexistent init=/nonexistent",
        &[],
    );
    g.wait_for("Kernel panic");
    let st = g.wait_exit();
    assert_eq!(st.code(), Some(EXIT_GUEST_RESET), "stderr: {}", g.stderr());
}

/// Without ACPI the kernel takes the processors, the IOAPIC, the ISA
/// interrupts and the root bus's PCI INTx routes from the MP table.
#[test]
fn acpi_off_uses_the_mp_table() {
    if !kvm_available() {
        return;
    }
    let kit = guest_kit();
    let s = Scratch::new("mptable");
    let disk = s.path("disk.img");
    mbr_disk(&disk, 43);
    let d = format!("path={},readonly=on", disk.display());
    // pci=nomsi: the disk on the root bus completes its I/O through INTx,
    // routed by the table only.
    let g = Guest::boot(
        "mptable",
        &kit.vmlinux,
        2,
        "acpi=off pci=nomsi",
        &["--disk", &d],
    );
    g.wait_for("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]");
    g.wait_for("Intel MultiProcessor Specification v1.4");
    g.wait_for("Processor #0 (Bootup-CPU)");
    // This uniprocessor kernel reports the second CPU beyond its limit.
    g.wait_for("Processor 1/0x1 ignored");
    g.wait_for("IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23");
    g.wait_for("ttyS0 at I/O 0x3f8 (irq = 4");
    // Reading the partition table needs a completed request: INTx works.
    g.wait_for("88064 512-byte logical blocks");
    g.wait_for(" vda: vda1 vda2");
    g.wait_for("Run /init as init process");
    assert!(!g.console().contains("ACPI: RSDP"), "{}", g.console());
}

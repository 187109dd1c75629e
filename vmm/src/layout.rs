//! The guest physical address map (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT (64-bit boot)           0x0000_6000  PVH start info + memmap
//! 0x0000_7000  boot_params (zero page)     0x0000_9000  page tables (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line         0x0009_fc00  EBDA (reserved): MP table
//! 0x000e_0000  ACPI tables (RSDP first)    0x0010_0000  RAM continues
//! 0xc000_0000  32-bit MMIO hole start      (PCI 32-bit window, ECAM, platform MMIO)
//! 0x1_0000_0000 RAM above 4 GiB, when memory does not fit below the hole
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: GuestAddress = GuestAddress(0x500);
pub const IDT_START: GuestAddress = GuestAddress(0x520);
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
pub const MODLIST_START: GuestAddress = GuestAddress(0x6040);
pub const MEMMAP_START: GuestAddress = GuestAddress(0x6100);
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Longest command line the x86 kernel accepts (COMMAND_LINE_SIZE), with NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
pub const ACPI_SIZE: u64 = 0x20000;
pub const HIGH_RAM_START: GuestAddress = GuestAddress(0x10_0000);

/// Start of the 32-bit MMIO hole below 4 GiB.
pub const MEM_32BIT_HOLE_START: u64 = 0xc000_0000;
pub const MEM_32BIT_HOLE_SIZE: u64 = (1 << 32) - MEM_32BIT_HOLE_START;
/// RAM above the hole starts here.
pub const RAM_64BIT_START: u64 = 1 << 32;

/// PCI 32-bit memory window (devices' non-prefetchable BARs).
/// The I/O port window of the PCI root complex (I/O BARs, bridges' I/O
/// windows): above every platform device's ports.
pub const PCI_IO_START: u64 = 0x2000;
/// Size of [`PCI_IO_START`]'s window (up to the last port, 0xffff).
pub const PCI_IO_SIZE: u64 = 0x1_0000 - PCI_IO_START;
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express ECAM (MMCONFIG): 256 buses x 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Platform MMIO (hotplug registers, GED) just below the IOAPIC.
pub const PLATFORM_MMIO_START: u64 = 0xfe00_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS and identity map pages, at the top of the hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Size of the PCI 64-bit window placed above RAM.
pub const PCI_MMIO64_SIZE: u64 = 1 << 36;

/// The 64-bit PCI window starts above the end of RAM, 1 GiB aligned.
pub fn pci_mmio64_start(ram_end: u64) -> u64 {
    let gib = 1u64 << 30;
    ram_end.max(RAM_64BIT_START).div_ceil(gib) * gib
}

/// The host bridge's 32-bit and 64-bit windows, as (base, size), for a VM
/// with `memory` bytes of RAM (the 64-bit window sits above RAM).
pub fn pci_windows(memory: u64) -> ((u64, u64), (u64, u64)) {
    let ram_end = ram_ranges(memory).last().map(|(a, s)| a.0 + s).unwrap_or(0);
    (
        (PCI_MMIO32_START, PCI_MMIO32_SIZE),
        (pci_mmio64_start(ram_end), PCI_MMIO64_SIZE),
    )
}

/// Guest RAM ranges for `size` bytes of memory: below the 32-bit hole, then
/// above 4 GiB for what does not fit.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MEM_32BIT_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MEM_32BIT_HOLE_START),
            (GuestAddress(RAM_64BIT_START), size - MEM_32BIT_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MEM_32BIT_HOLE_START));
        assert_eq!(
            r[1],
            (GuestAddress(1 << 32), (4 << 30) - MEM_32BIT_HOLE_START)
        );
        assert_eq!(pci_mmio64_start(512 << 20), 1 << 32);
        assert_eq!(pci_mmio64_start((5 << 30) + 1), 6 << 30);
    }

    const _: () = {
        assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
        assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= PLATFORM_MMIO_START);
        assert!(PLATFORM_MMIO_START < IOAPIC_START);
    };
}

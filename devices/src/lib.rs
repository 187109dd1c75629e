//! Device models for Arbor: legacy platform devices and (in `virtio`) the
//! virtio-pci transport with its devices; (in `vfio`) PCI passthrough. Nothing here talks to KVM; the
//! VMM registers these models on its buses and wires their interrupts.

pub mod acpi;
pub mod legacy;
pub mod log_limit;
pub mod vfio;
pub mod virtio;

/// Gives the heap's free pages back to the kernel (glibc's `malloc_trim`):
/// the top of the heap above what is in use, and every whole free page
/// inside it. Called after the rare events that allocate and free much in
/// one go (a device activated, added or removed), so that what they freed
/// does not stay resident: with one malloc arena (see the `arbor` binary)
/// a freed chunk between live ones otherwise keeps its pages. A few
/// microseconds on a heap of a few hundred KiB.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under
    // its lock, and returns unused pages with madvise or brk; it touches no
    // memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

//! PCI passthrough: one PCI function model ([`VfioPciDevice`]) over a back end
//! ([`VfioBackend`]) that reaches the real function, through the VFIO region
//! and interrupt model (regions 0-5 are the BARs, 6 the expansion ROM, 7 the
//! configuration space; interrupt index 0 is INTx, 1 MSI, 2 MSI-X).
//!
//! The back ends are [`kernel::KernelVfioBackend`], a host function bound to
//! `vfio-pci` through the `vfio-ioctls` crate (container, group and device;
//! IOMMU group rules in [`group`]), and [`user::VfioUserBackend`], a
//! vfio-user client (the `vfio_user` crate's `Client` over the server's UNIX
//! socket, with what it lacks completed around it: see that module).
//!
//! What the model does (see [`device`]):
//! - a virtualised configuration header: identity, class, revision and
//!   subsystem ids are read once from the device; BARs are sized from the
//!   back end's region information (not from what the device's registers
//!   claim) with their type (I/O, 32/64-bit memory, prefetchable) taken from
//!   the device's BAR registers, and the guest's BAR programming is followed
//!   by the VMM like any emulated function's; the command register is
//!   virtual and also forwarded, so the device sees its decodes enabled;
//! - capabilities: the device's list (read through the back end's
//!   configuration region) is walked, bounded (pointers into the header or
//!   past 0xfc, a capability seen twice and more than 48 of them end the
//!   walk), and only MSI, MSI-X and vendor-specific capabilities (ID 0x09:
//!   virtio-pci describes where its register blocks live with them) are
//!   offered, relinked in the device's order; every other capability is
//!   hidden (its bytes still read through at their offsets), the extended
//!   space reads zero. A vendor-specific capability reads through to the
//!   device but for its next pointer, and writes to it (and to every byte
//!   outside MSI and MSI-X) go to the device, as QEMU's vfio does for the
//!   capabilities it does not virtualise; one lying inside an emulated
//!   capability (a malformed list) is not offered. MSI is offered when
//!   the back end has MSI interrupts (as many vectors as both allow, a power
//!   of two), MSI-X when it has MSI-X interrupts and the table and PBA lie in
//!   memory BARs (table size bounded by the back end's count); the VMM gives
//!   each an interrupt group (a [`MsiGroupFactory`]: one KVM GSI and irqfd
//!   per vector). Otherwise they are hidden and the function uses INTx;
//! - MSI and MSI-X are emulated: their registers are virtual (never written
//!   to the device), the MSI-X table and PBA are trapped in their BAR and
//!   served by [`pci::MsixConfig`] (accesses straddling their edges are
//!   dropped), MSI by [`pci::MsiConfig`]. Each programmed vector is a KVM MSI
//!   route of its GSI; when the guest enables MSI-X (or MSI with N
//!   vectors) the back end is given the vectors' irqfds on interrupt index 2
//!   (1) and INTx is taken off it; disabling gives INTx back. The modes are
//!   exclusive (both enabled: the one in use stays). Masking: a masked
//!   vector's irqfd is unregistered from KVM (route kept), so what the
//!   device signals meanwhile is counted in the eventfd; a PBA (or MSI
//!   pending register) read turns those counts into pending bits and
//!   unmasking delivers a pending vector once; an irqfd registered again
//!   with a count also delivers it (KVM checks on registration). A signal
//!   counted while masked and never read can thus arrive late, once, after
//!   unmasking: a spurious interrupt at worst;
//! - INTx: the back end signals an eventfd that the VMM registers as a KVM
//!   irqfd with resample (level-triggered, lowered on EOI); the resample
//!   eventfd is also given to the back end to unmask INTx (kernel VFIO);
//! - BARs: the parts of memory BARs the back end lets be mmap-ed
//!   ([`VfioBackend::region_mmap`]: a vfio-user region with a file
//!   descriptor, a kernel VFIO region with `VFIO_REGION_INFO_FLAG_MMAP`,
//!   each with its sparse mmap areas) are mapped once (`MAP_SHARED`,
//!   read-only if the region is) when the function is created, less every
//!   page holding the MSI-X table or PBA, and rounded inward to whole pages
//!   (a BAR or area smaller than a page, or not page-aligned in the file,
//!   stays trapped); the VMM puts them into the guest as KVM memory slots
//!   ([`pci::PciDevice::direct_areas`]) while the BAR is placed and memory
//!   decode is on, so the guest's accesses there never exit. Every other
//!   BAR access is trapped and forwarded, except the MSI-X table and PBA,
//!   which are emulated; the expansion ROM is hidden;
//! - all guest RAM is given to the back end for DMA when the function is
//!   created; removal resets the function.
//!
//! Guest accesses never panic: a failing back end marks the function failed,
//! its reads return all-ones and its writes are dropped.

pub mod device;
pub mod group;
pub mod kernel;
pub mod user;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;

use vmm_sys_util::eventfd::EventFd;

pub use device::{FailureWatch, MsiGroupFactory, VfioPciDevice, VfioPciError};
pub use kernel::{KernelVfioBackend, KernelVfioContainer};
pub use user::VfioUserBackend;

/// VFIO region index of the configuration space.
pub const CONFIG_REGION: u32 = 7;
/// VFIO region index of the expansion ROM.
pub const ROM_REGION: u32 = 6;
/// VFIO interrupt index of INTx.
pub const INTX_IRQ: u32 = 0;
/// VFIO interrupt index of MSI.
pub const MSI_IRQ: u32 = 1;
/// VFIO interrupt index of MSI-X.
pub const MSIX_IRQ: u32 = 2;

/// Region flag: readable.
pub const REGION_READ: u32 = 1;
/// Region flag: writable.
pub const REGION_WRITE: u32 = 2;
/// Region flag: may be mmap-ed.
pub const REGION_MMAP: u32 = 4;

/// One region as the back end describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// Size in bytes (0: the device has no such region, e.g. an unused BAR).
    pub size: u64,
    /// `REGION_*` flags.
    pub flags: u32,
}

/// Where the mmap-able parts of a region are: byte 0 of the region is at
/// `offset` in `fd`, and `areas` (offset within the region, size) may be
/// mapped (`MAP_SHARED`, with the region's read/write permissions).
#[derive(Debug)]
pub struct RegionMmap<'a> {
    /// The descriptor to map.
    pub fd: BorrowedFd<'a>,
    /// Offset of the region's first byte in `fd`.
    pub offset: u64,
    /// The areas that may be mapped, as (offset within the region, size).
    pub areas: Vec<(u64, u64)>,
}

/// One interrupt index as the back end describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Interrupt index (0 INTx, 1 MSI, 2 MSI-X, ...).
    pub index: u32,
    /// Number of vectors.
    pub count: u32,
}

/// What a passthrough function needs from whatever reaches the real device.
pub trait VfioBackend: Send {
    /// A short description for logs and `vm.info` (host BDF, socket path).
    fn describe(&self) -> String;

    /// Region `index`, if the device has it.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;

    /// The parts of region `index` that may be mmap-ed, if any (the region
    /// has [`REGION_MMAP`] and the back end can give a descriptor). None by
    /// default: every access is forwarded.
    fn region_mmap(&self, _index: u32) -> Option<RegionMmap<'_>> {
        None
    }

    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;

    /// Writes `data` at `offset` of region `index`.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Interrupt index `index`, if the device has it.
    fn irq_info(&mut self, index: u32) -> Option<IrqInfo>;

    /// Makes the device signal `fds[i]` for vector `i` of interrupt `index`
    /// (an empty slice disables the interrupt).
    fn set_irq_eventfds(&mut self, index: u32, fds: &[&EventFd]) -> io::Result<()>;

    /// Has the back end unmask INTx whenever `fd` is signalled (the KVM
    /// resample eventfd, written on the guest's EOI). Kernel VFIO masks
    /// INTx each time it fires and needs this; a vfio-user server drives
    /// its INTx level itself, so that back end keeps the default, which
    /// does nothing.
    fn set_intx_unmask(&mut self, _fd: &EventFd) -> io::Result<()> {
        Ok(())
    }

    /// Gives the device `size` bytes of guest memory at guest physical
    /// address `iova` (one whole guest RAM region), backed by `file` from
    /// `offset`: a server in another process maps the file; kernel VFIO
    /// maps this process's mapping of the region, once per container.
    fn dma_map(&mut self, iova: u64, size: u64, file: &File, offset: u64) -> io::Result<()>;

    /// Takes back what [`VfioBackend::dma_map`] gave at `iova`.
    fn dma_unmap(&mut self, iova: u64, size: u64) -> io::Result<()>;

    /// Resets the function.
    fn reset(&mut self) -> io::Result<()>;

    /// Stops using the device (closes the connection); later calls fail.
    fn close(&mut self) {}
}

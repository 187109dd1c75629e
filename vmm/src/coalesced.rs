//! Coalesced port writes.
//!
//! A guest write to a port registered with `KVM_REGISTER_COALESCED_MMIO`
//! does not leave the guest: KVM appends it to a ring page shared with the
//! VMM and the vCPU runs on. The VMM applies the queued writes, in order,
//! before it handles the next exit of any vCPU, so a device sees the same
//! sequence of accesses as without coalescing; only the moment it sees a
//! write moves, up to the next exit.
//!
//! That is right for write-only registers whose effect the guest can only
//! observe through a later access that exits anyway. Arbor coalesces two:
//!
//! - the CF8 address latch: every configuration access is a write to 0xcf8
//!   then an access to 0xcfc, so one exit per access instead of two;
//! - the UART's transmit register while no transmit interrupt is enabled:
//!   the kernel's console polls the line status register (an exit) around
//!   every byte, so one exit per byte instead of two. While the guest
//!   enables the transmit interrupt (a tty writing), the register exits as
//!   usual, since that interrupt must follow the write.
//!
//! Under emulated KVM an exit costs the guest tens to hundreds of
//! microseconds, and a boot prints some 15,000 bytes and makes some 10,000
//! configuration accesses; on hardware an exit to user space costs a few
//! microseconds.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};

/// One queued guest write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoalescedWrite {
    /// A port write (else an MMIO write).
    pub pio: bool,
    /// Port or guest-physical address.
    pub addr: u64,
    /// The bytes written (1 to 8).
    pub data: [u8; 8],
    /// How many of `data` were written.
    pub len: usize,
}

impl CoalescedWrite {
    /// The bytes written.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// The VM's ring of coalesced writes, mapped from a vCPU's descriptor (the
/// ring is the VM's: every vCPU's descriptor maps the same page).
pub struct CoalescedRing {
    page: NonNull<u8>,
    page_size: usize,
    /// Entries the ring holds (KVM's `KVM_COALESCED_MMIO_MAX`).
    capacity: u32,
    /// Held while draining, so that writes are applied once and in order
    /// whichever vCPU drains.
    drain: Mutex<()>,
}

// SAFETY: the page is a shared mapping that lives as long as the struct;
// all access to it goes through `drain`, which serialises the VMM's side
// (the kernel's side is the producer, synchronised by the ring indices).
unsafe impl Send for CoalescedRing {}
// SAFETY: as above: `&self` methods only touch the page under the mutex.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring page of `vcpu`'s VM. `None` when this KVM has no
    /// coalesced port I/O.
    pub fn map(kvm: &Kvm, vcpu: &VcpuFd) -> io::Result<Option<Self>> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            return Ok(None);
        }
        // The extension's value is the ring's page offset in the vCPU
        // mapping (0: no coalesced MMIO at all).
        let page_offset = kvm.check_extension_int(Cap::CoalescedMmio);
        if page_offset <= 0 {
            return Ok(None);
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(io::Error::last_os_error()),
        };
        let offset = (page_offset as usize)
            .checked_mul(page_size)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: maps one page of the vCPU descriptor at the offset KVM
        // documents for the coalesced ring; the result is checked, and the
        // mapping is owned by the returned struct (unmapped on drop).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(vcpu),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        let entry = std::mem::size_of::<kvm_coalesced_mmio>();
        Ok(Some(CoalescedRing {
            page,
            page_size,
            capacity: ((page_size - header) / entry) as u32,
            drain: Mutex::new(()),
        }))
    }

    /// Applies every queued write, oldest first, with `apply`. Cheap when
    /// the ring is empty (two loads).
    pub fn drain(&self, mut apply: impl FnMut(CoalescedWrite)) {
        let ring = self.page.as_ptr().cast::<kvm_coalesced_mmio_ring>();
        let _held = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // SAFETY: `ring` points at the mapped page (at least one page,
            // larger than the header); the indices are plain u32s that the
            // kernel updates concurrently, hence volatile reads.
            let (first, last) = unsafe {
                (
                    std::ptr::addr_of!((*ring).first).read_volatile(),
                    std::ptr::addr_of!((*ring).last).read_volatile(),
                )
            };
            // The kernel publishes an entry before moving `last` past it.
            fence(Ordering::Acquire);
            if first == last || first >= self.capacity {
                return;
            }
            // SAFETY: `first` < capacity, so the entry lies inside the
            // page; it is plain data written by the kernel before `last`
            // moved past it.
            let e = unsafe {
                std::ptr::addr_of!((*ring).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>()
                    .add(first as usize)
                    .read_volatile()
            };
            fence(Ordering::Release);
            // SAFETY: as for the reads; `first` is the consumer's index,
            // written only by the VMM (under `drain`).
            unsafe {
                std::ptr::addr_of_mut!((*ring).first).write_volatile((first + 1) % self.capacity)
            };
            // SAFETY: both union members are u32.
            let pio = unsafe { e.__bindgen_anon_1.pio } != 0;
            apply(CoalescedWrite {
                pio,
                addr: e.phys_addr,
                data: e.data,
                len: (e.len as usize).min(e.data.len()),
            });
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `map` with this size and nothing
        // else refers to it once the struct is gone.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
    }
}

/// Turns coalescing of one port range on and off (registers and unregisters
/// it with KVM), remembering the state so that repeated calls cost nothing.
pub struct CoalescedPort {
    vm: Arc<VmFd>,
    port: u16,
    len: u32,
    on: bool,
}

impl CoalescedPort {
    /// A port range, not coalesced yet.
    pub fn new(vm: Arc<VmFd>, port: u16, len: u32) -> Self {
        CoalescedPort {
            vm,
            port,
            len,
            on: false,
        }
    }

    /// Coalesces the range's writes (`true`) or lets them exit (`false`).
    /// A failed (un)registration leaves writes exiting, which is always
    /// correct.
    pub fn set(&mut self, on: bool) {
        if on == self.on {
            return;
        }
        let addr = IoEventAddress::Pio(u64::from(self.port));
        let r = if on {
            self.vm.register_coalesced_mmio(addr, self.len)
        } else {
            self.vm.unregister_coalesced_mmio(addr, self.len)
        };
        match r {
            Ok(()) => self.on = on,
            Err(e) => log::debug!(
                "coalesced writes to port {:#x}: {} failed: {e}",
                self.port,
                if on { "register" } else { "unregister" }
            ),
        }
    }
}

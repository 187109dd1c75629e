//! The kernel VFIO back end: a host PCI function bound to `vfio-pci`,
//! reached through the `vfio-ioctls` crate (container, group, device).
//!
//! How it fits together:
//! - [`probe`] checks everything that can be checked before anything is
//!   opened, in this order: the path names a PCI function (sysfs), then
//!   what the request takes ([`pci::assignment::assign`] over
//!   [`super::group::host_view`]: the whole host device and its IOMMU
//!   groups' endpoints, all bound to `vfio-pci`, the functions left out
//!   named), then the host has kernel VFIO (`/dev/vfio/vfio`) and each
//!   group's character device. Both roots are given ([`HostPaths`]), so
//!   tests run it over a fake tree.
//! - One [`KernelVfioContainer`] per VM: the VFIO container, with the KVM
//!   VFIO device (`KVM_DEV_TYPE_VFIO`, created by the VMM) that the crate
//!   tells about each group it adds. Guest RAM is DMA-mapped into the
//!   container once, when the first function asks for it; later functions
//!   share the mapping (reference-counted per region), and the last one to
//!   go unmaps it.
//! - [`KernelVfioBackend`]: one function. Region accesses are `pread` and
//!   `pwrite` on the device descriptor at the offsets the kernel gave (the
//!   crate's own accessors only log errors: here an error reaches the
//!   device model, which marks the function failed). INTx is given the
//!   KVM irqfd as trigger and the KVM resample eventfd as unmask, so the
//!   kernel's automatic INTx mask is lifted on the guest's EOI.
//!
//! The crate opens `/dev/vfio/vfio` and `/dev/vfio/<group>` itself (fixed
//! paths); the `/dev/vfio` root of [`HostPaths`] is used by [`probe`]'s
//! checks, so production gives `/dev/vfio`.
//!
//! What was not run here: this host has no kernel VFIO (no IOMMU, no
//! `/dev/vfio`); everything above the ioctls is unit-tested over a fake
//! sysfs tree, the ioctl path only by an integration test that needs a real
//! device (`ARBOR_TEST_VFIO_DEVICE`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioRegionInfoCap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use pci::assignment::{AssignError, AssignRequest, Assignment, HostBdf};

use super::group::{self, GroupError};
use super::{IrqInfo, RegionInfo, RegionMmap, VfioBackend, CONFIG_REGION, INTX_IRQ, REGION_MMAP};

pub use vfio_ioctls::VfioDeviceFd as KvmVfioDevice;

/// Number of VFIO PCI regions: six BARs, the ROM, configuration space, VGA.
const PCI_REGIONS: u32 = 9;

/// Where the host's sysfs and VFIO character devices are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPaths {
    /// sysfs root, `/sys`.
    pub sysfs: PathBuf,
    /// VFIO character devices, `/dev/vfio`.
    pub dev_vfio: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            sysfs: PathBuf::from("/sys"),
            dev_vfio: PathBuf::from("/dev/vfio"),
        }
    }
}

/// Why a host function cannot be passed through with kernel VFIO.
#[derive(Debug, thiserror::Error)]
pub enum KernelVfioError {
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error(transparent)]
    Assign(#[from] AssignError),
    #[error("'{field}': {why}")]
    BadFunction { field: &'static str, why: String },
    #[error(
        "kernel VFIO is not available on this host: {0} is missing (the kernel has no VFIO, \
         or the vfio and vfio-pci modules are not loaded)"
    )]
    Unavailable(String),
    #[error("IOMMU group {group} of {bdf} has no VFIO character device ({path} is missing)")]
    NoGroupDevice {
        bdf: String,
        group: u32,
        path: String,
    },
    #[error("cannot open the VFIO container: {0}")]
    Container(#[source] VfioError),
    #[error("cannot open {bdf} through VFIO (IOMMU group {group}): {source}")]
    Device {
        bdf: String,
        group: u32,
        #[source]
        source: VfioError,
    },
    #[error("{0}: cannot duplicate the VFIO device descriptor: {1}")]
    Dup(String, #[source] io::Error),
}

/// What a kernel VFIO request asks for: the function its path names and
/// the host functions its options name.
#[derive(Clone, Copy, Debug)]
pub struct ProbeRequest<'a> {
    /// `/sys/bus/pci/devices/DDDD:BB:DD.F`.
    pub path: &'a str,
    /// The functions to give the guest (`None`: every one not unassigned).
    pub assigned: Option<&'a [String]>,
    /// The functions left out of the guest.
    pub unassigned: &'a [String],
}

fn parse_list(field: &'static str, list: &[String]) -> Result<Vec<HostBdf>, KernelVfioError> {
    list.iter()
        .map(|s| {
            s.parse()
                .map_err(|why| KernelVfioError::BadFunction { field, why })
        })
        .collect()
}

/// Checks, without opening anything, what the request takes
/// ([`pci::assignment::assign`] over sysfs: the whole host device, its
/// IOMMU groups' endpoints, all bound to `vfio-pci`, the functions left out
/// named), then that the host has kernel VFIO and each group's device.
pub fn probe(paths: &HostPaths, req: &ProbeRequest<'_>) -> Result<Assignment, KernelVfioError> {
    let bdf = group::function_of(&paths.sysfs, req.path)?;
    let start: HostBdf = bdf.parse().map_err(|_| GroupError::NotPciFunction(bdf))?;
    let assigned = req
        .assigned
        .map(|a| parse_list("assigned", a))
        .transpose()?;
    let unassigned = parse_list("unassigned", req.unassigned)?;
    let mut named = unassigned.clone();
    named.extend(assigned.iter().flatten());
    let host = group::host_view(&paths.sysfs, start, &named);
    let assignment = pci::assignment::assign(
        &host,
        &AssignRequest {
            function: Some(start),
            assigned,
            unassigned,
        },
    )?;
    let container = paths.dev_vfio.join("vfio");
    if !container.exists() {
        return Err(KernelVfioError::Unavailable(
            container.display().to_string(),
        ));
    }
    for g in &assignment.groups {
        let dev = paths.dev_vfio.join(g.to_string());
        if !dev.exists() {
            let bdf = assignment
                .devices
                .iter()
                .flat_map(|d| d.functions.iter().map(|f| (f.host, f.group)))
                .chain(assignment.held.iter().copied())
                .find(|(_, fg)| fg == g)
                .map_or(start, |(b, _)| b);
            return Err(KernelVfioError::NoGroupDevice {
                bdf: bdf.to_string(),
                group: *g,
                path: dev.display().to_string(),
            });
        }
    }
    Ok(assignment)
}

/// Which guest RAM regions a container has DMA-mapped, and for how many
/// functions: the first function to ask maps a region, the last to go
/// unmaps it.
#[derive(Debug, Default)]
struct DmaRefs(BTreeMap<u64, (u64, usize)>);

impl DmaRefs {
    /// One more user of `size` bytes at `iova`; `true` if it is the first
    /// (the caller maps the region, then calls [`DmaRefs::mapped`]).
    fn acquire(&mut self, iova: u64, size: u64) -> io::Result<bool> {
        match self.0.get_mut(&iova) {
            Some((len, _)) if *len != size => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest RAM at {iova:#x} is mapped with {len:#x} bytes, not {size:#x}"),
            )),
            Some((_, users)) => {
                *users += 1;
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// Records the first user's mapping.
    fn mapped(&mut self, iova: u64, size: u64) {
        self.0.insert(iova, (size, 1));
    }

    /// One user fewer; `true` if it was the last (the caller unmaps).
    fn release(&mut self, iova: u64, size: u64) -> io::Result<bool> {
        let Some((len, users)) = self.0.get_mut(&iova) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("guest RAM at {iova:#x} is not mapped"),
            ));
        };
        if *len != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest RAM at {iova:#x} is mapped with {len:#x} bytes, not {size:#x}"),
            ));
        }
        *users -= 1;
        if *users == 0 {
            self.0.remove(&iova);
            return Ok(true);
        }
        Ok(false)
    }
}

/// The VM's VFIO container: one IOMMU address space for every host function
/// given to the guest, holding guest RAM.
pub struct KernelVfioContainer {
    container: Arc<VfioContainer>,
    /// Guest RAM; held so that what is DMA-mapped stays mapped in this
    /// process as long as the container may use it.
    memory: GuestMemoryMmap,
    mapped: Mutex<DmaRefs>,
}

impl KernelVfioContainer {
    /// Opens `/dev/vfio/vfio` (checking the API version and the type 1 v2
    /// IOMMU); `kvm_vfio` is the VM's KVM VFIO device, told about every
    /// group added to the container.
    pub fn open(
        kvm_vfio: KvmVfioDevice,
        memory: GuestMemoryMmap,
    ) -> Result<Arc<Self>, KernelVfioError> {
        let container =
            VfioContainer::new(Some(Arc::new(kvm_vfio))).map_err(KernelVfioError::Container)?;
        Ok(Arc::new(KernelVfioContainer {
            container: Arc::new(container),
            memory,
            mapped: Mutex::new(DmaRefs::default()),
        }))
    }

    /// DMA-maps the guest RAM region at `iova` (of `size` bytes), unless
    /// another function of the container has already.
    fn map(&self, iova: u64, size: u64) -> io::Result<()> {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if !mapped.acquire(iova, size)? {
            return Ok(());
        }
        let region = self
            .memory
            .find_region(GuestAddress(iova))
            .filter(|r| r.start_addr().0 == iova && r.len() == size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no guest RAM region of {size:#x} bytes at {iova:#x}"),
                )
            })?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| io::Error::other(e.to_string()))?;
        let len = usize::try_from(size).map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: `host..host + len` is a guest RAM region of `self.memory`,
        // which this container keeps mapped until it is dropped (closing
        // the container ends every DMA mapping). The VMM accesses guest RAM
        // only through vm-memory's volatile accessors, never through Rust
        // references, so the device writing it concurrently is allowed.
        unsafe { self.container.vfio_dma_map(iova, len, host) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        mapped.mapped(iova, size);
        Ok(())
    }

    /// Drops one user of the mapping at `iova`; the last one unmaps it.
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if mapped.release(iova, size)? {
            let len = usize::try_from(size).map_err(|e| io::Error::other(e.to_string()))?;
            self.container
                .vfio_dma_unmap(iova, len)
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(())
    }

    /// Guest RAM regions mapped now, with their number of users.
    pub fn mappings(&self) -> Vec<(u64, u64, usize)> {
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .iter()
            .map(|(iova, (size, users))| (*iova, *size, *users))
            .collect()
    }
}

/// One region of the device descriptor.
#[derive(Clone, Debug, Default)]
struct Region {
    info: RegionInfo,
    /// Offset of the region in the device descriptor.
    offset: u64,
    /// The parts that may be mmap-ed (offset within the region, size).
    mmap: Vec<(u64, u64)>,
}

/// The mmap-able parts of a region the kernel describes with `info` and
/// `caps`: none without `VFIO_REGION_INFO_FLAG_MMAP`; the areas of its
/// sparse mmap capability if it has one (the kernel lists there what may be
/// mapped, e.g. a BAR less its MSI-X table on kernels that do not allow
/// mapping that); the whole region otherwise.
pub(crate) fn mmap_areas(info: RegionInfo, caps: &[VfioRegionInfoCap]) -> Vec<(u64, u64)> {
    if info.flags & REGION_MMAP == 0 || info.size == 0 {
        return Vec::new();
    }
    for cap in caps {
        if let VfioRegionInfoCap::SparseMmap(sparse) = cap {
            return sparse
                .areas
                .iter()
                .filter(|a| a.size > 0)
                .map(|a| (a.offset, a.size))
                .collect();
        }
    }
    vec![(0, info.size)]
}

/// A host PCI function bound to `vfio-pci`.
pub struct KernelVfioBackend {
    /// A duplicate of the device descriptor, for `pread`/`pwrite` with
    /// errors; closed before `device` (the group cannot leave the container
    /// while a device descriptor is open).
    file: Option<File>,
    device: Option<VfioDevice>,
    container: Arc<KernelVfioContainer>,
    /// sysfs directory of the function (the crate reads its IOMMU group
    /// link again when the device is closed).
    sysfs_dir: PathBuf,
    bdf: String,
    group: u32,
    regions: Vec<Region>,
}

impl KernelVfioBackend {
    /// Opens function `bdf` of IOMMU group `group` (as [`probe`] checked
    /// it) through `container`: the crate opens its group, adds it to the
    /// container (and to the KVM VFIO device) and opens the device. A
    /// function left out of the guest is opened the same way and held
    /// (never placed): its group stays in this VM's container, so the host
    /// cannot bind a driver to it.
    pub fn open(
        paths: &HostPaths,
        bdf: HostBdf,
        group: u32,
        container: Arc<KernelVfioContainer>,
    ) -> Result<Self, KernelVfioError> {
        let bdf = bdf.to_string();
        let sysfs_dir = paths.sysfs.join("bus/pci/devices").join(&bdf);
        let ops: Arc<dyn vfio_ioctls::VfioOps> = container.container.clone();
        let device =
            VfioDevice::new(&sysfs_dir, ops, false).map_err(|source| KernelVfioError::Device {
                bdf: bdf.clone(),
                group,
                source,
            })?;
        // SAFETY: the descriptor belongs to `device`, which is alive for
        // the whole call; it is only borrowed to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        let file = borrowed
            .try_clone_to_owned()
            .map(File::from)
            .map_err(|e| KernelVfioError::Dup(bdf.clone(), e))?;
        let regions = (0..PCI_REGIONS)
            .map(|index| {
                let info = RegionInfo {
                    index,
                    size: device.get_region_size(index),
                    flags: device.get_region_flags(index),
                };
                Region {
                    info,
                    offset: device.get_region_offset(index),
                    mmap: mmap_areas(info, &device.get_region_caps(index)),
                }
            })
            .collect();
        Ok(KernelVfioBackend {
            file: Some(file),
            device: Some(device),
            container,
            sysfs_dir,
            bdf,
            group,
            regions,
        })
    }

    /// The host function, `DDDD:BB:DD.F`.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// Its IOMMU group.
    pub fn group(&self) -> u32 {
        self.group
    }

    fn device(&self) -> io::Result<&VfioDevice> {
        self.device
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "device closed"))
    }

    /// The descriptor offset of `len` bytes at `offset` of region `index`.
    fn at(&self, index: u32, offset: u64, len: usize) -> io::Result<(&File, u64)> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "device closed"))?;
        let r = self
            .regions
            .get(index as usize)
            .filter(|r| r.info.size > 0)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no region {index}"))
            })?;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > r.info.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset:#x} are outside region {index}"),
            ));
        }
        Ok((file, r.offset + offset))
    }
}

impl VfioBackend for KernelVfioBackend {
    fn describe(&self) -> String {
        format!("vfio {} (IOMMU group {})", self.bdf, self.group)
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(index as usize).map(|r| r.info)
    }

    fn region_mmap(&self, index: u32) -> Option<RegionMmap<'_>> {
        // The BARs only: the ROM and configuration space are never mapped.
        if index >= super::ROM_REGION {
            return None;
        }
        let r = self.regions.get(index as usize)?;
        if r.mmap.is_empty() {
            return None;
        }
        Some(RegionMmap {
            fd: self.file.as_ref()?.as_fd(),
            offset: r.offset,
            areas: r.mmap.clone(),
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let (file, at) = self.at(index, offset, data.len())?;
        file.read_exact_at(data, at)
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let (file, at) = self.at(index, offset, data.len())?;
        if index != CONFIG_REGION && self.regions[index as usize].info.flags & 2 == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("region {index} is read-only"),
            ));
        }
        file.write_all_at(data, at)
    }

    fn irq_info(&mut self, index: u32) -> Option<IrqInfo> {
        let i = self.device().ok()?.get_irq_info(index)?;
        Some(IrqInfo {
            index: i.index,
            count: i.count,
        })
    }

    fn set_irq_eventfds(&mut self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let device = self.device()?;
        if fds.is_empty() {
            device.disable_irq(index)
        } else {
            device.enable_irq(index, fds.to_vec())
        }
        .map_err(|e| io::Error::other(e.to_string()))
    }

    fn set_intx_unmask(&mut self, fd: &EventFd) -> io::Result<()> {
        self.device()?
            .set_irq_resample_fd(INTX_IRQ, vec![fd])
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn dma_map(&mut self, iova: u64, size: u64, _file: &File, _offset: u64) -> io::Result<()> {
        // The kernel maps by this process's address of guest RAM (the
        // container holds it), not by descriptor.
        self.container.map(iova, size)
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> io::Result<()> {
        self.container.unmap(iova, size)
    }

    fn reset(&mut self) -> io::Result<()> {
        // The crate resets only a function that supports reset, and does
        // not report errors.
        self.device()?.reset();
        Ok(())
    }

    fn close(&mut self) {
        self.file = None;
        if let Some(device) = self.device.take() {
            // Closing the device reads the function's IOMMU group link
            // again and panics if it cannot: if the function has gone from
            // sysfs, the descriptor is leaked rather than the VMM stopped.
            if std::fs::read_link(self.sysfs_dir.join("iommu_group")).is_ok() {
                drop(device);
            } else {
                log::error!(
                    "{}: the function has left sysfs; its VFIO descriptor stays open",
                    self.bdf
                );
                std::mem::forget(device);
            }
        }
    }
}

impl Drop for KernelVfioBackend {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::group::tests::tree;

    /// A fake host: a sysfs tree and a `/dev/vfio` with what `dev` lists.
    fn host(dir: &std::path::Path, dev: &[&str]) -> HostPaths {
        let paths = HostPaths {
            sysfs: dir.join("sys"),
            dev_vfio: dir.join("dev/vfio"),
        };
        std::fs::create_dir_all(&paths.dev_vfio).unwrap();
        for d in dev {
            std::fs::write(paths.dev_vfio.join(d), b"").unwrap();
        }
        tree(
            &paths.sysfs,
            &[
                // Group 3: a NIC's two functions, both for vfio, and the
                // root port above them (a bridge: it keeps its driver).
                ("0000:03:00.0", "0x020000", Some("vfio-pci"), Some(3)),
                ("0000:03:00.1", "0x020000", Some("vfio-pci"), Some(3)),
                ("0000:00:1c.0", "0x060400", Some("pcieport"), Some(3)),
                // Group 4: one function for vfio, three others with host
                // drivers.
                ("0000:04:00.0", "0x030000", Some("vfio-pci"), Some(4)),
                ("0000:04:00.1", "0x040300", Some("snd_hda_intel"), Some(4)),
                ("0000:04:00.2", "0x0c0330", Some("xhci_hcd"), Some(4)),
                ("0000:04:00.3", "0x0c8000", Some("nvidia-gpu"), Some(4)),
                // A disk still with its host driver.
                ("0000:05:00.0", "0x010802", Some("nvme"), Some(5)),
                // Group 9: a 4-function device, all for vfio.
                ("0000:09:00.0", "0x030000", Some("vfio-pci"), Some(9)),
                ("0000:09:00.1", "0x040300", Some("vfio-pci"), Some(9)),
                ("0000:09:00.2", "0x0c0330", Some("vfio-pci"), Some(9)),
                ("0000:09:00.3", "0x0c8000", Some("vfio-pci"), Some(9)),
            ],
        );
        paths
    }

    fn path(p: &str) -> ProbeRequest<'_> {
        ProbeRequest {
            path: p,
            assigned: None,
            unassigned: &[],
        }
    }

    /// (host function, guest function) of each guest slot.
    fn slots(a: &Assignment) -> Vec<Vec<(String, u8)>> {
        a.devices
            .iter()
            .map(|d| {
                d.functions
                    .iter()
                    .map(|f| (f.host.to_string(), f.function))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_path_that_is_not_a_pci_function() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let paths = host(t.as_path(), &["vfio", "3"]);
        for p in [
            "/nonexistent",
            "/sys/bus/pci/devices/0000:0f:00.0",
            "/sys/bus/pci/devices/0000:03:00.0/config",
        ] {
            let e = probe(&paths, &path(p)).unwrap_err();
            assert!(
                matches!(e, KernelVfioError::Group(GroupError::NotPciFunction(_))),
                "{p}: {e}"
            );
            assert!(
                e.to_string().contains("does not name a PCI function"),
                "{e}"
            );
        }
        let bad = ["0000:03:00.9".to_string()];
        let e = probe(
            &paths,
            &ProbeRequest {
                unassigned: &bad,
                ..path("/sys/bus/pci/devices/0000:03:00.0")
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "'unassigned': '0000:03:00.9' is not a host PCI function (expected DDDD:BB:DD.F)"
        );
    }

    #[test]
    fn a_function_bound_to_another_driver() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let paths = host(t.as_path(), &["vfio", "5"]);
        let e = probe(&paths, &path("/sys/bus/pci/devices/0000:05:00.0")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "PCI function 0000:05:00.0 is bound to driver 'nvme', not vfio-pci"
        );
    }

    #[test]
    fn a_group_that_is_not_viable_names_every_offender() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let paths = host(t.as_path(), &["vfio", "4"]);
        let e = probe(&paths, &path("/sys/bus/pci/devices/0000:04:00.0")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "IOMMU group 4 of 0000:04:00.0 is not viable: 0000:04:00.1 is bound to \
             snd_hda_intel, 0000:04:00.2 is bound to xhci_hcd, 0000:04:00.3 is bound to \
             nvidia-gpu (every endpoint of the group goes to the VM, assigned or held: bind \
             each to vfio-pci)"
        );
    }

    #[test]
    fn a_four_function_device_over_a_fake_sysfs() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let paths = host(t.as_path(), &["vfio", "9"]);
        let all: Vec<(String, u8)> = (0..4).map(|f| (format!("0000:09:00.{f}"), f)).collect();
        // Whole device by default, whichever function the path names.
        let a = probe(&paths, &path("/sys/bus/pci/devices/0000:09:00.2")).unwrap();
        assert_eq!(slots(&a), [all.to_vec()]);
        assert_eq!(a.groups, [9]);
        // Partial, named.
        let un = ["0000:09:00.1".to_string(), "0000:09:00.3".to_string()];
        let a = probe(
            &paths,
            &ProbeRequest {
                unassigned: &un,
                ..path("/sys/bus/pci/devices/0000:09:00.0")
            },
        )
        .unwrap();
        assert_eq!(slots(&a), [vec![all[0].clone(), all[2].clone()]]);
        assert_eq!(a.held.len(), 2);
        // Partial, not named: the error lists what is left out.
        let only = ["0000:09:00.0".to_string()];
        let e = probe(
            &paths,
            &ProbeRequest {
                assigned: Some(&only),
                ..path("/sys/bus/pci/devices/0000:09:00.0")
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with(
                "0000:09:00.1, 0000:09:00.2, 0000:09:00.3 left out of the guest without being \
                 named"
            ),
            "{e}"
        );
        // Function 0 left out: function 1 is the guest's function 0.
        let un = ["0000:09:00.0".to_string()];
        let a = probe(
            &paths,
            &ProbeRequest {
                unassigned: &un,
                ..path("/sys/bus/pci/devices/0000:09:00.1")
            },
        )
        .unwrap();
        assert_eq!(
            slots(&a),
            [vec![
                ("0000:09:00.1".to_string(), 0),
                all[2].clone(),
                all[3].clone()
            ]]
        );
        assert_eq!(
            a.devices[0].remapped.map(|b| b.to_string()).as_deref(),
            Some("0000:09:00.1")
        );
    }

    #[test]
    fn a_viable_group_needs_kernel_vfio_and_the_group_device() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        // Checked from the sysfs tree before /dev/vfio: a host without
        // kernel VFIO still reports bad paths and groups as such.
        let paths = host(t.as_path(), &[]);
        let e = probe(&paths, &path("/sys/bus/pci/devices/0000:05:00.0")).unwrap_err();
        assert!(matches!(e, KernelVfioError::Assign(_)), "{e}");
        let e = probe(&paths, &path("/sys/bus/pci/devices/0000:03:00.0")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "kernel VFIO is not available on this host: {}/vfio is missing (the kernel has \
                 no VFIO, or the vfio and vfio-pci modules are not loaded)",
                paths.dev_vfio.display()
            )
        );
        std::fs::write(paths.dev_vfio.join("vfio"), b"").unwrap();
        let e = probe(&paths, &path("0000:03:00.0")).unwrap_err();
        assert!(
            matches!(e, KernelVfioError::NoGroupDevice { group: 3, .. }),
            "{e}"
        );
        std::fs::write(paths.dev_vfio.join("3"), b"").unwrap();
        // The root port in group 3 is a bridge: it stays with the host.
        let a = probe(&paths, &path("/sys/bus/pci/devices/0000:03:00.0")).unwrap();
        assert_eq!(
            slots(&a),
            [vec![
                ("0000:03:00.0".to_string(), 0),
                ("0000:03:00.1".to_string(), 1)
            ]]
        );
        assert_eq!(a.groups, [3]);
    }

    #[test]
    fn guest_ram_is_mapped_once_per_container() {
        let mut refs = DmaRefs::default();
        // The first function maps both regions; the second shares them.
        assert!(refs.acquire(0, 1 << 20).unwrap());
        refs.mapped(0, 1 << 20);
        assert!(refs.acquire(1 << 32, 2 << 20).unwrap());
        refs.mapped(1 << 32, 2 << 20);
        assert!(!refs.acquire(0, 1 << 20).unwrap());
        assert!(!refs.acquire(1 << 32, 2 << 20).unwrap());
        // A region of another size at a mapped address is refused.
        assert!(refs.acquire(0, 4096).is_err());
        assert!(refs.release(0, 4096).is_err());
        // The first function goes: nothing is unmapped; the last: all is.
        assert!(!refs.release(0, 1 << 20).unwrap());
        assert!(!refs.release(1 << 32, 2 << 20).unwrap());
        assert!(refs.release(0, 1 << 20).unwrap());
        assert!(refs.release(1 << 32, 2 << 20).unwrap());
        assert!(refs.0.is_empty());
        assert_eq!(
            refs.release(0, 1 << 20).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // A failed mapping (no `mapped` call) leaves nothing behind.
        assert!(refs.acquire(0, 1 << 20).unwrap());
        assert!(refs.0.is_empty());
    }

    #[test]
    fn production_paths() {
        let p = HostPaths::default();
        assert_eq!(p.sysfs, PathBuf::from("/sys"));
        assert_eq!(p.dev_vfio, PathBuf::from("/dev/vfio"));
    }

    #[test]
    fn mmap_areas_follow_the_flag_and_the_sparse_capability() {
        use vfio_ioctls::{VfioRegionInfoCapSparseMmap, VfioRegionSparseMmapArea};
        let info = |flags| RegionInfo {
            index: 0,
            size: 0x4000,
            flags,
        };
        let rw = super::super::REGION_READ | super::super::REGION_WRITE;
        // Not mmap-able: nothing, whatever the capabilities say.
        assert!(mmap_areas(info(rw), &[]).is_empty());
        // Mmap-able without a sparse capability: the whole region.
        assert_eq!(mmap_areas(info(rw | REGION_MMAP), &[]), vec![(0, 0x4000)]);
        assert_eq!(
            mmap_areas(info(rw | REGION_MMAP), &[VfioRegionInfoCap::MsixMappable]),
            vec![(0, 0x4000)]
        );
        // A sparse capability lists what may be mapped (empty areas left out;
        // an empty list: nothing).
        let sparse = |areas: &[(u64, u64)]| {
            VfioRegionInfoCap::SparseMmap(VfioRegionInfoCapSparseMmap {
                areas: areas
                    .iter()
                    .map(|&(offset, size)| VfioRegionSparseMmapArea { offset, size })
                    .collect(),
            })
        };
        assert_eq!(
            mmap_areas(
                info(rw | REGION_MMAP),
                &[sparse(&[(0, 0x2000), (0x3000, 0), (0x3000, 0x1000)])]
            ),
            vec![(0, 0x2000), (0x3000, 0x1000)]
        );
        assert!(mmap_areas(info(rw | REGION_MMAP), &[sparse(&[])]).is_empty());
        // No region.
        let mut none = info(rw | REGION_MMAP);
        none.size = 0;
        assert!(mmap_areas(none, &[]).is_empty());
    }
}

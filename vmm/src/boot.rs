//! Loading the guest kernel, initramfs and command line, and writing the
//! boot information each entry protocol expects: `hvm_start_info` for PVH
//! (ELF vmlinux with a PVH note) and `boot_params` for a bzImage.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::cpu::BootEntry;
use crate::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_MAX: usize = 128;

/// Errors loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel '{0}': {1}")]
    OpenKernel(String, std::io::Error),
    #[error("'{0}' is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(String),
    #[error("ELF kernel '{0}' has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvhEntry(String),
    #[error("cannot load kernel '{0}': {1} (is guest memory large enough?)")]
    LoadKernel(String, linux_loader::loader::Error),
    #[error("cannot open initramfs '{0}': {1}")]
    OpenInitramfs(String, std::io::Error),
    #[error("initramfs '{0}' ({1} bytes) does not fit in guest memory below {2:#x}")]
    InitramfsTooLarge(String, u64, u64),
    #[error("cannot copy the initramfs into guest memory")]
    WriteInitramfs,
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot parameters: {0}")]
    BootParams(String),
}

/// What the vCPU setup needs after loading.
pub struct BootInfo {
    pub entry: BootEntry,
}

fn is_elf(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

fn is_bzimage(file: &mut File) -> std::io::Result<bool> {
    let mut hdr = [0u8; 4];
    file.seek(SeekFrom::Start(0x202))?;
    let n = file.read(&mut hdr)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && u32::from_le_bytes(hdr) == KERNEL_HDR_MAGIC)
}

/// The e820 map: RAM, the legacy hole, the ECAM window, RAM above 4 GiB.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start == 0 {
            map.push((0, EBDA_START, E820_RAM));
            map.push((EBDA_START, HIGH_RAM_START.0 - EBDA_START, E820_RESERVED));
            if end > HIGH_RAM_START.0 {
                map.push((HIGH_RAM_START.0, end - HIGH_RAM_START.0, E820_RAM));
            }
        } else {
            map.push((start, end - start, E820_RAM));
        }
    }
    map.push((PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    map.sort_by_key(|e| e.0);
    map
}

/// End of RAM below the 32-bit hole.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().raw_value() < MEM_32BIT_HOLE_START)
        .map(|r| r.start_addr().raw_value() + r.len())
        .max()
        .unwrap_or(0)
}

/// Copies the initramfs to the top of low RAM (below `max_addr`), page
/// aligned; returns (address, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    max_addr: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| BootError::OpenInitramfs(name.clone(), e))?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| BootError::OpenInitramfs(name.clone(), e))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::OpenInitramfs(name.clone(), e))?;
    let top = low_ram_end(mem).min(max_addr);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitramfsTooLarge(name, size, top))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|_| BootError::WriteInitramfs)?;
    Ok((addr, size))
}

/// Loads kernel, initramfs and command line and writes the boot protocol's
/// structures. `rsdp` is the ACPI RSDP address.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline_str: &str,
    rsdp: u64,
) -> Result<BootInfo, BootError> {
    let kname = kernel.display().to_string();
    let mut kfile = File::open(kernel).map_err(|e| BootError::OpenKernel(kname.clone(), e))?;

    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(cmdline_str)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, CMDLINE_START, &cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    if is_elf(&mut kfile).map_err(|e| BootError::OpenKernel(kname.clone(), e))? {
        let res = Elf::load(mem, None, &mut kfile, Some(HIGH_RAM_START))
            .map_err(|e| BootError::LoadKernel(kname.clone(), e))?;
        let entry = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => addr.raw_value(),
            _ => return Err(BootError::NoPvhEntry(kname)),
        };
        let initrd = match initramfs {
            Some(p) => Some(load_initramfs(mem, p, u64::MAX, res.kernel_end)?),
            None => None,
        };
        write_pvh_info(mem, initrd, rsdp)?;
        Ok(BootInfo {
            entry: BootEntry::Pvh {
                entry,
                start_info: PVH_INFO_START.raw_value(),
            },
        })
    } else if is_bzimage(&mut kfile).map_err(|e| BootError::OpenKernel(kname.clone(), e))? {
        let res = BzImage::load(mem, None, &mut kfile, Some(HIGH_RAM_START))
            .map_err(|e| BootError::LoadKernel(kname.clone(), e))?;
        let mut params = boot_params::default();
        if let Some(hdr) = res.setup_header {
            params.hdr = hdr;
        }
        params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.cmd_line_ptr = CMDLINE_START.raw_value() as u32;
        params.hdr.cmdline_size = cmdline_len as u32;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        params.acpi_rsdp_addr = rsdp;
        if let Some(p) = initramfs {
            let max = match params.hdr.initrd_addr_max {
                0 => 0x37ff_ffff,
                m => u64::from(m),
            };
            let (addr, size) = load_initramfs(mem, p, max + 1, res.kernel_end)?;
            params.hdr.ramdisk_image = addr as u32;
            params.hdr.ramdisk_size = size as u32;
        }
        let map = e820_map(mem);
        if map.len() > params.e820_table.len() {
            return Err(BootError::BootParams("too many e820 entries".into()));
        }
        for (i, (addr, size, type_)) in map.iter().enumerate() {
            params.e820_table[i].addr = *addr;
            params.e820_table[i].size = *size;
            params.e820_table[i].r#type = *type_;
        }
        params.e820_entries = map.len() as u8;
        LinuxBootConfigurator::write_bootparams(
            &BootParams::new::<boot_params>(&params, ZERO_PAGE_START),
            mem,
        )
        .map_err(|e| BootError::BootParams(e.to_string()))?;
        // The 64-bit entry point is 0x200 past the protected-mode code.
        let entry = res.kernel_load.raw_value() + 0x200;
        Ok(BootInfo {
            entry: BootEntry::Linux64 { entry },
        })
    } else {
        Err(BootError::UnknownKernelFormat(kname))
    }
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(mem)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    if map.len() > E820_MAX {
        return Err(BootError::BootParams("too many memory map entries".into()));
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START.raw_value(),
        rsdp_paddr: rsdp,
        memmap_paddr: MEMMAP_START.raw_value(),
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = MODLIST_START.raw_value();
    }
    let mut params = BootParams::new::<hvm_start_info>(&info, PVH_INFO_START);
    params.set_sections::<hvm_memmap_table_entry>(&map, MEMMAP_START);
    if !modules.is_empty() {
        params.set_modules::<hvm_modlist_entry>(&modules, MODLIST_START);
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::BootParams(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_has_holes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(
            map[2],
            (HIGH_RAM_START.0, (64 << 20) - HIGH_RAM_START.0, E820_RAM)
        );
        assert_eq!(map[3], (PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    }

    #[test]
    fn garbage_kernel_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let p = std::env::temp_dir().join(format!("arbor-garbage-{}", std::process::id()));
        std::fs::write(&p, vec![0x5au8; 8192]).unwrap();
        let r = load(&mem, &p, None, "console=ttyS0", 0xe0000);
        assert!(matches!(r, Err(BootError::UnknownKernelFormat(_))));
        std::fs::remove_file(&p).unwrap();
    }
}

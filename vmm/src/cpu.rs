//! vCPU state at boot: CPUID, MSRs, FPU, LAPIC, registers and segments for
//! the two entry protocols (PVH 32-bit protected mode, Linux 64-bit).

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetCpuid(kvm_ioctls::Error),
    #[error("setting CPUID failed: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error("setting MSRs failed: {0}")]
    SetMsrs(String),
    #[error("setting registers failed: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("setting the FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
    #[error("setting up the local APIC failed: {0}")]
    Lapic(kvm_ioctls::Error),
    #[error("writing boot page tables or GDT failed")]
    GuestMemory,
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `ebx` = start info address.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped low 1 GiB,
    /// `rsi` = boot_params address.
    Linux64 { entry: u64 },
}

/// The CPUID template all vCPUs start from.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::GetCpuid)
}

/// Bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `cpuid` for vCPU `id` of `count`: APIC IDs, a one-socket topology
/// of `count` single-thread cores, and the hypervisor bit.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    let count = u32::from(count);
    let core_bits = bits_for(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors.
                e.ebx = (e.ebx & 0xffff) | (u32::from(id) << 24) | (count << 16);
                // HTT when more than one logical processor; hypervisor bit.
                if count > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
                e.ecx |= 1 << 31;
            }
            4 => {
                // EAX[31:26]: cores per package - 1; [25:14]: threads sharing
                // this cache - 1 (caches are per core).
                e.eax = (e.eax & 0x3ff) | ((count - 1) << 26);
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            _ => {}
        }
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// Boot MSRs: syscall MSRs cleared, fast strings on, write-back default
/// memory type with MTRRs enabled.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let entries = [
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, 1),
        msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|e| CpuError::SetMsrs(format!("{e:?}")))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| CpuError::SetMsrs(e.to_string()))?;
    if set != entries.len() {
        // Not every host knows every MSR; report which one stopped it.
        let idx = entries.get(set).map(|e| e.index).unwrap_or(0);
        log::warn!(
            "KVM accepted {set} of {} boot MSRs (stopped at {idx:#x})",
            entries.len()
        );
    }
    Ok(())
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuError::SetFpu)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_apic_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(CpuError::Lapic)?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, v) in lapic.regs[off..off + 4].iter().enumerate() {
            b[i] = *v as u8;
        }
        let v = set_apic_delivery_mode(u32::from_le_bytes(b), mode);
        for (i, byte) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *byte as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(CpuError::Lapic)
}

/// A GDT entry from flags, base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0x0000_ffff)
}

/// The KVM segment a GDT entry describes.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit_raw = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry & 0xff00_0000_0000_0000) >> 32) | ((entry & 0x0000_00ff_ffff_0000) >> 16),
        limit: if g == 1 {
            ((limit_raw as u32) << 12) | 0xfff
        } else {
            limit_raw as u32
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), CpuError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GDT_START.unchecked_add_for(i))
            .map_err(|_| CpuError::GuestMemory)?;
    }
    mem.write_obj(0u64, IDT_START)
        .map_err(|_| CpuError::GuestMemory)
}

trait AddFor {
    fn unchecked_add_for(self, i: usize) -> GuestAddress;
}

impl AddFor for GuestAddress {
    fn unchecked_add_for(self, i: usize) -> GuestAddress {
        GuestAddress(self.0 + (i * 8) as u64)
    }
}

/// Identity-maps the first 1 GiB with 2 MiB pages for the 64-bit entry.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let w = |v: u64, a: GuestAddress| mem.write_obj(v, a).map_err(|_| CpuError::GuestMemory);
    w(PDPTE_START.0 | 0x03, PML4_START)?;
    w(PDE_START.0 | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, GuestAddress(PDE_START.0 + i * 8))?;
    }
    Ok(())
}

/// Writes `gdt` (null, code, data, TSS) and the empty IDT to guest memory
/// and points the segment registers at them.
fn load_segments(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    gdt: &[u64; 4],
) -> Result<(), CpuError> {
    write_gdt(mem, gdt)?;
    let data = segment_from_gdt(gdt[2], 2);
    sregs.gdt.base = GDT_START.0;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = segment_from_gdt(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    Ok(())
}

/// Registers and segments for the boot vCPU.
pub fn setup_boot_registers(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), CpuError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(CpuError::SetRegs)?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            let gdt = [
                0,
                gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x008b, 0, 0x67),    // 32-bit TSS
            ];
            load_segments(mem, &mut sregs, &gdt)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry } => {
            let gdt = [
                0,
                gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x808b, 0, 0xfffff), // TSS
            ];
            load_segments(mem, &mut sregs, &gdt)?;
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START.0;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START.0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(CpuError::SetRegs)?;
    vcpu.set_regs(&regs).map_err(CpuError::SetRegs)
}

/// A one-line dump of the registers a failing exit is explained by.
pub fn describe_registers(vcpu: &VcpuFd) -> String {
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return format!("(registers unavailable: {e})"),
    };
    let sregs = vcpu.get_sregs().ok();
    let mut s = format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
        regs.rip, regs.rsp, regs.rflags, regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi
    );
    if let Some(sr) = sregs {
        s.push_str(&format!(
            " cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            sr.cr0, sr.cr3, sr.cr4, sr.efer, sr.cs.selector
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trip() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment_from_gdt(e, 1);
        assert_eq!(s.selector, 8);
        assert_eq!(s.l, 1);
        assert_eq!(s.g, 1);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.present, 1);
        let t = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!(t.limit, 0x67);
        assert_eq!(t.s, 0);
    }

    #[test]
    fn topology_bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(254), 8);
    }
}

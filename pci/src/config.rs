//! PCI configuration space.
//!
//! [`PciConfiguration`] is a register file of 1024 dwords (256 bytes for conventional
//! functions, 4 KiB for PCI Express ones) plus two per-bit masks:
//!
//! - `writable`: bits the guest may set or clear; every other bit is read-only (this covers
//!   reserved fields, which are read-only zero);
//! - `w1c`: write-1-to-clear bits (status registers): writing 1 clears, writing 0 keeps.
//!
//! A guest write is merged through those masks, then post-processed for the registers with
//! side effects: the command register (decode enables), BARs (moves reported as
//! [`BarChange`]s, sizing probes ignored), the type 1 bus numbers and windows, and the
//! capabilities with state machines (MSI, MSI-X, power management). Everything that changed
//! and matters to the VMM is returned in a [`ConfigWriteOutcome`].
//!
//! Capabilities are appended to the standard list (from 0x40) or the extended list (from
//! 0x100) with [`PciConfiguration::add_capability`] and friends. The expansion ROM BAR is not
//! implemented: it is read-only zero, so sizing it reports "no ROM".

use std::sync::Arc;

use crate::bar::{BarRegion, PciBarConfig, BAR0_REG, NUM_BARS_TYPE0, NUM_BARS_TYPE1};
use crate::device::{BarChange, BarInfo, ConfigWriteOutcome};
use crate::msi::{MsiCapability, MsiConfig, MSI_CAP_ID};
use crate::msix::{
    MsixCapability, MsixConfig, MSIX_CAP_ID, MSIX_CTL_ENABLE, MSIX_CTL_FUNCTION_MASK,
};
use crate::pcie_cap::{PcieCapability, PCIE_CAP_ID};
use crate::pm::{PmCapability, PMCSR_STATE_MASK, PM_CAP_ID, PM_PMCSR};
use crate::PciError;

/// Size of a conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of a PCI Express configuration space.
pub const EXT_CONFIG_SPACE_SIZE: usize = 4096;
/// Number of dword registers in a PCI Express configuration space.
pub const NUM_CONFIG_REGS: usize = EXT_CONFIG_SPACE_SIZE / 4;

/// Command register index (command in the low half, status in the high half).
pub const COMMAND_REG: usize = 1;
/// Command: I/O space enable.
pub const CMD_IO_SPACE: u16 = 1 << 0;
/// Command: memory space enable.
pub const CMD_MEMORY_SPACE: u16 = 1 << 1;
/// Command: bus master enable.
pub const CMD_BUS_MASTER: u16 = 1 << 2;
const CMD_WRITABLE: u32 = 0x0547; // IO, MEM, master, parity, SERR, INTx disable
const STATUS_CAP_LIST: u32 = 1 << 4;
const STATUS_W1C: u32 = 0xf900;
/// Header type register index (cache line, latency, header type, BIST).
pub const HEADER_TYPE_REG: usize = 3;
/// Multi-function bit in the header type byte.
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
const CAP_PTR_OFFSET: usize = 0x34;
const FIRST_CAP_OFFSET: usize = 0x40;
const FIRST_EXT_CAP_OFFSET: usize = 0x100;
const INTERRUPT_REG: usize = 15;
const BRIDGE_BUS_REG: usize = 6;
const BRIDGE_IO_REG: usize = 7;
const BRIDGE_MEM_REG: usize = 8;
const BRIDGE_PREF_REG: usize = 9;
const BRIDGE_PREF_BASE_HI_REG: usize = 10;
const BRIDGE_PREF_LIMIT_HI_REG: usize = 11;
const BRIDGE_IO_HI_REG: usize = 12;
const BRIDGE_CONTROL_SECONDARY_RESET: u32 = 1 << (16 + 6);

/// Configuration header layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderType {
    /// Type 0: endpoint / general device.
    Device,
    /// Type 1: PCI-to-PCI bridge.
    Bridge,
}

/// Identity of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciConfigParams {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Class code: base class << 16 | subclass << 8 | programming interface.
    pub class_code: u32,
    /// Subsystem vendor ID (type 0 only).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (type 0 only).
    pub subsystem_id: u16,
    /// Header type.
    pub header_type: HeaderType,
    /// Interrupt pin (0 = none, 1 = INTA# .. 4 = INTD#).
    pub interrupt_pin: u8,
    /// 4 KiB configuration space (PCI Express); otherwise 256 bytes.
    pub extended: bool,
}

impl PciConfigParams {
    /// Parameters of a type 0 device with no subsystem IDs, no interrupt pin and a 256-byte
    /// configuration space.
    pub fn device(vendor_id: u16, device_id: u16, class_code: u32) -> Self {
        PciConfigParams {
            vendor_id,
            device_id,
            revision_id: 0,
            class_code,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            header_type: HeaderType::Device,
            interrupt_pin: 0,
            extended: false,
        }
    }
}

/// Bus numbers of a type 1 header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusNumbers {
    /// Primary (upstream) bus.
    pub primary: u8,
    /// Secondary bus (directly below the bridge).
    pub secondary: u8,
    /// Highest bus number below the bridge.
    pub subordinate: u8,
}

/// Forwarding windows of a type 1 header; each is an inclusive range, `None` if disabled
/// (base above limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeWindows {
    /// I/O window.
    pub io: Option<(u64, u64)>,
    /// Non-prefetchable memory window.
    pub mem: Option<(u64, u64)>,
    /// Prefetchable memory window.
    pub prefetch: Option<(u64, u64)>,
}

#[derive(Clone, Copy, Debug)]
struct BarSlot {
    cfg: PciBarConfig,
    /// Address last assigned or reported to the VMM.
    committed: u64,
    /// Low half of a 64-bit BAR written; the change is reported with the high half.
    pending: bool,
}

#[derive(Clone, Copy, Debug)]
struct CapEntry {
    /// Capability ID; extended capabilities are `0x1_0000 | id`.
    id: u32,
    offset: usize,
    len: usize,
}

/// A capability described by its initial contents and masks.
pub trait PciCapability {
    /// Capability ID.
    fn id(&self) -> u8;
    /// Contents after the ID and next-pointer bytes.
    fn body(&self) -> Vec<u8>;
    /// Writable bits of the body (same length as the body).
    fn writable_mask(&self) -> Vec<u8>;
    /// Write-1-to-clear bits of the body (same length as the body).
    fn w1c_mask(&self) -> Vec<u8> {
        vec![0; self.body().len()]
    }
}

/// A capability given as raw bytes, e.g. a vendor-specific capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawCapability {
    /// Capability ID.
    pub id: u8,
    /// Contents after the ID and next-pointer bytes.
    pub body: Vec<u8>,
    /// Writable bits of the body.
    pub writable: Vec<u8>,
}

impl PciCapability for RawCapability {
    fn id(&self) -> u8 {
        self.id
    }
    fn body(&self) -> Vec<u8> {
        self.body.clone()
    }
    fn writable_mask(&self) -> Vec<u8> {
        let mut m = self.writable.clone();
        m.resize(self.body.len(), 0);
        m
    }
}

/// The configuration space of one PCI function.
pub struct PciConfiguration {
    regs: Vec<u32>,
    writable: Vec<u32>,
    w1c: Vec<u32>,
    header_type: HeaderType,
    extended: bool,
    bars: Vec<Option<BarSlot>>,
    caps: Vec<CapEntry>,
    last_cap_ptr: usize,
    next_cap: usize,
    last_ext_header: Option<usize>,
    next_ext_cap: usize,
    msi: Option<(usize, Arc<MsiConfig>)>,
    msix: Option<(usize, Arc<MsixConfig>)>,
    pm: Option<(usize, PmCapability)>,
    /// Last accepted power state, to refuse writes of unsupported states.
    pm_state: u8,
    pcie: Option<usize>,
}

impl std::fmt::Debug for PciConfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfiguration")
            .field("id", &format_args!("{:08x}", self.regs[0]))
            .field("header_type", &self.header_type)
            .field("bars", &self.bars)
            .field("caps", &self.caps)
            .finish()
    }
}

impl PciConfiguration {
    /// Sets the interrupt pin (0 none, 1-4 INTA-INTD) after construction.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        let line = self.regs[INTERRUPT_REG] & 0xff;
        self.regs[INTERRUPT_REG] =
            (self.regs[INTERRUPT_REG] & !0xffff) | (u32::from(pin.min(4)) << 8) | line;
    }

    /// A fresh configuration space for a function with identity `p`.
    pub fn new(p: PciConfigParams) -> Self {
        let mut c = PciConfiguration {
            // The conventional 256 bytes; the extended space is stored only
            // once something is written there (an extended capability):
            // until then it reads as zeroes, and a function costs 768 bytes
            // of registers and masks instead of 12 KiB.
            regs: vec![0; CONFIG_SPACE_SIZE / 4],
            writable: vec![0; CONFIG_SPACE_SIZE / 4],
            w1c: vec![0; CONFIG_SPACE_SIZE / 4],
            header_type: p.header_type,
            extended: p.extended,
            bars: vec![
                None;
                match p.header_type {
                    HeaderType::Device => NUM_BARS_TYPE0,
                    HeaderType::Bridge => NUM_BARS_TYPE1,
                }
            ],
            caps: Vec::new(),
            last_cap_ptr: CAP_PTR_OFFSET,
            next_cap: FIRST_CAP_OFFSET,
            last_ext_header: None,
            next_ext_cap: FIRST_EXT_CAP_OFFSET,
            msi: None,
            msix: None,
            pm: None,
            pm_state: 0,
            pcie: None,
        };
        c.regs[0] = u32::from(p.vendor_id) | (u32::from(p.device_id) << 16);
        c.writable[COMMAND_REG] = CMD_WRITABLE;
        c.w1c[COMMAND_REG] = STATUS_W1C << 16;
        c.regs[2] = u32::from(p.revision_id) | ((p.class_code & 0xff_ffff) << 8);
        let header_byte: u32 = match p.header_type {
            HeaderType::Device => 0,
            HeaderType::Bridge => 1,
        };
        c.regs[HEADER_TYPE_REG] = header_byte << 16;
        c.writable[HEADER_TYPE_REG] = 0xff; // cache line size
        c.regs[INTERRUPT_REG] = u32::from(p.interrupt_pin.min(4)) << 8;
        c.writable[INTERRUPT_REG] = 0xff; // interrupt line
        match p.header_type {
            HeaderType::Device => {
                c.regs[11] = u32::from(p.subsystem_vendor_id) | (u32::from(p.subsystem_id) << 16);
            }
            HeaderType::Bridge => {
                c.writable[BRIDGE_BUS_REG] = 0x00ff_ffff;
                // I/O base/limit: 32-bit I/O addressing; secondary status is RW1C.
                c.regs[BRIDGE_IO_REG] = 0x0101;
                c.writable[BRIDGE_IO_REG] = 0xf0f0;
                c.w1c[BRIDGE_IO_REG] = STATUS_W1C << 16;
                c.writable[BRIDGE_MEM_REG] = 0xfff0_fff0;
                // Prefetchable base/limit: 64-bit addressing.
                c.regs[BRIDGE_PREF_REG] = 0x0001_0001;
                c.writable[BRIDGE_PREF_REG] = 0xfff0_fff0;
                c.writable[BRIDGE_PREF_BASE_HI_REG] = u32::MAX;
                c.writable[BRIDGE_PREF_LIMIT_HI_REG] = u32::MAX;
                c.writable[BRIDGE_IO_HI_REG] = u32::MAX;
                // Bridge control: parity, SERR, ISA, VGA, VGA16, master abort, bus reset.
                c.writable[INTERRUPT_REG] |= 0x007f << 16;
            }
        }
        c
    }

    /// Header type.
    pub fn header_type(&self) -> HeaderType {
        self.header_type
    }

    /// Whether the space is 4 KiB (PCI Express).
    pub fn is_extended(&self) -> bool {
        self.extended
    }

    /// Set or clear the multi-function bit of the header type register.
    pub fn set_multifunction(&mut self, multifunction: bool) {
        let bit = u32::from(HEADER_TYPE_MULTIFUNCTION) << 16;
        if multifunction {
            self.regs[HEADER_TYPE_REG] |= bit;
        } else {
            self.regs[HEADER_TYPE_REG] &= !bit;
        }
    }

    fn num_regs(&self) -> usize {
        if self.extended {
            NUM_CONFIG_REGS
        } else {
            CONFIG_SPACE_SIZE / 4
        }
    }

    /// Guest read of dword `reg_idx`. Registers beyond a conventional space read as zero;
    /// indices beyond 4 KiB read as all-ones.
    pub fn read_config_register(&self, reg_idx: usize) -> u32 {
        if reg_idx >= NUM_CONFIG_REGS {
            return u32::MAX;
        }
        if reg_idx >= self.num_regs() {
            return 0;
        }
        if let Some((off, msi)) = &self.msi {
            if let Some(p) = msi.capability().pending_offset() {
                if (off + p) / 4 == reg_idx {
                    return msi.pending_bits();
                }
            }
        }
        // Extended space not stored yet: zeroes.
        self.regs.get(reg_idx).copied().unwrap_or(0)
    }

    /// Guest write of `data` (1, 2 or 4 bytes) at byte `offset` of dword `reg_idx`.
    /// Malformed accesses (other sizes, crossing the dword, out of range) are ignored.
    pub fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> ConfigWriteOutcome {
        let mut out = ConfigWriteOutcome::default();
        let len = data.len();
        if !matches!(len, 1 | 2 | 4) || offset >= 4 || offset as usize + len > 4 {
            return out;
        }
        // Beyond the stored registers nothing is writable (no capability
        // there), so the write changes nothing.
        if reg_idx >= self.num_regs() || reg_idx >= self.regs.len() {
            return out;
        }
        let shift = offset as u32 * 8;
        let mut value = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (8 * i);
        }
        let byte_mask = if len == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * len)) - 1) << shift
        };
        value <<= shift;

        let old = self.regs[reg_idx];
        let rw = self.writable[reg_idx] & byte_mask;
        let w1c = self.w1c[reg_idx] & byte_mask;
        let new = ((old & !rw) | (value & rw)) & !(value & w1c);
        self.regs[reg_idx] = new;

        if reg_idx == COMMAND_REG {
            self.command_written(old, new, &mut out);
        }
        if let Some((pos, high)) = self.bar_for_reg(reg_idx) {
            let probe = len == 4 && value == u32::MAX;
            self.bar_written(pos, high, probe, &mut out);
        }
        if self.header_type == HeaderType::Bridge {
            self.bridge_written(reg_idx, old, new, &mut out);
        }
        self.capability_written(reg_idx * 4 + offset as usize, len, &mut out);
        out
    }

    fn command_written(&mut self, old: u32, new: u32, out: &mut ConfigWriteOutcome) {
        let changed =
            |bit: u16| ((old ^ new) & u32::from(bit) != 0).then_some(new & u32::from(bit) != 0);
        out.io_decode = changed(CMD_IO_SPACE);
        out.mem_decode = changed(CMD_MEMORY_SPACE);
        out.bus_master = changed(CMD_BUS_MASTER);
        if out.mem_decode == Some(true) || out.io_decode == Some(true) {
            // A 64-bit BAR whose high half was never rewritten is committed when decoding
            // gets enabled.
            for pos in 0..self.bars.len() {
                if self.bars[pos].is_some_and(|b| b.pending) {
                    self.commit_bar(pos, out);
                }
            }
        }
    }

    fn bridge_written(&mut self, reg_idx: usize, old: u32, new: u32, out: &mut ConfigWriteOutcome) {
        match reg_idx {
            BRIDGE_BUS_REG if (old ^ new) & 0x00ff_ffff != 0 => out.bus_numbers_changed = true,
            BRIDGE_IO_REG if (old ^ new) & 0xffff != 0 => out.bridge_windows_changed = true,
            BRIDGE_MEM_REG..=BRIDGE_IO_HI_REG if old != new => out.bridge_windows_changed = true,
            INTERRUPT_REG if new & BRIDGE_CONTROL_SECONDARY_RESET != 0 => {
                out.secondary_bus_reset = old & BRIDGE_CONTROL_SECONDARY_RESET == 0;
            }
            _ => {}
        }
    }

    // ---- raw (device-side) accessors, bypassing the guest masks ----

    /// Read a byte at byte offset `off` (device side, no side effects).
    pub fn read_u8(&self, off: usize) -> u8 {
        match self.regs.get(off / 4) {
            Some(r) => (r >> ((off % 4) * 8)) as u8,
            // Not stored (extended space before any capability there, or a
            // conventional function): zeroes, up to 4 KiB.
            None if off / 4 < NUM_CONFIG_REGS => 0,
            None => 0xff,
        }
    }

    /// Read a little-endian u16 at byte offset `off` (device side).
    pub fn read_u16(&self, off: usize) -> u16 {
        u16::from(self.read_u8(off)) | (u16::from(self.read_u8(off + 1)) << 8)
    }

    /// Read a little-endian u32 at byte offset `off` (device side).
    pub fn read_u32(&self, off: usize) -> u32 {
        u32::from(self.read_u16(off)) | (u32::from(self.read_u16(off + 2)) << 16)
    }

    /// Write bytes at `off`, ignoring the guest write masks (device side).
    pub fn write_bytes_internal(&mut self, off: usize, bytes: &[u8]) {
        self.store_up_to(off + bytes.len());
        put_bytes(&mut self.regs, off, bytes);
    }

    /// Stores the whole configuration space once bytes up to `end` are
    /// written beyond the conventional 256 (extended space only).
    fn store_up_to(&mut self, end: usize) {
        let regs = self.num_regs();
        if end.div_ceil(4) > self.regs.len() && self.regs.len() < regs {
            self.regs.resize(regs, 0);
            self.writable.resize(regs, 0);
            self.w1c.resize(regs, 0);
        }
    }

    /// Write a u16 at `off`, ignoring the guest write masks (device side).
    pub fn write_u16_internal(&mut self, off: usize, v: u16) {
        self.write_bytes_internal(off, &v.to_le_bytes());
    }

    /// Write a u32 at `off`, ignoring the guest write masks (device side).
    pub fn write_u32_internal(&mut self, off: usize, v: u32) {
        self.write_bytes_internal(off, &v.to_le_bytes());
    }

    /// Set the guest-writable mask of the bytes at `off`.
    pub fn set_writable_mask(&mut self, off: usize, mask: &[u8]) {
        self.store_up_to(off + mask.len());
        put_bytes(&mut self.writable, off, mask);
    }

    /// Set the write-1-to-clear mask of the bytes at `off`.
    pub fn set_w1c_mask(&mut self, off: usize, mask: &[u8]) {
        self.store_up_to(off + mask.len());
        put_bytes(&mut self.w1c, off, mask);
    }

    // ---- BARs ----

    /// Declare a BAR. Its address starts at 0 until the VMM assigns one.
    pub fn add_bar(&mut self, cfg: PciBarConfig) -> Result<(), PciError> {
        cfg.validate(self.bars.len())?;
        let regs = if cfg.region == BarRegion::Mmio64 {
            2
        } else {
            1
        };
        for i in cfg.index..cfg.index + regs {
            if self.bars[i].is_some() || self.bar_for_reg(BAR0_REG + i).is_some() {
                return Err(PciError::BarInUse(i));
            }
        }
        let r = BAR0_REG + cfg.index;
        self.regs[r] = cfg.flags();
        self.writable[r] = cfg.low_mask();
        if regs == 2 {
            self.regs[r + 1] = 0;
            self.writable[r + 1] = cfg.high_mask();
        }
        self.bars[cfg.index] = Some(BarSlot {
            cfg,
            committed: 0,
            pending: false,
        });
        Ok(())
    }

    /// The BAR declared at `index`.
    pub fn bar_config(&self, index: usize) -> Option<PciBarConfig> {
        self.bars.get(index).copied().flatten().map(|b| b.cfg)
    }

    /// All BARs with the address last assigned by the VMM or reported in a [`BarChange`].
    pub fn bars(&self) -> Vec<BarInfo> {
        self.bars
            .iter()
            .flatten()
            .map(|b| BarInfo {
                index: b.cfg.index,
                region: b.cfg.region,
                prefetchable: b.cfg.prefetchable,
                addr: b.committed,
                size: b.cfg.size,
            })
            .collect()
    }

    /// Address of BAR `index` (as last assigned or reported).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        self.bars.get(index).copied().flatten().map(|b| b.committed)
    }

    /// Program BAR `index` to `addr` (VMM placement). Not reported as a change.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let slot = self
            .bars
            .get_mut(index)
            .and_then(|b| b.as_mut())
            .ok_or(PciError::BarNotConfigured(index))?;
        if !slot.cfg.address_valid(addr) {
            return Err(PciError::InvalidBarAddress { index, addr });
        }
        let (lo, hi) = slot.cfg.encode(addr);
        slot.committed = addr;
        slot.pending = false;
        let r = BAR0_REG + index;
        let is64 = slot.cfg.region == BarRegion::Mmio64;
        self.regs[r] = lo;
        if is64 {
            self.regs[r + 1] = hi;
        }
        Ok(())
    }

    /// Which BAR slot (and whether its high half) register `reg_idx` belongs to.
    fn bar_for_reg(&self, reg_idx: usize) -> Option<(usize, bool)> {
        let i = reg_idx.checked_sub(BAR0_REG)?;
        if i >= self.bars.len() {
            return None;
        }
        if self.bars[i].is_some() {
            return Some((i, false));
        }
        if i > 0 && self.bars[i - 1].is_some_and(|b| b.cfg.region == BarRegion::Mmio64) {
            return Some((i - 1, true));
        }
        None
    }

    fn bar_written(&mut self, pos: usize, high: bool, probe: bool, out: &mut ConfigWriteOutcome) {
        let Some(slot) = self.bars[pos].as_mut() else {
            return;
        };
        let cfg = slot.cfg;
        if cfg.region == BarRegion::Mmio64 && !high {
            if !probe {
                slot.pending = true;
            }
            return;
        }
        if probe {
            return;
        }
        if cfg.region == BarRegion::Mmio64 {
            let lo_mask = cfg.low_mask();
            if lo_mask != 0 && self.regs[BAR0_REG + pos] & lo_mask == lo_mask {
                // The low half still holds a sizing probe.
                return;
            }
        }
        self.commit_bar(pos, out);
    }

    fn commit_bar(&mut self, pos: usize, out: &mut ConfigWriteOutcome) {
        let lo = self.regs[BAR0_REG + pos];
        let hi = self.regs.get(BAR0_REG + pos + 1).copied().unwrap_or(0);
        let Some(slot) = self.bars[pos].as_mut() else {
            return;
        };
        let new = slot.cfg.decode(lo, hi);
        slot.pending = false;
        if new != slot.committed {
            out.bar_changes.push(BarChange {
                index: pos,
                region: slot.cfg.region,
                prefetchable: slot.cfg.prefetchable,
                old_addr: slot.committed,
                new_addr: new,
                size: slot.cfg.size,
            });
            slot.committed = new;
        }
    }

    // ---- command register ----

    /// Current command register value.
    pub fn command(&self) -> u16 {
        self.regs[COMMAND_REG] as u16
    }

    /// Whether memory decoding is enabled.
    pub fn mem_decode_enabled(&self) -> bool {
        self.command() & CMD_MEMORY_SPACE != 0
    }

    /// Whether I/O decoding is enabled.
    pub fn io_decode_enabled(&self) -> bool {
        self.command() & CMD_IO_SPACE != 0
    }

    /// Whether bus mastering (DMA, MSI) is enabled.
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & CMD_BUS_MASTER != 0
    }

    // ---- type 1 ----

    /// Bus numbers (type 1 only).
    pub fn bus_numbers(&self) -> Option<BusNumbers> {
        (self.header_type == HeaderType::Bridge).then(|| {
            let r = self.regs[BRIDGE_BUS_REG];
            BusNumbers {
                primary: r as u8,
                secondary: (r >> 8) as u8,
                subordinate: (r >> 16) as u8,
            }
        })
    }

    /// Forwarding windows (type 1 only).
    pub fn bridge_windows(&self) -> Option<BridgeWindows> {
        if self.header_type != HeaderType::Bridge {
            return None;
        }
        let range = |base: u64, limit: u64| (base <= limit).then_some((base, limit));
        let io = self.regs[BRIDGE_IO_REG];
        let io_hi = self.regs[BRIDGE_IO_HI_REG];
        let io_base = (u64::from(io & 0xf0) << 8) | (u64::from(io_hi & 0xffff) << 16);
        let io_limit = (u64::from((io >> 8) & 0xf0) << 8) | 0xfff | (u64::from(io_hi >> 16) << 16);
        let mem = self.regs[BRIDGE_MEM_REG];
        let mem_base = u64::from(mem & 0xfff0) << 16;
        let mem_limit = (u64::from((mem >> 16) & 0xfff0) << 16) | 0xf_ffff;
        let pref = self.regs[BRIDGE_PREF_REG];
        let pref_base = (u64::from(pref & 0xfff0) << 16)
            | (u64::from(self.regs[BRIDGE_PREF_BASE_HI_REG]) << 32);
        let pref_limit = (u64::from((pref >> 16) & 0xfff0) << 16)
            | 0xf_ffff
            | (u64::from(self.regs[BRIDGE_PREF_LIMIT_HI_REG]) << 32);
        Some(BridgeWindows {
            io: range(io_base, io_limit),
            mem: range(mem_base, mem_limit),
            prefetch: range(pref_base, pref_limit),
        })
    }

    // ---- capabilities ----

    /// Append a capability to the standard list. Returns its offset.
    pub fn add_capability(&mut self, cap: &dyn PciCapability) -> Result<usize, PciError> {
        let body = cap.body();
        let len = body.len() + 2;
        let off = self.next_cap;
        if off + len > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpaceFull(u16::from(cap.id())));
        }
        self.write_bytes_internal(off, &[cap.id(), 0]);
        self.write_bytes_internal(off + 2, &body);
        let mut rw = cap.writable_mask();
        rw.resize(body.len(), 0);
        self.set_writable_mask(off + 2, &rw);
        let mut w1c = cap.w1c_mask();
        w1c.resize(body.len(), 0);
        self.set_w1c_mask(off + 2, &w1c);
        // Link from the previous capability (or the capabilities pointer).
        self.write_bytes_internal(self.last_cap_ptr, &[off as u8]);
        self.last_cap_ptr = off + 1;
        self.next_cap = (off + len + 3) & !3;
        self.regs[COMMAND_REG] |= STATUS_CAP_LIST << 16;
        self.caps.push(CapEntry {
            id: u32::from(cap.id()),
            offset: off,
            len,
        });
        Ok(off)
    }

    /// Append an extended capability (PCI Express configuration space only). `body` is the
    /// content after the 4-byte header. Returns its offset.
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        writable: &[u8],
        w1c: &[u8],
    ) -> Result<usize, PciError> {
        if !self.extended {
            return Err(PciError::NoExtendedConfigSpace);
        }
        let off = self.next_ext_cap;
        let len = body.len() + 4;
        if off + len > EXT_CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpaceFull(id));
        }
        let header = u32::from(id) | (u32::from(version & 0xf) << 16);
        self.write_u32_internal(off, header);
        self.write_bytes_internal(off + 4, body);
        let mut rw = writable.to_vec();
        rw.resize(body.len(), 0);
        self.set_writable_mask(off + 4, &rw);
        let mut c = w1c.to_vec();
        c.resize(body.len(), 0);
        self.set_w1c_mask(off + 4, &c);
        if let Some(prev) = self.last_ext_header {
            let h = self.read_u32(prev) & 0x000f_ffff;
            self.write_u32_internal(prev, h | ((off as u32) << 20));
        }
        self.last_ext_header = Some(off);
        self.next_ext_cap = (off + len + 3) & !3;
        self.caps.push(CapEntry {
            id: 0x1_0000 | u32::from(id),
            offset: off,
            len,
        });
        Ok(off)
    }

    /// Offset of the first capability with `id` in the standard list.
    pub fn find_capability(&self, id: u8) -> Option<usize> {
        self.caps
            .iter()
            .find(|c| c.id == u32::from(id))
            .map(|c| c.offset)
    }

    /// Add an MSI capability backed by `msi`.
    pub fn add_msi_capability(&mut self, msi: Arc<MsiConfig>) -> Result<usize, PciError> {
        if self.msi.is_some() {
            return Err(PciError::DuplicateCapability(MSI_CAP_ID));
        }
        let off = self.add_capability(&CapAdapter {
            id: MSI_CAP_ID,
            body: msi.capability().body(),
            rw: msi.capability().writable_mask(),
            w1c: Vec::new(),
        })?;
        self.msi = Some((off, msi));
        Ok(off)
    }

    /// Add an MSI-X capability with layout `cap`, backed by `msix`.
    pub fn add_msix_capability(
        &mut self,
        cap: &MsixCapability,
        msix: Arc<MsixConfig>,
    ) -> Result<usize, PciError> {
        if self.msix.is_some() {
            return Err(PciError::DuplicateCapability(MSIX_CAP_ID));
        }
        if cap.table_size != msix.num_vectors() {
            return Err(PciError::InvalidCapability("MSI-X table size mismatch"));
        }
        let off = self.add_capability(&CapAdapter {
            id: MSIX_CAP_ID,
            body: cap.body(),
            rw: cap.writable_mask(),
            w1c: Vec::new(),
        })?;
        self.msix = Some((off, msix));
        Ok(off)
    }

    /// Add a power management capability.
    pub fn add_pm_capability(&mut self, pm: PmCapability) -> Result<usize, PciError> {
        if self.pm.is_some() {
            return Err(PciError::DuplicateCapability(PM_CAP_ID));
        }
        let off = self.add_capability(&CapAdapter {
            id: PM_CAP_ID,
            body: pm.body(),
            rw: pm.writable_mask(),
            w1c: pm.w1c_mask(),
        })?;
        self.pm = Some((off, pm));
        Ok(off)
    }

    /// Add a PCI Express capability (requires an extended configuration space).
    pub fn add_pcie_capability(&mut self, cap: &PcieCapability) -> Result<usize, PciError> {
        if self.pcie.is_some() {
            return Err(PciError::DuplicateCapability(PCIE_CAP_ID));
        }
        if !self.extended {
            return Err(PciError::NoExtendedConfigSpace);
        }
        let off = self.add_capability(&CapAdapter {
            id: PCIE_CAP_ID,
            body: cap.body(),
            rw: cap.writable_mask(),
            w1c: cap.w1c_mask(),
        })?;
        self.pcie = Some(off);
        Ok(off)
    }

    /// Offset of the PCI Express capability.
    pub fn pcie_offset(&self) -> Option<usize> {
        self.pcie
    }

    /// Offset of the MSI-X capability.
    pub fn msix_offset(&self) -> Option<usize> {
        self.msix.as_ref().map(|(o, _)| *o)
    }

    /// Offset of the MSI capability.
    pub fn msi_offset(&self) -> Option<usize> {
        self.msi.as_ref().map(|(o, _)| *o)
    }

    /// Current power state (0 = D0 .. 3 = D3hot); D0 without a PM capability.
    pub fn power_state(&self) -> u8 {
        self.pm
            .map(|(off, _)| (self.read_u16(off + PM_PMCSR) & PMCSR_STATE_MASK) as u8)
            .unwrap_or(0)
    }

    fn capability_written(&mut self, byte_off: usize, len: usize, out: &mut ConfigWriteOutcome) {
        let Some(cap) = self
            .caps
            .iter()
            .copied()
            .find(|c| byte_off < c.offset + c.len && c.offset < byte_off + len)
        else {
            return;
        };
        out.capabilities_written.push((cap.id, cap.offset as u16));
        match cap.id {
            id if id == u32::from(MSIX_CAP_ID) => {
                if let Some((off, msix)) = &self.msix {
                    let ctl = self.read_u16(off + 2);
                    out.msix_changed = msix.set_control(
                        ctl & MSIX_CTL_ENABLE != 0,
                        ctl & MSIX_CTL_FUNCTION_MASK != 0,
                    );
                }
            }
            id if id == u32::from(MSI_CAP_ID) => {
                if let Some((off, msi)) = &self.msi {
                    let c: MsiCapability = *msi.capability();
                    let ctl = self.read_u16(off + MsiCapability::CONTROL);
                    let lo = u64::from(self.read_u32(off + MsiCapability::ADDR_LO));
                    let hi = c
                        .addr_hi_offset()
                        .map(|h| u64::from(self.read_u32(off + h)))
                        .unwrap_or(0);
                    let data = self.read_u16(off + c.data_offset());
                    let mask = c.mask_offset().map(|m| self.read_u32(off + m)).unwrap_or(0);
                    msi.registers_written(ctl, (hi << 32) | lo, data, mask);
                    out.msi_changed = true;
                }
            }
            id if id == u32::from(PM_CAP_ID) => {
                self.pm_written(out);
            }
            _ => {}
        }
    }

    fn pm_written(&mut self, out: &mut ConfigWriteOutcome) {
        let Some((off, pm)) = self.pm else {
            return;
        };
        let pmcsr = self.read_u16(off + PM_PMCSR);
        let state = (pmcsr & PMCSR_STATE_MASK) as u8;
        let prev = self.pm_state;
        if !pm.supports(state) {
            self.write_u16_internal(
                off + PM_PMCSR,
                (pmcsr & !PMCSR_STATE_MASK) | u16::from(prev),
            );
            return;
        }
        if state != prev {
            self.pm_state = state;
            out.power_state = Some(state);
        }
    }
}

struct CapAdapter {
    id: u8,
    body: Vec<u8>,
    rw: Vec<u8>,
    w1c: Vec<u8>,
}

impl PciCapability for CapAdapter {
    fn id(&self) -> u8 {
        self.id
    }
    fn body(&self) -> Vec<u8> {
        self.body.clone()
    }
    fn writable_mask(&self) -> Vec<u8> {
        self.rw.clone()
    }
    fn w1c_mask(&self) -> Vec<u8> {
        let mut m = self.w1c.clone();
        m.resize(self.body.len(), 0);
        m
    }
}

fn put_bytes(regs: &mut [u32], off: usize, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        let o = off + i;
        let Some(r) = regs.get_mut(o / 4) else {
            return;
        };
        let shift = (o % 4) * 8;
        *r = (*r & !(0xff << shift)) | (u32::from(*b) << shift);
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

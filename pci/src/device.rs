//! The [`PciDevice`] trait the VMM dispatches to, and the values describing the side effects
//! of a configuration write.
//!
//! Configuration writes return a [`ConfigWriteOutcome`] instead of calling back into the VMM:
//! the VMM inspects it and moves BAR mappings / ioeventfds, (de)activates decoding and so on.
//! Interrupt routing is the exception: vector programming reaches the VMM through the
//! device's [`crate::MsiInterruptGroup`], because MSI-X vectors are programmed through BAR
//! writes, not configuration writes; the outcome still flags MSI/MSI-X control changes.

use std::any::Any;

use vmm_sys_util::eventfd::EventFd;

use crate::bar::BarRegion;
use crate::msix::MsixConfig;
use crate::PciError;

/// A doorbell the VMM registers as a KVM ioeventfd: a guest write to `offset` within BAR
/// `bar` signals `fd` without a vCPU exit (virtio queue notifications, for instance).
#[derive(Debug)]
pub struct IoEventNotifier<'a> {
    /// BAR index.
    pub bar: usize,
    /// Offset within the BAR.
    pub offset: u64,
    /// The descriptor to signal.
    pub fd: &'a EventFd,
}

/// Host memory the VMM may map into the guest (a KVM memory slot) in place of trapping
/// accesses: a mapping the device made of part of one of its BARs. It must stay mapped
/// while any holder of this handle lives (implementations unmap on drop), so the VMM keeps
/// a clone while the memory is in the guest and drops it only after taking it out.
pub trait HostMapping: Send + Sync + std::fmt::Debug {
    /// Address of the mapping in this process (page-aligned).
    fn host_addr(&self) -> u64;
    /// Bytes mapped (a multiple of the page size).
    fn size(&self) -> u64;
    /// Whether the guest may write it (otherwise it is mapped read-only and writes trap).
    fn writable(&self) -> bool;
}

/// Part of a BAR the guest reaches directly: `mapping` appears at `offset` within BAR
/// `bar` (page-aligned) while the BAR is placed and memory decode is on. Accesses to the
/// rest of the BAR still reach [`PciDevice::read_bar`]/[`PciDevice::write_bar`].
#[derive(Clone, Debug)]
pub struct DirectArea {
    /// BAR index (a memory BAR).
    pub bar: usize,
    /// Offset within the BAR.
    pub offset: u64,
    /// The host memory (its length is the area's size).
    pub mapping: std::sync::Arc<dyn HostMapping>,
}

/// A BAR moved (its address as decoded from the registers changed).
///
/// Sizing probes (all-ones writes) and the intermediate state between the two halves of a
/// 64-bit BAR write are not reported; the change is reported once the new address is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarChange {
    /// BAR index.
    pub index: usize,
    /// Address space of the BAR.
    pub region: BarRegion,
    /// Whether the BAR is prefetchable.
    pub prefetchable: bool,
    /// Previous address (as last reported or assigned).
    pub old_addr: u64,
    /// New address.
    pub new_addr: u64,
    /// BAR size in bytes.
    pub size: u64,
}

/// A BAR as currently configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index.
    pub index: usize,
    /// Address space of the BAR.
    pub region: BarRegion,
    /// Whether the BAR is prefetchable.
    pub prefetchable: bool,
    /// Current address.
    pub addr: u64,
    /// BAR size in bytes.
    pub size: u64,
}

/// Everything a configuration write changed that the VMM may need to follow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigWriteOutcome {
    /// BARs whose address changed.
    pub bar_changes: Vec<BarChange>,
    /// `Some(enabled)` if the I/O space enable bit of the command register changed.
    pub io_decode: Option<bool>,
    /// `Some(enabled)` if the memory space enable bit of the command register changed.
    pub mem_decode: Option<bool>,
    /// `Some(enabled)` if the bus master enable bit of the command register changed.
    pub bus_master: Option<bool>,
    /// The MSI capability was written (enable, message or mask may have changed). The
    /// device's [`crate::MsiInterruptGroup`] has already been updated.
    pub msi_changed: bool,
    /// The MSI-X enable or function mask bit changed. The device's
    /// [`crate::MsiInterruptGroup`] has already been updated.
    pub msix_changed: bool,
    /// Type 1 header: primary/secondary/subordinate bus numbers changed.
    pub bus_numbers_changed: bool,
    /// Type 1 header: an I/O, memory or prefetchable memory window changed.
    pub bridge_windows_changed: bool,
    /// Type 1 header: the secondary bus reset bit of the bridge control register was set.
    pub secondary_bus_reset: bool,
    /// Power management: the power state (0 = D0 .. 3 = D3hot) changed to this value.
    pub power_state: Option<u8>,
    /// Capabilities written, as (capability id, offset of the capability). Extended
    /// capability ids are reported as `0x1_0000 | id`.
    pub capabilities_written: Vec<(u32, u16)>,
    /// PCI Express hot-plug slot (see [`crate::PciePort`]): `Some(lit)` if the guest wrote
    /// Slot Control, `lit` telling whether the power indicator is on or blinking after the
    /// write. `Some(false)` means the guest shows the slot as off (after a removal request,
    /// with the card gone: the removal is complete).
    pub slot_indicator: Option<bool>,
}

impl ConfigWriteOutcome {
    /// True if nothing the VMM tracks changed.
    pub fn is_empty(&self) -> bool {
        *self == ConfigWriteOutcome::default()
    }

    /// Merge another outcome into this one (later values win).
    pub fn merge(&mut self, other: ConfigWriteOutcome) {
        self.bar_changes.extend(other.bar_changes);
        self.io_decode = other.io_decode.or(self.io_decode);
        self.mem_decode = other.mem_decode.or(self.mem_decode);
        self.bus_master = other.bus_master.or(self.bus_master);
        self.msi_changed |= other.msi_changed;
        self.msix_changed |= other.msix_changed;
        self.bus_numbers_changed |= other.bus_numbers_changed;
        self.bridge_windows_changed |= other.bridge_windows_changed;
        self.secondary_bus_reset |= other.secondary_bus_reset;
        self.power_state = other.power_state.or(self.power_state);
        self.capabilities_written.extend(other.capabilities_written);
        self.slot_indicator = other.slot_indicator.or(self.slot_indicator);
    }
}

/// A PCI function as seen by the bus and the VMM.
///
/// All accesses are guest controlled: implementations must ignore malformed accesses
/// (bad sizes, offsets outside the BAR) and never panic.
pub trait PciDevice: Send {
    /// Read the configuration dword at `reg_idx` (byte offset `reg_idx * 4`, 0..1024).
    fn read_config_register(&mut self, reg_idx: usize) -> u32;

    /// Write `data` (1, 2 or 4 bytes) at byte `offset` (0..=3) within dword `reg_idx`.
    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> ConfigWriteOutcome;

    /// The BARs the device implements, with their current addresses.
    fn bars(&self) -> Vec<BarInfo>;

    /// Program BAR `index` to `addr` (VMM placement; not reported as a [`BarChange`]).
    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError>;

    /// Read from BAR `index` at `offset` within the BAR.
    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]);

    /// Write to BAR `index` at `offset` within the BAR.
    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]);

    /// Whether this function is a PCI-to-PCI bridge (type 1 header) with a secondary bus.
    fn is_bridge(&self) -> bool {
        false
    }

    /// Doorbells to register as ioeventfds while the BARs are mapped. The descriptors must
    /// stay the same for the function's lifetime. None by default.
    fn ioeventfds(&self) -> Vec<IoEventNotifier<'_>> {
        Vec::new()
    }

    /// Parts of memory BARs the VMM maps straight into the guest (see [`DirectArea`]) while
    /// the BAR is placed and memory decode is on; they must not cover doorbells. The areas
    /// must stay the same for the function's lifetime. None by default.
    fn direct_areas(&self) -> Vec<DirectArea> {
        Vec::new()
    }

    /// Stops the function's back end (worker threads, host files in flight) before the
    /// VMM detaches it: after this returns, the function touches neither guest memory nor
    /// its interrupts. Nothing by default.
    fn reset(&mut self) {}

    /// Whether the guest has read this function's identity (vendor and device id) since it
    /// was placed. A function the guest never enumerated has no driver, so the VMM may
    /// remove it without the guest's cooperation. `true` (the cautious answer) by default.
    fn enumerated(&self) -> bool {
        true
    }

    /// The VM is pausing: stop the back end's work (no request completes while paused)
    /// and wait, at most `timeout`, until it has stopped. Returns whether it did. Nothing
    /// to stop by default.
    fn pause(&mut self, _timeout: std::time::Duration) -> bool {
        true
    }

    /// The VM resumes: undo [`PciDevice::pause`].
    fn resume(&mut self) {}

    /// The MSI-X state, for functions that have the capability (the VMM logs it when the
    /// guest changes it). None by default.
    fn msix(&self) -> Option<&MsixConfig> {
        None
    }

    /// Downcasting support (tests and tools; the VMM itself reaches devices only through
    /// this trait).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

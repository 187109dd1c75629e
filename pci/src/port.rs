//! PCI Express ports and PCI bridges with native hot-plug slots.
//!
//! [`PciePort`] is one type 1 (bridge) function of any of the kinds in [`PciePortKind`]:
//! a root port, the upstream or a downstream port of a switch, a PCIe-to-PCI bridge, or a
//! conventional PCI-to-PCI bridge (no PCI Express capability, for nesting under a PCI
//! bridge). It carries the type 1 header (bus numbers and forwarding windows, which the bus
//! tree reads to route configuration cycles), a power management capability, the PCI
//! Express capability of the right device/port type, and optionally an MSI capability
//! (one vector, 64-bit address) whose interrupt goes through the
//! [`MsiInterruptGroup`] given at construction.
//!
//! # Native hot-plug
//!
//! Root ports and switch downstream ports built with `native_hotplug` implement a slot:
//! hot-plug capable and surprise, attention/power indicators present, no power controller,
//! no attention button, no MRL sensor, and "No Command Completed Support" (every
//! Slot Control write takes effect at once, so the guest never waits for a Command
//! Completed event and none is raised). The link reports Data Link Layer Link Active, which
//! follows presence.
//!
//! The VMM drives the slot with [`PciePort::card_present`]: a change of presence updates
//! Presence Detect State and Link Active and raises Presence Detect Changed and Data Link
//! Layer State Changed. The hot-plug interrupt follows the hardware rule: it is signalled
//! on each 0 -> 1 transition of "MSI enabled, Hot-Plug Interrupt Enable set and an enabled
//! event bit pending" (an edge). An event raised before the guest enabled notifications is
//! therefore held in Slot Status and delivered by the configuration write that enables them,
//! unless the guest cleared it first (drivers clear stale events when they start and check
//! presence themselves).
//!
//! Removal is cooperative: after `card_present(false)` the device stays on the secondary bus
//! while the guest unbinds its driver; the guest then turns the slot's power indicator off,
//! which the configuration write reports as [`ConfigWriteOutcome::slot_indicator`]
//! `== Some(false)`, the signal that the VMM may detach the device.
//!
//! Why no power controller: Linux's pciehp waits one second after every power-off it
//! commands (`remove_board()`), and only then looks at the slot again, so a device plugged
//! into a slot within a second of its previous device's removal waited up to a second to be
//! seen. Without a power controller the guest goes straight from unbinding the driver to
//! the power indicator, and a re-plug is as fast as a first plug. The indicator is the
//! last thing pciehp writes on every removal path (`remove_board()`, a failed enable).

use std::any::Any;
use std::sync::Arc;

use log::warn;

/// Class code of a PCI-to-PCI bridge.
pub const PCI_BRIDGE_CLASS: u32 = 0x06_0400;
use crate::config::{
    BridgeWindows, BusNumbers, HeaderType, PciConfigParams, PciConfiguration, CMD_BUS_MASTER,
    CMD_IO_SPACE, CMD_MEMORY_SPACE,
};
use crate::device::{BarInfo, ConfigWriteOutcome, PciDevice};
use crate::interrupt::MsiInterruptGroup;
use crate::msi::{MsiCapability, MsiConfig};
use crate::pcie_cap::{
    regs, slot_control, slot_status, PcieCapability, PciePortType, PcieSlotCapabilities,
    LNKSTA_DLL_ACTIVE,
};
use crate::pm::PmCapability;
use crate::PciError;

/// Byte offset of the bus number register (primary, secondary, subordinate, latency).
const BUS_NUMBERS_OFF: usize = 0x18;
/// Byte offset of I/O base / I/O limit.
const IO_BASE_OFF: usize = 0x1c;
/// Byte offset of memory base / limit.
const MEM_BASE_OFF: usize = 0x20;
/// Byte offset of prefetchable base / limit.
const PREF_BASE_OFF: usize = 0x24;
/// Byte offset of the prefetchable base upper 32 bits.
const PREF_BASE_HI_OFF: usize = 0x28;
/// Byte offset of the prefetchable limit upper 32 bits.
const PREF_LIMIT_HI_OFF: usize = 0x2c;
/// Byte offset of the I/O base / limit upper 16 bits.
const IO_HI_OFF: usize = 0x30;
/// Byte offset of the command register.
const COMMAND_OFF: usize = 0x04;

/// Granularity of the memory windows.
pub const MEM_WINDOW_GRANULE: u64 = 1 << 20;
/// Granularity of the I/O window.
pub const IO_WINDOW_GRANULE: u64 = 1 << 12;
/// Largest physical slot number (13 bits).
pub const MAX_PHYSICAL_SLOT: u16 = 0x1fff;

/// Indicator encodings of Slot Control (2-bit fields).
const INDICATOR_ON: u16 = 0b01;
const INDICATOR_OFF: u16 = 0b11;
const ATTN_INDICATOR_SHIFT: u16 = 6;
const PWR_INDICATOR_SHIFT: u16 = 8;

/// What a [`PciePort`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PciePortKind {
    /// Root port of the root complex (on the root bus).
    RootPort,
    /// Upstream port of a switch (below a root port or a switch downstream port).
    SwitchUpstream,
    /// Downstream port of a switch (on the upstream port's secondary bus).
    SwitchDownstream,
    /// PCI Express to PCI bridge: a PCI bridge whose PCI Express capability has the
    /// PCIe-to-PCI bridge type.
    PcieToPciBridge,
    /// Conventional PCI-to-PCI bridge without a PCI Express capability (256-byte
    /// configuration space), for nesting under a PCI bridge.
    PciBridge,
}

impl PciePortKind {
    /// The PCI Express device/port type, `None` for a conventional PCI bridge.
    pub fn pcie_type(self) -> Option<PciePortType> {
        match self {
            PciePortKind::RootPort => Some(PciePortType::RootPort),
            PciePortKind::SwitchUpstream => Some(PciePortType::UpstreamPort),
            PciePortKind::SwitchDownstream => Some(PciePortType::DownstreamPort),
            PciePortKind::PcieToPciBridge => Some(PciePortType::PcieToPciBridge),
            PciePortKind::PciBridge => None,
        }
    }

    /// Whether the kind can implement a native hot-plug slot (downstream-facing PCI Express
    /// ports), which also means its secondary bus has a single device (device 0).
    pub fn is_downstream_port(self) -> bool {
        matches!(
            self,
            PciePortKind::RootPort | PciePortKind::SwitchDownstream
        )
    }

    /// Whether the secondary bus is a conventional PCI bus (32 slots).
    pub fn is_pci_bridge(self) -> bool {
        matches!(
            self,
            PciePortKind::PcieToPciBridge | PciePortKind::PciBridge
        )
    }

    /// Default (vendor, device) IDs: Red Hat/QEMU IDs for the root port (1b36:000c),
    /// PCIe-to-PCI bridge (1b36:000e) and PCI bridge (1b36:0001), and the TI XIO3130 IDs
    /// (104c:8232 upstream, 104c:8233 downstream) for switch ports, which guests know from
    /// QEMU's emulated switch.
    pub fn default_ids(self) -> (u16, u16) {
        match self {
            PciePortKind::RootPort => (0x1b36, 0x000c),
            PciePortKind::SwitchUpstream => (0x104c, 0x8232),
            PciePortKind::SwitchDownstream => (0x104c, 0x8233),
            PciePortKind::PcieToPciBridge => (0x1b36, 0x000e),
            PciePortKind::PciBridge => (0x1b36, 0x0001),
        }
    }

    /// Short human-readable name.
    pub fn name(self) -> &'static str {
        match self {
            PciePortKind::RootPort => "root port",
            PciePortKind::SwitchUpstream => "switch upstream port",
            PciePortKind::SwitchDownstream => "switch downstream port",
            PciePortKind::PcieToPciBridge => "PCIe-to-PCI bridge",
            PciePortKind::PciBridge => "PCI bridge",
        }
    }
}

/// Construction parameters of a [`PciePort`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciePortParams {
    /// Kind of port.
    pub kind: PciePortKind,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Implement a native PCI Express hot-plug slot (root and switch downstream ports only).
    pub native_hotplug: bool,
    /// Physical slot number of the hot-plug slot (0..=0x1fff; unique per port).
    pub physical_slot: u16,
    /// Port number reported in Link Capabilities.
    pub port_number: u8,
    /// Implement the I/O window registers. When false, I/O base/limit are read-only zero
    /// (the spec's "no I/O window"), so the guest does not try to assign I/O space.
    pub io_window: bool,
}

impl PciePortParams {
    /// Parameters for `kind` with the default IDs, no hot-plug slot, port number 0 and no
    /// I/O window.
    pub fn new(kind: PciePortKind) -> Self {
        let (vendor_id, device_id) = kind.default_ids();
        PciePortParams {
            kind,
            vendor_id,
            device_id,
            native_hotplug: false,
            physical_slot: 0,
            port_number: 0,
            io_window: false,
        }
    }

    /// Enable the native hot-plug slot with physical slot number `physical_slot`.
    pub fn with_native_hotplug(mut self, physical_slot: u16) -> Self {
        self.native_hotplug = true;
        self.physical_slot = physical_slot;
        self
    }
}

/// A PCI Express port or PCI bridge function (type 1 header), see the module docs.
#[derive(Debug)]
pub struct PciePort {
    params: PciePortParams,
    config: PciConfiguration,
    msi: Option<Arc<MsiConfig>>,
    /// Last value of the hot-plug interrupt condition (interrupts fire on 0 -> 1).
    irq_line: bool,
}

impl PciePort {
    /// Build a port. `msi` adds an MSI capability (one vector, 64-bit address) delivering
    /// through that group; without it the port never interrupts (slot events stay pending).
    pub fn new(
        params: PciePortParams,
        msi: Option<Arc<dyn MsiInterruptGroup>>,
    ) -> Result<Self, PciError> {
        let kind = params.kind;
        if params.native_hotplug && !kind.is_downstream_port() {
            return Err(PciError::InvalidCapability(
                "native hot-plug needs a root port or a switch downstream port",
            ));
        }
        if params.physical_slot > MAX_PHYSICAL_SLOT {
            return Err(PciError::InvalidCapability(
                "physical slot number above 0x1fff",
            ));
        }
        let mut p = PciConfigParams::device(params.vendor_id, params.device_id, PCI_BRIDGE_CLASS);
        p.header_type = HeaderType::Bridge;
        p.extended = kind.pcie_type().is_some();
        let mut config = PciConfiguration::new(p);
        if let Some(pt) = kind.pcie_type() {
            let mut cap = PcieCapability::new(pt);
            cap.port_number = params.port_number;
            if params.native_hotplug {
                cap = cap.with_slot(PcieSlotCapabilities {
                    attention_button: false,
                    power_controller: false,
                    attention_indicator: true,
                    power_indicator: true,
                    hotplug_surprise: true,
                    hotplug_capable: true,
                    no_command_completed: true,
                    physical_slot: params.physical_slot,
                });
            }
            config.add_pcie_capability(&cap)?;
        }
        let msi = match msi {
            Some(group) => {
                let m = Arc::new(MsiConfig::new(MsiCapability::new(1, true, false)?, group));
                config.add_msi_capability(m.clone())?;
                Some(m)
            }
            None => None,
        };
        config.add_pm_capability(PmCapability::default())?;
        let mut port = PciePort {
            params,
            config,
            msi,
            irq_line: false,
        };
        if !params.io_window {
            // No I/O window unless one was reserved: base/limit and upper halves read as 0.
            port.config.write_u16_internal(IO_BASE_OFF, 0);
            port.config.set_writable_mask(IO_BASE_OFF, &[0, 0]);
            port.config.write_u32_internal(IO_HI_OFF, 0);
            port.config.set_writable_mask(IO_HI_OFF, &[0; 4]);
        }
        port.set_windows(&BridgeWindows::default());
        if params.native_hotplug {
            port.cold_plug(false);
        }
        Ok(port)
    }

    /// Construction parameters.
    pub fn params(&self) -> &PciePortParams {
        &self.params
    }

    /// Kind of port.
    pub fn kind(&self) -> PciePortKind {
        self.params.kind
    }

    /// Whether the port implements a native hot-plug slot.
    pub fn has_native_hotplug(&self) -> bool {
        self.params.native_hotplug
    }

    /// Physical slot number of the native hot-plug slot.
    pub fn physical_slot(&self) -> Option<u16> {
        self.params
            .native_hotplug
            .then_some(self.params.physical_slot)
    }

    /// The configuration space (read-only view).
    pub fn config(&self) -> &PciConfiguration {
        &self.config
    }

    /// The MSI state, if the port has an MSI capability.
    pub fn msi(&self) -> Option<&Arc<MsiConfig>> {
        self.msi.as_ref()
    }

    // ---- type 1 header ----

    /// Bus numbers as currently programmed (by firmware or the guest).
    pub fn bus_numbers(&self) -> BusNumbers {
        self.config.bus_numbers().unwrap_or_default()
    }

    /// Primary bus number.
    pub fn primary_bus(&self) -> u8 {
        self.bus_numbers().primary
    }

    /// Secondary bus number.
    pub fn secondary_bus(&self) -> u8 {
        self.bus_numbers().secondary
    }

    /// Subordinate bus number.
    pub fn subordinate_bus(&self) -> u8 {
        self.bus_numbers().subordinate
    }

    /// Program the bus numbers (firmware side, no outcome).
    pub fn set_bus_numbers(&mut self, primary: u8, secondary: u8, subordinate: u8) {
        self.config
            .write_bytes_internal(BUS_NUMBERS_OFF, &[primary, secondary, subordinate]);
    }

    /// Forwarding windows as currently programmed, as inclusive `(first, last)` ranges;
    /// `None` for a disabled window (base above limit) and for the I/O window when it is not
    /// implemented.
    pub fn windows(&self) -> BridgeWindows {
        let mut w = self.config.bridge_windows().unwrap_or_default();
        if !self.params.io_window {
            w.io = None;
        }
        w
    }

    /// Program the forwarding windows (firmware side, no outcome). Ranges are inclusive
    /// `(first, last)`; memory windows are truncated to 1 MiB granularity, the I/O window to
    /// 4 KiB; `None` disables a window (base above limit). The I/O window is ignored if not
    /// implemented.
    pub fn set_windows(&mut self, w: &BridgeWindows) {
        let (mem_base, mem_limit) = match w.mem {
            Some((first, last)) => ((first >> 16) as u16 & 0xfff0, (last >> 16) as u16 & 0xfff0),
            None => (0xfff0, 0),
        };
        self.config.write_u16_internal(MEM_BASE_OFF, mem_base);
        self.config.write_u16_internal(MEM_BASE_OFF + 2, mem_limit);
        // The low nibble of the prefetchable registers says "64-bit".
        let (pb, pl, pbh, plh) = match w.prefetch {
            Some((first, last)) => (
                ((first >> 16) as u16 & 0xfff0) | 1,
                ((last >> 16) as u16 & 0xfff0) | 1,
                (first >> 32) as u32,
                (last >> 32) as u32,
            ),
            None => (0xfff1, 0x0001, 0, 0),
        };
        self.config.write_u16_internal(PREF_BASE_OFF, pb);
        self.config.write_u16_internal(PREF_BASE_OFF + 2, pl);
        self.config.write_u32_internal(PREF_BASE_HI_OFF, pbh);
        self.config.write_u32_internal(PREF_LIMIT_HI_OFF, plh);
        if self.params.io_window {
            // The low nibble says "32-bit I/O addressing".
            let (ib, il, ibh, ilh) = match w.io {
                Some((first, last)) => (
                    ((first >> 8) as u8 & 0xf0) | 1,
                    ((last >> 8) as u8 & 0xf0) | 1,
                    (first >> 16) as u16,
                    (last >> 16) as u16,
                ),
                None => (0xf1, 0x01, 0, 0),
            };
            self.config.write_bytes_internal(IO_BASE_OFF, &[ib, il]);
            self.config.write_u16_internal(IO_HI_OFF, ibh);
            self.config.write_u16_internal(IO_HI_OFF + 2, ilh);
        }
    }

    /// Enable forwarding as firmware does: memory space, bus master, and I/O space when the
    /// I/O window is implemented (firmware side, no outcome).
    pub fn enable_forwarding(&mut self) {
        let mut cmd = self.config.command() | CMD_MEMORY_SPACE | CMD_BUS_MASTER;
        if self.params.io_window {
            cmd |= CMD_IO_SPACE;
        }
        self.config.write_u16_internal(COMMAND_OFF, cmd);
    }

    // ---- native hot-plug slot ----

    fn pcie_reg(&self, reg: usize) -> u16 {
        self.config
            .pcie_offset()
            .map(|off| self.config.read_u16(off + reg))
            .unwrap_or(0)
    }

    fn set_pcie_reg(&mut self, reg: usize, v: u16) {
        if let Some(off) = self.config.pcie_offset() {
            self.config.write_u16_internal(off + reg, v);
        }
    }

    /// Slot Control (0 without a native slot).
    pub fn slot_control(&self) -> u16 {
        if self.params.native_hotplug {
            self.pcie_reg(regs::SLTCTL)
        } else {
            0
        }
    }

    /// Slot Status (0 without a native slot).
    pub fn slot_status(&self) -> u16 {
        if self.params.native_hotplug {
            self.pcie_reg(regs::SLTSTA)
        } else {
            0
        }
    }

    /// Link Status (0 for a conventional PCI bridge).
    pub fn link_status(&self) -> u16 {
        self.pcie_reg(regs::LNKSTA)
    }

    /// Presence Detect State: whether a card is in the slot. Always true without a native
    /// slot.
    pub fn presence(&self) -> bool {
        !self.params.native_hotplug || self.slot_status() & slot_status::PRESENCE_DETECT_STATE != 0
    }

    /// Data Link Layer Link Active (follows presence; true without a native slot).
    pub fn link_active(&self) -> bool {
        !self.params.native_hotplug || self.link_status() & LNKSTA_DLL_ACTIVE != 0
    }

    /// Whether the slot's power indicator is on or blinking (the guest's view that the slot
    /// is in use). Always true without a native slot.
    pub fn slot_in_use(&self) -> bool {
        !self.params.native_hotplug
            || (self.slot_control() & slot_control::POWER_INDICATOR)
                != INDICATOR_OFF << PWR_INDICATOR_SHIFT
    }

    /// Whether a removal is complete: a native slot that is empty (after
    /// [`PciePort::card_present`]`(false)`) and whose power indicator the guest turned off.
    /// Also true when the indicator was already off before the removal request.
    pub fn removal_complete(&self) -> bool {
        self.params.native_hotplug && !self.presence() && !self.slot_in_use()
    }

    /// Whether a configuration write of `len` bytes at `reg_idx`/`offset` covers Slot
    /// Control.
    fn writes_slot_control(&self, reg_idx: usize, offset: u64, len: usize) -> bool {
        let Some(cap) = self.config.pcie_offset() else {
            return false;
        };
        let ctl = cap + regs::SLTCTL;
        let Some(start) = (reg_idx * 4).checked_add(offset as usize) else {
            return false;
        };
        start < ctl + 2 && ctl < start.saturating_add(len)
    }

    /// Set the slot state for a card present (or not) at reset, before the guest runs:
    /// presence, link active, slot power on (off when empty) and the power indicator, with
    /// no event bits and no interrupt. Does nothing without a native slot.
    pub fn cold_plug(&mut self, present: bool) {
        if !self.params.native_hotplug {
            return;
        }
        let mut sta = self.pcie_reg(regs::SLTSTA) & !slot_status::RW1C;
        let mut lnk = self.pcie_reg(regs::LNKSTA);
        let mut ctl = self.pcie_reg(regs::SLTCTL)
            & !(slot_control::POWER_CONTROLLER
                | slot_control::POWER_INDICATOR
                | slot_control::ATTENTION_INDICATOR);
        ctl |= INDICATOR_OFF << ATTN_INDICATOR_SHIFT;
        if present {
            sta |= slot_status::PRESENCE_DETECT_STATE;
            lnk |= LNKSTA_DLL_ACTIVE;
            ctl |= INDICATOR_ON << PWR_INDICATOR_SHIFT;
        } else {
            sta &= !slot_status::PRESENCE_DETECT_STATE;
            lnk &= !LNKSTA_DLL_ACTIVE;
            ctl |= INDICATOR_OFF << PWR_INDICATOR_SHIFT;
        }
        self.set_pcie_reg(regs::SLTSTA, sta);
        self.set_pcie_reg(regs::LNKSTA, lnk);
        self.set_pcie_reg(regs::SLTCTL, ctl);
        self.irq_line = self.interrupt_condition();
    }

    /// Hot-plug event from the VMM: a card was inserted (`true`, the device is already on
    /// the secondary bus) or the VMM asks for its removal (`false`; the device must stay
    /// until the guest powers the slot off). On a change of presence, updates Presence
    /// Detect State and Link Active, raises Presence Detect Changed and Data Link Layer State
    /// Changed, and signals the interrupt if the guest enabled it (otherwise the events stay
    /// pending until it does). Returns whether presence changed.
    pub fn card_present(&mut self, present: bool) -> Result<bool, PciError> {
        if !self.params.native_hotplug {
            return Err(PciError::NoHotplugSlot);
        }
        if self.presence() == present {
            return Ok(false);
        }
        self.config.pcie_set_slot_presence(present);
        self.update_interrupt();
        Ok(true)
    }

    /// Raise Slot Status event bits (RW1C bits only), signalling the interrupt if enabled.
    pub fn raise_slot_events(&mut self, events: u16) {
        if !self.params.native_hotplug {
            return;
        }
        self.config.pcie_raise_slot_events(events);
        self.update_interrupt();
    }

    /// The hot-plug interrupt condition: MSI enabled, Hot-Plug Interrupt Enable set and an
    /// enabled event pending.
    pub fn interrupt_condition(&self) -> bool {
        if !self.params.native_hotplug {
            return false;
        }
        let Some(msi) = &self.msi else {
            return false;
        };
        if !msi.enabled() {
            return false;
        }
        let ctl = self.slot_control();
        if ctl & slot_control::HOTPLUG_INTERRUPT_ENABLE == 0 {
            return false;
        }
        // Enable bits 0..4 match status bits 0..4; DLLSCE (12) matches DLLSC (8).
        let mut enabled = ctl
            & (slot_control::ATTENTION_BUTTON_ENABLE
                | slot_control::POWER_FAULT_ENABLE
                | slot_control::MRL_SENSOR_ENABLE
                | slot_control::PRESENCE_DETECT_ENABLE
                | slot_control::COMMAND_COMPLETED_ENABLE);
        if ctl & slot_control::DLL_STATE_CHANGED_ENABLE != 0 {
            enabled |= slot_status::DLL_STATE_CHANGED;
        }
        self.slot_status() & enabled & slot_status::RW1C != 0
    }

    fn update_interrupt(&mut self) {
        let cond = self.interrupt_condition();
        if cond && !self.irq_line {
            if let Some(msi) = &self.msi {
                if let Err(e) = msi.trigger(0) {
                    warn!("PCIe port: failed to signal the hot-plug interrupt: {e}");
                }
            }
        }
        self.irq_line = cond;
    }
}

impl PciDevice for PciePort {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_config_register(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> ConfigWriteOutcome {
        let mut out = self.config.write_config_register(reg_idx, offset, data);
        if self.params.native_hotplug {
            if self.writes_slot_control(reg_idx, offset, data.len()) {
                out.slot_indicator = Some(self.slot_in_use());
            }
            self.update_interrupt();
        }
        out
    }

    fn bars(&self) -> Vec<BarInfo> {
        Vec::new()
    }

    fn set_bar_address(&mut self, index: usize, _addr: u64) -> Result<(), PciError> {
        Err(PciError::BarNotConfigured(index))
    }

    fn read_bar(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}

    fn is_bridge(&self) -> bool {
        true
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
#[path = "port_tests.rs"]
mod tests;

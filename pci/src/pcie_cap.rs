//! PCI Express capability (version 2).
//!
//! One builder, [`PcieCapability`], covers every port type: which register blocks are
//! implemented and which bits are writable follow from [`PciePortType`] and from whether a
//! slot is attached ([`PcieSlotCapabilities`]). Endpoints use the device and link registers;
//! root ports and downstream switch ports can add the slot registers (hot-plug: Slot
//! Capabilities / Control / Status with the RW1C event bits) and root ports the root
//! control/status registers. Device-side helpers at the bottom (presence detect, attention
//! button, data-link-layer state) let a future hot-plug controller raise slot events on the
//! configuration space without going through the guest-write masks.

use crate::config::PciConfiguration;

/// PCI Express capability ID.
pub const PCIE_CAP_ID: u8 = 0x10;
/// Length of the version 2 capability.
pub const PCIE_CAP_LEN: usize = 0x3c;

/// Register offsets from the capability start.
pub mod regs {
    /// PCI Express Capabilities register (u16).
    pub const CAPS: usize = 0x02;
    /// Device Capabilities (u32).
    pub const DEVCAP: usize = 0x04;
    /// Device Control (u16).
    pub const DEVCTL: usize = 0x08;
    /// Device Status (u16).
    pub const DEVSTA: usize = 0x0a;
    /// Link Capabilities (u32).
    pub const LNKCAP: usize = 0x0c;
    /// Link Control (u16).
    pub const LNKCTL: usize = 0x10;
    /// Link Status (u16).
    pub const LNKSTA: usize = 0x12;
    /// Slot Capabilities (u32).
    pub const SLTCAP: usize = 0x14;
    /// Slot Control (u16).
    pub const SLTCTL: usize = 0x18;
    /// Slot Status (u16).
    pub const SLTSTA: usize = 0x1a;
    /// Root Control (u16).
    pub const RTCTL: usize = 0x1c;
    /// Root Capabilities (u16).
    pub const RTCAP: usize = 0x1e;
    /// Root Status (u32).
    pub const RTSTA: usize = 0x20;
    /// Device Capabilities 2 (u32).
    pub const DEVCAP2: usize = 0x24;
    /// Device Control 2 (u16).
    pub const DEVCTL2: usize = 0x28;
    /// Link Capabilities 2 (u32).
    pub const LNKCAP2: usize = 0x2c;
    /// Link Control 2 (u16).
    pub const LNKCTL2: usize = 0x30;
}

/// Slot Status bits.
pub mod slot_status {
    /// Attention Button Pressed (RW1C).
    pub const ATTENTION_BUTTON_PRESSED: u16 = 1 << 0;
    /// Power Fault Detected (RW1C).
    pub const POWER_FAULT_DETECTED: u16 = 1 << 1;
    /// MRL Sensor Changed (RW1C).
    pub const MRL_SENSOR_CHANGED: u16 = 1 << 2;
    /// Presence Detect Changed (RW1C).
    pub const PRESENCE_DETECT_CHANGED: u16 = 1 << 3;
    /// Command Completed (RW1C).
    pub const COMMAND_COMPLETED: u16 = 1 << 4;
    /// MRL Sensor State (RO).
    pub const MRL_SENSOR_STATE: u16 = 1 << 5;
    /// Presence Detect State (RO).
    pub const PRESENCE_DETECT_STATE: u16 = 1 << 6;
    /// Electromechanical Interlock Status (RO).
    pub const INTERLOCK_STATUS: u16 = 1 << 7;
    /// Data Link Layer State Changed (RW1C).
    pub const DLL_STATE_CHANGED: u16 = 1 << 8;
    /// All RW1C bits.
    pub const RW1C: u16 = 0x011f;
}

/// Slot Control bits.
pub mod slot_control {
    /// Attention Button Pressed Enable.
    pub const ATTENTION_BUTTON_ENABLE: u16 = 1 << 0;
    /// Power Fault Detected Enable.
    pub const POWER_FAULT_ENABLE: u16 = 1 << 1;
    /// MRL Sensor Changed Enable.
    pub const MRL_SENSOR_ENABLE: u16 = 1 << 2;
    /// Presence Detect Changed Enable.
    pub const PRESENCE_DETECT_ENABLE: u16 = 1 << 3;
    /// Command Completed Interrupt Enable.
    pub const COMMAND_COMPLETED_ENABLE: u16 = 1 << 4;
    /// Hot-Plug Interrupt Enable.
    pub const HOTPLUG_INTERRUPT_ENABLE: u16 = 1 << 5;
    /// Attention Indicator Control (2 bits).
    pub const ATTENTION_INDICATOR: u16 = 3 << 6;
    /// Power Indicator Control (2 bits).
    pub const POWER_INDICATOR: u16 = 3 << 8;
    /// Power Controller Control (1 = off).
    pub const POWER_CONTROLLER: u16 = 1 << 10;
    /// Data Link Layer State Changed Enable.
    pub const DLL_STATE_CHANGED_ENABLE: u16 = 1 << 12;
}

/// Link Status: Data Link Layer Link Active.
pub const LNKSTA_DLL_ACTIVE: u16 = 1 << 13;

/// Device/port type field of the PCI Express Capabilities register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciePortType {
    /// PCI Express endpoint.
    Endpoint = 0,
    /// Legacy PCI Express endpoint.
    LegacyEndpoint = 1,
    /// Root port of a root complex.
    RootPort = 4,
    /// Upstream port of a switch.
    UpstreamPort = 5,
    /// Downstream port of a switch.
    DownstreamPort = 6,
    /// PCI Express to PCI/PCI-X bridge.
    PcieToPciBridge = 7,
    /// PCI/PCI-X to PCI Express bridge.
    PciToPcieBridge = 8,
    /// Root complex integrated endpoint.
    RootComplexIntegratedEndpoint = 9,
    /// Root complex event collector.
    RootComplexEventCollector = 10,
}

impl PciePortType {
    /// Whether this function has a type 1 header (ports and bridges).
    pub fn is_bridge(self) -> bool {
        matches!(
            self,
            PciePortType::RootPort
                | PciePortType::UpstreamPort
                | PciePortType::DownstreamPort
                | PciePortType::PcieToPciBridge
                | PciePortType::PciToPcieBridge
        )
    }

    /// Whether this is a downstream-facing port (may implement a slot).
    pub fn is_downstream_port(self) -> bool {
        matches!(self, PciePortType::RootPort | PciePortType::DownstreamPort)
    }

    fn has_link(self) -> bool {
        !matches!(
            self,
            PciePortType::RootComplexIntegratedEndpoint | PciePortType::RootComplexEventCollector
        )
    }

    fn has_root_regs(self) -> bool {
        matches!(
            self,
            PciePortType::RootPort | PciePortType::RootComplexEventCollector
        )
    }
}

/// Slot capabilities of a downstream port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PcieSlotCapabilities {
    /// Attention button present.
    pub attention_button: bool,
    /// Power controller present.
    pub power_controller: bool,
    /// Attention indicator present.
    pub attention_indicator: bool,
    /// Power indicator present.
    pub power_indicator: bool,
    /// Hot-plug surprise (removal without notice allowed).
    pub hotplug_surprise: bool,
    /// Hot-plug capable.
    pub hotplug_capable: bool,
    /// No Command Completed support (commands complete immediately, no event).
    pub no_command_completed: bool,
    /// Physical slot number (13 bits).
    pub physical_slot: u16,
}

impl PcieSlotCapabilities {
    fn register(&self) -> u32 {
        let mut v = 0u32;
        v |= u32::from(self.attention_button);
        v |= u32::from(self.power_controller) << 1;
        v |= u32::from(self.attention_indicator) << 3;
        v |= u32::from(self.power_indicator) << 4;
        v |= u32::from(self.hotplug_surprise) << 5;
        v |= u32::from(self.hotplug_capable) << 6;
        v |= u32::from(self.no_command_completed) << 18;
        v |= u32::from(self.physical_slot & 0x1fff) << 19;
        v
    }

    fn control_mask(&self) -> u16 {
        let mut m = 0x103f; // event enables 0..5 and DLL state changed enable
        if self.attention_indicator {
            m |= slot_control::ATTENTION_INDICATOR;
        }
        if self.power_indicator {
            m |= slot_control::POWER_INDICATOR;
        }
        if self.power_controller {
            m |= slot_control::POWER_CONTROLLER;
        }
        m
    }
}

/// Parameters of a PCI Express capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieCapability {
    /// Device/port type.
    pub port_type: PciePortType,
    /// Slot implemented (downstream ports only).
    pub slot: Option<PcieSlotCapabilities>,
    /// Max payload size supported, encoded (0 = 128 bytes .. 5 = 4096 bytes).
    pub max_payload: u8,
    /// Link speed (1 = 2.5 GT/s, 2 = 5, 3 = 8, 4 = 16, 5 = 32).
    pub link_speed: u8,
    /// Link width (lanes).
    pub link_width: u8,
    /// Port number (link capabilities).
    pub port_number: u8,
}

impl PcieCapability {
    /// A capability of `port_type` with a x1 Gen1 link, 128-byte payload and no slot.
    pub fn new(port_type: PciePortType) -> Self {
        PcieCapability {
            port_type,
            slot: None,
            max_payload: 0,
            link_speed: 1,
            link_width: 1,
            port_number: 0,
        }
    }

    /// Attach a slot (ignored unless the port type is a downstream port).
    pub fn with_slot(mut self, slot: PcieSlotCapabilities) -> Self {
        if self.port_type.is_downstream_port() {
            self.slot = Some(slot);
        }
        self
    }

    fn put16(b: &mut [u8], off: usize, v: u16) {
        b[off - 2..off].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off - 2..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Initial body after the ID/next bytes.
    pub fn body(&self) -> Vec<u8> {
        let mut b = vec![0u8; PCIE_CAP_LEN - 2];
        let pt = self.port_type;
        let mut caps: u16 = 2 | ((pt as u16) << 4);
        if self.slot.is_some() {
            caps |= 1 << 8;
        }
        // `put16` takes offsets relative to the capability start; the body starts at +2.
        b[0..2].copy_from_slice(&caps.to_le_bytes());
        let mut devcap = u32::from(self.max_payload.min(5));
        // Role-based error reporting (required for PCIe 1.1+ functions).
        devcap |= 1 << 15;
        Self::put32(&mut b, regs::DEVCAP, devcap);
        if pt.has_link() {
            let speed = u32::from(self.link_speed.clamp(1, 5));
            let mut lnkcap = speed | (u32::from(self.link_width.clamp(1, 32)) << 4);
            if pt.is_downstream_port() {
                // Data Link Layer Link Active Reporting capable.
                lnkcap |= 1 << 20;
            }
            lnkcap |= u32::from(self.port_number) << 24;
            Self::put32(&mut b, regs::LNKCAP, lnkcap);
            let mut lnksta = (speed as u16) | (u16::from(self.link_width.clamp(1, 32)) << 4);
            if pt.is_downstream_port() && self.slot.is_none() {
                lnksta |= LNKSTA_DLL_ACTIVE;
            }
            Self::put16(&mut b, regs::LNKSTA, lnksta);
            Self::put32(&mut b, regs::LNKCAP2, ((1u32 << speed) - 1) << 1);
            Self::put16(&mut b, regs::LNKCTL2, speed as u16);
        }
        if let Some(slot) = self.slot {
            Self::put32(&mut b, regs::SLTCAP, slot.register());
        }
        if pt.is_downstream_port() {
            // ARI forwarding supported.
            Self::put32(&mut b, regs::DEVCAP2, 1 << 5);
        }
        b
    }

    /// Writable bits of the body.
    pub fn writable_mask(&self) -> Vec<u8> {
        let mut m = vec![0u8; PCIE_CAP_LEN - 2];
        let pt = self.port_type;
        Self::put16(&mut m, regs::DEVCTL, 0x7fff);
        if pt.has_link() {
            let lnkctl = if pt.is_bridge() { 0x0fdb } else { 0x03cb };
            Self::put16(&mut m, regs::LNKCTL, lnkctl);
            Self::put16(&mut m, regs::LNKCTL2, 0x000f);
        }
        if let Some(slot) = self.slot {
            Self::put16(&mut m, regs::SLTCTL, slot.control_mask());
        }
        if pt.has_root_regs() {
            Self::put16(&mut m, regs::RTCTL, 0x001f);
        }
        let devctl2 = if pt.is_downstream_port() {
            0x003f
        } else {
            0x001f
        };
        Self::put16(&mut m, regs::DEVCTL2, devctl2);
        m
    }

    /// Write-1-to-clear bits of the body.
    pub fn w1c_mask(&self) -> Vec<u8> {
        let mut m = vec![0u8; PCIE_CAP_LEN - 2];
        Self::put16(&mut m, regs::DEVSTA, 0x000f);
        if self.port_type.has_link() && self.port_type.is_bridge() {
            Self::put16(&mut m, regs::LNKSTA, 0xc000);
        }
        if self.slot.is_some() {
            Self::put16(&mut m, regs::SLTSTA, slot_status::RW1C);
        }
        if self.port_type.has_root_regs() {
            Self::put32(&mut m, regs::RTSTA, 1 << 16);
        }
        m
    }
}

/// Device-side accessors for a configuration space with a PCI Express capability. They
/// bypass the guest write masks (they model hardware changing its own status bits) and do
/// nothing if the capability is absent.
impl PciConfiguration {
    /// Current Slot Control value.
    pub fn pcie_slot_control(&self) -> Option<u16> {
        self.pcie_offset()
            .map(|off| self.read_u16(off + regs::SLTCTL))
    }

    /// Current Slot Status value.
    pub fn pcie_slot_status(&self) -> Option<u16> {
        self.pcie_offset()
            .map(|off| self.read_u16(off + regs::SLTSTA))
    }

    /// Set RW1C event bits in Slot Status (e.g. attention button pressed, command completed).
    pub fn pcie_raise_slot_events(&mut self, events: u16) {
        if let Some(off) = self.pcie_offset() {
            let v = self.read_u16(off + regs::SLTSTA) | (events & slot_status::RW1C);
            self.write_u16_internal(off + regs::SLTSTA, v);
        }
    }

    /// Update Presence Detect State and the data link layer state for a card insertion or
    /// removal, raising Presence Detect Changed and DLL State Changed.
    pub fn pcie_set_slot_presence(&mut self, present: bool) {
        let Some(off) = self.pcie_offset() else {
            return;
        };
        let mut sta = self.read_u16(off + regs::SLTSTA);
        let was = sta & slot_status::PRESENCE_DETECT_STATE != 0;
        if was == present {
            return;
        }
        if present {
            sta |= slot_status::PRESENCE_DETECT_STATE;
        } else {
            sta &= !slot_status::PRESENCE_DETECT_STATE;
        }
        sta |= slot_status::PRESENCE_DETECT_CHANGED | slot_status::DLL_STATE_CHANGED;
        self.write_u16_internal(off + regs::SLTSTA, sta);
        let mut lnksta = self.read_u16(off + regs::LNKSTA);
        if present {
            lnksta |= LNKSTA_DLL_ACTIVE;
        } else {
            lnksta &= !LNKSTA_DLL_ACTIVE;
        }
        self.write_u16_internal(off + regs::LNKSTA, lnksta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_layout() {
        let c = PcieCapability::new(PciePortType::Endpoint);
        let b = c.body();
        assert_eq!(b.len(), PCIE_CAP_LEN - 2);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x0002);
        let m = c.writable_mask();
        // No slot or root registers for an endpoint.
        assert!(m[regs::SLTCTL - 2..regs::RTSTA + 2].iter().all(|&x| x == 0));
        assert!(c.w1c_mask()[regs::SLTSTA - 2..regs::SLTSTA]
            .iter()
            .all(|&x| x == 0));
        // Slots are ignored for endpoints.
        let c = c.with_slot(PcieSlotCapabilities::default());
        assert!(c.slot.is_none());
    }

    #[test]
    fn root_port_with_slot() {
        let slot = PcieSlotCapabilities {
            attention_button: true,
            power_controller: true,
            attention_indicator: true,
            power_indicator: true,
            hotplug_capable: true,
            physical_slot: 5,
            ..Default::default()
        };
        let c = PcieCapability::new(PciePortType::RootPort).with_slot(slot);
        let b = c.body();
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x0142);
        let sltcap = u32::from_le_bytes(b[regs::SLTCAP - 2..regs::SLTCAP + 2].try_into().unwrap());
        assert_eq!(sltcap, 0x1b | (1 << 6) | (5 << 19));
        let w1c = c.w1c_mask();
        assert_eq!(
            u16::from_le_bytes([w1c[regs::SLTSTA - 2], w1c[regs::SLTSTA - 1]]),
            slot_status::RW1C
        );
    }
}

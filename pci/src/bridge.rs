//! A PCI-to-PCI bridge function (type 1 header).
//!
//! Minimal but complete enough for routing: bus numbers and forwarding windows are plain
//! type 1 registers handled by [`PciConfiguration`]; the bus tree ([`crate::PciBus`]) reads the
//! secondary/subordinate numbers to route configuration cycles. An optional PCI Express
//! capability makes it a root port, a switch port or a PCIe-to-PCI bridge (with a hot-plug
//! slot if requested). No BARs and no interrupts yet.

use std::any::Any;

use crate::config::{HeaderType, PciConfigParams, PciConfiguration};
use crate::device::{BarInfo, ConfigWriteOutcome, PciDevice};
use crate::pcie_cap::PcieCapability;
use crate::pm::PmCapability;
use crate::PciError;

/// Class code of a PCI-to-PCI bridge.
pub const PCI_BRIDGE_CLASS: u32 = 0x06_0400;

/// A PCI-to-PCI bridge.
#[derive(Debug)]
pub struct PciBridge {
    config: PciConfiguration,
}

impl PciBridge {
    /// Create a bridge with the given IDs; `pcie` adds a PCI Express capability (and a 4 KiB
    /// configuration space).
    pub fn new(
        vendor_id: u16,
        device_id: u16,
        pcie: Option<PcieCapability>,
    ) -> Result<Self, PciError> {
        let mut p = PciConfigParams::device(vendor_id, device_id, PCI_BRIDGE_CLASS);
        p.header_type = HeaderType::Bridge;
        p.extended = pcie.is_some();
        let mut config = PciConfiguration::new(p);
        if let Some(cap) = pcie {
            config.add_pcie_capability(&cap)?;
        }
        config.add_pm_capability(PmCapability::default())?;
        Ok(PciBridge { config })
    }

    /// The configuration space (e.g. to raise slot events).
    pub fn config(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

impl PciDevice for PciBridge {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_config_register(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> ConfigWriteOutcome {
        self.config.write_config_register(reg_idx, offset, data)
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        self.config.set_bar_address(index, addr)
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

//! The host bridge at 00:00.0.
//!
//! A type 0 function with class 0x060000 (host bridge) and the IDs of the Q35 MCH
//! (8086:29c0), which guests know as a plain host bridge. It has no BARs and no capabilities;
//! all of its registers except the standard writable ones are read-only.

use std::any::Any;

use crate::config::{PciConfigParams, PciConfiguration};
use crate::device::{BarInfo, ConfigWriteOutcome, PciDevice};
use crate::PciError;

/// Vendor ID of the host bridge.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Device ID of the host bridge.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x29c0;
/// Class code of a host bridge.
pub const HOST_BRIDGE_CLASS: u32 = 0x06_0000;

/// The host bridge function.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfiguration,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// Create the host bridge.
    pub fn new() -> Self {
        let mut p = PciConfigParams::device(
            HOST_BRIDGE_VENDOR_ID,
            HOST_BRIDGE_DEVICE_ID,
            HOST_BRIDGE_CLASS,
        );
        p.subsystem_vendor_id = 0x1af4;
        p.subsystem_id = 0x1100;
        HostBridge {
            config: PciConfiguration::new(p),
        }
    }
}

impl PciDevice for HostBridge {
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
        Vec::new()
    }

    fn set_bar_address(&mut self, index: usize, _addr: u64) -> Result<(), PciError> {
        Err(PciError::BarNotConfigured(index))
    }

    fn read_bar(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

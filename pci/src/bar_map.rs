//! Guest-address to BAR routing for the VMM.
//!
//! [`BarMap`] remembers where each device's BARs currently are and answers "which device,
//! which BAR, which offset" for an MMIO or port access. Feed it the BARs placed by the
//! allocator ([`BarMap::add_device`]) and every [`ConfigWriteResult`] coming back from the
//! configuration front ends ([`BarMap::apply`]); it moves entries on [`BarChange`]s and honours
//! the command register's memory/I/O decode enables. Guests may transiently program
//! overlapping BARs; lookups then return the most recently placed match. The map is a small
//! vector: a lookup is linear in the number of BARs, which is fine for tens of devices.

use std::sync::Arc;

use crate::bar::BarRegion;
use crate::bus::{ConfigWriteResult, SharedPciDevice};
use crate::device::BarChange;

/// Address space of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    /// Memory (MMIO).
    Memory,
    /// I/O ports.
    Io,
}

impl From<BarRegion> for AddressSpace {
    fn from(r: BarRegion) -> Self {
        if r == BarRegion::Io {
            AddressSpace::Io
        } else {
            AddressSpace::Memory
        }
    }
}

struct Entry {
    space: AddressSpace,
    base: u64,
    size: u64,
    index: usize,
    device: SharedPciDevice,
}

/// Where an access lands.
pub struct BarTarget {
    /// The device owning the BAR.
    pub device: SharedPciDevice,
    /// BAR index.
    pub index: usize,
    /// Offset of the access within the BAR.
    pub offset: u64,
}

/// BAR locations of all devices.
#[derive(Default)]
pub struct BarMap {
    entries: Vec<Entry>,
    /// Devices with memory / I/O decoding disabled, by pointer.
    mem_off: Vec<SharedPciDevice>,
    io_off: Vec<SharedPciDevice>,
}

impl std::fmt::Debug for BarMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v: Vec<_> = self
            .entries
            .iter()
            .map(|e| (e.space, e.base, e.size, e.index))
            .collect();
        f.debug_struct("BarMap").field("entries", &v).finish()
    }
}

fn same(a: &SharedPciDevice, b: &SharedPciDevice) -> bool {
    Arc::ptr_eq(a, b)
}

impl BarMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record every BAR of `device` at its current address. Decoding starts disabled until
    /// the guest sets the command register bits (as after reset).
    pub fn add_device(&mut self, device: &SharedPciDevice) {
        let bars = device.lock().unwrap_or_else(|e| e.into_inner()).bars();
        for b in bars {
            self.entries.push(Entry {
                space: b.region.into(),
                base: b.addr,
                size: b.size,
                index: b.index,
                device: device.clone(),
            });
        }
        self.mem_off.push(device.clone());
        self.io_off.push(device.clone());
    }

    /// Forget every BAR of `device`.
    pub fn remove_device(&mut self, device: &SharedPciDevice) {
        self.entries.retain(|e| !same(&e.device, device));
        self.mem_off.retain(|d| !same(d, device));
        self.io_off.retain(|d| !same(d, device));
    }

    /// Apply the BAR moves and decode changes of a configuration write.
    pub fn apply(&mut self, result: &ConfigWriteResult) {
        for c in &result.outcome.bar_changes {
            self.move_bar(&result.device, c);
        }
        let set = |list: &mut Vec<SharedPciDevice>, enabled: Option<bool>| match enabled {
            Some(true) => list.retain(|d| !same(d, &result.device)),
            Some(false) if !list.iter().any(|d| same(d, &result.device)) => {
                list.push(result.device.clone());
            }
            _ => {}
        };
        set(&mut self.mem_off, result.outcome.mem_decode);
        set(&mut self.io_off, result.outcome.io_decode);
    }

    fn move_bar(&mut self, device: &SharedPciDevice, c: &BarChange) {
        if let Some(pos) = self
            .entries
            .iter()
            .position(|e| same(&e.device, device) && e.index == c.index)
        {
            let mut e = self.entries.remove(pos);
            e.base = c.new_addr;
            self.entries.push(e);
        }
    }

    /// The BAR containing `addr` in `space`, if its device decodes that space.
    pub fn lookup(&self, space: AddressSpace, addr: u64) -> Option<BarTarget> {
        let off = match space {
            AddressSpace::Memory => &self.mem_off,
            AddressSpace::Io => &self.io_off,
        };
        self.entries
            .iter()
            .rev()
            .filter(|e| e.space == space && addr >= e.base && addr - e.base < e.size)
            .find(|e| !off.iter().any(|d| same(d, &e.device)))
            .map(|e| BarTarget {
                device: e.device.clone(),
                index: e.index,
                offset: addr - e.base,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{PciBdf, PciRoot};
    use crate::config::{PciConfigParams, PciConfiguration};
    use crate::device::{BarInfo, ConfigWriteOutcome, PciDevice};
    use crate::{PciBarConfig, PciError};
    use std::any::Any;
    use std::sync::Mutex;

    struct Dummy(PciConfiguration);
    impl PciDevice for Dummy {
        fn read_config_register(&mut self, reg_idx: usize) -> u32 {
            self.0.read_config_register(reg_idx)
        }
        fn write_config_register(&mut self, r: usize, o: u64, d: &[u8]) -> ConfigWriteOutcome {
            self.0.write_config_register(r, o, d)
        }
        fn bars(&self) -> Vec<BarInfo> {
            self.0.bars()
        }
        fn set_bar_address(&mut self, i: usize, a: u64) -> Result<(), PciError> {
            self.0.set_bar_address(i, a)
        }
        fn read_bar(&mut self, _: usize, _: u64, _: &mut [u8]) {}
        fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    #[test]
    fn follows_moves_and_decode() {
        let mut c = PciConfiguration::new(PciConfigParams::device(1, 2, 0xff0000));
        c.add_bar(PciBarConfig::new(0, 0x1000, BarRegion::Mmio32, false).unwrap())
            .unwrap();
        c.add_bar(PciBarConfig::new(1, 0x20, BarRegion::Io, false).unwrap())
            .unwrap();
        c.set_bar_address(0, 0xe000_0000).unwrap();
        c.set_bar_address(1, 0xc000).unwrap();
        let dev: SharedPciDevice = Arc::new(Mutex::new(Dummy(c)));
        let mut root = PciRoot::with_host_bridge();
        let bdf: PciBdf = root.add_root_device(1, 0, dev.clone()).unwrap();
        let mut map = BarMap::new();
        map.add_device(&dev);
        // Decode disabled after reset.
        assert!(map.lookup(AddressSpace::Memory, 0xe000_0010).is_none());
        let r = root.config_write(bdf, 4, &[3, 0]).unwrap();
        map.apply(&r);
        let t = map.lookup(AddressSpace::Memory, 0xe000_0010).unwrap();
        assert_eq!((t.index, t.offset), (0, 0x10));
        assert!(Arc::ptr_eq(&t.device, &dev));
        assert_eq!(map.lookup(AddressSpace::Io, 0xc01f).unwrap().offset, 0x1f);
        assert!(map.lookup(AddressSpace::Io, 0xc020).is_none());
        assert!(map.lookup(AddressSpace::Memory, 0xc000).is_none());
        // Guest moves BAR 0.
        let r = root
            .config_write(bdf, 0x10, &0xd000_0000u32.to_le_bytes())
            .unwrap();
        map.apply(&r);
        assert!(map.lookup(AddressSpace::Memory, 0xe000_0010).is_none());
        assert_eq!(
            map.lookup(AddressSpace::Memory, 0xd000_0fff)
                .unwrap()
                .offset,
            0xfff
        );
        // Memory decode off.
        let r = root.config_write(bdf, 4, &[1, 0]).unwrap();
        map.apply(&r);
        assert!(map.lookup(AddressSpace::Memory, 0xd000_0000).is_none());
        assert!(map.lookup(AddressSpace::Io, 0xc000).is_some());
        map.remove_device(&dev);
        assert!(map.lookup(AddressSpace::Io, 0xc000).is_none());
    }
}

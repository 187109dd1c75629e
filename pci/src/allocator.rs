//! BAR placement.
//!
//! [`BarAllocator`] manages the guest-physical windows the VMM dedicates to PCI (an I/O port
//! window, a 32-bit MMIO window below 4 GiB and a 64-bit MMIO window above RAM) with
//! `vm-allocator`'s [`AddressAllocator`], which does aligned first-fit allocation and freeing.
//! BARs are naturally aligned (address multiple of the size); memory BARs are also rounded to
//! whole 4 KiB pages so no two devices share a page. 64-bit BARs go to the 64-bit window and
//! fall back to the 32-bit one.
//!
//! The allocator records the VMM's placement only: if the guest later moves a BAR (reported as
//! a [`crate::BarChange`]), the space stays reserved under the original address until freed.
//!
//! Behind a PCI-to-PCI bridge the rules differ ([`BarPlacement::BehindBridge`], built with
//! [`BarAllocator::behind_bridge`]): a bridge forwards memory through a 32-bit
//! non-prefetchable window and a 64-bit prefetchable window only, so non-prefetchable memory
//! BARs (64-bit ones included) go to the 32-bit window, and only prefetchable 64-bit BARs go
//! to the 64-bit window (falling back to the 32-bit one).

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::bar::BarRegion;
use crate::device::PciDevice;
use crate::PciError;

const PAGE_SIZE: u64 = 4096;

/// A BAR placed by [`BarAllocator::place_device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarAssignment {
    /// BAR index.
    pub index: usize,
    /// Address space.
    pub region: BarRegion,
    /// Prefetchable.
    pub prefetchable: bool,
    /// Assigned address.
    pub addr: u64,
    /// BAR size.
    pub size: u64,
}

/// Which window a memory BAR goes to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BarPlacement {
    /// Root bus: 64-bit BARs go to the 64-bit window (falling back to the 32-bit one), 32-bit
    /// BARs to the 32-bit window, whether prefetchable or not.
    #[default]
    RootBus,
    /// Behind a bridge: non-prefetchable memory BARs (even 64-bit ones) go to the 32-bit
    /// (non-prefetchable) window; prefetchable 64-bit BARs go to the 64-bit (prefetchable)
    /// window, falling back to the 32-bit one; 32-bit BARs go to the 32-bit window.
    BehindBridge,
}

/// Address allocator for BARs.
#[derive(Debug)]
pub struct BarAllocator {
    io: Option<AddressAllocator>,
    mmio32: Option<AddressAllocator>,
    mmio64: Option<AddressAllocator>,
    placement: BarPlacement,
}

fn alloc_err(e: vm_allocator::Error) -> PciError {
    PciError::Allocation(e.to_string())
}

fn window(base: u64, size: u64) -> Result<AddressAllocator, PciError> {
    AddressAllocator::new(base, size).map_err(alloc_err)
}

impl BarAllocator {
    /// Windows are `(base, size)`. The I/O and 64-bit windows are optional;
    /// an empty one is absent (ports may take all of a host window: the root
    /// bus then has none of it, and BARs that need it are refused).
    pub fn new(
        io: Option<(u64, u64)>,
        mmio32: (u64, u64),
        mmio64: Option<(u64, u64)>,
    ) -> Result<Self, PciError> {
        if mmio32
            .0
            .checked_add(mmio32.1)
            .is_none_or(|end| end > 1 << 32)
        {
            return Err(PciError::Allocation("32-bit window above 4 GiB".into()));
        }
        let nonempty = |w: Option<(u64, u64)>| w.filter(|(_, s)| *s > 0);
        Ok(BarAllocator {
            io: nonempty(io).map(|(b, s)| window(b, s)).transpose()?,
            mmio32: Some(window(mmio32.0, mmio32.1)?),
            mmio64: nonempty(mmio64).map(|(b, s)| window(b, s)).transpose()?,
            placement: BarPlacement::RootBus,
        })
    }

    /// An allocator for the devices behind a bridge ([`BarPlacement::BehindBridge`]). Windows
    /// are `(base, size)`; absent or empty windows allocate nothing. `mem` (non-prefetchable)
    /// must lie below 4 GiB.
    pub fn behind_bridge(
        io: Option<(u64, u64)>,
        mem: Option<(u64, u64)>,
        prefetch: Option<(u64, u64)>,
    ) -> Result<Self, PciError> {
        let nonempty = |w: Option<(u64, u64)>| w.filter(|(_, s)| *s > 0);
        let mem = nonempty(mem);
        if mem.is_some_and(|(b, s)| b.checked_add(s).is_none_or(|end| end > 1 << 32)) {
            return Err(PciError::Allocation(
                "non-prefetchable bridge window above 4 GiB".into(),
            ));
        }
        Ok(BarAllocator {
            io: nonempty(io).map(|(b, s)| window(b, s)).transpose()?,
            mmio32: mem.map(|(b, s)| window(b, s)).transpose()?,
            mmio64: nonempty(prefetch).map(|(b, s)| window(b, s)).transpose()?,
            placement: BarPlacement::BehindBridge,
        })
    }

    /// The placement rules in use.
    pub fn placement(&self) -> BarPlacement {
        self.placement
    }

    fn footprint(region: BarRegion, size: u64) -> (u64, u64) {
        if region == BarRegion::Io {
            (size, size)
        } else {
            let s = size.max(PAGE_SIZE);
            (s, s)
        }
    }

    /// Allocate a naturally aligned range for a non-prefetchable BAR of `size` bytes in
    /// `region` (see [`BarAllocator::allocate_bar`]).
    pub fn allocate(&mut self, region: BarRegion, size: u64) -> Result<u64, PciError> {
        self.allocate_bar(region, false, size)
    }

    /// Allocate a naturally aligned range for a BAR of `size` bytes in `region`, following
    /// the [`BarPlacement`] rules (prefetchability only matters behind a bridge).
    pub fn allocate_bar(
        &mut self,
        region: BarRegion,
        prefetchable: bool,
        size: u64,
    ) -> Result<u64, PciError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(PciError::Allocation(format!("invalid BAR size {size:#x}")));
        }
        let (len, align) = Self::footprint(region, size);
        let from = |a: &mut AddressAllocator| {
            a.allocate(len, align, AllocPolicy::FirstMatch)
                .map(|r| r.start())
                .map_err(alloc_err)
        };
        let from32 = |a: Option<&mut AddressAllocator>| match a {
            Some(a) => from(a),
            None => Err(PciError::Allocation("no 32-bit memory window".into())),
        };
        let use64 = match self.placement {
            BarPlacement::RootBus => region == BarRegion::Mmio64,
            BarPlacement::BehindBridge => region == BarRegion::Mmio64 && prefetchable,
        };
        match region {
            BarRegion::Io => match self.io.as_mut() {
                Some(io) => from(io),
                None => Err(PciError::Allocation("no I/O window".into())),
            },
            _ if use64 => match self.mmio64.as_mut().map(from) {
                Some(Ok(addr)) => Ok(addr),
                _ => from32(self.mmio32.as_mut()),
            },
            _ => from32(self.mmio32.as_mut()),
        }
    }

    /// Free a range returned by [`BarAllocator::allocate`].
    pub fn free(&mut self, region: BarRegion, addr: u64, size: u64) -> Result<(), PciError> {
        if size == 0 {
            return Err(PciError::Allocation("zero-sized range".into()));
        }
        let (len, _) = Self::footprint(region, size);
        let end = addr
            .checked_add(len - 1)
            .ok_or_else(|| PciError::Allocation("range overflow".into()))?;
        let range = RangeInclusive::new(addr, end).map_err(alloc_err)?;
        let pool = match region {
            BarRegion::Io => self.io.as_mut(),
            _ => [self.mmio64.as_mut(), self.mmio32.as_mut()]
                .into_iter()
                .flatten()
                .find(|a| a.base() <= addr && end <= a.end()),
        }
        .ok_or_else(|| PciError::Allocation(format!("{addr:#x} is in no window")))?;
        pool.free(&range).map_err(alloc_err)
    }

    /// Allocate and program every BAR of `dev` (largest first). On failure nothing stays
    /// allocated.
    pub fn place_device(
        &mut self,
        dev: &mut dyn PciDevice,
    ) -> Result<Vec<BarAssignment>, PciError> {
        let mut bars = dev.bars();
        bars.sort_by_key(|b| std::cmp::Reverse(b.size));
        let mut done: Vec<BarAssignment> = Vec::new();
        for bar in bars {
            let res = self
                .allocate_bar(bar.region, bar.prefetchable, bar.size)
                .and_then(|addr| dev.set_bar_address(bar.index, addr).map(|_| addr));
            match res {
                Ok(addr) => done.push(BarAssignment {
                    index: bar.index,
                    region: bar.region,
                    prefetchable: bar.prefetchable,
                    addr,
                    size: bar.size,
                }),
                Err(e) => {
                    self.release(&done);
                    return Err(e);
                }
            }
        }
        done.sort_by_key(|b| b.index);
        Ok(done)
    }

    /// Free BARs placed by [`BarAllocator::place_device`].
    pub fn release(&mut self, bars: &[BarAssignment]) {
        for b in bars {
            if let Err(e) = self.free(b.region, b.addr, b.size) {
                log::warn!("failed to free BAR {} at {:#x}: {e}", b.index, b.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_optional_windows_are_absent() {
        // Ports with io-reserve may take the whole host I/O window: the root
        // bus has no I/O space then (it was an allocator underflow).
        let mut a = BarAllocator::new(
            Some((0x2000, 0)),
            (0xc000_0000, 0x1000_0000),
            Some((0x100_0000_0000, 0)),
        )
        .unwrap();
        assert!(a.allocate(BarRegion::Io, 0x20).is_err());
        assert_eq!(a.allocate(BarRegion::Mmio64, 0x4000).unwrap(), 0xc000_0000);
    }

    #[test]
    fn aligned_allocation_and_free() {
        let mut a = BarAllocator::new(
            Some((0xc000, 0x1000)),
            (0xc000_0000, 0x1000_0000),
            Some((0x100_0000_0000, 0x10_0000_0000)),
        )
        .unwrap();
        let m1 = a.allocate(BarRegion::Mmio32, 0x100).unwrap();
        assert_eq!(m1, 0xc000_0000);
        // Sub-page BARs still take a whole page.
        let m2 = a.allocate(BarRegion::Mmio32, 0x1_0000).unwrap();
        assert_eq!(m2 % 0x1_0000, 0);
        assert!(m2 >= m1 + 0x1000);
        let big = a.allocate(BarRegion::Mmio64, 0x1_0000_0000).unwrap();
        assert_eq!(big % 0x1_0000_0000, 0);
        assert!(big >= 0x100_0000_0000);
        let io1 = a.allocate(BarRegion::Io, 0x20).unwrap();
        let io2 = a.allocate(BarRegion::Io, 0x40).unwrap();
        assert_eq!(io1 % 0x20, 0);
        assert_eq!(io2 % 0x40, 0);
        assert_ne!(io1, io2);
        a.free(BarRegion::Mmio32, m1, 0x100).unwrap();
        assert_eq!(a.allocate(BarRegion::Mmio32, 0x1000).unwrap(), m1);
        a.free(BarRegion::Mmio64, big, 0x1_0000_0000).unwrap();
        assert!(a.free(BarRegion::Mmio64, big, 0x1_0000_0000).is_err());
        assert!(a.allocate(BarRegion::Mmio32, 3).is_err());
        assert!(a.free(BarRegion::Io, 0xc000, 0).is_err());
        assert!(a.free(BarRegion::Mmio32, u64::MAX, 0x1000).is_err());
        assert!(a.allocate(BarRegion::Mmio32, 0x2000_0000).is_err());
    }

    #[test]
    fn behind_bridge_placement() {
        let mem = (0xc000_0000, 0x10_0000);
        let pref = (0x1_0000_0000, 0x100_0000);
        let mut a = BarAllocator::behind_bridge(None, Some(mem), Some(pref)).unwrap();
        assert_eq!(a.placement(), BarPlacement::BehindBridge);
        let in_mem = |x: u64| (mem.0..mem.0 + mem.1).contains(&x);
        let in_pref = |x: u64| (pref.0..pref.0 + pref.1).contains(&x);
        // Non-prefetchable 64-bit BARs go through the non-prefetchable (32-bit) window.
        assert!(in_mem(
            a.allocate_bar(BarRegion::Mmio64, false, 0x4000).unwrap()
        ));
        assert!(in_mem(a.allocate(BarRegion::Mmio64, 0x4000).unwrap()));
        // Prefetchable 64-bit BARs go to the prefetchable window.
        assert!(in_pref(
            a.allocate_bar(BarRegion::Mmio64, true, 0x10_0000).unwrap()
        ));
        // 32-bit BARs stay below 4 GiB even when prefetchable.
        assert!(in_mem(
            a.allocate_bar(BarRegion::Mmio32, true, 0x1000).unwrap()
        ));
        // Prefetchable falls back to the non-prefetchable window when full.
        let mut f = BarAllocator::behind_bridge(None, Some(mem), Some((pref.0, 0x1000))).unwrap();
        assert!(in_pref(
            f.allocate_bar(BarRegion::Mmio64, true, 0x1000).unwrap()
        ));
        assert!(in_mem(
            f.allocate_bar(BarRegion::Mmio64, true, 0x1000).unwrap()
        ));
        assert!(a.allocate_bar(BarRegion::Mmio64, true, 0x100_0000).is_err());
        assert!(a.allocate(BarRegion::Io, 0x10).is_err());
        // Windows can be absent.
        let mut none = BarAllocator::behind_bridge(None, None, Some((0, 0))).unwrap();
        assert!(none.allocate(BarRegion::Mmio32, 0x1000).is_err());
        assert!(none.allocate_bar(BarRegion::Mmio64, true, 0x1000).is_err());
        assert!(BarAllocator::behind_bridge(None, Some((0xfff0_0000, 0x20_0000)), None).is_err());
        // The root-bus rules are unchanged: 64-bit BARs go high whatever prefetchability.
        let mut r = BarAllocator::new(None, mem, Some(pref)).unwrap();
        assert_eq!(r.placement(), BarPlacement::RootBus);
        assert!(in_pref(
            r.allocate_bar(BarRegion::Mmio64, false, 0x1000).unwrap()
        ));
    }

    #[test]
    fn place_device_behind_bridge_follows_prefetchability() {
        use crate::bar::PciBarConfig;
        use crate::config::{PciConfigParams, PciConfiguration};
        use crate::device::{BarInfo, ConfigWriteOutcome};

        struct Dev(PciConfiguration);
        impl PciDevice for Dev {
            fn read_config_register(&mut self, r: usize) -> u32 {
                self.0.read_config_register(r)
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
            fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
                self
            }
        }
        let mut c = PciConfiguration::new(PciConfigParams::device(1, 2, 0));
        c.add_bar(PciBarConfig::new(0, 0x4000, BarRegion::Mmio64, false).unwrap())
            .unwrap();
        c.add_bar(PciBarConfig::new(2, 0x10_0000, BarRegion::Mmio64, true).unwrap())
            .unwrap();
        let mut d = Dev(c);
        let mut a = BarAllocator::behind_bridge(
            None,
            Some((0xc010_0000, 0x10_0000)),
            Some((0x2_0000_0000, 0x20_0000)),
        )
        .unwrap();
        let placed = a.place_device(&mut d).unwrap();
        assert_eq!(placed.len(), 2);
        assert_eq!(placed[0].addr, 0xc010_0000);
        assert_eq!(placed[1].addr, 0x2_0000_0000);
        a.release(&placed);
        assert_eq!(
            a.allocate(BarRegion::Mmio32, 0x10_0000).unwrap(),
            0xc010_0000
        );
    }

    #[test]
    fn mmio64_falls_back_to_32bit_window() {
        let mut a = BarAllocator::new(None, (0xe000_0000, 0x100_0000), None).unwrap();
        let addr = a.allocate(BarRegion::Mmio64, 0x4000).unwrap();
        assert!((0xe000_0000..0xe100_0000).contains(&addr));
        assert!(a.allocate(BarRegion::Io, 0x10).is_err());
        assert!(BarAllocator::new(None, (0xffff_0000, 0x2_0000), None).is_err());
    }
}

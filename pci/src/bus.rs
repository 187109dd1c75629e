//! Bus topology and configuration-cycle routing.
//!
//! A [`PciBus`] holds up to 256 functions (32 slots x 8 functions) keyed by devfn. A function
//! that is a bridge ([`PciDevice::is_bridge`]) owns a child [`PciBus`]. The bus number of a
//! child is not stored: it is whatever the guest programmed into the bridge's secondary bus
//! register, so routing a configuration access to bus N walks down from bus 0 into the bridge
//! whose secondary..=subordinate range covers N (like hardware). Devices are attached by
//! [`PciPath`] (slots from the root bus), which is stable whatever the guest's numbering.
//!
//! [`PciRoot`] is the single segment (domain 0000) with its root bus 0; the ECAM and CF8/CFC
//! front ends ([`crate::ecam`], [`crate::config_io`]) call [`PciRoot::config_read`] and
//! [`PciRoot::config_write`]. Reads of absent functions return all-ones, writes to them are
//! dropped.
//!
//! Functions 1-7 of a slot without function 0 are *staged*: attached, but absent to the guest
//! (reads all-ones, writes dropped), as on hardware where software finds the other functions
//! only through function 0. Once function 0 is attached they appear, and function 0's header
//! type reports the multifunction bit (bit 7).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::config::HEADER_TYPE_REG;
use crate::device::{ConfigWriteOutcome, PciDevice};
use crate::host_bridge::HostBridge;
use crate::path::{PciPath, PciSlot};
use crate::PciError;

/// A device shared between the bus and the VMM.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Number of slots (devices) on a bus.
pub const NUM_SLOTS: u8 = 32;
/// Number of functions per slot.
pub const NUM_FUNCTIONS: u8 = 8;
const BRIDGE_BUS_REG: usize = 6;

/// Bus / device / function address (domain 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciBdf {
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..32.
    pub device: u8,
    /// Function number, 0..8.
    pub function: u8,
}

impl PciBdf {
    /// Build a BDF, checking device < 32 and function < 8.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, PciError> {
        if device >= NUM_SLOTS || function >= NUM_FUNCTIONS {
            return Err(PciError::InvalidDeviceFunction { device, function });
        }
        Ok(PciBdf {
            bus,
            device,
            function,
        })
    }

    /// Build from a bus number and a devfn byte.
    pub fn from_devfn(bus: u8, devfn: u8) -> Self {
        PciBdf {
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }

    /// The devfn byte (device << 3 | function).
    pub fn devfn(&self) -> u8 {
        (self.device << 3) | self.function
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciBdf {
    type Err = PciError;

    /// Parses `DDDD:BB:SS.F` (domain must be 0) or `BB:SS.F`, hex.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PciError::BadBdf(s.to_string());
        let hex = |t: &str, max_len: usize| -> Result<u32, PciError> {
            if t.is_empty() || t.len() > max_len || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16).map_err(|_| bad())
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (bus, rest) = match parts.as_slice() {
            [dom, bus, rest] => {
                if hex(dom, 4)? != 0 {
                    return Err(bad());
                }
                (*bus, *rest)
            }
            [bus, rest] => (*bus, *rest),
            _ => return Err(bad()),
        };
        let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
        let bus = hex(bus, 2)?;
        let dev = hex(dev, 2)?;
        let func = hex(func, 1)?;
        PciBdf::new(bus as u8, dev as u8, func as u8)
    }
}

/// One bus: functions keyed by devfn, and the child bus of each bridge function.
#[derive(Default)]
pub struct PciBus {
    devices: BTreeMap<u8, SharedPciDevice>,
    children: BTreeMap<u8, PciBus>,
}

impl fmt::Debug for PciBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciBus")
            .field("devfns", &self.devices.keys().collect::<Vec<_>>())
            .field("children", &self.children)
            .finish()
    }
}

impl PciBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attach `dev` at `device.function`. A bridge gets an (empty) child bus.
    pub fn add_device(
        &mut self,
        device: u8,
        function: u8,
        dev: SharedPciDevice,
    ) -> Result<(), PciError> {
        let bdf = PciBdf::new(0, device, function)?;
        let devfn = bdf.devfn();
        if self.devices.contains_key(&devfn) {
            return Err(PciError::SlotOccupied(bdf));
        }
        let is_bridge = dev.lock().unwrap_or_else(|e| e.into_inner()).is_bridge();
        if is_bridge {
            self.children.insert(devfn, PciBus::new());
        }
        self.devices.insert(devfn, dev);
        Ok(())
    }

    /// Detach the function at `device.function` (and the subtree below it, for a bridge).
    pub fn remove_device(&mut self, device: u8, function: u8) -> Option<SharedPciDevice> {
        let devfn = PciBdf::new(0, device, function).ok()?.devfn();
        self.children.remove(&devfn);
        self.devices.remove(&devfn)
    }

    /// The function at `devfn`.
    pub fn device(&self, devfn: u8) -> Option<&SharedPciDevice> {
        self.devices.get(&devfn)
    }

    /// The function at `devfn` as the guest sees it: `None` for a staged function (one of
    /// 1-7 in a slot without function 0).
    pub fn visible_device(&self, devfn: u8) -> Option<&SharedPciDevice> {
        if devfn & 7 != 0 && !self.devices.contains_key(&(devfn & !7)) {
            return None;
        }
        self.devices.get(&devfn)
    }

    /// The child bus of the bridge at `devfn`.
    pub fn child_bus(&self, devfn: u8) -> Option<&PciBus> {
        self.children.get(&devfn)
    }

    /// Mutable child bus of the bridge at `devfn`.
    pub fn child_bus_mut(&mut self, devfn: u8) -> Option<&mut PciBus> {
        self.children.get_mut(&devfn)
    }

    /// All functions on this bus as (devfn, device).
    pub fn devices(&self) -> impl Iterator<Item = (u8, &SharedPciDevice)> {
        self.devices.iter().map(|(k, v)| (*k, v))
    }

    /// First slot at or after `first` with no function attached.
    pub fn free_slot(&self, first: u8) -> Option<u8> {
        (first..NUM_SLOTS)
            .find(|s| !(0..NUM_FUNCTIONS).any(|f| self.devices.contains_key(&((s << 3) | f))))
    }

    fn slot_is_multifunction(&self, device: u8) -> bool {
        (1..NUM_FUNCTIONS).any(|f| self.devices.contains_key(&((device << 3) | f)))
    }

    /// Secondary and subordinate bus numbers programmed in the bridge at `devfn`.
    fn bridge_range(&self, devfn: u8) -> Option<(u8, u8)> {
        let dev = self.devices.get(&devfn)?;
        let r = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_config_register(BRIDGE_BUS_REG);
        Some(((r >> 8) as u8, (r >> 16) as u8))
    }

    /// Find the bus numbered `target`, this bus being numbered `number`.
    fn route(&self, number: u8, target: u8) -> Option<&PciBus> {
        if target == number {
            return Some(self);
        }
        for devfn in self.children.keys() {
            let Some((sec, sub)) = self.bridge_range(*devfn) else {
                continue;
            };
            // Bus numbers strictly increase going down, which also bounds the recursion
            // whatever the guest programs.
            if sec > number && sec <= target && target <= sub {
                return self.children.get(devfn)?.route(sec, target);
            }
        }
        None
    }
}

/// Result of a configuration write that reached a device.
pub struct ConfigWriteResult {
    /// The function written.
    pub bdf: PciBdf,
    /// The device, for the VMM to follow BAR changes.
    pub device: SharedPciDevice,
    /// What changed.
    pub outcome: ConfigWriteOutcome,
}

impl fmt::Debug for ConfigWriteResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigWriteResult")
            .field("bdf", &self.bdf)
            .field("outcome", &self.outcome)
            .finish()
    }
}

/// PCI segment 0 with its root bus.
#[derive(Debug, Default)]
pub struct PciRoot {
    bus: PciBus,
}

impl PciRoot {
    /// An empty root bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// A root bus with a [`HostBridge`] at 00:00.0.
    pub fn with_host_bridge() -> Self {
        let mut root = Self::new();
        let hb: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        // Slot 0 of an empty bus is always free.
        let _ = root.bus.add_device(0, 0, hb);
        root
    }

    /// The root bus.
    pub fn root_bus(&self) -> &PciBus {
        &self.bus
    }

    /// First free slot on bus 0 at or after 1 (slot 0 holds the host bridge).
    pub fn free_root_slot(&self) -> Option<u8> {
        self.bus.free_slot(1)
    }

    /// Attach `dev` at `device.function` of bus 0; returns its BDF.
    pub fn add_root_device(
        &mut self,
        device: u8,
        function: u8,
        dev: SharedPciDevice,
    ) -> Result<PciBdf, PciError> {
        self.bus.add_device(device, function, dev)?;
        PciBdf::new(0, device, function)
    }

    fn bus_for_path_mut(&mut self, path: &PciPath) -> Result<&mut PciBus, PciError> {
        let mut bus = &mut self.bus;
        for (i, s) in path.parents().iter().enumerate() {
            bus = bus.child_bus_mut(s.devfn()).ok_or_else(|| {
                PciError::NotABridge(PciPath::from_slots(path.slots()[..=i].to_vec()).to_string())
            })?;
        }
        Ok(bus)
    }

    fn bus_for_path(&self, path: &PciPath) -> Result<&PciBus, PciError> {
        let mut bus = &self.bus;
        for (i, s) in path.parents().iter().enumerate() {
            bus = bus.child_bus(s.devfn()).ok_or_else(|| {
                PciError::NotABridge(PciPath::from_slots(path.slots()[..=i].to_vec()).to_string())
            })?;
        }
        Ok(bus)
    }

    /// Attach `dev` at `path`: every element but the last must be a bridge already attached.
    pub fn add_device(&mut self, path: &PciPath, dev: SharedPciDevice) -> Result<(), PciError> {
        let last: PciSlot = path.last();
        self.bus_for_path_mut(path)?
            .add_device(last.slot, last.function, dev)
    }

    /// Detach the function at `path` (with everything below it, for a bridge).
    pub fn remove_device(&mut self, path: &PciPath) -> Result<SharedPciDevice, PciError> {
        let last = path.last();
        self.bus_for_path_mut(path)?
            .remove_device(last.slot, last.function)
            .ok_or_else(|| PciError::NoDevice(path.to_string()))
    }

    /// The function at `path`.
    pub fn device_at_path(&self, path: &PciPath) -> Option<SharedPciDevice> {
        self.bus_for_path(path)
            .ok()?
            .device(path.last().devfn())
            .cloned()
    }

    /// The BDF the guest currently sees for `path` (depends on the bridges' programmed
    /// secondary bus numbers); `None` if a bridge on the way is unconfigured.
    pub fn bdf_of_path(&self, path: &PciPath) -> Option<PciBdf> {
        let mut bus = &self.bus;
        let mut number = 0u8;
        for s in path.parents() {
            let (sec, _) = bus.bridge_range(s.devfn())?;
            if sec <= number {
                return None;
            }
            bus = bus.child_bus(s.devfn())?;
            number = sec;
        }
        bus.device(path.last().devfn())?;
        let l = path.last();
        PciBdf::new(number, l.slot, l.function).ok()
    }

    /// The function the guest addresses as `bdf` (`None` for a staged function, which the
    /// guest cannot address).
    pub fn device(&self, bdf: PciBdf) -> Option<SharedPciDevice> {
        self.bus
            .route(0, bdf.bus)?
            .visible_device(bdf.devfn())
            .cloned()
    }

    /// Configuration read of `data.len()` (1, 2 or 4) bytes at byte `offset` (0..4096) of
    /// `bdf`. Absent functions and malformed accesses read as all-ones.
    pub fn config_read(&self, bdf: PciBdf, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        let len = data.len();
        let byte = usize::from(offset % 4);
        if !matches!(len, 1 | 2 | 4) || byte + len > 4 || offset >= 4096 {
            return;
        }
        let Some(bus) = self.bus.route(0, bdf.bus) else {
            return;
        };
        let Some(dev) = bus.visible_device(bdf.devfn()) else {
            return;
        };
        let reg = usize::from(offset / 4);
        let mut value = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_config_register(reg);
        if reg == HEADER_TYPE_REG && bdf.function == 0 && bus.slot_is_multifunction(bdf.device) {
            value |= 0x80 << 16;
        }
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[byte..byte + len]);
    }

    /// Configuration write of `data` (1, 2 or 4 bytes) at byte `offset` of `bdf`. Returns
    /// `None` if no function is there (the write is dropped) or the access is malformed.
    pub fn config_write(&self, bdf: PciBdf, offset: u16, data: &[u8]) -> Option<ConfigWriteResult> {
        let len = data.len();
        if !matches!(len, 1 | 2 | 4) || usize::from(offset % 4) + len > 4 || offset >= 4096 {
            return None;
        }
        let dev = self.device(bdf)?;
        let outcome = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_config_register(usize::from(offset / 4), u64::from(offset % 4), data);
        Some(ConfigWriteResult {
            bdf,
            device: dev,
            outcome,
        })
    }

    /// Every attached function with its path.
    pub fn devices(&self) -> Vec<(PciPath, SharedPciDevice)> {
        fn walk(bus: &PciBus, prefix: &[PciSlot], out: &mut Vec<(PciPath, SharedPciDevice)>) {
            for (devfn, dev) in bus.devices() {
                let mut slots = prefix.to_vec();
                slots.push(PciSlot::from_devfn(devfn));
                if let Some(child) = bus.child_bus(devfn) {
                    walk(child, &slots, out);
                }
                out.push((PciPath::from_slots(slots), dev.clone()));
            }
        }
        let mut out = Vec::new();
        walk(&self.bus, &[], &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::{parse_bridge_map, resolve_with_bridge_map};
    use crate::port::{PciePort, PciePortKind, PciePortParams};

    fn endpoint() -> SharedPciDevice {
        Arc::new(Mutex::new(HostBridge::new()))
    }

    fn bridge() -> SharedPciDevice {
        Arc::new(Mutex::new(
            PciePort::new(PciePortParams::new(PciePortKind::RootPort), None).unwrap(),
        ))
    }

    fn p(s: &str) -> PciPath {
        s.parse().unwrap()
    }

    fn bdf(s: &str) -> PciBdf {
        s.parse().unwrap()
    }

    fn vendor(root: &PciRoot, b: &str) -> u16 {
        let mut d = [0u8; 2];
        root.config_read(bdf(b), 0, &mut d);
        u16::from_le_bytes(d)
    }

    fn set_buses(root: &PciRoot, b: &str, pri: u8, sec: u8, sub: u8) {
        let r = root
            .config_write(bdf(b), 0x18, &[pri, sec, sub, 0])
            .expect("bridge present");
        assert!(r.outcome.bus_numbers_changed);
    }

    #[test]
    fn bdf_parse_and_display() {
        assert_eq!(bdf("00:1f.7"), PciBdf::new(0, 0x1f, 7).unwrap());
        assert_eq!(bdf("0000:0a:01.2").to_string(), "0000:0a:01.2");
        assert!("0001:00:00.0".parse::<PciBdf>().is_err());
        assert!("00:20.0".parse::<PciBdf>().is_err());
        assert!("00:01.8".parse::<PciBdf>().is_err());
        assert!("00:01".parse::<PciBdf>().is_err());
        assert!("x0:01.0".parse::<PciBdf>().is_err());
        assert!(PciBdf::new(0, 32, 0).is_err());
        assert_eq!(PciBdf::from_devfn(3, 0x21).to_string(), "0000:03:04.1");
    }

    #[test]
    fn root_bus_devices_and_unknown_bdfs() {
        let mut root = PciRoot::with_host_bridge();
        assert_eq!(root.free_root_slot(), Some(1));
        root.add_root_device(3, 0, endpoint()).unwrap();
        assert!(matches!(
            root.add_root_device(3, 0, endpoint()),
            Err(PciError::SlotOccupied(_))
        ));
        assert!(root.add_root_device(32, 0, endpoint()).is_err());
        assert_eq!(vendor(&root, "00:03.0"), 0x8086);
        assert_eq!(vendor(&root, "00:04.0"), 0xffff);
        assert_eq!(vendor(&root, "05:00.0"), 0xffff);
        let mut d = [0u8; 4];
        root.config_read(bdf("00:03.0"), 0x1000, &mut d);
        assert_eq!(d, [0xff; 4]);
        root.config_read(bdf("00:03.0"), 1, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(root.config_write(bdf("00:04.0"), 4, &[2, 0]).is_none());
        assert!(root.config_write(bdf("00:03.0"), 3, &[2, 0]).is_none());

        // Multi-function: function 0 reports the bit once another function exists.
        let ht = |root: &PciRoot| {
            let mut b = [0u8; 1];
            root.config_read(bdf("00:03.0"), 0x0e, &mut b);
            b[0]
        };
        assert_eq!(ht(&root), 0x00);
        root.add_device(&p("03.4"), endpoint()).unwrap();
        assert_eq!(ht(&root), 0x80);
        assert_eq!(root.free_root_slot(), Some(1));
        root.add_root_device(1, 0, endpoint()).unwrap();
        assert_eq!(root.free_root_slot(), Some(2));
        root.remove_device(&p("03.4")).unwrap();
        assert_eq!(ht(&root), 0x00);
        assert!(root.remove_device(&p("03.4")).is_err());
        assert_eq!(root.devices().len(), 3);
    }

    #[test]
    fn staged_functions_are_invisible_until_function_0() {
        let mut root = PciRoot::with_host_bridge();
        root.add_device(&p("02"), bridge()).unwrap();
        set_buses(&root, "00:02.0", 0, 1, 1);
        let header = |root: &PciRoot, b: &str| {
            let mut d = [0u8; 4];
            root.config_read(bdf(b), 0x0c, &mut d);
            d[2]
        };
        // Functions 1, 2 and 3 staged below the port and on the root bus.
        for f in 1..4u8 {
            root.add_device(&p(&format!("02/00.{f}")), endpoint())
                .unwrap();
            root.add_device(&p(&format!("05.{f}")), endpoint()).unwrap();
        }
        for b in ["01:00.1", "01:00.2", "01:00.3", "00:05.1", "00:05.3"] {
            assert_eq!(vendor(&root, b), 0xffff, "{b}");
            let mut d = [0u8; 4];
            root.config_read(bdf(b), 0x0c, &mut d);
            assert_eq!(d, [0xff; 4], "{b}");
            // Writes are dropped.
            assert!(root.config_write(bdf(b), 0x3c, &[9]).is_none(), "{b}");
            assert!(root.device(bdf(b)).is_none());
        }
        assert_eq!(vendor(&root, "01:00.0"), 0xffff);
        // They are attached all the same.
        assert!(root.device_at_path(&p("02/00.2")).is_some());
        assert_eq!(root.bdf_of_path(&p("02/00.2")), Some(bdf("01:00.2")));
        // Function 0 commits the slot: everything appears, with the multifunction bit.
        root.add_device(&p("02/00"), endpoint()).unwrap();
        for b in ["01:00.0", "01:00.1", "01:00.2", "01:00.3"] {
            assert_eq!(vendor(&root, b), 0x8086, "{b}");
        }
        assert_eq!(vendor(&root, "01:00.4"), 0xffff);
        assert_eq!(header(&root, "01:00.0") & 0x80, 0x80);
        assert_eq!(header(&root, "01:00.1") & 0x80, 0);
        assert!(root.config_write(bdf("01:00.2"), 0x3c, &[9]).is_some());
        // The root-bus slot is still staged.
        assert_eq!(vendor(&root, "00:05.2"), 0xffff);
        // A single function 0 has no multifunction bit.
        root.add_device(&p("06"), endpoint()).unwrap();
        assert_eq!(header(&root, "00:06.0") & 0x80, 0);
        // Removing function 0 hides the others again.
        root.remove_device(&p("02/00")).unwrap();
        assert_eq!(vendor(&root, "01:00.1"), 0xffff);
    }

    #[test]
    fn routing_through_three_levels_of_bridges() {
        let mut root = PciRoot::with_host_bridge();
        root.add_device(&p("02"), bridge()).unwrap();
        root.add_device(&p("02/00"), bridge()).unwrap();
        root.add_device(&p("02/00/03"), bridge()).unwrap();
        root.add_device(&p("02/00/05"), endpoint()).unwrap();
        root.add_device(&p("02/00/03/1f.2"), endpoint()).unwrap();
        root.add_device(&p("02/00/03/1f"), endpoint()).unwrap();
        root.add_device(&p("02/01"), endpoint()).unwrap();
        assert!(matches!(
            root.add_device(&p("02/01/00"), endpoint()),
            Err(PciError::NotABridge(_))
        ));
        assert!(matches!(
            root.add_device(&p("07/00"), endpoint()),
            Err(PciError::NotABridge(_))
        ));

        // Unprogrammed bridges forward nothing.
        assert_eq!(vendor(&root, "01:00.0"), 0xffff);
        assert_eq!(root.bdf_of_path(&p("02/00")), None);
        assert_eq!(vendor(&root, "00:02.0"), 0x1b36);

        set_buses(&root, "00:02.0", 0, 1, 3);
        set_buses(&root, "01:00.0", 1, 2, 3);
        set_buses(&root, "02:03.0", 2, 3, 3);
        assert_eq!(vendor(&root, "01:00.0"), 0x1b36);
        assert_eq!(vendor(&root, "01:01.0"), 0x8086);
        assert_eq!(vendor(&root, "02:05.0"), 0x8086);
        assert_eq!(vendor(&root, "03:1f.2"), 0x8086);
        assert_eq!(vendor(&root, "03:1f.1"), 0xffff);
        assert_eq!(vendor(&root, "04:00.0"), 0xffff);
        assert_eq!(root.bdf_of_path(&p("02/00/03/1f.2")), Some(bdf("03:1f.2")));
        assert_eq!(root.bdf_of_path(&p("02/00/05")), Some(bdf("02:05.0")));
        assert_eq!(root.bdf_of_path(&p("02/00/06")), None);

        // The same answer from the kernel-log resolver.
        let log = "pci 0000:00:02.0: PCI bridge to [bus 01-03]\n\
                   pci 0000:01:00.0: PCI bridge to [bus 02-03]\n\
                   pci 0000:02:03.0: PCI bridge to [bus 03]\n";
        let map = parse_bridge_map(log);
        for path in ["02/00/03/1f.2", "02/00/05", "02/01"] {
            assert_eq!(
                Some(resolve_with_bridge_map(&p(path), &map).unwrap()),
                root.bdf_of_path(&p(path))
            );
        }

        // Config writes route to the right function and report the device.
        let r = root.config_write(bdf("03:1f.2"), 0x3c, &[9]).unwrap();
        assert_eq!(r.bdf, bdf("03:1f.2"));
        let dev = root.device_at_path(&p("02/00/03/1f.2")).unwrap();
        assert!(Arc::ptr_eq(&r.device, &dev));

        // Renumbering moves the subtree.
        set_buses(&root, "00:02.0", 0, 8, 10);
        set_buses(&root, "08:00.0", 8, 9, 10);
        set_buses(&root, "09:03.0", 9, 10, 10);
        assert_eq!(vendor(&root, "03:1f.2"), 0xffff);
        assert_eq!(vendor(&root, "0a:1f.2"), 0x8086);

        // Hostile programming: secondary not above the parent bus, or a loop, is not
        // followed (and does not recurse forever).
        set_buses(&root, "00:02.0", 0, 0, 0xff);
        assert_eq!(vendor(&root, "08:00.0"), 0xffff);
        set_buses(&root, "00:02.0", 0, 8, 0xff);
        set_buses(&root, "08:00.0", 8, 8, 0xff);
        assert_eq!(vendor(&root, "09:03.0"), 0xffff);
        assert_eq!(vendor(&root, "08:00.0"), 0x1b36);

        // Removing a bridge removes its subtree.
        root.remove_device(&p("02/00")).unwrap();
        assert!(root.device_at_path(&p("02/00/03/1f.2")).is_none());
        assert!(root.device_at_path(&p("02/01")).is_some());
    }
}

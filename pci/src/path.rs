//! [`PciPath`]: where a device sits in the PCI tree, as the list of slots from the root bus.
//!
//! The textual form extends the Kata Containers format with functions: each element is a
//! 1-2 digit hex slot (printed as two digits), optionally followed by `.F` (one digit 0-7,
//! printed only when not 0), elements separated by `/`. `03` is slot 3 on bus 0, `04/00` is
//! slot 0 behind the bridge at slot 4, `04/00.3` its function 3. Every element but the last
//! names a bridge.
//!
//! A path is independent of the bus numbers the guest assigns. Two resolvers map it to what
//! the guest sees: [`resolve_sysfs`] walks a `/sys/bus/pci/devices` tree (reading each bridge's
//! secondary bus), and [`resolve_with_bridge_map`] uses a bridge -> secondary bus map, which
//! [`parse_bridge_map`] extracts from guest kernel log lines such as
//! `pci 0000:00:02.0: PCI bridge to [bus 01]`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::bus::{PciBdf, NUM_FUNCTIONS, NUM_SLOTS};

/// Maximum number of elements in a path (one per bus level).
pub const MAX_PATH_DEPTH: usize = 256;

/// One element of a [`PciPath`]: slot and function on a bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciSlot {
    /// Slot (device) number, 0..=0x1f.
    pub slot: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl PciSlot {
    /// Build, checking the ranges.
    pub fn new(slot: u8, function: u8) -> Result<Self, PciPathError> {
        if slot >= NUM_SLOTS {
            return Err(PciPathError::SlotOutOfRange(u32::from(slot)));
        }
        if function >= NUM_FUNCTIONS {
            return Err(PciPathError::FunctionOutOfRange(u32::from(function)));
        }
        Ok(PciSlot { slot, function })
    }

    /// From a devfn byte.
    pub fn from_devfn(devfn: u8) -> Self {
        PciSlot {
            slot: devfn >> 3,
            function: devfn & 7,
        }
    }

    /// The devfn byte.
    pub fn devfn(&self) -> u8 {
        (self.slot << 3) | (self.function & 7)
    }
}

impl fmt::Display for PciSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}", self.slot)?;
        if self.function != 0 {
            write!(f, ".{:x}", self.function)?;
        }
        Ok(())
    }
}

/// Errors parsing or resolving a [`PciPath`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciPathError {
    /// Empty string.
    #[error("empty PCI path")]
    Empty,
    /// Empty element (leading, trailing or doubled `/`).
    #[error("PCI path '{path}': element {index} is empty (leading, trailing or doubled '/')")]
    EmptyElement {
        /// The whole path.
        path: String,
        /// Element index (0-based).
        index: usize,
    },
    /// A character that is neither a hex digit nor a separator.
    #[error("PCI path '{path}': invalid character {ch:?} at position {pos} (expected hex digits, '/' between slots, '.' before a function)")]
    BadCharacter {
        /// The whole path.
        path: String,
        /// Offending character.
        ch: char,
        /// Byte position.
        pos: usize,
    },
    /// Slot with more than two hex digits.
    #[error("PCI path element '{0}': slot has more than 2 hex digits")]
    TooManyDigits(String),
    /// Slot above 0x1f.
    #[error("PCI slot {0:#x} out of range (maximum 0x1f)")]
    SlotOutOfRange(u32),
    /// Malformed function part.
    #[error("PCI path element '{0}': function must be a single hex digit after '.'")]
    BadFunction(String),
    /// Function above 7.
    #[error("PCI function {0} out of range (maximum 7)")]
    FunctionOutOfRange(u32),
    /// More than [`MAX_PATH_DEPTH`] elements.
    #[error("PCI path has more than {MAX_PATH_DEPTH} elements")]
    TooDeep,
    /// A sysfs entry that should exist does not.
    #[error("{0} not found")]
    NotFound(PathBuf),
    /// A bridge whose secondary bus cannot be determined.
    #[error("cannot determine the secondary bus of bridge {0}")]
    NoSecondaryBus(String),
}

/// Path of slots from the root bus down to a device.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciPath {
    parents: Vec<PciSlot>,
    last: PciSlot,
}

impl PciPath {
    /// Build from a non-empty list of slots.
    pub fn new(slots: Vec<PciSlot>) -> Result<Self, PciPathError> {
        if slots.len() > MAX_PATH_DEPTH {
            return Err(PciPathError::TooDeep);
        }
        let mut parents = slots;
        let last = parents.pop().ok_or(PciPathError::Empty)?;
        Ok(PciPath { parents, last })
    }

    /// Internal constructor for lists known to be non-empty.
    pub(crate) fn from_slots(slots: Vec<PciSlot>) -> Self {
        let mut parents = slots;
        let last = parents.pop().unwrap_or_default();
        PciPath { parents, last }
    }

    /// A device on the root bus.
    pub fn root(slot: PciSlot) -> Self {
        PciPath {
            parents: Vec::new(),
            last: slot,
        }
    }

    /// The path of `slot` on the secondary bus of the bridge at `self`.
    pub fn child(&self, slot: PciSlot) -> Self {
        let mut parents = self.parents.clone();
        parents.push(self.last);
        PciPath {
            parents,
            last: slot,
        }
    }

    /// All elements, root first.
    pub fn slots(&self) -> Vec<PciSlot> {
        let mut v = self.parents.clone();
        v.push(self.last);
        v
    }

    /// The bridges leading to the device.
    pub fn parents(&self) -> &[PciSlot] {
        &self.parents
    }

    /// The device's own slot on its bus.
    pub fn last(&self) -> PciSlot {
        self.last
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.parents.len() + 1
    }

    /// Always false: a path has at least one element.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The same slot with function `function` (taken modulo 8) in the last element.
    pub fn with_function(&self, function: u8) -> Self {
        PciPath {
            parents: self.parents.clone(),
            last: PciSlot {
                slot: self.last.slot,
                function: function & 7,
            },
        }
    }

    /// Function 0 of the device's slot: the path that names the whole slot.
    pub fn slot_path(&self) -> Self {
        self.with_function(0)
    }
}

impl fmt::Display for PciPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.parents {
            write!(f, "{p}/")?;
        }
        write!(f, "{}", self.last)
    }
}

fn parse_element(elem: &str) -> Result<PciSlot, PciPathError> {
    let (slot_s, func_s) = match elem.split_once('.') {
        Some((s, f)) => (s, Some(f)),
        None => (elem, None),
    };
    if slot_s.is_empty() {
        return Err(PciPathError::BadFunction(elem.to_string()));
    }
    if slot_s.len() > 2 {
        return Err(PciPathError::TooManyDigits(elem.to_string()));
    }
    // Only hex digits reach here (checked by the caller), so parsing cannot fail.
    let slot = u32::from_str_radix(slot_s, 16)
        .map_err(|_| PciPathError::TooManyDigits(elem.to_string()))?;
    if slot >= u32::from(NUM_SLOTS) {
        return Err(PciPathError::SlotOutOfRange(slot));
    }
    let function = match func_s {
        None => 0,
        Some(f) => {
            if f.len() != 1 {
                return Err(PciPathError::BadFunction(elem.to_string()));
            }
            let v = u32::from_str_radix(f, 16)
                .map_err(|_| PciPathError::BadFunction(elem.to_string()))?;
            if v >= u32::from(NUM_FUNCTIONS) {
                return Err(PciPathError::FunctionOutOfRange(v));
            }
            v
        }
    };
    Ok(PciSlot {
        slot: slot as u8,
        function: function as u8,
    })
}

impl FromStr for PciPath {
    type Err = PciPathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PciPathError::Empty);
        }
        if let Some((pos, ch)) = s
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_hexdigit() || *c == '/' || *c == '.'))
        {
            return Err(PciPathError::BadCharacter {
                path: s.to_string(),
                ch,
                pos,
            });
        }
        let mut slots = Vec::new();
        for (index, elem) in s.split('/').enumerate() {
            if elem.is_empty() {
                return Err(PciPathError::EmptyElement {
                    path: s.to_string(),
                    index,
                });
            }
            if index >= MAX_PATH_DEPTH {
                return Err(PciPathError::TooDeep);
            }
            slots.push(parse_element(elem)?);
        }
        PciPath::new(slots)
    }
}

fn sysfs_name(bus: u8, s: PciSlot) -> String {
    format!("0000:{:02x}:{:02x}.{:x}", bus, s.slot, s.function)
}

fn secondary_bus_from_sysfs(dir: &Path) -> Option<u8> {
    if let Ok(entries) = fs::read_dir(dir.join("pci_bus")) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(bus) = name.strip_prefix("0000:") {
                if bus.len() == 2 {
                    if let Ok(b) = u8::from_str_radix(bus, 16) {
                        return Some(b);
                    }
                }
            }
        }
    }
    // The attribute is printed in decimal by the kernel.
    let s = fs::read_to_string(dir.join("secondary_bus_number")).ok()?;
    s.trim().parse::<u8>().ok()
}

/// Resolve `path` to the device directory in a guest `/sys/bus/pci/devices`-like tree
/// (`devices_dir`), starting at domain 0000 bus 00 and reading each bridge's secondary bus
/// from its `pci_bus/0000:XX` entry or its `secondary_bus_number` file.
pub fn resolve_sysfs(path: &PciPath, devices_dir: &Path) -> Result<PathBuf, PciPathError> {
    let mut bus = 0u8;
    for s in path.parents() {
        let name = sysfs_name(bus, *s);
        let dir = devices_dir.join(&name);
        if !dir.exists() {
            return Err(PciPathError::NotFound(dir));
        }
        bus = secondary_bus_from_sysfs(&dir).ok_or(PciPathError::NoSecondaryBus(name))?;
    }
    let dir = devices_dir.join(sysfs_name(bus, path.last()));
    if !dir.exists() {
        return Err(PciPathError::NotFound(dir));
    }
    Ok(dir)
}

/// Extract the bridge -> secondary bus map from guest kernel log text: every line containing
/// `<BDF>: PCI bridge to [bus XX]` or `[bus XX-YY]` (later lines win).
pub fn parse_bridge_map(log: &str) -> BTreeMap<PciBdf, u8> {
    const MARKER: &str = ": PCI bridge to [bus ";
    let mut map = BTreeMap::new();
    for line in log.lines() {
        let Some(idx) = line.find(MARKER) else {
            continue;
        };
        let Some(bdf) = line[..idx]
            .split_whitespace()
            .last()
            .and_then(|t| t.parse::<PciBdf>().ok())
        else {
            continue;
        };
        let rest = &line[idx + MARKER.len()..];
        let end = rest.find([']', '-']).unwrap_or(rest.len());
        if let Ok(sec) = u8::from_str_radix(rest[..end].trim(), 16) {
            map.insert(bdf, sec);
        }
    }
    map
}

/// Resolve `path` to the BDF the guest uses, given each bridge's secondary bus.
pub fn resolve_with_bridge_map(
    path: &PciPath,
    bridges: &BTreeMap<PciBdf, u8>,
) -> Result<PciBdf, PciPathError> {
    let mut bus = 0u8;
    for s in path.parents() {
        let bdf = PciBdf {
            bus,
            device: s.slot,
            function: s.function,
        };
        bus = *bridges
            .get(&bdf)
            .ok_or_else(|| PciPathError::NoSecondaryBus(bdf.to_string()))?;
    }
    let l = path.last();
    Ok(PciBdf {
        bus,
        device: l.slot,
        function: l.function,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    fn p(s: &str) -> PciPath {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_display_roundtrip() {
        for s in ["03", "04/00", "04/00/05", "04/00.3", "1f.7/00/1e", "00"] {
            assert_eq!(p(s).to_string(), s);
        }
        assert_eq!(p("3").to_string(), "03");
        assert_eq!(p("4/0.0").to_string(), "04/00");
        assert_eq!(p("0A/0b").to_string(), "0a/0b");
        let path = p("04/00.3");
        assert_eq!(path.len(), 2);
        assert_eq!(
            path.parents(),
            &[PciSlot {
                slot: 4,
                function: 0
            }]
        );
        assert_eq!(
            path.last(),
            PciSlot {
                slot: 0,
                function: 3
            }
        );
        assert_eq!(
            PciPath::root(PciSlot::new(4, 0).unwrap()).child(PciSlot::new(0, 3).unwrap()),
            path
        );
        // Functions: only the last element's is changed; function 0 is not printed.
        assert_eq!(path.slot_path().to_string(), "04/00");
        assert_eq!(p("04.2/00").with_function(5).to_string(), "04.2/00.5");
        assert_eq!(p("1f.7").with_function(0).to_string(), "1f");
        assert_eq!(p("1f.7").slot_path(), p("1f"));
        for f in 0..8u8 {
            let s = format!("03/1e.{f}");
            let q = p(&s);
            assert_eq!(q.last().function, f);
            assert_eq!(q.slot_path(), p("03/1e"));
            assert_eq!(p("03/1e").with_function(f), q);
            let shown = q.to_string();
            assert_eq!(shown, if f == 0 { "03/1e".to_string() } else { s });
        }
    }

    #[test]
    fn parse_rejects_bad_input() {
        use PciPathError::*;
        let err = |s: &str| s.parse::<PciPath>().unwrap_err();
        assert_eq!(err(""), Empty);
        assert!(matches!(err("/03"), EmptyElement { index: 0, .. }));
        assert!(matches!(err("03/"), EmptyElement { index: 1, .. }));
        assert!(matches!(err("03//04"), EmptyElement { index: 1, .. }));
        assert_eq!(err("003"), TooManyDigits("003".into()));
        assert_eq!(err("20"), SlotOutOfRange(0x20));
        assert_eq!(err("ff"), SlotOutOfRange(0xff));
        assert_eq!(err("03.8"), FunctionOutOfRange(8));
        assert_eq!(err("03."), BadFunction("03.".into()));
        assert_eq!(err("03.01"), BadFunction("03.01".into()));
        assert_eq!(err("03.1.2"), BadFunction("03.1.2".into()));
        assert_eq!(err(".3"), BadFunction(".3".into()));
        assert!(matches!(
            err("03:04"),
            BadCharacter {
                ch: ':',
                pos: 2,
                ..
            }
        ));
        assert!(matches!(err("03\\04"), BadCharacter { ch: '\\', .. }));
        assert!(matches!(
            err(" 03"),
            BadCharacter {
                ch: ' ',
                pos: 0,
                ..
            }
        ));
        assert!(matches!(err("+3"), BadCharacter { ch: '+', .. }));
        assert!(matches!(err("0x3"), BadCharacter { ch: 'x', .. }));
        assert!(matches!(err("03,04"), BadCharacter { ch: ',', .. }));
        let deep = vec!["00"; MAX_PATH_DEPTH + 1].join("/");
        assert_eq!(err(&deep), TooDeep);
        // Messages are descriptive.
        assert!(err("03:04").to_string().contains("'/' between slots"));
        assert!(err("20").to_string().contains("maximum 0x1f"));
    }

    /// Build a fake sysfs tree: `devices` are BDF names; `bridges` maps a BDF name to
    /// (secondary bus, use the pci_bus/ directory rather than the attribute file).
    fn fake_sysfs(devices: &[&str], bridges: &[(&str, u8, bool)]) -> TempDir {
        let t = TempDir::new().unwrap();
        for d in devices {
            fs::create_dir_all(t.as_path().join(d)).unwrap();
        }
        for (d, sec, use_dir) in bridges {
            let dir = t.as_path().join(d);
            fs::create_dir_all(&dir).unwrap();
            if *use_dir {
                fs::create_dir_all(dir.join("pci_bus").join(format!("0000:{sec:02x}"))).unwrap();
            } else {
                fs::write(dir.join("secondary_bus_number"), format!("{sec}\n")).unwrap();
            }
        }
        t
    }

    #[test]
    fn sysfs_resolution() {
        // 00:04.0 bridge -> bus 1; 01:00.0 bridge -> bus 2; 02:05.0 bridge -> bus 16
        // (decimal attribute); device 10:1e.2 three levels down.
        let t = fake_sysfs(
            &[
                "0000:00:03.0",
                "0000:01:00.3",
                "0000:02:05.0",
                "0000:10:1e.2",
            ],
            &[
                ("0000:00:04.0", 1, true),
                ("0000:01:00.0", 2, false),
                ("0000:02:06.0", 16, false),
            ],
        );
        let root = t.as_path();
        assert_eq!(
            resolve_sysfs(&p("03"), root).unwrap(),
            root.join("0000:00:03.0")
        );
        assert_eq!(
            resolve_sysfs(&p("04/00.3"), root).unwrap(),
            root.join("0000:01:00.3")
        );
        assert_eq!(
            resolve_sysfs(&p("04/00/05"), root).unwrap(),
            root.join("0000:02:05.0")
        );
        assert_eq!(
            resolve_sysfs(&p("04/00/06/1e.2"), root).unwrap(),
            root.join("0000:10:1e.2")
        );
        assert!(matches!(
            resolve_sysfs(&p("05"), root),
            Err(PciPathError::NotFound(_))
        ));
        assert!(matches!(
            resolve_sysfs(&p("07/00"), root),
            Err(PciPathError::NotFound(_))
        ));
        // 00:03.0 exists but is not a bridge.
        assert!(matches!(
            resolve_sysfs(&p("03/00"), root),
            Err(PciPathError::NoSecondaryBus(_))
        ));
    }

    #[test]
    fn kernel_log_resolution() {
        let log = "\
[    0.300000] pci 0000:00:02.0: [1b36:000c] type 01 class 0x060400 PCIe Root Port
[    0.310000] pci 0000:00:02.0: PCI bridge to [bus 01-03]
[    0.320000] pci 0000:01:00.0: PCI bridge to [bus 02-03]
[    0.330000] pci 0000:02:01.0: PCI bridge to [bus 03]
[    0.340000] pci 0000:00:1f.0: PCI bridge to [bus 0a]
[    0.350000] pci 0000:00:1f.0: PCI bridge to [bus 04]
garbage PCI bridge to [bus 05]
";
        let map = parse_bridge_map(log);
        assert_eq!(map.len(), 4);
        assert_eq!(map[&"00:1f.0".parse().unwrap()], 4);
        let r = |s: &str| resolve_with_bridge_map(&p(s), &map);
        assert_eq!(r("05").unwrap().to_string(), "0000:00:05.0");
        assert_eq!(r("02/00.1").unwrap().to_string(), "0000:01:00.1");
        assert_eq!(r("02/00/01").unwrap().to_string(), "0000:02:01.0");
        assert_eq!(r("02/00/01/07").unwrap().to_string(), "0000:03:07.0");
        assert_eq!(r("1f/00").unwrap().to_string(), "0000:04:00.0");
        assert!(matches!(r("03/00"), Err(PciPathError::NoSecondaryBus(_))));
    }
}
